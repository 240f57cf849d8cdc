"""Teacher and student: loading (local HF directories or HF configs), the body / lm_head split,
and the preflight that checks they can be distilled token by token before any heavy work."""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from tailkd_dist.config import ModelSpec

log = logging.getLogger("tailkd_dist")

# Config attributes of known non-linear maps of the logits (a soft cap), for a refusal that says
# which setting to change; any other map is found by the probe in ``hidden_scale``.
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


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


def meta_model(config) -> nn.Module:
    """The causal LM of an HF config on the meta device: real shapes, no storage, no
    initialisation cost."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


class _GivenHidden(nn.Module):
    """Stands in for a model's decoder body: returns a given final hidden state. Any other
    attribute the model's forward reads from its body is the real body's (Falcon-H1's
    ``lm_head_multiplier``), a submodule again a stand-in (OPT calls ``model.decoder``)."""

    def __init__(self, real: nn.Module, hidden: torch.Tensor):
        super().__init__()
        object.__setattr__(self, "_real", real)  # not a submodule: its meta weights stay out
        object.__setattr__(self, "_hidden", hidden)

    def forward(self, *args, **kwargs):
        return _body_output()(last_hidden_state=self._hidden)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            value = getattr(object.__getattribute__(self, "_real"), name)
            return _GivenHidden(value, self._hidden) if isinstance(value, nn.Module) else value


@functools.cache
def _body_output():
    """A body's output holding only ``last_hidden_state``; any other field a forward reads
    (cache, attentions, router logits, ...) is None, as when it was not asked for."""
    from transformers.utils import ModelOutput

    @dataclass
    class BodyOutput(ModelOutput):
        last_hidden_state: torch.Tensor | None = None

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return None

    return BodyOutput


class _Unprobed(Exception):
    """The probe could not run this model's forward (it needs more than its body's output)."""


def _probe_logits(config, *, role: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(the model's own logits, lm_head(hidden), whether the lm_head has a bias) for one probe
    hidden state: the model's forward run after its body with a small random lm_head of the
    real one's kind. ValueError: the structure itself rules the fused loss out; _Unprobed: the
    forward could not be run."""
    import copy
    import math

    try:
        # A copy: building a model may write to its config (the attention implementation),
        # and this config may be a live model's.
        model = meta_model(copy.deepcopy(config)).eval()
    except Exception as e:
        raise _Unprobed(e) from e
    body, head = body_of(model), lm_head_of(model)
    inside = {id(p) for p in body.parameters()} | {id(p) for p in head.parameters()}
    outside = [n for n, p in model.named_parameters() if id(p) not in inside]
    if outside:
        raise ValueError(
            f"the {role} ({config.model_type}) has parameters between its base model and its lm_head "
            f"({', '.join(outside[:4])}{', ...' if len(outside) > 4 else ''}): its logits are not the lm_head "
            "applied to the final hidden state, which is what the fused loss computes; distil a causal LM "
            "whose lm_head reads the decoder's output")
    d, rows = int(head.weight.shape[1]), 16
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 8, d, generator=g)
    probe = nn.Linear(d, rows, bias=getattr(head, "bias", None) is not None)
    with torch.no_grad():
        # logits of a few tens: a soft cap (tanh(x / c) * c, c ~ 30) bends them visibly
        probe.weight.normal_(0, 40 / math.sqrt(d), generator=g)
        if probe.bias is not None:
            probe.bias.normal_(0, 1, generator=g)
    parent, _, attr = next(name for name, m in model.named_modules() if m is head).rpartition(".")
    setattr(model.get_submodule(parent), attr, probe)
    setattr(model, model.base_model_prefix, _GivenHidden(body, hidden))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits
            return logits.float(), probe(hidden).float(), probe.bias is not None
    except Exception as e:
        raise _Unprobed(e) from e


_SCALES: dict[str, float] = {}
_SAID: set = set()


def hidden_scale(config, *, role: str) -> float:
    """The constant c with logits = c * lm_head(final hidden state), folded into the hidden
    states so the fused loss sees the model's logits (exact: (c h) W^T = c (h W^T); with a
    bias, the bias must be scaled too, so c != 1 with a bias is refused).

    Found by running the model's own forward after its body on a probe hidden state, not read
    from a table of config names: the same name means different maps in different families
    (``logits_scaling`` divides in Granite and multiplies in HyperCLOVA X), and a family may
    name its own (Falcon-H1's ``lm_head_multiplier``). Anything but a constant (a soft cap, a
    transform between body and head) is refused in one line. Cached per config."""
    key = f"{role}:{config.to_json_string(use_diff=False)}"
    if key in _SCALES:
        return _SCALES[key]
    for attr in _SOFTCAPS:
        cap = getattr(config, attr, None)
        if cap:
            raise ValueError(
                f"the {role} ({config.model_type}) applies {attr}={cap} to its logits, which the fused "
                f"loss cannot reproduce exactly; set {attr} to null in the {role}'s config.json (and "
                "accept slightly different logits) or distil another model"
            )
    try:
        logits, base, has_bias = _probe_logits(config, role=role)
    except _Unprobed as unprobed:  # say so, go on
        e = unprobed.__cause__
        log.warning("%s (%s): could not check that its logits are its lm_head applied to the final hidden state "
                    "(%s: %s); the fused loss assumes they are", role, config.model_type, type(e).__name__,
                    " ".join(str(e).split())[:200])
        _SCALES[key] = 1.0
        return 1.0
    if logits.shape != base.shape:
        raise ValueError(
            f"the {role} ({config.model_type}) returns logits of shape {tuple(logits.shape)} from an lm_head of "
            f"{base.shape[-1]} rows: its forward reshapes or slices them after the lm_head, which the fused "
            "loss cannot reproduce; distil another model")
    scale = float((logits * base).sum() / (base * base).sum())
    err = float((logits - scale * base).abs().max() / base.abs().max())
    if err > 1e-5:
        raise ValueError(
            f"the {role} ({config.model_type}) maps lm_head(hidden) to its logits non-linearly (a probe's "
            f"logits differ from any constant multiple by {err:.1e} of their range): the fused loss computes "
            "lm_head(hidden) and cannot reproduce them exactly; distil another model")
    if abs(scale - 1.0) <= 1e-6:
        scale = 1.0
    elif has_bias:
        raise ValueError(f"the {role} ({config.model_type}) scales its logits by {scale:.6g} and its lm_head has "
                         "a bias: folding the scale into the hidden states would leave the bias unscaled; "
                         "distil another model")
    elif (role, config.model_type, scale) not in _SAID:  # once per process, not per caller
        _SAID.add((role, config.model_type, scale))
        log.warning("%s (%s): its logits are %.6g x lm_head(hidden); the factor is folded into the hidden states",
                    role, config.model_type, scale)
    _SCALES[key] = scale
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
