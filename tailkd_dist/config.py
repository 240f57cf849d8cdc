"""The trainer's typed configuration: YAML file + ``dotted.key=value`` overrides, validated on
load with errors that name the key.

    cfg = load_config("run.yaml", ["loss.beta=5", "optim.lr=3e-4"])
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from tailkd_dist.losses.common import DIVERGENCES
from tailkd_dist.model_files import check_model_dir, check_model_type, check_tokenizer_dir
from tailkd_dist.staging import check_creatable_dir, write_atomic

# The field types carry their rules (type, range, finiteness, allowed values): pydantic checks
# them all on load, so each rule is written once, here, next to the field it constrains. What
# needs two fields or the disk is checked by `validate` below; what needs the models or the data,
# by the preflight.


def _no_bool(value: Any) -> Any:
    # YAML reads `yes`/`true` as a bool, which pydantic would take as 1 in a number field.
    if isinstance(value, bool):
        raise ValueError("a number, not true/false")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]
AtLeast1 = Annotated[Int, Field(ge=1)]
AtLeast0 = Annotated[Int, Field(ge=0)]
Positive = Annotated[Float, Field(gt=0)]
NonNegative = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, lt=1)]
Seed = Annotated[Int, Field(ge=0, lt=2**32)]  # numpy's seed range
Text = Annotated[str, Field(min_length=1)]

ROW_PASSES = ("auto", "compiled", "eager")
# Attention implementations transformers builds locally (a hub kernel would need a download).
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
Divergence = Literal[DIVERGENCES]
RowPasses = Literal[ROW_PASSES]
Attention = Literal[ATTENTION]


@dataclass(kw_only=True)
class ModelSpec:
    """One causal LM: a local HF directory, or an HF config to build from (tests, demo)."""

    path: Text | None = None
    """Local HF model directory (``AutoModelForCausalLM.from_pretrained``); never downloaded."""
    config: dict[Any, Any] | None = None
    """Or an HF config as a dict (must contain ``model_type``), built with random weights."""
    tokenizer: Text | None = None
    """Tokenizer directory; default: ``path``."""
    init_seed: Seed = 0
    """Seed for weights built from ``config`` (identical on every rank)."""
    cache: Text | None = None
    """Teacher only: a teacher cache directory (``tailkd-cache-teacher`` writes it here from
    ``path`` or ``config`` and the token shards in ``data.path``). Training then reads the
    teacher's hidden states and head from it and never builds the teacher; with ``path`` or
    ``config`` also given, the cache must have been made from that teacher. A local (or mounted)
    directory: with ``cache_remote``, where the remote cache's files are fetched to."""
    cache_remote: Text | None = None
    """Teacher only: where the cache lives when not local (s3://..., gs://..., oci://..., or
    another directory), as ``data.remote`` for the token shards: its manifest and head are
    fetched into ``cache`` at start, each shard of hidden states when a row of it is first
    read (streaming checks its hash)."""


@dataclass(kw_only=True)
class ModelsConfig:
    """The teacher (frozen) and the student (trained)."""

    teacher: ModelSpec = field(default_factory=ModelSpec)
    """The teacher model; may be left empty only with loss.divergence: none (plain CE training,
    e.g. of a teacher), where no teacher is built."""
    student: ModelSpec = field(default_factory=ModelSpec)
    """The student model."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Parameter/compute dtype: "auto" (bf16 on GPUs that support it, fp32 on CPU), "fp32", "bf16"."""
    attention: Attention = "sdpa"
    """HF attention implementation for both models: "sdpa", "eager", "flex_attention", or
    "flash_attention_2" / "flash_attention_3" (CUDA and their package only)."""
    freeze_embeddings: bool = False
    """Keep the student's input embeddings fixed (the paper copies them from the teacher and
    freezes them; see tailkd-derive-student). An untied output head still trains."""


@dataclass(kw_only=True)
class DataConfig:
    """MDS shards written by ``tailkd-prepare-data``."""

    path: Text = ""
    """Directory holding manifest.json and the split subdirectories (or the local cache if
    ``remote`` is set)."""
    remote: Text | None = None
    """Where the shards live if not local: s3://, gs://, or another directory."""
    train_split: Text = "train"
    """Split to train on."""
    eval_split: Text = "validation"
    """Held-out split for evaluation. A split the shards lack is refused at start, unless it is
    this default name and no periodic evaluation is asked for (then the run does not evaluate,
    and says so)."""
    micro_batch_size: AtLeast1 = 4
    """Rows of seq_len tokens per rank per micro-batch."""
    num_workers: AtLeast0 = 0
    """DataLoader worker processes per rank."""
    shuffle_seed: Seed = 9176
    """Deterministic shuffle seed."""


@dataclass(kw_only=True)
class LossConfig:
    """The distillation loss (specification: docs/loss.md)."""

    divergence: Divergence = "tad"
    """"tad", "forward_kl", "reverse_kl", "jsd", or "none" (CE only, e.g. to train a teacher)."""
    k: AtLeast1 = 10
    """TAD's teacher top-k (paper: 10)."""
    beta: Positive = 2.0
    """TAD's tail weight (paper: 2)."""
    temperature: Positive = 1.0
    """Softmax temperature of the KD term (scaled by tau^2); CE stays at 1."""
    ce_weight: NonNegative = 1.0
    """Weight of the cross-entropy term."""
    kd_weight: NonNegative = 1.0
    """Weight of the divergence term."""
    jsd_beta: Annotated[Float, Field(gt=0, lt=1)] = 0.5
    """Mixture weight of the generalised JSD."""
    beta_scope: Literal["document", "row"] = "document"
    """TAD's beta(X) per "document" (doc ids of packed rows) or per "row"."""
    loss_group_size: AtLeast0 = 0
    """Ranks that share the vocabulary in the vocab-parallel fused loss (divides the world
    size). 0 = auto: the whole world under fsdp2 (the loss group is the FSDP shard group),
    1 under deepspeed (every rank holds the whole lm_head)."""
    chunk_size: AtLeast0 = 0
    """Positions per chunk of the fused loss. 0 = auto: derived for the device and the loss
    group's vocabulary slice (losses.fused.default_chunk_size: 2048 on a GPU at V = 128256,
    256 on a CPU); the run says at start which."""
    row_passes: RowPasses = "auto"
    """The fused loss's element-wise row passes: "compiled" (torch.compile), "eager", or "auto"
    (compiled on CUDA with Triton, eager elsewhere). The run says at start which and why."""
    hidden_weight: NonNegative = 0.0
    """Weight of the hidden-state cosine term (0 = off): mean over mapped layers of
    1 - cos(P h_student, h_teacher), summed over valid positions (tailkd_dist/hidden.py)."""
    hidden_layer_map: list[Annotated[Int, Field(ge=-1)]] | None = None
    """Teacher layer for each student layer (-1 skips one); default: the map recorded by
    tailkd-derive-student in the student's directory, else an even spread."""


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: Positive = 1e-4
    """Peak learning rate (paper: 1e-4)."""
    weight_decay: NonNegative = 0.1
    """Decoupled weight decay (paper: 0.1)."""
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    """Adam betas."""
    eps: Positive = 1e-8
    """Adam epsilon."""
    warmup_steps: AtLeast0 = 10
    """Linear warmup steps."""
    max_steps: AtLeast1 = 100
    """Optimizer steps of the run."""
    min_lr_ratio: Annotated[Float, Field(ge=0, le=1)] = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    grad_clip: NonNegative = 1.0
    """Global gradient-norm clip (0 = off)."""
    grad_accum: AtLeast1 = 1
    """Micro-batches per optimizer step."""


@dataclass(kw_only=True)
class EngineConfig:
    """How the models are sharded."""

    kind: Literal["deepspeed", "fsdp2"] = "deepspeed"
    """"deepspeed" or "fsdp2"."""
    ds_config: Text = "ds_configs/zero3.json"
    """DeepSpeed JSON for the student ("auto" values are filled from this config)."""
    teacher_ds_config: Text = "ds_configs/teacher_zero3.json"
    """DeepSpeed JSON for the frozen teacher (ZeRO-3, no optimizer)."""
    sharded_load: bool = True
    """Load a model given by ``path`` without a whole copy on every rank (a 70B teacher is
    140 GB in bf16). deepspeed: straight into its ZeRO-3 partitions (transformers'
    HfDeepSpeedConfig + deepspeed.zero.Init): always the teacher (its engine is ZeRO-3), the
    student when ``ds_config`` is ZeRO stage 3. fsdp2: rank 0 reads the files; the other ranks
    build the model on the meta device and receive their shards from rank 0. False: every
    rank loads each model whole in host RAM first, then the engine shards it. Models built
    from a config (random weights, tests) are always built whole."""
    dist_timeout_s: Positive = 600.0
    """Collective timeout: a dead rank makes the others fail within this many seconds."""
    activation_checkpointing: bool = False
    """fsdp2: recompute each student decoder block's activations in backward (less memory)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints (atomic; the run resumes from the latest complete one)."""

    every_steps: AtLeast1 = 50
    """Save every N optimizer steps (and at the end, and on SIGTERM/SIGUSR1)."""
    keep: AtLeast1 = 2
    """Complete checkpoints kept."""
    resume: bool = True
    """Resume from the latest complete checkpoint in the output directory if there is one."""
    export_hf_at_end: bool = True
    """Write the student as an HF checkpoint (output_dir/hf_student) at the end."""


@dataclass(kw_only=True)
class LoggingConfig:
    """Console and TensorBoard."""

    every_steps: AtLeast1 = 1
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

    every_steps: AtLeast0 = 0
    """Evaluate every N steps (0 = only at the end)."""
    max_batches: AtLeast1 = 8
    """Micro-batches per rank per evaluation."""
    ece_bins: AtLeast1 = 10
    """Bins of the Full-ECE calibration metric."""


@dataclass(kw_only=True)
class TrainConfig:
    """A distillation run."""

    output_dir: Text = "runs/tailkd"
    """Checkpoints, TensorBoard events, resolved config, exported student."""
    seed: Seed = 1234
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


def _sections(cls=TrainConfig):
    """Every dataclass of the config tree, found from its fields (a new section is included)."""
    yield cls
    for tp in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp)


for _cls in set(_sections()):
    # unknown keys are errors (a typo must not be ignored); numbers given as strings by a YAML
    # override ("3e-4") are read as numbers, a number where a name is expected as its text
    _cls.__pydantic_config__ = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
_ADAPTER = TypeAdapter(TrainConfig)

# pydantic's error types -> the rule as the one line states it (ctx fills the braces)
_RULES = {
    "greater_than": "must be > {gt}", "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}", "less_than_equal": "must be <= {le}",
    "finite_number": "must be a finite number", "literal_error": "must be one of {expected}",
    "int_parsing": "must be an integer", "int_type": "must be an integer",
    "int_from_float": "must be an integer", "float_parsing": "must be a number",
    "float_type": "must be a number", "bool_parsing": "must be true or false",
    "bool_type": "must be true or false", "string_type": "must be a string",
    "string_too_short": "must not be empty", "dict_type": "must be a mapping",
    "dataclass_type": "must be a mapping", "dataclass_args_type": "must be a mapping",
    "list_type": "must be a list", "tuple_type": "must be a list",
    "value_error": "must be {error}",
}


def _section(loc: tuple) -> type | None:
    """The dataclass that holds the key at ``loc`` (None past a free-form mapping)."""
    cls = TrainConfig
    for name in loc[:-1]:
        tp = typing.get_type_hints(cls).get(name) if isinstance(name, str) else None
        if not dataclasses.is_dataclass(tp):
            return None
        cls = tp
    return cls


def _one_line(error: ValidationError, raw: dict) -> str:
    """The first problem of a validation, as one line naming the dotted key and the rule."""
    e = error.errors(include_url=False)[0]
    loc = tuple(e["loc"])
    # a list or tuple entry's index is part of the value, not of the key
    key_loc = tuple(p for p in loc if isinstance(p, str))
    key = ".".join(key_loc)
    more = error.error_count() - 1
    tail = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
    if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        section = _section(loc)
        known = sorted(f.name for f in dataclasses.fields(section)) if section else []
        where = f"'{'.'.join(key_loc[:-1])}'" if len(key_loc) > 1 else "the top level"
        return f"unknown config key '{key}' in {where}; known keys: {', '.join(known)}{tail}"
    value: Any = raw
    for p in key_loc:
        value = value.get(p) if isinstance(value, dict) else None
    ctx = dict(e.get("ctx") or {})
    if "error" in ctx:
        ctx["error"] = str(ctx["error"])
    if e["type"] == "literal_error":
        ctx["expected"] = ctx["expected"].replace("'", "")
    if e["type"] in ("too_short", "too_long") or (e["type"] == "missing" and len(loc) > len(key_loc)):
        section = _section(key_loc)  # a list of the wrong length for a fixed-length field
        n = len(typing.get_args(typing.get_type_hints(section)[key_loc[-1]])) if section else None
        return f"config key '{key}' = {value!r} must have {n or 'another number of'} entries{tail}"
    try:
        rule = _RULES[e["type"]].format(**ctx)
    except (KeyError, IndexError):  # a rule without its own wording: pydantic's own
        rule = e["msg"][:1].lower() + e["msg"][1:]
    if len(loc) > len(key_loc):  # an entry of a list: say which
        index = [p for p in loc if not isinstance(p, str)][0]
        return f"config key '{key}' = {value!r}: entry {index} {rule}{tail}"
    return f"config key '{key}' = {value!r} {rule}{tail}"


def _build(raw: dict) -> TrainConfig:
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as e:
        raise ValueError(_one_line(e, raw)) from None


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
    cfg = _build(raw)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks that need no model or data (those live in the preflight): between fields and on
    the disk; each field's own rules are in its type."""
    if cfg.loss.hidden_weight > 0 and cfg.loss.divergence == "none" and not (
            cfg.models.teacher.path or cfg.models.teacher.config):
        raise ValueError(f"config key 'loss.hidden_weight' = {cfg.loss.hidden_weight!r} needs a teacher "
                         "(models.teacher.path or .config)")
    kd = cfg.loss.kd_weight if cfg.loss.divergence != "none" else 0.0
    if cfg.loss.ce_weight == 0 and kd == 0 and cfg.loss.hidden_weight == 0:
        # every term weighted 0: the run would load the models, step and save, and learn nothing
        raise ValueError(
            f"config keys 'loss.ce_weight' = {cfg.loss.ce_weight!r}, 'loss.kd_weight' = {cfg.loss.kd_weight!r} "
            f"(loss.divergence = {cfg.loss.divergence!r}) and 'loss.hidden_weight' = {cfg.loss.hidden_weight!r} "
            "give every term of the loss weight 0, so training would change nothing: give one a weight above 0")
    # The output directory can be made: else the first write, after the models are loaded, fails.
    check_creatable_dir(cfg.output_dir, key="output_dir")
    for role in ("teacher", "student"):
        spec: ModelSpec = getattr(cfg.models, role)
        if spec.tokenizer is not None:
            try:
                check_tokenizer_dir(spec.tokenizer)
            except ValueError as e:
                raise ValueError(f"config key 'models.{role}.tokenizer' = {spec.tokenizer!r}: {e}") from None
        if role == "student" and (spec.cache is not None or spec.cache_remote is not None):
            key = "cache" if spec.cache is not None else "cache_remote"
            raise ValueError(f"config key 'models.student.{key}': only the teacher can be read from a cache")
        if role == "teacher" and spec.cache_remote is not None and spec.cache is None:
            raise ValueError(f"config key 'models.teacher.cache_remote' = {spec.cache_remote!r} needs "
                             "models.teacher.cache: the local directory its files are fetched into")
        if role == "teacher" and spec.cache is not None:
            if "://" in spec.cache:
                raise ValueError(f"config key 'models.teacher.cache' = {spec.cache!r} is the local (or mounted) "
                                 "directory the cache is read from: name a remote cache in "
                                 "models.teacher.cache_remote and a local directory here")
            if cfg.loss.divergence == "none":
                raise ValueError(f"config key 'models.teacher.cache' = {spec.cache!r}: loss.divergence none trains "
                                 "without a teacher; drop the cache or choose a divergence")
            if cfg.loss.hidden_weight > 0:
                raise ValueError(f"config key 'models.teacher.cache' = {spec.cache!r}: the hidden-state term "
                                 "(loss.hidden_weight > 0) needs the teacher's intermediate layers, which a cache of "
                                 "its final hidden states does not hold: train it with the online teacher")
            if spec.path is None and spec.config is None:
                continue  # the cache alone: what it was made from is in its manifest
        if role == "teacher" and spec.path is None and spec.config is None and cfg.loss.divergence == "none":
            continue  # CE-only training needs no teacher
        if (spec.path is None) == (spec.config is None):
            raise ValueError(f"config key 'models.{role}': give exactly one of 'path' (an HF directory) "
                             "or 'config' (an HF config mapping)")
        if spec.path is not None:
            try:  # the files on disk, before anything large is loaded
                check_model_dir(spec.path)
            except ValueError as e:
                raise ValueError(f"config key 'models.{role}.path' = {spec.path!r}: {e}") from None
        if spec.config is not None:
            if "model_type" not in spec.config:
                raise ValueError(f"config key 'models.{role}.config' needs a 'model_type' (e.g. llama)")
            check_model_type(spec.config["model_type"], where=f"config key 'models.{role}.config'")


def check_k_fits(cfg: TrainConfig, vocab: int) -> None:
    """loss.k against the vocabulary the loss uses, known once the models' configs are read (the
    preflight, from the config files; the trainer, from the loaded models)."""
    if cfg.loss.k >= vocab:
        raise ValueError(f"config key 'loss.k' = {cfg.loss.k} must be smaller than the vocabulary ({vocab}): "
                         "with k >= V the tail is empty")


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
