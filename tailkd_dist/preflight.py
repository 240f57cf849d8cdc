"""Preflight: the cheap checks that catch a doomed run before an allocation is burned (and again
at the start of training).

    report = run_preflight(cfg, world_size=16, gpus_per_node=8)
    print("\\n".join(report.lines()))
    report.raise_for_problems()           # ValueError with one line per problem

What it checks, without loading any weights (model configs are read with ``AutoConfig`` and the
models instantiated on the ``meta`` device, which costs no memory):

* **vocabularies**: teacher and student lm_head rows (``config.vocab_size``) and tokenizers
  (``models.plan_vocab``: same tokenizer files, padded vocabularies allowed), ``loss.k`` below
  the vocabulary, and the shards' tokenizer and id range (``data.dataset.check_compat``);
* **layout**: world size = data-parallel x ``loss.loss_group_size``
  (``parallel.topology.validate_degrees``), the world size a whole number of nodes, the
  vocabulary splittable over the loss group, the DeepSpeed JSONs (ZeRO stage 1-3 for the
  student, stage 3 without optimizer for the teacher, explicit batch sizes consistent);
* **memory**: an estimate per rank of teacher + student + optimizer + heads + loss chunks +
  activations under the chosen ZeRO stage or FSDP2, compared with the device's memory
  (``torch.cuda.mem_get_info`` on GPUs, ``/proc/meminfo`` on CPU, or an explicit
  ``device_memory_gib``), with a verdict (OK / TOO BIG) and what to change;
* **data**: the shards' manifest exists and is readable (fetched from ``data.remote`` into a
  temporary directory when the data is remote), the training split is there.

The memory model (bytes per parameter; P = parameters of a body, W = world size, b = bytes of
the compute dtype, 2 for bf16 and 4 for fp32; AdamW's two moments and the master weights are
fp32):

====================  ===========================  ============================  =================
student body          weights                      gradients                     AdamW (+ master)
====================  ===========================  ============================  =================
ZeRO-1                b P                          b P                           (8 + m) P / W
ZeRO-2                b P                          b P / W (+ one bucket)        (8 + m) P / W
ZeRO-3                b P / W (+ gathered blocks)  b P / W (+ one bucket)        (8 + m) P / W
FSDP2 (shard = G)     4 P / G (+ gathered blocks)  4 P / G                       8 P / G
====================  ===========================  ============================  =================

m = 4 (an fp32 master copy) when the compute dtype is not fp32, else 0; G = the loss group size
(FSDP2 shards within the loss group and replicates across groups); ZeRO's CPU offload moves the
optimizer states (``offload_optimizer``) or the weights (``offload_param``) to host memory. The
teacher body is ZeRO-3 inference (b P / W) or FSDP2 (b P / G), no gradients, no optimizer. The
lm_heads live outside the engines as vocabulary shards of V / G rows: the student's 16 bytes
per element (fp32 weight, gradient, two moments), the teacher's 4. The fused loss keeps two
[chunk, V / G] fp32 blocks and the loss group's gathered hidden states; activations are taken as
(10 d + 4 d_ffn) x b per token and layer for the student (d x b per token and layer plus one
block with activation checkpointing), one block's worth for the teacher (no_grad), plus the
attention matrices with eager attention. Every rank also loads the student in fp32 on the host
before the engines shard it, and the teacher likewise; a model read from a directory into
ZeRO-3 partitions (DeepSpeed, ``engine.sharded_load``, ``train.load_models``) costs the host one
checkpoint file at a time on GPUs, and about a whole fp32 copy on CPU (measured); under FSDP2
(``engine.sharded_load``) only rank 0 reads a model directory (the host estimate counts it once
per node; the CPU one, conservatively, on every rank). On GPUs
that is host RAM, on CPU it adds to the same memory. Treat the result as an estimate
(+- 20 %); the verdict leaves 10 % headroom.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tailkd_dist.user_error import ArgumentParser, positive_number, say_error, whole_number

GIB = 2**30
HEADROOM = 0.9  # the estimate must fit in this fraction of the device's memory
RUNTIME_GPU = 1.5 * GIB  # CUDA context, NCCL buffers, allocator slack
RUNTIME_CPU = 0.6 * GIB  # python + torch + transformers + deepspeed (measured RSS about 0.5 GiB)
_DS_DEFAULTS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8,
                "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9}

log = logging.getLogger("tailkd_dist")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass
class ModelStats:
    """What the memory model needs from one causal LM (read from its config, no weights)."""

    role: str
    body_params: int  # everything but the lm_head (input embeddings included)
    head_rows: int  # lm_head rows (= config.vocab_size for HF causal LMs)
    hidden: int
    ffn: int
    layers: int
    heads: int
    largest_block: int  # parameters of the largest decoder block
    max_positions: int | None

    @property
    def total_params(self) -> int:
        return self.body_params + self.head_rows * self.hidden


@dataclass
class MemoryEstimate:
    """Per-rank memory estimate and the verdict against the device's memory."""

    components: dict[str, float]  # bytes per rank on the device, by component
    per_rank: float  # sum of components (bytes)
    ranks_sharing: int  # ranks whose estimates share `capacity` (1 per GPU; ranks per node on CPU)
    capacity: float | None  # bytes: one GPU, or the node's available RAM on CPU
    capacity_source: str
    device: str  # "cuda" or "cpu"
    layout: str  # e.g. "DeepSpeed ZeRO-2, bf16, world 16, loss group 2"
    host_per_node: float | None = None  # GPUs: host RAM while every rank holds its fp32 copies
    host_capacity: float | None = None
    verdict: str = "UNKNOWN"  # "OK", "TOO BIG" or "UNKNOWN" (no capacity known)
    suggestions: list[str] = field(default_factory=list)

    @property
    def needed(self) -> float:
        return self.per_rank * self.ranks_sharing

    def lines(self) -> list[str]:
        out = [f"memory per rank ({self.layout}):"]
        for name, value in self.components.items():
            if value >= 1e-3 * GIB:
                out.append(f"  {name:<52s} {value / GIB:9.2f} GiB")
        out.append(f"  {'total per rank':<52s} {self.per_rank / GIB:9.2f} GiB")
        if self.ranks_sharing > 1:
            out.append(f"  x {self.ranks_sharing} ranks sharing the node's memory = {self.needed / GIB:.2f} GiB")
        if self.capacity is not None:
            out.append(f"  device memory: {self.capacity / GIB:.2f} GiB ({self.capacity_source}); "
                       f"the estimate may use {HEADROOM:.0%} of it")
        if self.host_per_node is not None:
            cap = f" of {self.host_capacity / GIB:.1f} GiB" if self.host_capacity else ""
            out.append(f"  host RAM per node while loading (every rank's copies): "
                       f"{self.host_per_node / GIB:.1f} GiB{cap}")
        return out


@dataclass
class Report:
    """What the preflight found. ``problems`` make the run fail; ``warnings`` do not."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    memory: MemoryEstimate | None = None
    vocab: object | None = None  # models.VocabPlan

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        if self.memory is not None and self.memory.verdict == "TOO BIG":
            return "TOO BIG"
        return "OK" if self.ok else "FAILED"

    def lines(self) -> list[str]:
        out = list(self.info)
        if self.memory is not None:
            out += self.memory.lines()
        out += [f"warning: {w}" for w in self.warnings]
        out.append(self.verdict_line())
        return out

    def verdict_line(self) -> str:
        mem = ""
        if self.memory is not None and self.memory.capacity is not None:
            m = self.memory
            mem = f": about {m.needed / GIB:.1f} GiB needed of {m.capacity / GIB:.1f} GiB ({m.capacity_source})"
        if self.ok:
            return f"preflight: OK{mem}"
        return f"preflight: {self.verdict}{mem if self.verdict == 'TOO BIG' else ''} ({len(self.problems)} problem(s))"

    def raise_for_problems(self, logger: logging.Logger | None = None) -> Report:
        """Log the report (when ``logger`` is given), then raise ValueError naming every problem."""
        if logger is not None:
            for line in self.lines():
                logger.info("%s", line)
        if self.problems:
            raise ValueError("preflight: " + "; ".join(self.problems))
        return self


# --------------------------------------------------------------------------------------------
# Models (configs only)
# --------------------------------------------------------------------------------------------
def _hf_config(spec):
    from transformers import AutoConfig

    if spec.path is not None:
        return AutoConfig.from_pretrained(spec.path, local_files_only=True)
    raw = dict(spec.config)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def model_stats(spec, role: str):
    """(ModelStats, meta model) of a ModelSpec, from its config alone (cached per process)."""
    key = (spec.path, os.path.getmtime(os.path.join(spec.path, "config.json")) if spec.path and
           os.path.isfile(os.path.join(spec.path, "config.json")) else None,
           json.dumps(spec.config, sort_keys=True, default=str) if spec.config is not None else None)
    stats, model = _model_stats(key, spec)
    return dataclasses.replace(stats, role=role), model


_CACHE: dict = {}


def _model_stats(key, spec):
    if key in _CACHE:
        return _CACHE[key]
    from torch import nn

    from tailkd_dist.models import body_of, lm_head_of, meta_model

    config = _hf_config(spec)
    model = meta_model(config)
    body = body_of(model)
    body_params = sum(p.numel() for p in body.parameters())
    head = lm_head_of(model)
    blocks = max((m for m in body.modules() if isinstance(m, nn.ModuleList)), key=len, default=None)
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0) if blocks is not None else 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", head.weight.shape[1]))
    stats = ModelStats(
        role="model", body_params=body_params, head_rows=int(head.weight.shape[0]), hidden=hidden,
        ffn=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        layers=int(getattr(text, "num_hidden_layers", None) or (len(blocks) if blocks is not None else 1)),
        heads=int(getattr(text, "num_attention_heads", None) or 1), largest_block=largest,
        max_positions=getattr(text, "max_position_embeddings", None),
    )
    if len(_CACHE) > 8:
        _CACHE.clear()
    _CACHE[key] = (stats, model)
    return stats, model


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------
def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _meminfo() -> dict[str, float]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, rest = line.split(":", 1)
                out[key] = float(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def device_capacity(device: str, override_gib: float | None) -> tuple[float | None, str]:
    """Bytes of memory one rank's device has, and where the number came from."""
    if override_gib is not None:
        return override_gib * GIB, f"--device-memory-gib {override_gib:g}"
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return float(total), f"{torch.cuda.get_device_name()} ({free / GIB:.1f} GiB free now)"
        return None, "no GPU visible here: pass --device-memory-gib"
    info = _meminfo()
    if "MemAvailable" in info:
        return info["MemAvailable"], f"this node's available RAM, MemTotal {info.get('MemTotal', 0) / GIB:.1f} GiB"
    return None, "/proc/meminfo unreadable"


# --------------------------------------------------------------------------------------------
# Memory model
# --------------------------------------------------------------------------------------------
@dataclass
class _Layout:
    engine: str  # "deepspeed" | "fsdp2"
    stage: int  # ZeRO stage (deepspeed)
    offload_optimizer: bool
    offload_param: bool
    teacher_offload: bool
    world: int
    loss_group: int
    micro_batch: int
    seq_len: int
    chunk: int
    loss_buffers: int  # [chunk, V/G] fp32 buffers of the fused loss: 3 with compiled row passes
    dtype_bytes: int
    activation_checkpointing: bool
    eager_attention: bool
    buckets: dict
    hidden_term: bool = False  # loss.hidden_weight > 0: per-layer projections + teacher layer states
    # The teacher is read straight into ZeRO-3 partitions (engine.sharded_load with a
    # teacher directory): bytes of its largest checkpoint file, which a rank holds at once.
    teacher_partitioned_load: int | None = None
    student_partitioned_load: int | None = None  # likewise the student (ZeRO-3 student engine)

    def describe(self) -> str:
        if self.engine == "deepspeed":
            eng = (f"DeepSpeed ZeRO-{self.stage}" + (" + optimizer offload" if self.offload_optimizer else "")
                   + (" + param offload" if self.offload_param else "")
                   + (" + teacher offload" if self.teacher_offload else ""))
        else:
            eng = "FSDP2" + (" + activation checkpointing" if self.activation_checkpointing else "")
        dt = {2: "bf16", 4: "fp32"}[self.dtype_bytes]
        return (f"{eng}, {dt}, world {self.world}, loss group {self.loss_group}, micro-batch "
                f"{self.micro_batch} x {self.seq_len} tokens")


def estimate_components(teacher: ModelStats | None, student: ModelStats, vocab: int, lay: _Layout,
                        *, on_gpu: bool) -> dict[str, float]:
    """Bytes per rank on the device, by component (module docstring)."""
    b, W, G = lay.dtype_bytes, lay.world, lay.loss_group
    shard = G if lay.engine == "fsdp2" else W  # ranks a body is partitioned over
    P = student.body_params
    master = 0 if b == 4 else 4
    c: dict[str, float] = {}
    if lay.engine == "deepspeed":
        s = lay.stage
        gather = min(P, max(2 * student.largest_block, lay.buckets["stage3_prefetch_bucket_size"])) * b
        c["student weights"] = (b * P / W + gather) if s == 3 else b * P
        if s == 3 and lay.offload_param:
            c["student weights"] = gather
        bucket = min(P, lay.buckets["reduce_bucket_size"]) * b
        c["student gradients"] = b * P if s == 1 else b * P / W + bucket
        c["student AdamW states" + (" + fp32 master" if master else "")] = \
            0.0 if lay.offload_optimizer else (8 + master) * P / W
        if lay.teacher_offload:
            c["teacher weights (ZeRO-3, offloaded)"] = min(teacher.body_params, 2 * teacher.largest_block) * b if teacher else 0.0
        elif teacher is not None:
            c["teacher weights (ZeRO-3)"] = b * teacher.body_params / W + min(
                teacher.body_params, max(2 * teacher.largest_block, lay.buckets["stage3_prefetch_bucket_size"])) * b
    else:
        gather = 2 * student.largest_block * b
        c["student weights (fp32 shard + gathered blocks)"] = 4 * P / shard + gather
        c["student gradients (fp32 shard)"] = 4 * P / shard
        c["student AdamW states"] = 8 * P / shard
        if teacher is not None:
            c["teacher weights (shard + gathered blocks)"] = b * teacher.body_params / shard + 2 * teacher.largest_block * b
    rows = math.ceil(vocab / G)
    c["student lm_head shard (weight, grad, AdamW; fp32)"] = 16 * rows * student.hidden
    if teacher is not None:
        c["teacher lm_head shard (fp32)"] = 4 * rows * teacher.hidden
    tokens = lay.micro_batch * lay.seq_len
    d_t = teacher.hidden if teacher is not None else student.hidden
    c[f"fused loss: {lay.loss_buffers} x [{lay.chunk}, V/G] fp32 + gathered hiddens"] = (
        lay.loss_buffers * lay.chunk * rows * 4 + 2 * G * tokens * (student.hidden + d_t) * 4)
    per_layer = tokens * (10 * student.hidden + 4 * student.ffn) * b
    if lay.activation_checkpointing:
        act = student.layers * tokens * student.hidden * b + per_layer
    else:
        act = student.layers * per_layer
    if lay.eager_attention:
        att = lay.micro_batch * student.heads * lay.seq_len**2 * b * 2
        act += att * (1 if lay.activation_checkpointing else student.layers)
    c["student activations"] = act
    if lay.hidden_term and teacher is not None:
        proj = student.hidden * teacher.hidden if student.hidden != teacher.hidden else 0
        c["hidden-state term: projections (fp32 + AdamW) + teacher layer states"] = (
            16 * student.layers * proj + student.layers * tokens * teacher.hidden * b)
    if teacher is not None:
        t_act = tokens * (4 * teacher.hidden + 3 * teacher.ffn) * b + tokens * teacher.hidden * b
        if lay.eager_attention:
            t_act += lay.micro_batch * teacher.heads * lay.seq_len**2 * b * 2
        c["teacher forward (no_grad, one block)"] = t_act
    c["runtime (CUDA context, buffers)" if on_gpu else "runtime (python, torch, libraries)"] = \
        RUNTIME_GPU if on_gpu else RUNTIME_CPU
    if not on_gpu:  # loading happens in the same memory
        c.update(loading_components(teacher, student, lay, on_gpu=False))
    return c


def loading_components(teacher: ModelStats | None, student: ModelStats, lay: _Layout, *,
                       on_gpu: bool) -> dict[str, float]:
    """Host bytes per rank while the models load, before the engines shard them. A model read
    into ZeRO-3 partitions costs the host one checkpoint file on GPUs (the partitions are in
    device memory); on CPU the loader's transient memory makes it about a whole fp32 load
    (measured by tools/bench_load.py, BENCHMARKS.md)."""
    c = {}
    for role, stats, partitioned in (("student", student, lay.student_partitioned_load),
                                     ("teacher", teacher, lay.teacher_partitioned_load)):
        if stats is None:
            continue
        if partitioned is None:
            c[f"{role}: fp32 copy while loading"] = 4 * stats.total_params
        elif on_gpu:
            c[f"{role}: one checkpoint file on the host while loading into ZeRO-3 partitions"] = partitioned
        else:
            c[f"{role}: loading into ZeRO-3 partitions on CPU (about a whole fp32 copy)"] = 4 * stats.total_params
    return c


def _loading_words(lay: _Layout) -> str:
    words = {None: "a fp32 copy"}
    return " + ".join(
        f"{role}: {words.get(load, 'one checkpoint file')}"
        for role, load in (("student", lay.student_partitioned_load), ("teacher", lay.teacher_partitioned_load)))


def _largest_checkpoint_file(path: str) -> int:
    sizes = [f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in Path(path).glob(pattern)]
    return max(sizes, default=0)


def _fits(c: dict[str, float], sharing: int, capacity: float | None) -> bool:
    return capacity is None or sum(c.values()) * sharing <= HEADROOM * capacity


def _suggest(teacher, student, vocab, lay: _Layout, *, on_gpu, sharing, capacity, gpus_per_node) -> list[str]:
    """Changes that make the estimate fit: single changes first, then combinations, then the
    smallest number of ranks that would fit (with the current engine settings or with ZeRO-3)."""
    def variant(**kw) -> _Layout:
        return variant_of(lay, **kw)

    tries: list[tuple[str, _Layout]] = []
    if lay.engine == "deepspeed":
        if lay.stage < 3:
            tries.append(("ZeRO-3 (engine.ds_config=ds_configs/zero3.json)", variant(stage=3)))
        if not lay.teacher_offload and teacher is not None:
            tries.append(("the teacher's weights offloaded to CPU "
                          "(engine.teacher_ds_config=ds_configs/teacher_zero3_offload.json)", variant(teacher_offload=True)))
            tries.append(("ZeRO-3 and the teacher offloaded to CPU (ds_configs/zero3.json + "
                          "ds_configs/teacher_zero3_offload.json)", variant(stage=3, teacher_offload=True)))
        if not lay.offload_optimizer:
            tries.append(("ZeRO-3 with optimizer and weight offload (engine.ds_config=ds_configs/zero3_offload.json)",
                          variant(stage=3, offload_optimizer=True, offload_param=True)))
            if teacher is not None:
                tries.append(("everything offloaded (ds_configs/zero3_offload.json + teacher_zero3_offload.json)",
                              variant(stage=3, offload_optimizer=True, offload_param=True, teacher_offload=True)))
    else:
        if not lay.activation_checkpointing:
            tries.append(("engine.activation_checkpointing=true", variant(activation_checkpointing=True)))
        if lay.loss_group < lay.world:
            tries.append((f"loss.loss_group_size={lay.world} (FSDP2 shards over the loss group)",
                          variant(loss_group=lay.world)))
    if lay.micro_batch > 1:
        tries.append((f"data.micro_batch_size=1 (and optim.grad_accum x {lay.micro_batch} to keep the batch)",
                      variant(micro_batch=1)))
    if lay.eager_attention:
        tries.append(("models.attention=sdpa", variant(eager_attention=False)))
    if lay.dtype_bytes == 4 and on_gpu:
        tries.append(("models.dtype=bf16", variant(dtype_bytes=2)))
    for g in (2, 4, 8):
        if lay.world % (lay.loss_group * g) == 0:
            tries.append((f"loss.loss_group_size={lay.loss_group * g}", variant(loss_group=lay.loss_group * g)))
            break
    out = []
    for text, new in tries:
        need = sum(estimate_components(teacher, student, vocab, new, on_gpu=on_gpu).values())
        if _fits({"": need}, sharing, capacity):
            out.append(f"{text}: about {need / GIB:.1f} GiB per rank")
        if len(out) == 3:
            break
    step = gpus_per_node or 1
    bases = [("", lay)]
    if lay.engine == "deepspeed" and lay.stage < 3:
        bases.append((" with ZeRO-3", variant(stage=3)))
    if lay.engine == "deepspeed" and teacher is not None and not lay.teacher_offload:
        bases.append((" with ZeRO-3 and the teacher offloaded", variant(stage=3, teacher_offload=True)))
    for text, base in bases:
        hit = None
        for world in range(lay.world + step, 65537, step):
            if world % base.loss_group == 0:
                need = sum(estimate_components(teacher, student, vocab, variant_of(base, world=world),
                                               on_gpu=on_gpu).values())
                if _fits({"": need}, sharing, capacity):
                    hit = (world, need)
                    break
        if hit:
            nodes = f" ({hit[0] // step} nodes of {step})" if gpus_per_node else ""
            out.append(f"{hit[0]} ranks{nodes}{text}: about {hit[1] / GIB:.1f} GiB per rank")
            break
    if not out:
        out.append("no change tried fits: a smaller teacher or student, or far more ranks with everything offloaded")
    return out


def variant_of(lay: _Layout, **kw) -> _Layout:
    new = copy.copy(lay)
    for k, v in kw.items():
        setattr(new, k, v)
    return new


# --------------------------------------------------------------------------------------------
# The preflight
# --------------------------------------------------------------------------------------------
def _ds_json(load, cfg, report: Report, **kw) -> dict | None:
    """A DeepSpeed config as the engine loads it (``load``: student_ds_config or
    teacher_ds_config, which hold its rules); a problem is reported, not raised."""
    try:
        return load(cfg, **kw)
    except (ValueError, OSError) as e:
        report.problems.append(str(e))
    return None


def _offload(zero: dict, key: str) -> bool:
    section = zero.get(key)
    dev = section.get("device", "none") if isinstance(section, dict) else "none"
    return str(dev).lower() in ("cpu", "nvme")


# Attention kernels that exist only on CUDA, and the package each one imports.
_CUDA_ATTENTION = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
# Where SLURM says which GPUs it gave the job (CUDA_VISIBLE_DEVICES says nothing: the
# `deepspeed` launcher sets it on CPU-only nodes too).
_SLURM_GPUS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE")


def device_problems(cfg, *, environ=None, cuda_available: bool | None = None) -> list[str]:
    """What the job or the config asks of this node's devices that it does not have.

    Run where the training runs (not by tailkd-preflight, which may run on a login node): a GPU
    job on a node where torch sees no GPU would otherwise train on the CPU, silently and a
    thousand times slower, or fail deep inside a kernel after the models are loaded.
    """
    import importlib.util

    import torch

    environ = os.environ if environ is None else environ
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    problems = []
    if not cuda:
        build = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" if torch.version.cuda
                 else f"torch {torch.__version__} is a CPU-only build")
        # GPU index lists ("0" is a GPU), and a count ("0" is none)
        given = [(k, environ[k]) for k in _SLURM_GPUS
                 if environ.get(k, "").strip() not in (("", "0") if k == "SLURM_GPUS_ON_NODE" else ("",))]
        if given:
            problems.append(f"SLURM gave this job GPUs ({given[0][0]}={given[0][1]}) but torch sees none ({build}; "
                            "check nvidia-smi and the driver): install torch for this node's CUDA, or submit "
                            "the job without GPUs to train on the CPU")
        elif environ.get("DS_ACCELERATOR", "").lower() == "cuda":
            problems.append(f"DS_ACCELERATOR=cuda asks DeepSpeed for a GPU but torch sees none ({build}): run on a "
                            "GPU node, or set DS_ACCELERATOR=cpu")
        if cfg.models.attention in _CUDA_ATTENTION:
            problems.append(f"models.attention = {cfg.models.attention} runs only on CUDA GPUs and torch sees none "
                            "here: use models.attention=sdpa")
    elif cfg.models.attention in _CUDA_ATTENTION and importlib.util.find_spec(_CUDA_ATTENTION[cfg.models.attention]) is None:
        problems.append(f"models.attention = {cfg.models.attention} needs the {_CUDA_ATTENTION[cfg.models.attention]} "
                        "package, which is not installed: install it, or use models.attention=sdpa")
    return problems


def run_preflight(cfg, *, world_size: int, gpus_per_node: int | None = None,
                  local_world_size: int | None = None, device: str | None = None,
                  device_memory_gib: float | None = None, host_memory_gib: float | None = None,
                  check_memory: bool | None = None) -> Report:
    """Check ``cfg`` (a TrainConfig) for a job of ``world_size`` ranks. Never raises for what it
    checks: every finding is a line in ``Report.problems`` / ``warnings``.

    Args:
        gpus_per_node: ranks per node (processes per node on CPU); default ``local_world_size``,
            else the whole job on one node.
        local_world_size: the launcher's ranks on this node (what train.py knows).
        device: "cuda" or "cpu"; default "cuda" when a GPU is visible or ``device_memory_gib``
            is given, else "cpu".
        device_memory_gib: memory of one rank's device (one GPU; on CPU the node's RAM).
        host_memory_gib: the nodes' RAM (GPUs), for the model-loading check; default this
            machine's MemTotal when a GPU is visible here.
        check_memory: False skips the memory verdict; default: on, unless the environment
            variable TAILKD_PREFLIGHT_MEMORY=warn (memory findings become warnings) or off.
    """
    import torch

    from tailkd_dist.losses.fused import group_chunk_size
    from tailkd_dist.models import hidden_scale, plan_vocab, tokenizer_dir
    from tailkd_dist.parallel.topology import validate_degrees

    r = Report()
    cfg = copy.deepcopy(cfg)
    try:  # loss.loss_group_size 0 = auto (resolved for this world size, as train.py does)
        from tailkd_dist.config import resolve_loss_group

        resolve_loss_group(cfg, world_size)
    except ImportError:  # a version without "auto"
        pass
    mode = os.environ.get("TAILKD_PREFLIGHT_MEMORY", "error").lower()
    if check_memory is None:
        check_memory = mode != "off"
    per_node = gpus_per_node or local_world_size or world_size
    if device is None:
        device = "cuda" if (torch.cuda.is_available() or device_memory_gib is not None) else "cpu"
    on_gpu = device == "cuda"

    # -- layout ----------------------------------------------------------------------------
    lg = cfg.loss.loss_group_size
    try:
        validate_degrees(world_size=world_size, loss_group_size=lg)
    except ValueError as e:
        r.problems.append(f"loss.loss_group_size = {lg}: {e}")
    if gpus_per_node and world_size % gpus_per_node:
        r.problems.append(f"world size {world_size} is not a whole number of nodes of {gpus_per_node} "
                          f"GPUs (processes) each: launch a multiple of {gpus_per_node} ranks")
    if gpus_per_node and lg > gpus_per_node and world_size > gpus_per_node:
        r.warnings.append(f"loss.loss_group_size = {lg} spans nodes ({gpus_per_node} ranks per node): the "
                          "fused loss's per-chunk all-reduces cross the network; keep the loss group inside a node")
    if cfg.engine.kind == "fsdp2" and lg == 1 and world_size > 1:
        r.warnings.append(f"engine fsdp2 shards over the loss group, which has 1 rank: every rank holds full "
                          f"replicas; set loss.loss_group_size={world_size} to shard")

    # -- models and vocabularies -----------------------------------------------------------
    t_spec = cfg.models.teacher
    online = t_spec.path is not None or t_spec.config is not None
    cache = None  # the teacher cache's manifest
    if t_spec.cache is not None:
        from tailkd_dist.data.teacher_cache import read_cache_manifest

        try:
            cache = read_cache_manifest(t_spec.cache, remote=t_spec.cache_remote)
        except ValueError as e:
            r.problems.append(str(e))
    has_teacher = online or cache is not None
    stats: dict[str, ModelStats] = {}
    metas = {}
    for role in ("teacher", "student"):
        if role == "teacher" and not has_teacher:
            continue
        spec = getattr(cfg.models, role)
        if role == "teacher" and not online:  # the cache alone: the config it recorded
            spec = dataclasses.replace(spec, config=cache["teacher_cache"]["config"])
        try:
            stats[role], metas[role] = model_stats(spec, role)
        except Exception as e:  # unreadable config.json, unknown model_type, ...
            where = spec.path or "its config mapping"
            r.problems.append(f"models.{role}: cannot read the model config from {where} ({type(e).__name__}: {e})")
            continue
        try:  # what the fused loss computes is what the model computes (the engines fold the same scale)
            hidden_scale(metas[role].config, role=role)
        except ValueError as e:
            r.problems.append(str(e))
    vocab = None
    if "student" in metas and (not has_teacher or "teacher" in metas):
        t_key = "teacher" if has_teacher else "student"
        try:
            plan = plan_vocab(metas[t_key], metas["student"], teacher_spec=getattr(cfg.models, t_key),
                              student_spec=cfg.models.student)
            r.vocab, vocab = plan, plan.vocab
            r.info.append(f"vocabulary: {plan.vocab} rows used by the loss (teacher lm_head {plan.teacher_rows} "
                          f"rows, student {plan.student_rows})" + (f"; {plan.note}" if plan.note else ""))
        except ValueError as e:
            r.problems.append(f"vocabulary: {e}")
    for role, s in stats.items():
        r.info.append(f"{role}: {_count(s.total_params)} parameters ({s.layers} layers, hidden {s.hidden}, "
                      f"lm_head {s.head_rows} x {s.hidden})")
    if cache is not None and "teacher" in stats:
        # Read from the cache: no teacher body on any rank, only its head and hidden states.
        stats["teacher"] = dataclasses.replace(stats["teacher"], body_params=0, largest_block=0, ffn=0)
        r.info.append(f"teacher: read from the cache {t_spec.cache_remote or t_spec.cache} (its body is never built)")
    if cfg.loss.hidden_weight > 0 and {"teacher", "student"} <= set(stats):
        from tailkd_dist.hidden import check_layer_map, default_layer_map

        try:  # the map the engine will use (given, recorded by the derivation, or spread)
            layers = dict(student_layers=stats["student"].layers, teacher_layers=stats["teacher"].layers)
            check_layer_map(cfg.loss.hidden_layer_map or default_layer_map(
                **layers, student_path=cfg.models.student.path), **layers)
        except ValueError as e:
            r.problems.append(str(e))
    if vocab is not None:
        from tailkd_dist.config import check_k_fits

        try:
            check_k_fits(cfg, vocab)
        except ValueError as e:
            r.problems.append(str(e))
        if vocab < lg:
            r.problems.append(f"the vocabulary ({vocab} rows) cannot be split over loss.loss_group_size = {lg} ranks")

    # -- data ------------------------------------------------------------------------------
    from tailkd_dist.data.dataset import check_compat, read_index, read_manifest

    seq_len = None
    manifest = None
    try:
        if cfg.data.remote is not None:
            with tempfile.TemporaryDirectory(prefix="tailkd-preflight-") as tmp:
                manifest = read_manifest(local=tmp, remote=cfg.data.remote)
        else:
            manifest = read_manifest(local=cfg.data.path)
    except (ValueError, OSError) as e:
        where = cfg.data.remote or cfg.data.path
        r.problems.append(f"data ({where}): {e}")
    if manifest is not None:
        seq_len = int(manifest.get("seq_len", 0)) or None
        splits = manifest.get("splits", {})
        if cfg.data.train_split not in splits:
            r.problems.append(f"data.train_split = {cfg.data.train_split!r} is not in the shards' manifest "
                              f"(splits: {', '.join(splits) or 'none'})")
        else:
            # Streaming gives every rank ceil(rows / ranks) rows (padded) and the loader drops a
            # last short micro-batch: fewer rows than one micro-batch make every epoch empty.
            rows = int(splits[cfg.data.train_split].get("rows", 0))
            per_rank = -(-rows // max(1, world_size))
            if per_rank < cfg.data.micro_batch_size:
                r.problems.append(
                    f"data.micro_batch_size = {cfg.data.micro_batch_size} rows but split {cfg.data.train_split!r} "
                    f"has {rows} rows, {per_rank} per rank over {world_size} rank(s): every epoch would be "
                    "empty; lower data.micro_batch_size, or use fewer ranks or more data")
        for split in (cfg.data.train_split, cfg.data.eval_split):
            if split not in splits or cfg.data.remote is not None:
                continue
            index = Path(cfg.data.path) / split / "index.json"
            if not index.is_file():
                r.problems.append(f"data: {index} is missing (the split's shard index)")
                continue
            try:
                read_index(index)
            except ValueError as e:
                r.problems.append(f"data: {e}")
        if cfg.data.eval_split not in splits:
            # Data prepared without a validation split trains without evaluations; a split named
            # on purpose, or periodic evaluations asked for, must not be skipped in silence.
            from tailkd_dist.config import DataConfig

            have = f"the shards' splits: {', '.join(splits) or 'none'}"
            if cfg.data.eval_split != DataConfig.eval_split:
                r.problems.append(f"data.eval_split = {cfg.data.eval_split!r} is not in the shards' manifest "
                                  f"({have}): name one of them")
            elif cfg.eval.every_steps > 0:
                r.problems.append(f"eval.every_steps = {cfg.eval.every_steps} asks for evaluations but the shards "
                                  f"have no {cfg.data.eval_split!r} split ({have}): prepare the data with "
                                  "--val-fraction, name a split in data.eval_split, or set eval.every_steps=0")
            else:
                r.warnings.append(f"data: no {cfg.data.eval_split!r} split in the shards: the run will not "
                                  "evaluate")
        tok = tokenizer_dir(cfg.models.student) or tokenizer_dir(cfg.models.teacher)
        if tok is None:
            r.warnings.append("no tokenizer directory in the config (models.*.tokenizer or path): the shards' "
                              "tokenizer cannot be checked against the models'")
        try:
            check_compat(manifest, tokenizer_dir=tok, model_vocab_size=vocab)
        except (ValueError, KeyError) as e:
            r.problems.append(f"shards: {e}")
        for role, s in stats.items():
            if seq_len and s.max_positions and seq_len > s.max_positions:
                # Learned positions fail at step 1 (an index past the table); rotary ones would
                # train, silently, at positions the model was never made for.
                r.problems.append(f"the shards' rows have {seq_len} positions but the {role}'s position "
                                  f"table has {s.max_positions} (max_position_embeddings): prepare the data "
                                  f"with --seq-len {s.max_positions} or less, or use a {role} with more positions")

    # -- engine settings ----------------------------------------------------------------------
    dtype = cfg.models.dtype
    if dtype == "auto":
        dtype = "bf16" if on_gpu else "fp32"
    if cfg.engine.kind == "fsdp2" and not on_gpu:
        dtype = "fp32"  # the fsdp2 adapter computes in fp32 on CPU
    if cache is not None:
        from tailkd_dist.data.teacher_cache import cache_dtype, check_cache_matches, teacher_identity
        from tailkd_dist.models import teacher_compute_dtype

        try:
            check_cache_matches(cache, cache=t_spec.cache,
                                data_manifest_path=Path(cfg.data.path) / "manifest.json" if cfg.data.remote is None
                                else None,
                                teacher=teacher_identity(t_spec) if online else None,
                                dtype=cache_dtype(teacher_compute_dtype(cfg, device)))
        except (ValueError, OSError) as e:
            r.problems.append(str(e))
    from tailkd_dist.engines.ds_config import student_ds_config, teacher_ds_config

    stage, off_opt, off_param, t_off, buckets = 3, False, False, False, dict(_DS_DEFAULTS)
    if cfg.engine.kind == "deepspeed":
        kw = dict(world_size=world_size, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
        ds = _ds_json(student_ds_config, cfg, r, **kw)
        tds = _ds_json(teacher_ds_config, cfg, r, **kw) if online else None  # no engine for a cache
        if ds is not None:
            zero = ds["zero_optimization"]
            stage = zero["stage"]
            off_opt, off_param = _offload(zero, "offload_optimizer"), _offload(zero, "offload_param")
            for k in buckets:
                if isinstance(zero.get(k), (int, float)):
                    buckets[k] = float(zero[k])
        if tds is not None:
            t_off = _offload(tds["zero_optimization"], "offload_param")

    # -- memory ----------------------------------------------------------------------------
    if check_memory and "student" in stats and vocab is not None:
        lay = _Layout(engine=cfg.engine.kind, stage=stage, offload_optimizer=off_opt, offload_param=off_param,
                      teacher_offload=t_off, world=world_size, loss_group=max(1, lg),
                      micro_batch=cfg.data.micro_batch_size, seq_len=seq_len or 2048,
                      chunk=cfg.loss.chunk_size or group_chunk_size(accelerator=True, vocab=vocab, group_size=lg),
                      # the GPU's "auto" is compiled (rowpass.row_path): a gradient buffer more
                      loss_buffers=2 if cfg.loss.row_passes == "eager" else 3,
                      dtype_bytes=2 if dtype == "bf16" else 4,
                      activation_checkpointing=cfg.engine.kind == "fsdp2" and cfg.engine.activation_checkpointing,
                      eager_attention=cfg.models.attention == "eager", buckets=buckets,
                      hidden_term=float(getattr(cfg.loss, "hidden_weight", 0.0) or 0.0) > 0,
                      teacher_partitioned_load=(
                          _largest_checkpoint_file(cfg.models.teacher.path)
                          if cfg.engine.kind == "deepspeed" and cfg.engine.sharded_load
                          and cfg.models.teacher.path is not None else None),
                      student_partitioned_load=(
                          _largest_checkpoint_file(cfg.models.student.path)
                          if cfg.engine.kind == "deepspeed" and cfg.engine.sharded_load and stage == 3
                          and cfg.models.student.path is not None else None))
        if seq_len is None:
            r.warnings.append("memory: the shards' row length is unknown; activations estimated for 2048 tokens")
        teacher = stats.get("teacher")
        comps = estimate_components(teacher, stats["student"], vocab, lay, on_gpu=on_gpu)
        capacity, source = device_capacity(device, device_memory_gib)
        sharing = 1 if on_gpu else per_node
        mem = MemoryEstimate(components=comps, per_rank=sum(comps.values()), ranks_sharing=sharing,
                             capacity=capacity, capacity_source=source, device=device, layout=lay.describe())
        if on_gpu:
            mem.host_per_node = per_node * sum(loading_components(teacher, stats["student"], lay, on_gpu=True).values())
            if cfg.engine.kind == "fsdp2" and cfg.engine.sharded_load and world_size > 1:
                # FSDP2's sharded load: rank 0 alone reads a model directory, whole, in fp32.
                for role, st in (("teacher", teacher), ("student", stats["student"])):
                    if st is not None and getattr(cfg.models, role).path is not None:
                        mem.host_per_node -= (per_node - 1) * 4 * st.total_params
            if host_memory_gib is not None:
                mem.host_capacity = host_memory_gib * GIB
            elif torch.cuda.is_available():
                mem.host_capacity = _meminfo().get("MemTotal")
        r.memory = mem
        findings = []
        if capacity is None:
            mem.verdict = "UNKNOWN"
            r.warnings.append(f"memory: device memory unknown ({source}); no verdict")
        elif _fits(comps, sharing, capacity):
            mem.verdict = "OK"
            if mem.needed > 0.75 * capacity:
                r.warnings.append(f"memory: the estimate ({mem.needed / GIB:.1f} GiB) is within 25 % of the "
                                  f"device's {capacity / GIB:.1f} GiB")
        else:
            mem.verdict = "TOO BIG"
            mem.suggestions = _suggest(teacher, stats["student"], vocab, lay, on_gpu=on_gpu, sharing=sharing,
                                       capacity=capacity, gpus_per_node=gpus_per_node)
            where = (f"per GPU ({source})" if on_gpu else
                     f"for {sharing} ranks sharing this node's memory ({source})")
            findings.append(f"memory: TOO BIG: about {mem.needed / GIB:.1f} GiB needed {where}, "
                            f"{capacity / GIB:.1f} GiB available (x {HEADROOM} headroom) with {lay.describe()}; "
                            f"what fits: " + "; ".join(mem.suggestions))
        if on_gpu and mem.host_capacity is None and mem.host_per_node > 256 * GIB:
            r.warnings.append(f"memory: loading needs about {mem.host_per_node / GIB:.0f} GiB of host RAM per node "
                              f"({per_node} ranks x {_loading_words(lay)}); pass --host-memory-gib to check it")
        if mem.host_per_node and mem.host_capacity and mem.host_per_node > HEADROOM * mem.host_capacity:
            findings.append(f"memory: loading needs about {mem.host_per_node / GIB:.0f} GiB of host RAM per node "
                            f"({per_node} ranks x {_loading_words(lay)}) but the node has "
                            f"{mem.host_capacity / GIB:.0f} GiB: fewer ranks per node or smaller models"
                            + ("" if lay.teacher_partitioned_load is not None or lay.engine != "deepspeed" else
                               ", or give the teacher as a directory with engine.sharded_load: true"))
        (r.warnings if mode == "warn" else r.problems).extend(findings)
    return r


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = ArgumentParser(
        prog="tailkd-preflight",
        description="Cheap checks of a tailkd-train config for a job of --world-size ranks, before an "
        "allocation is burned: vocabularies, layout, memory estimate, data. Exit 0 on OK, 2 with one "
        "line per problem.")
    ap.add_argument("config", help="the YAML config tailkd-train will get")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as for tailkd-train")
    ap.add_argument("--world-size", type=whole_number(), required=True, help="ranks of the job (nodes x GPUs per node)")
    ap.add_argument("--gpus-per-node", type=whole_number(), help="ranks per node (processes per node on CPU)")
    ap.add_argument("--device", choices=["cuda", "cpu"],
                    help="the ranks' device (default: cuda if a GPU is visible or --device-memory-gib is given)")
    ap.add_argument("--device-memory-gib", type=positive_number, help="memory of one GPU (on CPU: the node's RAM)")
    ap.add_argument("--host-memory-gib", type=positive_number, help="RAM of one node (GPU runs: the model-loading check)")
    ap.add_argument("--engine", choices=["deepspeed", "fsdp2"], help="override engine.kind")
    ap.add_argument("--quiet", action="store_true", help="print only the verdict and the problems")
    args = ap.parse_intermixed_args(argv)  # overrides before or after the options
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tailkd_dist.config import load_config

    overrides = list(args.overrides) + ([f"engine.kind={args.engine}"] if args.engine else [])
    try:
        cfg = load_config(args.config, overrides)
    except ValueError as e:
        say_error("tailkd-preflight", e)
        return 2
    report = run_preflight(cfg, world_size=args.world_size, gpus_per_node=args.gpus_per_node, device=args.device,
                           device_memory_gib=args.device_memory_gib, host_memory_gib=args.host_memory_gib)
    lines = [report.verdict_line()] if args.quiet else report.lines()
    print("\n".join(lines), flush=True)
    for p in report.problems:
        say_error("tailkd-preflight", p)
    return 0 if report.ok else 2


if __name__ == "__main__":
    sys.exit(main())
