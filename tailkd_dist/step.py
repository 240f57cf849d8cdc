"""One optimizer step of distillation, shared by every engine (the adapter does the rest).

The loss is a SUM over valid positions, normalised once by the global count of valid tokens
(all ranks, all micro-batches of the step): that count is known before the first forward (it
only needs the labels), which costs one all-reduce per step.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tailkd_dist.config import TrainConfig
from tailkd_dist.engines.base import clip_coefficient
from tailkd_dist.losses import STAT_KEYS, fused_linear_distill

IGNORE_INDEX = -100


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to optim.lr, then cosine to lr * min_lr_ratio at max_steps (step from 0)."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, o.max_steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_doc_ids(batch, cfg: TrainConfig) -> torch.Tensor | None:
    """beta(X) per document (the shards' doc ids, made unique per row across the whole job),
    or per row."""
    if cfg.loss.beta_scope == "row":
        return None
    docs = batch["doc_ids"]
    # Doc ids restart in every row; a row index (the sample's global index) keeps two rows'
    # documents apart when the loss gathers a group's rows. A document continued from the
    # previous row is, for attention, a new segment anyway.
    return batch["sample_idx"].view(-1, 1) * (docs.shape[1] + 1) + docs + 1


@dataclass
class StepResult:
    stats: dict[str, float]  # global sums over the step's valid tokens
    grad_norm: float
    lr: float
    tokens: int
    times: dict[str, float] = field(default_factory=dict)
    monitored: bool = True  # the loss's monitoring statistics were computed (else NaN in stats)


def _captured(hidden, role: str):
    return contextlib.nullcontext() if hidden is None else hidden.capture(role)


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def loss_kwargs(cfg: TrainConfig) -> dict:
    L = cfg.loss
    return dict(divergence=L.divergence, k=L.k, beta=L.beta, temperature=L.temperature,
                ce_weight=L.ce_weight, kd_weight=L.kd_weight, jsd_beta=L.jsd_beta, chunk_size=L.chunk_size or None,
                compiled=ROW_PASSES[L.row_passes])


# loss.row_passes -> fused_linear_distill(compiled=...)
ROW_PASSES = {"auto": None, "compiled": True, "eager": False}


def distill_loss(adapter, batch, cfg: TrainConfig, *, student_hidden, teacher_hidden, stats: bool = True):
    """The fused loss of one micro-batch on this rank (sums over its own positions)."""
    student = adapter.student_head
    teacher = adapter.teacher.head()
    if teacher_hidden is None:  # CE-only training: the student's own outputs, detached, stand in
        teacher_hidden, teacher = student_hidden.detach(), student
    t_bias = None if teacher.bias is None else teacher.bias.detach()
    return fused_linear_distill(
        student_hidden, student.weight, teacher_hidden, teacher.weight.detach(),
        batch["labels"], doc_ids=loss_doc_ids(batch, cfg), student_bias=student.bias,
        teacher_bias=t_bias, vocab_group=adapter.loss_group, stats=stats, **loss_kwargs(cfg),
    )


def optimizer_step(adapter, hidden, *, lr: float, grad_clip: float) -> float:
    """After the last micro-batch: final gradients, the global norm over everything trained
    (one host sync: the clip decision needs it), clipping, the step. Returns the norm."""
    adapter.finish_grads()
    sq = adapter.grad_sq_norm().double()
    if hidden is not None:
        sq = sq + hidden.reduce_grads(group=adapter.topo.group("world"), divide_by=adapter.grad_replica_factor)
    total = math.sqrt(float(sq))  # the step's one host sync: the clip decision needs the value
    if not math.isfinite(total):
        raise FloatingPointError(f"gradient norm is {total}: stopping instead of training on NaN/inf")
    coef = clip_coefficient(total, grad_clip)
    if coef < 1.0:
        adapter.clip_grads(coef)
    adapter.apply_step(lr)
    if hidden is not None:
        hidden.step(lr=lr, coef=coef)
    return total


def train_step(adapter, micro_batches: list[dict], *, step: int, cfg: TrainConfig, stats: bool = True,
               hidden=None) -> StepResult:
    """One optimizer step; ``stats``: compute the loss's monitoring statistics (a step that
    is logged), else only the losses. ``hidden``: the hidden-state term (hidden.HiddenTerm)."""
    device = adapter.device
    world = adapter.topo.group("world")
    batches = [_to(b, device) for b in micro_batches]
    n_local = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches).to(torch.float64)
    counts = torch.stack([n_local, torch.tensor(float(sum(b["labels"].numel() for b in batches)),
                                                 dtype=torch.float64, device=n_local.device)])
    if world is not None:
        dist.all_reduce(counts, group=world)
    n_global = counts[0].clamp_min(1.0)
    scale = adapter.loss_scale(n_global)
    sums = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=device)
    hidden_sum = torch.zeros((), dtype=torch.float64, device=device)
    # Wall-clock split of the step (on GPUs without a sync: enqueue time, indicative only).
    times = dict.fromkeys(("teacher_forward", "student_forward", "loss", "student_backward", "optimizer"), 0.0)
    adapter.train()
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        with _captured(hidden, "teacher"):
            th = adapter.teacher.hidden(b)
        t1 = time.perf_counter()
        with _captured(hidden, "student"):
            sh = adapter.student_hidden(b)
        t2 = time.perf_counter()
        loss_sum, loss_stats = distill_loss(adapter, b, cfg, student_hidden=sh, teacher_hidden=th, stats=stats)
        if hidden is not None:
            cos_sum = hidden.loss_sum(b["labels"] != IGNORE_INDEX)
            loss_sum = loss_sum + cfg.loss.hidden_weight * cos_sum
            hidden_sum += cos_sum.detach().to(torch.float64)
        t3 = time.perf_counter()
        adapter.backward(loss_sum * scale.to(loss_sum.dtype))
        t4 = time.perf_counter()
        for key, dt in zip(("teacher_forward", "student_forward", "loss", "student_backward"),
                           (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key] += dt
        sums += torch.stack([loss_stats[k].detach().to(torch.float64) for k in STAT_KEYS])
        if i < len(batches) - 1:
            adapter.micro_step()
    lr = lr_at(step, cfg)
    t0 = time.perf_counter()
    grad_norm = optimizer_step(adapter, hidden, lr=lr, grad_clip=cfg.optim.grad_clip)
    times["optimizer"] = time.perf_counter() - t0
    sums = torch.cat([sums, hidden_sum.view(1)])
    if world is not None:
        dist.all_reduce(sums, group=world)
    values = dict(zip(list(STAT_KEYS) + ["hidden_cos"], sums.tolist()))
    loss = (cfg.loss.ce_weight * values["ce"] + cfg.loss.kd_weight * values["kd"]
            + cfg.loss.hidden_weight * values["hidden_cos"]) / max(values["valid_count"], 1.0)
    if not math.isfinite(loss):
        raise FloatingPointError(f"step {step}: loss is {loss}: stopping instead of training on NaN/inf")
    return StepResult(
        stats=values, grad_norm=grad_norm, lr=lr, tokens=int(counts[1].item()),
        times=times, monitored=stats,
    )
