"""The trainer's typed configuration: YAML file + ``dotted.key=value`` overrides, validated on
load with errors that name the key.

    cfg = load_config("run.yaml", ["loss.beta=5", "optim.lr=3e-4"])
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from tailkd_dist.losses.common import DIVERGENCES
from tailkd_dist.model_files import check_model_dir
from tailkd_dist.staging import check_creatable_dir, write_atomic


@dataclass(kw_only=True)
class ModelSpec:
    """One causal LM: a local HF directory, or an HF config to build from (tests, demo)."""

    path: str | None = None
    """Local HF model directory (``AutoModelForCausalLM.from_pretrained``); never downloaded."""
    config: dict | None = None
    """Or an HF config as a dict (must contain ``model_type``), built with random weights."""
    tokenizer: str | None = None
    """Tokenizer directory; default: ``path``."""
    init_seed: int = 0
    """Seed for weights built from ``config`` (identical on every rank)."""


@dataclass(kw_only=True)
class ModelsConfig:
    """The teacher (frozen) and the student (trained)."""

    teacher: ModelSpec = field(default_factory=ModelSpec)
    """The teacher model; may be left empty only with loss.divergence: none (plain CE training,
    e.g. of a teacher), where no teacher is built."""
    student: ModelSpec = field(default_factory=ModelSpec)
    """The student model."""
    dtype: str = "auto"
    """Parameter/compute dtype: "auto" (bf16 on GPUs that support it, fp32 on CPU), "fp32", "bf16"."""
    attention: str = "sdpa"
    """HF attention implementation for both models: "sdpa" or "eager"."""
    freeze_embeddings: bool = False
    """Keep the student's input embeddings fixed (the paper copies them from the teacher and
    freezes them; see tailkd-derive-student). An untied output head still trains."""


@dataclass(kw_only=True)
class DataConfig:
    """MDS shards written by ``tailkd-prepare-data``."""

    path: str = ""
    """Directory holding manifest.json and the split subdirectories (or the local cache if
    ``remote`` is set)."""
    remote: str | None = None
    """Where the shards live if not local: s3://, gs://, or another directory."""
    train_split: str = "train"
    """Split to train on."""
    eval_split: str = "validation"
    """Held-out split for evaluation."""
    micro_batch_size: int = 4
    """Rows of seq_len tokens per rank per micro-batch."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    shuffle_seed: int = 9176
    """Deterministic shuffle seed."""


@dataclass(kw_only=True)
class LossConfig:
    """The distillation loss (specification: docs/loss.md)."""

    divergence: str = "tad"
    """"tad", "forward_kl", "reverse_kl", "jsd", or "none" (CE only, e.g. to train a teacher)."""
    k: int = 10
    """TAD's teacher top-k (paper: 10)."""
    beta: float = 2.0
    """TAD's tail weight (paper: 2)."""
    temperature: float = 1.0
    """Softmax temperature of the KD term (scaled by tau^2); CE stays at 1."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy term."""
    kd_weight: float = 1.0
    """Weight of the divergence term."""
    jsd_beta: float = 0.5
    """Mixture weight of the generalised JSD."""
    beta_scope: str = "document"
    """TAD's beta(X) per "document" (doc ids of packed rows) or per "row"."""
    loss_group_size: int = 0
    """Ranks that share the vocabulary in the vocab-parallel fused loss (divides the world
    size). 0 = auto: the whole world under fsdp2 (the loss group is the FSDP shard group),
    1 under deepspeed (every rank holds the whole lm_head)."""
    chunk_size: int = 0
    """Positions per chunk of the fused loss. 0 = auto: derived for the device and the loss
    group's vocabulary slice (losses.fused.default_chunk_size: 2048 on a GPU at V = 128256,
    256 on a CPU); the run says at start which."""
    row_passes: str = "auto"
    """The fused loss's element-wise row passes: "compiled" (torch.compile), "eager", or "auto"
    (compiled on CUDA with Triton, eager elsewhere). The run says at start which and why."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state cosine term (0 = off): mean over mapped layers of
    1 - cos(P h_student, h_teacher), summed over valid positions (tailkd_dist/hidden.py)."""
    hidden_layer_map: list | None = None
    """Teacher layer for each student layer (-1 skips one); default: the map recorded by
    tailkd-derive-student in the student's directory, else an even spread."""


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 1e-4
    """Peak learning rate (paper: 1e-4)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (paper: 0.1)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    max_steps: int = 100
    """Optimizer steps of the run."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""


@dataclass(kw_only=True)
class EngineConfig:
    """How the models are sharded."""

    kind: str = "deepspeed"
    """"deepspeed" or "fsdp2"."""
    ds_config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON for the student ("auto" values are filled from this config)."""
    teacher_ds_config: str = "ds_configs/teacher_zero3.json"
    """DeepSpeed JSON for the frozen teacher (ZeRO-3, no optimizer)."""
    sharded_load: bool = True
    """Load a model given by ``path`` without a whole copy on every rank (a 70B teacher is
    140 GB in bf16). deepspeed: straight into its ZeRO-3 partitions (transformers'
    HfDeepSpeedConfig + deepspeed.zero.Init): always the teacher (its engine is ZeRO-3), the
    student when ``ds_config`` is ZeRO stage 3. fsdp2: rank 0 reads the files; the other ranks
    build the model on the meta device and receive their shards from rank 0. False: every
    rank loads each model whole in host RAM first, then the engine shards it. Models built
    from a config (random weights, tests) are always built whole."""
    dist_timeout_s: float = 600.0
    """Collective timeout: a dead rank makes the others fail within this many seconds."""
    activation_checkpointing: bool = False
    """fsdp2: recompute each student decoder block's activations in backward (less memory)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints (atomic; the run resumes from the latest complete one)."""

    every_steps: int = 50
    """Save every N optimizer steps (and at the end, and on SIGTERM/SIGUSR1)."""
    keep: int = 2
    """Complete checkpoints kept."""
    resume: bool = True
    """Resume from the latest complete checkpoint in the output directory if there is one."""
    export_hf_at_end: bool = True
    """Write the student as an HF checkpoint (output_dir/hf_student) at the end."""


@dataclass(kw_only=True)
class LoggingConfig:
    """Console and TensorBoard."""

    every_steps: int = 1
    """Log every N steps. The loss's monitoring statistics (tail masses, entropies, top-1
    agreement) are computed on those steps only; metrics.jsonl has the losses of every step and
    the statistics of the logged ones."""
    tensorboard: bool = True
    """Write TensorBoard events to output_dir/tb (rank 0)."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""


@dataclass(kw_only=True)
class EvalConfig:
    """Held-out evaluation."""

    every_steps: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    max_batches: int = 8
    """Micro-batches per rank per evaluation."""
    ece_bins: int = 10
    """Bins of the Full-ECE calibration metric."""


@dataclass(kw_only=True)
class TrainConfig:
    """A distillation run."""

    output_dir: str = "runs/tailkd"
    """Checkpoints, TensorBoard events, resolved config, exported student."""
    seed: int = 1234
    """Seed of everything random in the run."""
    models: ModelsConfig = field(default_factory=ModelsConfig)
    """Teacher and student."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Sharding engine."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(tp)):
            raise ValueError(f"config key '{key}' must be a list of {len(typing.get_args(tp))} numbers")
        return tuple(_coerce(v, a, key) for v, a in zip(value, typing.get_args(tp)))
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ValueError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"config key '{key}' must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"config key '{key}' must be an integer, got {value!r}") from None
    if tp is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key '{key}' must be a number, got {value!r}") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise ValueError(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}' must be a mapping, got {value!r}")
        return value
    return value


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"'{prefix}'" if prefix else "the top level"
        raise ValueError(
            f"unknown config key '{(prefix + '.') if prefix else ''}{unknown[0]}' in {where}; "
            f"known keys: {', '.join(sorted(names))}"
        )
    kwargs = {n: _coerce(v, hints[n], f"{prefix}.{n}" if prefix else n) for n, v in raw.items()}
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def read_yaml(path: str | os.PathLike, *, what: str = "config file") -> Any:
    """A YAML (or JSON) file's content; ValueError with the file, line and column otherwise."""
    if not os.path.exists(path):
        raise ValueError(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory: give the YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {path} is not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not a UTF-8 text file") from None
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value parsed as YAML, so 3e-4, true, [1,2] work)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like dotted.key=value (e.g. loss.beta=5)")
    key, text = item.split("=", 1)
    if not key.strip():
        raise ValueError(f"override {item!r} has no key before '=': write dotted.key=value")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at column {len(key) + 1 + mark.column + 1}" if mark is not None else ""
        raise ValueError(f"override {item!r}: the value is not valid YAML{at} "
                         f"({getattr(e, 'problem', None) or 'syntax error'}); quote a string value") from None
    return key.strip(), value


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read YAML (or JSON), apply overrides, validate. ValueError names the offending key."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = _build(TrainConfig, raw)
    validate(cfg)
    return cfg


# Attention implementations transformers builds locally (a hub kernel would need a download).
ROW_PASSES = ("auto", "compiled", "eager")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def validate(cfg: TrainConfig) -> None:
    """Checks that need no model or data (those live in the preflight)."""
    L, O = cfg.loss, cfg.optim
    checks = [
        (L.divergence in DIVERGENCES, "loss.divergence", f"must be one of {', '.join(DIVERGENCES)}"),
        (L.k >= 1, "loss.k", "must be >= 1 (paper: 10)"),
        (L.beta > 0, "loss.beta", "must be > 0 (paper: 2)"),
        (L.temperature > 0, "loss.temperature", "must be > 0"),
        (0 < L.jsd_beta < 1, "loss.jsd_beta", "must lie strictly between 0 and 1"),
        (L.beta_scope in ("document", "row"), "loss.beta_scope", "must be 'document' or 'row'"),
        (L.loss_group_size >= 0, "loss.loss_group_size", "must be >= 1 (or 0 for auto)"),
        (L.chunk_size >= 0, "loss.chunk_size", "must be >= 1 (or 0 for auto)"),
        (L.row_passes in ROW_PASSES, "loss.row_passes", f"must be one of {', '.join(ROW_PASSES)}"),
        (L.ce_weight >= 0, "loss.ce_weight", "must be >= 0"),
        (L.kd_weight >= 0, "loss.kd_weight", "must be >= 0"),
        (L.hidden_weight >= 0, "loss.hidden_weight", "must be >= 0"),
        (L.hidden_weight == 0 or L.divergence != "none" or cfg.models.teacher.path or cfg.models.teacher.config,
         "loss.hidden_weight", "needs a teacher"),
        (O.lr > 0, "optim.lr", "must be > 0"),
        (O.max_steps >= 1, "optim.max_steps", "must be >= 1"),
        (O.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
        (O.grad_accum >= 1, "optim.grad_accum", "must be >= 1"),
        (0 <= O.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]"),
        (cfg.data.micro_batch_size >= 1, "data.micro_batch_size", "must be >= 1"),
        (bool(cfg.data.path), "data.path", "must name the prepared data directory"),
        (cfg.engine.kind in ("deepspeed", "fsdp2"), "engine.kind", "must be 'deepspeed' or 'fsdp2'"),
        (cfg.models.dtype in ("auto", "fp32", "bf16"), "models.dtype", "must be 'auto', 'fp32' or 'bf16'"),
        (cfg.models.attention in ATTENTION, "models.attention", f"must be one of {', '.join(ATTENTION)}"),
        (cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1"),
        (cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1"),
        (cfg.logging.every_steps >= 1, "logging.every_steps", "must be >= 1"),
        (O.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
        (all(0 <= b < 1 for b in O.betas), "optim.betas", "must be two numbers in [0, 1), e.g. [0.9, 0.95]"),
        (O.eps > 0, "optim.eps", "must be > 0"),
        (O.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)"),
        (cfg.engine.dist_timeout_s > 0, "engine.dist_timeout_s", "must be > 0 seconds"),
        (cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0"),
        (cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0 (0 = only at the end)"),
        (cfg.eval.max_batches >= 1, "eval.max_batches", "must be >= 1"),
        (cfg.eval.ece_bins >= 1, "eval.ece_bins", "must be >= 1"),
    ]
    checks += [(0 <= _get_dotted(cfg, key) < 2**32, key, "must lie in [0, 2**32) (numpy's seed range)")
               for key in ("seed", "data.shuffle_seed", "models.teacher.init_seed", "models.student.init_seed")]
    for ok, key, why in checks:
        if not ok:
            value = _get_dotted(cfg, key)
            raise ValueError(f"config key '{key}' = {value!r} {why}")
    # The output directory can be made: else the first write, after the models are loaded, fails.
    check_creatable_dir(cfg.output_dir, key="output_dir")
    for role in ("teacher", "student"):
        spec: ModelSpec = getattr(cfg.models, role)
        if role == "teacher" and spec.path is None and spec.config is None and L.divergence == "none":
            continue  # CE-only training needs no teacher
        if (spec.path is None) == (spec.config is None):
            raise ValueError(f"config key 'models.{role}': give exactly one of 'path' (an HF directory) "
                             "or 'config' (an HF config mapping)")
        if spec.path is not None:
            try:  # the files on disk, before anything large is loaded
                check_model_dir(spec.path)
            except ValueError as e:
                raise ValueError(f"config key 'models.{role}.path' = {spec.path!r}: {e}") from None
        if spec.config is not None and "model_type" not in spec.config:
            raise ValueError(f"config key 'models.{role}.config' needs a 'model_type' (e.g. llama)")


def resolve_loss_group(cfg: TrainConfig, world_size: int) -> int:
    """loss.loss_group_size with "auto" (0) resolved for this world size; written back."""
    if cfg.loss.loss_group_size == 0:
        cfg.loss.loss_group_size = world_size if cfg.engine.kind == "fsdp2" else 1
    return cfg.loss.loss_group_size


def _get_dotted(cfg, key: str):
    node = cfg
    for p in key.split("."):
        node = getattr(node, p)
    return node


def to_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dump_yaml(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """The resolved config (what checkpoints carry)."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
