"""`tailkd-derive-student`: derive a student HF causal LM from its teacher, as the paper does.

    tailkd-derive-student TEACHER_DIR -o STUDENT_DIR                     # every 2nd layer
    tailkd-derive-student TEACHER_DIR -o STUDENT_DIR --every 3 --intermediate-size 4096
    tailkd-derive-student TEACHER_DIR -o STUDENT_DIR --layers 0,2,4,7 --hidden-size 1024

The student has the teacher's model_type (llama incl. Llama 3's rope scaling, qwen2 (Qwen2.5),
qwen3, mistral, phi, phi3, gemma2, gemma3_text; see `docs/models.md`), vocabulary,
tokenizer and tied-or-not embeddings, and fewer layers and optionally narrower widths. Its weights:

- layers: student layer i is initialised from teacher layer `layer_map[i]` (ascending);
- attention (q/k/v/o, Phi's dense, Phi-3's fused qkv_proj, their biases): the teacher layer's
  tensors, copied when the widths are equal, else truncated per head (see `_attention_index`);
- input embeddings and lm_head: copied, truncated to the student's hidden size (first columns);
  an lm_head bias (Phi) is copied whole;
- norms (RMSNorm/LayerNorm weights and biases; the per-head q/k norms of Phi, Qwen3 and Gemma3):
  copied, truncated to the first hidden_size (head_dim) entries;
- MLPs: random (the HF initialisation of the student config, seeded by --seed), or copied from
  the teacher layer with --copy-mlp, which needs the same hidden and intermediate sizes.

Layer choice: `--layers 0,2,4` keeps exactly those teacher layers. `--every N` (default 2) keeps
ceil(L / N) layers evenly spaced from the first to the last, both included: index
round(i * (L - 1) / (count - 1)), halves rounded up. For 12 layers and N = 2 that is
0, 2, 4, 7, 9, 11, DistilBERT's choice; for 32 layers, N = 2: 16 layers; for Gemma2-9B's 42,
N = 3: 14 layers. The first layer (closest to the copied embeddings) and the last one (feeding
the copied final norm and lm_head) are the ones a shallower copy needs most.

Widths: hidden size, intermediate (FFN) size, query heads, KV heads and head_dim default to the
teacher's, and none may exceed it. When the teacher's heads x head_dim equals its hidden size
(Llama, Qwen2, Mistral, Phi, Phi-3 as released), the student's must too: --hidden-size alone
keeps head_dim and uses hidden / head_dim heads; --num-heads alone gives head_dim =
hidden / heads; giving both --num-heads and --head-dim, their product must be the hidden size.
For a teacher whose attention width differs from its hidden size (Gemma2, Gemma3, Qwen3), heads and head_dim
are free (default: the teacher's). KV heads default to keeping the teacher's group size
(query heads per KV head) and must divide the query heads.

Output layout (OUT is --output):
    OUT/config.json, OUT/model.safetensors (or shards), OUT/generation_config.json
    OUT/tokenizer files          copied from the teacher directory when present
    OUT/tailkd_derivation.json   how the student was made (below); written last

`tailkd_derivation.json`: the teacher's path, model_type and `config_sha256` (sha256 of its
config.json bytes); `layer_map` (student layer i <- teacher layer layer_map[i]; the default
pairing for the hidden-state cosine term: the output of student layer i, `hidden_states[i + 1]`
in HF's output_hidden_states numbering, against teacher layer j's, `hidden_states[j + 1]`);
`tie_word_embeddings`; `parameters`; and `tensors`: for every student tensor, `init`
("copied", "truncated", "random" or "tied"), `from` (the teacher tensor), shapes and `index`:
per dimension null (all of it), {"first": n} (the first n entries) or {"heads": [[n_heads,
head_dim, kept_heads, kept_head_dim], ...]} (blocks of heads laid out one after another; of each
block the first kept_heads heads, and of each such head its first kept_head_dim entries).

Everything is written into a temporary sibling directory and renamed into place at the end: bad
input (ValueError, one line from `main`, exit status 2) or a failure leaves nothing behind.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tailkd_dist import __version__
from tailkd_dist.data.tokenizer import TOKENIZER_FILES as _TOKENIZER_FILES
from tailkd_dist.model_files import check_model_dir
from tailkd_dist.signals import unwind_on_signals
from tailkd_dist.staging import check_replaceable, staged_dir
from tailkd_dist.user_error import ArgumentParser, say_error, whole_number

# torch and transformers are imported where they are used: `--help` and bad arguments answer at
# once.

PROG = "tailkd-derive-student"
DERIVATION = "tailkd_derivation.json"
FORMAT = "tailkd-derivation/1"
# HF model_type of the teachers a student can be derived from (Qwen2.5 and Llama 3.x are
# "qwen2" and "llama"; Gemma 3's text-only checkpoints are "gemma3_text").
SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "phi", "phi3", "gemma2", "gemma3_text")
# Families whose model_type names a wrapper around a supported text model: the one-line answer
# says which config to pass instead.
_WRAPPERS = {"gemma3": "the multimodal Gemma 3 (vision tower + text model); derive from a "
                       "text-only Gemma 3 checkpoint (model_type gemma3_text, e.g. gemma-3-1b)"}

# Files copied from the teacher directory when present: the tokenizer's, and the chat template.
TOKENIZER_FILES = (*_TOKENIZER_FILES, "chat_template.jinja")

# Attention projections, by the name of the module inside `self_attn`.
_ATTN_IN = {"q_proj": ("q",), "k_proj": ("kv",), "v_proj": ("kv",), "qkv_proj": ("q", "kv", "kv")}
_ATTN_OUT = ("o_proj", "dense")  # dense: Phi's output projection
# Per-head norms over head_dim: Phi's LayerNorms (qk_layernorm=True), Qwen3's and Gemma3's RMSNorms
_HEAD_NORMS = ("q_layernorm", "k_layernorm", "q_norm", "k_norm")


@dataclass(kw_only=True)
class DeriveConfig:
    """The teacher, the output and the student's shape; None means "the teacher's" (see module)."""

    teacher: str
    """HF teacher model directory (config.json, weights, tokenizer files)."""
    output: str
    """Student directory to write (must be absent or empty unless `overwrite`)."""
    layers: str | list[int] | None = None
    """Teacher layers to keep, ascending ("0,2,4" or a list). Exclusive with `every`."""
    every: int | None = None
    """Keep ceil(L / every) evenly spaced layers, first and last included (default 2)."""
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    copy_mlp: bool = False
    """Copy the MLPs from the teacher layers (needs equal hidden and intermediate sizes)."""
    seed: int = 0
    """Seed of the random (HF) initialisation of the tensors not taken from the teacher."""
    overwrite: bool = False
    """Replace an existing student directory written by this tool."""


@dataclass
class _Shape:
    """The widths that the weight slicing depends on (teacher's or student's)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


def _shape_of(cfg) -> _Shape:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return _Shape(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                  cfg.num_attention_heads, kv, head_dim)


# ----------------------------------------------------------------------------------------------
# Choices -> student shape and layer map (all checks happen here, before any weight is loaded)


def every_nth_layers(num_layers: int, every: int) -> list[int]:
    """ceil(L / every) layers evenly spaced over 0..L-1, first and last included (see module)."""
    count = -(-num_layers // every)
    if count == 1:
        return [0]
    # round(i * (L-1) / (count-1)) with halves rounded up, in integers
    return [(2 * i * (num_layers - 1) + count - 1) // (2 * (count - 1)) for i in range(count)]


def _layer_map(config: DeriveConfig, num_layers: int) -> list[int]:
    if config.layers is not None and config.every is not None:
        raise ValueError("pass at most one of --layers and --every.")
    if config.layers is None:
        every = 2 if config.every is None else config.every
        if every < 1:
            raise ValueError(f"--every {every} must be at least 1.")
        return every_nth_layers(num_layers, every)
    if isinstance(config.layers, str):
        try:
            layers = [int(x) for x in config.layers.replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise ValueError(f"--layers {config.layers!r} is not a comma-separated list of layer "
                             "indices, e.g. --layers 0,2,4.") from None
    else:
        layers = [int(x) for x in config.layers]
    if not layers:
        raise ValueError("--layers is empty: name at least one teacher layer, e.g. --layers 0,2.")
    bad = [j for j in layers if not 0 <= j < num_layers]
    if bad:
        raise ValueError(f"--layers: layer index {bad[0]} is out of range: the teacher has "
                         f"{num_layers} layers (0..{num_layers - 1}).")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"--layers {','.join(map(str, layers))}: the indices must be strictly "
                         "increasing (each teacher layer once, in order).")
    return layers


def _student_shape(config: DeriveConfig, t: _Shape, model_type: str, teacher_cfg) -> _Shape:
    def at_most(flag: str, value: int | None, limit: int) -> int:
        if value is None:
            return limit
        if value < 1:
            raise ValueError(f"{flag} {value} must be at least 1.")
        if value > limit:
            raise ValueError(f"{flag} {value} is larger than the teacher's ({limit}): a derived "
                             "student can only be narrower than its teacher.")
        return value

    hidden = at_most("--hidden-size", config.hidden_size, t.hidden)
    inter = at_most("--intermediate-size", config.intermediate_size, t.intermediate)
    if config.num_heads is not None and config.num_heads < 1:
        raise ValueError(f"--num-heads {config.num_heads} must be at least 1.")
    if config.head_dim is not None and config.head_dim < 1:
        raise ValueError(f"--head-dim {config.head_dim} must be at least 1.")
    heads, head_dim = config.num_heads, config.head_dim
    if t.heads * t.head_dim == t.hidden:  # attention width = hidden size: keep it so
        if heads is None:
            head_dim = t.head_dim if head_dim is None else head_dim
            if hidden % head_dim:
                raise ValueError(f"hidden size {hidden} is not a multiple of head_dim {head_dim}:"
                                 " pass --num-heads (head_dim = hidden size / heads).")
            heads = hidden // head_dim
        elif head_dim is None:
            if hidden % heads:
                raise ValueError(f"--num-heads {heads} does not divide the hidden size {hidden} "
                                 "(head_dim = hidden size / heads).")
            head_dim = hidden // heads
        elif heads * head_dim != hidden:
            raise ValueError(f"--num-heads {heads} x --head-dim {head_dim} = {heads * head_dim} "
                             f"differs from the hidden size {hidden}; the teacher's attention "
                             f"width equals its hidden size ({t.heads} x {t.head_dim}), and so "
                             "must the student's.")
    else:  # e.g. Gemma2-9B: 16 heads x 256 = 4096 != hidden 3584; both free
        heads = t.heads if heads is None else heads
        head_dim = t.head_dim if head_dim is None else head_dim
    heads = at_most("--num-heads" if config.num_heads is not None else
                    f"number of heads (hidden size {hidden} / head_dim {head_dim})", heads, t.heads)
    head_dim = at_most("--head-dim" if config.head_dim is not None else
                       f"head_dim (hidden size {hidden} / {heads} heads)", head_dim, t.head_dim)
    if config.num_kv_heads is None:
        group = t.heads // t.kv_heads  # query heads per KV head, kept
        if heads % group:
            raise ValueError(f"{heads} query heads cannot keep the teacher's {group} query heads "
                             "per KV head: pass --num-kv-heads (a divisor of the heads).")
        kv = heads // group
    else:
        kv = at_most("--num-kv-heads", config.num_kv_heads, t.kv_heads)
    if heads % kv:
        raise ValueError(f"--num-kv-heads {kv} does not divide the {heads} query heads.")
    rotary = getattr(teacher_cfg, "partial_rotary_factor", 1.0) or 1.0
    rotary_dims = int(head_dim * rotary)
    if rotary_dims % 2:
        raise ValueError(f"head_dim {head_dim} gives {rotary_dims} rotary dimensions (partial "
                         f"rotary factor {rotary}); RoPE needs an even number: choose another "
                         "head_dim.")
    per_dim = _per_dimension_rope(teacher_cfg)
    if head_dim != t.head_dim and per_dim:
        raise ValueError(f"the teacher's RoPE parameters have per-dimension factors ({model_type}, "
                         f"{per_dim}) sized for head_dim {t.head_dim}; keep head_dim (pass fewer "
                         "--num-heads instead).")
    if config.copy_mlp and (hidden, inter) != (t.hidden, t.intermediate):
        raise ValueError(f"--copy-mlp needs the teacher's hidden and intermediate sizes "
                         f"({t.hidden}, {t.intermediate}); the student has ({hidden}, {inter}). "
                         "Drop --copy-mlp to initialise the MLPs randomly.")
    return _Shape(0, hidden, inter, heads, kv, head_dim)


def _per_dimension_rope(cfg) -> str | None:
    """The rope_type whose parameters hold per-dimension lists (LongRoPE's factors), if any.

    transformers 5 keeps them in `rope_parameters` (per layer type for Gemma3: a dict of dicts),
    older versions in `rope_scaling`; both are read so that neither hides such a list.
    """
    def walk(params):
        if isinstance(params, dict):
            if any(isinstance(v, list) for v in params.values()):
                return str(params.get("rope_type", params.get("type")))
            for v in params.values():
                found = walk(v)
                if found:
                    return found
        return None

    for attr in ("rope_parameters", "rope_scaling"):
        found = walk(getattr(cfg, attr, None))
        if found:
            return found
    return None


def _student_config(teacher_cfg, t: _Shape, s: _Shape, layer_map: list[int], dtype):
    d = teacher_cfg.to_dict()
    for key in ("_name_or_path", "auto_map", "transformers_version"):
        d.pop(key, None)  # auto_map: load with the native class, never the teacher's remote code
    d.update(num_hidden_layers=len(layer_map), hidden_size=s.hidden,
             intermediate_size=s.intermediate, num_attention_heads=s.heads,
             num_key_value_heads=s.kv_heads)
    if d.get("head_dim") is not None:
        d["head_dim"] = s.head_dim
    # (otherwise head_dim = hidden / heads, which the checks made equal to s.head_dim)
    if isinstance(d.get("layer_types"), list):  # sliding/full attention per layer (Gemma2, Qwen2)
        d["layer_types"] = [d["layer_types"][j] for j in layer_map]
    if isinstance(d.get("max_window_layers"), int):  # Qwen2, Qwen3
        # layers below max_window_layers use full attention: count the kept ones
        d["max_window_layers"] = sum(j < d["max_window_layers"] for j in layer_map)
    if d.get("query_pre_attn_scalar") == t.head_dim:  # Gemma2/3: 1/sqrt(head_dim) scaling
        d["query_pre_attn_scalar"] = s.head_dim
    d["dtype"] = str(dtype).removeprefix("torch.")
    d.pop("torch_dtype", None)
    return type(teacher_cfg).from_dict(d)


# ----------------------------------------------------------------------------------------------
# Which slice of which teacher tensor initialises each student tensor


def _attention_index(kind: tuple[str, ...], t: _Shape, s: _Shape, out_proj: bool) -> list:
    """Index (per dimension, see module docstring) of an attention tensor in the teacher's.

    q_proj / k_proj / v_proj weights are [heads * head_dim, hidden] (out x in): rows are head
    after head, head_dim rows each. The student takes, of the first n_heads heads (q: query
    heads, k/v: KV heads), the first head_dim rows each, and the first hidden_size columns:
    rows h * head_dim_t + r for h < n_heads, r < head_dim_s; columns c < hidden_s. Their biases
    [heads * head_dim] take the same rows. Phi-3's fused qkv_proj stacks [q; k; v] blocks of
    rows (heads, KV heads, KV heads) and takes those rows from each block.
    o_proj / dense weights are [hidden, heads * head_dim]: the first hidden_size rows and, of the
    first n_heads query heads, the first head_dim columns each; their bias [hidden] the first
    hidden_size entries.

    Query head h keeps teacher head h; it reads KV head h // (heads / kv_heads). That is the
    teacher's pairing when the student keeps the teacher's group size (the default). When
    head_dim shrinks, RoPE (rotate_half) pairs dimension r with r + head_dim / 2 of the new,
    smaller head, not the teacher's pairs: the truncated weights are a starting point only.
    """
    blocks = [[t.heads, t.head_dim, s.heads, s.head_dim] if k == "q"
              else [t.kv_heads, t.head_dim, s.kv_heads, s.head_dim] for k in kind]
    heads = None if all(b[0] == b[2] and b[1] == b[3] for b in blocks) else {"heads": blocks}
    cols = None if s.hidden == t.hidden else {"first": s.hidden}
    return [cols, heads] if out_proj else [heads, cols]


def _plan(name: str, shape: tuple[int, ...], t: _Shape, s: _Shape, layer_map: list[int],
          copy_mlp: bool) -> tuple[str, str | None, list | None]:
    """(category, teacher tensor name or None for random, index) for one student tensor."""
    first_hidden = None if s.hidden == t.hidden else {"first": s.hidden}
    parts = name.split(".")
    if name == "model.embed_tokens.weight":
        return "embeddings", name, [None, first_hidden]  # [vocab, hidden]
    if name == "lm_head.weight":
        return "lm_head", name, [None, first_hidden]  # [vocab, hidden]
    if name == "lm_head.bias":
        return "lm_head", name, [None]  # [vocab] (Phi)
    if parts[:2] in (["model", "norm"], ["model", "final_layernorm"]):
        return "norms", name, [first_hidden]
    if parts[:2] == ["model", "layers"] and len(parts) >= 5:
        source = ".".join(["model", "layers", str(layer_map[int(parts[2])]), *parts[3:]])
        block, module, param = parts[3], parts[4], parts[-1]
        if block == "mlp":
            return "mlp", (source if copy_mlp else None), [None] * len(shape)
        if block == "self_attn" and module in _ATTN_IN:
            index = _attention_index(_ATTN_IN[module], t, s, out_proj=False)
            return "attention", source, index[:len(shape)]  # bias: rows only
        if block == "self_attn" and module in _ATTN_OUT:
            index = _attention_index(("q",), t, s, out_proj=True)
            return "attention", source, index if param == "weight" else [first_hidden]
        if block == "self_attn" and module in _HEAD_NORMS:
            return "norms", source, [None if s.head_dim == t.head_dim else {"first": s.head_dim}]
        if block.endswith("layernorm") and len(parts) == 5:
            # input_ / post_attention_ / pre_feedforward_ / post_feedforward_layernorm [hidden]
            return "norms", source, [first_hidden]
    raise ValueError(f"do not know how to initialise the student tensor {name} {list(shape)}: "
                     "this variant of the model family is not supported.")


def _take(tensor, index: list):
    import torch

    for dim, spec in enumerate(index):
        if spec is None:
            continue
        if "first" in spec:
            tensor = tensor.narrow(dim, 0, spec["first"])
            continue
        rows, offset = [], 0
        for n, hd, keep, keep_hd in spec["heads"]:
            for h in range(keep):
                rows.extend(range(offset + h * hd, offset + h * hd + keep_hd))
            offset += n * hd
        if offset != tensor.shape[dim]:
            raise ValueError(f"internal: head blocks cover {offset} entries of a dimension of "
                             f"{tensor.shape[dim]}")
        tensor = tensor.index_select(dim, torch.tensor(rows, device=tensor.device))
    return tensor


# ----------------------------------------------------------------------------------------------
# The tool


def _check_paths(config: DeriveConfig):
    teacher = Path(config.teacher)
    if not teacher.is_dir():
        raise ValueError(f"teacher directory {teacher} does not exist: pass a local HF model "
                         "directory (config.json, weights, tokenizer).")
    if not (teacher / "config.json").is_file():
        raise ValueError(f"teacher directory {teacher} has no config.json: pass a directory "
                         "written by `save_pretrained`.")
    return teacher, check_replaceable(Path(config.output), overwrite=config.overwrite, marker=DERIVATION,
                                      producer=PROG, keep_apart=[("the teacher directory", teacher)])


def _load_teacher_config(teacher: Path):
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(teacher), local_files_only=True,
                                         trust_remote_code=False)
    except Exception as error:  # unknown model_type, bad JSON, ...: one clear line
        model_type = None
        try:
            model_type = json.loads((teacher / "config.json").read_text()).get("model_type")
        except Exception:
            pass
        if isinstance(model_type, str) and model_type not in SUPPORTED:
            raise ValueError(_unsupported(model_type)) from None
        raise ValueError(f"cannot read the teacher config {teacher / 'config.json'}: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
                         ) from None
    if cfg.model_type not in SUPPORTED:
        raise ValueError(_unsupported(cfg.model_type))
    if getattr(cfg, "quantization_config", None):
        raise ValueError(f"the teacher in {teacher} is quantized (quantization_config): derive "
                         "from the unquantized weights.")
    return cfg


def _unsupported(model_type: str) -> str:
    if model_type in _WRAPPERS:
        return (f"teacher model_type {model_type!r} is {_WRAPPERS[model_type]}; {PROG} derives "
                f"students from {', '.join(SUPPORTED)} teachers.")
    return (f"teacher model_type {model_type!r} is not supported: {PROG} derives students from "
            f"{', '.join(SUPPORTED)} teachers.")


def derive(config: DeriveConfig) -> dict[str, Any]:
    """Write the student directory; returns the derivation record. Bad input raises ValueError."""
    start = time.perf_counter()
    teacher_dir, out = _check_paths(config)
    teacher_cfg = _load_teacher_config(teacher_dir)
    t = _shape_of(teacher_cfg)
    layer_map = _layer_map(config, t.layers)
    s = _student_shape(config, t, teacher_cfg.model_type, teacher_cfg)
    s.layers = len(layer_map)
    check_model_dir(teacher_dir)  # the weights' files, before any is read

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no "weights not initialised" chatter: we initialise them
    try:
        try:
            teacher = AutoModelForCausalLM.from_pretrained(
                str(teacher_dir), dtype="auto", local_files_only=True, trust_remote_code=False,
                low_cpu_mem_usage=True)
        except Exception as error:
            raise ValueError(f"cannot load the teacher weights in {teacher_dir}: "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
                             ) from None
        dtype = teacher.dtype
        student_cfg = _student_config(teacher_cfg, t, s, layer_map, dtype)
        torch.manual_seed(config.seed)
        student = AutoModelForCausalLM.from_config(student_cfg, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    tensors = _initialise(student, teacher, t, s, layer_map, config)
    params = _count_parameters(student)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    del teacher

    record = {
        "format": FORMAT,
        "created_by": f"tailkd_dist {__version__}",
        "teacher": {
            "path": str(teacher_dir.resolve()),
            "model_type": teacher_cfg.model_type,
            "config_sha256": hashlib.sha256((teacher_dir / "config.json").read_bytes()).hexdigest(),
            **{k: v for k, v in asdict(t).items()},
            "parameters": teacher_params,
        },
        "student": asdict(s),
        "layer_map": layer_map,
        "layer_map_note": "student layer i <- teacher layer layer_map[i]; default hidden-state "
                          "pairing: student hidden_states[i + 1] vs teacher hidden_states["
                          "layer_map[i] + 1] (HF output_hidden_states numbering)",
        "tie_word_embeddings": bool(student_cfg.tie_word_embeddings),
        "dtype": str(dtype).removeprefix("torch."),
        "options": {k: v for k, v in asdict(config).items()
                    if k not in ("teacher", "output", "overwrite")},
        "parameters": params,
        "tensors": tensors,
    }
    if isinstance(record["options"]["layers"], list):
        record["options"]["layers"] = ",".join(map(str, record["options"]["layers"]))

    with staged_dir(out) as staging:  # --overwrite (checked above) or an empty directory
        student.save_pretrained(str(staging), safe_serialization=True)
        copied = [n for n in TOKENIZER_FILES if (teacher_dir / n).is_file()]
        for name in copied:
            shutil.copyfile(teacher_dir / name, staging / name)
        record["tokenizer_files"] = copied
        (staging / DERIVATION).write_text(json.dumps(record, indent=2) + "\n")
    _print_summary(record, out, time.perf_counter() - start)
    return record


def _initialise(student, teacher, t: _Shape, s: _Shape, layer_map: list[int],
                config: DeriveConfig) -> dict[str, dict]:
    import torch

    teacher_sd = teacher.state_dict()
    student_sd = student.state_dict()  # holds lm_head.weight even when tied (same storage)
    embed = student_sd["model.embed_tokens.weight"]
    tensors: dict[str, dict] = {}
    with torch.no_grad():
        for name, param in student_sd.items():
            if name == "lm_head.weight" and param.data_ptr() == embed.data_ptr():
                tensors[name] = {"init": "tied", "to": "model.embed_tokens.weight"}
                continue
            category, source, index = _plan(name, tuple(param.shape), t, s, layer_map,
                                            config.copy_mlp)
            if source is None:
                tensors[name] = {"init": "random", "category": category,
                                 "shape": list(param.shape),
                                 "why": f"HF initialisation of the student config, seed "
                                        f"{config.seed}"}
                continue
            if source not in teacher_sd:
                raise ValueError(f"internal: the teacher has no tensor {source} for {name}")
            src = teacher_sd[source]
            value = _take(src, index)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"internal: {source} {list(src.shape)} sliced by {index} gives "
                                 f"{list(value.shape)}, the student's {name} is "
                                 f"{list(param.shape)}")
            param.copy_(value)
            truncated = tuple(src.shape) != tuple(param.shape)
            tensors[name] = {"init": "truncated" if truncated else "copied",
                             "category": category, "from": source,
                             "teacher_shape": list(src.shape), "shape": list(param.shape),
                             "index": index}
    return tensors


def _count_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    head_n = 0 if head is None or tied else sum(p.numel() for p in head.parameters())
    return {
        "total": total,
        "embeddings": embed.numel(),
        "lm_head": head_n,  # 0 when tied to the embeddings
        "non_embedding": total - embed.numel() - head_n,
        # freeze_embeddings freezes the input embeddings (and so the lm_head when tied)
        "trainable_if_embeddings_frozen": total - embed.numel(),
    }


def _print_summary(record: dict, out: Path, seconds: float) -> None:
    t, s, p = record["teacher"], record["student"], record["parameters"]

    def shape(x: dict) -> str:
        return (f"{x['layers']} layers, hidden {x['hidden']}, {x['heads']} heads x "
                f"{x['head_dim']}, {x['kv_heads']} KV heads, FFN {x['intermediate']}")

    print(f"teacher: {t['path']} ({t['model_type']}): {shape(t)}, {t['parameters']:,} parameters")
    print(f"student: {out}: {shape(s)}, "
          f"{'tied' if record['tie_word_embeddings'] else 'untied'} embeddings, {record['dtype']}")
    pairs = " ".join(f"{i}<-{j}" for i, j in enumerate(record["layer_map"]))
    print(f"layers kept (student<-teacher): {pairs}")
    print(f"parameters: total {p['total']:,}; non-embedding {p['non_embedding']:,}; trainable "
          f"with embeddings frozen {p['trainable_if_embeddings_frozen']:,}")
    groups: dict[str, Counter] = {}
    for entry in record["tensors"].values():
        if entry["init"] != "tied":
            groups.setdefault(entry["category"], Counter())[entry["init"]] += 1
    for category in ("embeddings", "lm_head", "attention", "norms", "mlp"):
        if category in groups:
            counts = ", ".join(f"{n} {init}" for init, n in sorted(groups[category].items()))
            print(f"  {category:<11} {counts}")
    if record["tie_word_embeddings"]:
        print("  lm_head     tied to the embeddings")
    tok = record["tokenizer_files"]
    print(f"tokenizer files copied: {', '.join(tok) if tok else 'none (the teacher has none)'}")
    print(f"wrote {out} in {seconds:.1f}s")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Derive a student HF causal LM from a teacher directory "
        f"({', '.join(SUPPORTED)}): a subset of its layers, optionally narrower; attention, "
        "embeddings, lm_head and norms initialised from the teacher (truncated where narrower), "
        f"MLPs random unless --copy-mlp. Writes config, weights, tokenizer and {DERIVATION}.")
    p.add_argument("teacher", help="HF teacher model directory")
    p.add_argument("-o", "--output", required=True, help="student directory to write")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--layers", help="teacher layers to keep, ascending, e.g. 0,2,4")
    which.add_argument("--every", type=whole_number(), metavar="N",
                       help="keep ceil(L/N) evenly spaced layers, first and last included "
                       "(default: 2)")
    p.add_argument("--hidden-size", type=whole_number(), help="student hidden size (default: teacher's)")
    p.add_argument("--intermediate-size", type=whole_number(),
                   help="student MLP (FFN) size (default: teacher's)")
    p.add_argument("--num-heads", type=whole_number(), help="query heads (default: teacher's, or hidden "
                   "size / head_dim when the hidden size changes)")
    p.add_argument("--num-kv-heads", type=whole_number(),
                   help="KV heads (default: keep the teacher's query heads per KV head)")
    p.add_argument("--head-dim", type=whole_number(), help="head dimension (default: teacher's)")
    p.add_argument("--copy-mlp", action="store_true",
                   help="copy the MLPs from the teacher layers (same hidden and FFN sizes only)")
    p.add_argument("--seed", type=whole_number(0), default=0, help="seed of the random init (default 0)")
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing output of this tool (directory with {DERIVATION})")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 on bad input, with one clear message)."""
    args = build_parser().parse_args(argv)
    with unwind_on_signals(PROG):
        try:
            derive(DeriveConfig(**vars(args)))
        except ValueError as error:
            say_error(PROG, error)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
