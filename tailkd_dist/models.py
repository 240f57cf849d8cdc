"""Teacher and student: loading (local HF directories or HF configs), the body / lm_head split,
and the preflight that checks they can be distilled token by token before any heavy work."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from tailkd_dist.config import ModelSpec

log = logging.getLogger("tailkd_dist")

# Config attributes that change logits after the lm_head matmul. A scale is folded into the
# hidden states (exact: logits = (s * h) W^T); a soft cap is non-linear and is refused.
_LOGIT_SCALES = {"logit_scale": "multiply", "logits_scaling": "divide"}
_SOFTCAPS = ("final_logit_softcapping",)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def teacher_compute_dtype(cfg, device_type: str) -> torch.dtype:
    """The dtype of the hidden states the online teacher hands the loss: models.dtype, except
    that FSDP2 computes in float32 off CUDA (what a teacher cache must store to be exact)."""
    if cfg.engine.kind == "fsdp2" and device_type != "cuda":
        return torch.float32
    return resolve_dtype(cfg.models.dtype)


def build_model(spec: ModelSpec, *, dtype: torch.dtype, attention: str, zero3_config: dict | None = None,
                meta: bool = False):
    """An HF causal LM from a local directory, or with random weights from a config dict.

    ``zero3_config`` (a DeepSpeed ZeRO-3 config; directories only): load straight into ZeRO-3
    partitions. transformers then builds the model under ``deepspeed.zero.Init`` and copies
    each checkpoint tensor into its partitions as it reads the shards, so a rank holds its
    1/world of the parameters plus one shard file, never the whole model.

    ``meta`` (directories only): the model's structure on the meta device, no weights read
    (FSDP2's sharded load: rank 0 reads the files and sends each rank its shards)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.path is not None and meta:
        config = AutoConfig.from_pretrained(spec.path, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    if spec.path is not None:
        if zero3_config is None:
            return AutoModelForCausalLM.from_pretrained(
                spec.path, dtype=dtype, attn_implementation=attention, local_files_only=True,
                low_cpu_mem_usage=True,
            )
        from transformers.integrations import HfDeepSpeedConfig

        # transformers looks for ZeRO-3 through a weak reference to this object: it must stay
        # alive during from_pretrained, and only then (the student is built whole after it).
        alive = [HfDeepSpeedConfig(zero3_config)]
        try:
            model = AutoModelForCausalLM.from_pretrained(
                spec.path, dtype=dtype, attn_implementation=attention, local_files_only=True)
        finally:
            alive.clear()  # the last reference: ZeRO-3 loading is off again
        assert is_partitioned(model), "from_pretrained under HfDeepSpeedConfig did not partition"
        return model
    cfg = dict(spec.config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    # Same seed on every rank: every rank must start from identical weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)


def is_partitioned(module: nn.Module) -> bool:
    """Are the module's parameters ZeRO-3 partitions (made under deepspeed.zero.Init)?"""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also when ZeRO-3 has partitioned it (its ``shape`` is then [0])."""
    return getattr(p, "ds_shape", p.shape)


def body_of(model: nn.Module) -> nn.Module:
    """The decoder without its lm_head (HF's base model: LlamaModel, Qwen2Model, ...)."""
    return getattr(model, model.base_model_prefix)


def decoder_blocks(body: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, block) of every decoder block, in order: instances of HF's
    ``_no_split_modules`` classes, else the children of ``body.layers``. FSDP2 shards block by
    block (and wraps them for activation checkpointing through the parent); the hidden-state
    term hooks the blocks' outputs."""
    names = set(getattr(body, "_no_split_modules", None) or [])
    found = []
    if names:
        for parent in body.modules():
            for attr, child in parent.named_children():
                if type(child).__name__ in names:
                    found.append((parent, attr, child))
    if not found and isinstance(getattr(body, "layers", None), nn.ModuleList):
        found = [(body.layers, str(i), m) for i, m in enumerate(body.layers)]
    if not found:
        raise ValueError(f"{type(body).__name__}: cannot find its decoder blocks")
    return found


def lm_head_of(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to distil through")
    return head


def hidden_scale(config, *, role: str) -> float:
    """Factor folded into the final hidden states so the fused loss sees the model's logits."""
    for attr in _SOFTCAPS:
        cap = getattr(config, attr, None)
        if cap:
            raise ValueError(
                f"the {role} ({config.model_type}) applies {attr}={cap} to its logits, which the fused "
                f"loss cannot reproduce exactly; set {attr} to null in the {role}'s config.json (and "
                "accept slightly different logits) or distil another model"
            )
    scale = 1.0
    for attr, how in _LOGIT_SCALES.items():
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            scale = scale * value if how == "multiply" else scale / value
            log.warning("%s: %s=%s folded into the hidden states (logits scaled by %.4g)", role, attr, value, scale)
    return scale


def tokenizer_dir(spec: ModelSpec) -> str | None:
    cand = spec.tokenizer or spec.path
    if cand and any(os.path.exists(os.path.join(cand, f)) for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return cand
    return None


@dataclass
class VocabPlan:
    """What the preflight decided about the two vocabularies."""

    vocab: int  # rows of each lm_head the loss uses (the common rows)
    teacher_rows: int
    student_rows: int
    note: str = ""


def plan_vocab(teacher, student, *, teacher_spec: ModelSpec, student_spec: ModelSpec) -> VocabPlan:
    """Tokenizer/vocabulary compatibility. Padded vocabularies (e.g. 151936 vs 152064 rows over
    the same tokenizer) use the common rows and say so; anything else is refused."""
    vt, vs = full_shape(lm_head_of(teacher).weight)[0], full_shape(lm_head_of(student).weight)[0]
    tdir, sdir = tokenizer_dir(teacher_spec), tokenizer_dir(student_spec)
    n_tokens = None
    if tdir and sdir:
        from tailkd_dist.data.tokenizer import tokenizer_sha256

        if os.path.realpath(tdir) != os.path.realpath(sdir) and tokenizer_sha256(tdir) != tokenizer_sha256(sdir):
            raise ValueError(
                f"teacher tokenizer ({tdir}) and student tokenizer ({sdir}) differ: token-level "
                "distillation needs one tokenizer; give the student the teacher's tokenizer"
            )
        from transformers import AutoTokenizer

        n_tokens = len(AutoTokenizer.from_pretrained(tdir, local_files_only=True))
    if vt == vs:
        return VocabPlan(vocab=vt, teacher_rows=vt, student_rows=vs)
    common = min(vt, vs)
    if n_tokens is None:
        raise ValueError(
            f"lm_head rows differ (teacher {vt}, student {vs}) and no tokenizer directory was given "
            "to tell whether the extra rows are padding; set models.teacher.tokenizer and "
            "models.student.tokenizer"
        )
    if n_tokens > common:
        raise ValueError(
            f"lm_head rows differ (teacher {vt}, student {vs}) and the tokenizer has {n_tokens} "
            f"tokens > {common}: the smaller model cannot represent every token"
        )
    note = (f"vocabularies padded differently (teacher {vt} rows, student {vs}); the tokenizer has "
            f"{n_tokens} tokens, so the loss uses the common first {common} rows")
    log.warning(note)
    return VocabPlan(vocab=common, teacher_rows=vt, student_rows=vs, note=note)


def untie_warning(model, role: str) -> None:
    if getattr(model.config, "tie_word_embeddings", False):
        log.warning(
            "%s has tied input/output embeddings: the output rows become a vocabulary-sharded copy "
            "trained separately (untied); the exported HF model is written with "
            "tie_word_embeddings=false", role,
        )
