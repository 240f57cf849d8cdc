"""Evaluation metrics (held-out NLL, agreement, KL/TAD terms, Full-ECE) and TensorBoard.

Full-ECE (Liu et al. 2024, "Full-ECE: A Metric For Token-level Calibration on Large Language
Models", arXiv 2406.11345, the calibration metric of the TAD paper): every (position i, token
k) pair is a sample with confidence p_i(k) and outcome 1[y_i = k]. Pairs are binned by
confidence into M equal-width bins over [0, 1]; with N positions,

    Full-ECE = sum_m |B*_m| / N * |A*_m - C*_m| = (1/N) sum_m | sum_{(i,k) in B_m} (1[y_i = k] - p_i(k)) |

(A*_m, C*_m: accuracy and mean confidence of bin m over all its pairs). It scores the whole
predicted distribution, not just the argmax. Under the vocab-parallel layout each rank bins
its vocabulary slice for the loss group's positions and the bins are summed over the world.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from tailkd_dist.losses import STAT_KEYS, fused_linear_distill
from tailkd_dist.losses.common import merge_lse
from tailkd_dist.parallel import vocab_parallel as vp


@torch.no_grad()
def full_ece_bins(hidden, weight, bias, labels, *, bins: int, group, chunk: int = 1024):
    """Per-bin [correct count, confidence sum] for this rank's vocab slice: [2, bins] float64."""
    lead = hidden.shape[:-1]
    h, lab = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    counts = [lab.numel()]
    if group is not None:
        counts = vp.all_gather_meta(torch.tensor([lab.numel()], device=lab.device), group)[:, 0].tolist()
        h, lab = vp.gather_rows(h, counts, group), vp.gather_rows(lab[:, None], counts, group)[:, 0]
    del lead
    v_local = weight.shape[0]
    sizes = vp.all_gather_meta(torch.tensor([v_local], device=h.device), group)[:, 0].tolist()
    off = sum(sizes[: vp.group_rank(group)])
    out = torch.zeros(2, bins, dtype=torch.float64, device=h.device)
    for c0 in range(0, h.shape[0], chunk):
        z = (h[c0 : c0 + chunk] @ weight.t()).float()
        if bias is not None:
            z += bias.float()
        m = z.amax(-1)
        s = torch.exp(z - m[:, None]).sum(-1)
        g = vp.all_gather_stats(torch.stack([m, s], 1), group)
        _, lse = merge_lse(g[..., 0], g[..., 1])
        p = torch.exp(z - lse[:, None])
        lab_c = lab[c0 : c0 + chunk]
        valid = (lab_c != -100)[:, None]
        b = (p * bins).long().clamp_(max=bins - 1)
        out[1].index_add_(0, b[valid.expand_as(b)], p[valid.expand_as(p)].double())
        own = (lab_c >= off) & (lab_c < off + v_local)
        rows = own.nonzero(as_tuple=True)[0]
        out[0].index_add_(0, b[rows, lab_c[rows] - off], torch.ones(rows.numel(), dtype=torch.float64, device=h.device))
    return out


@torch.no_grad()
def evaluate(adapter, batches, cfg) -> dict[str, float]:
    """Student and teacher on held-out micro-batches; global averages (every rank calls). Without
    a teacher (CE-only training) only the student's own numbers."""
    from tailkd_dist.step import _to, distill_loss, loss_kwargs

    adapter.eval()
    world = adapter.topo.group("world")
    sums = torch.zeros(len(STAT_KEYS) + 1, dtype=torch.float64, device=adapter.device)
    ece = torch.zeros(2, cfg.eval.ece_bins, dtype=torch.float64, device=adapter.device)
    kw = loss_kwargs(cfg)
    for batch in batches:
        b = _to(batch, adapter.device)
        th, sh = adapter.teacher.hidden(b), adapter.student_hidden(b)
        _, st = distill_loss(adapter, b, cfg, student_hidden=sh, teacher_hidden=th)
        teacher_ce = torch.zeros((), dtype=torch.float64, device=adapter.device)
        if adapter.teacher.present:
            # The teacher's own NLL: the fused loss with the teacher as "student", CE only.
            head = adapter.teacher.head()
            tw, tb = head.weight.detach(), None if head.bias is None else head.bias.detach()
            _, tst = fused_linear_distill(
                th, tw, th, tw, b["labels"], **{**kw, "divergence": "none"}, student_bias=tb,
                teacher_bias=tb, vocab_group=adapter.loss_group)
            teacher_ce = tst["ce"].double()
        sums += torch.stack([st[k].double() for k in STAT_KEYS] + [teacher_ce])
        ece += full_ece_bins(sh, adapter.student_head.weight, adapter.student_head.bias, b["labels"],
                             bins=cfg.eval.ece_bins, group=adapter.loss_group)
    if world is not None:
        dist.all_reduce(sums, group=world)
        dist.all_reduce(ece, group=world)
    # Each loss-group rank returned only its own positions' sums; ece bins were computed for
    # the group's positions on every rank's vocabulary slice, so they are complete once summed.
    v = dict(zip(list(STAT_KEYS) + ["teacher_ce"], sums.tolist()))
    n = max(v["valid_count"], 1.0)
    out = {"student_nll": v["ce"] / n, "full_ece": float((ece[0] - ece[1]).abs().sum() / n),
           "tokens": v["valid_count"]}
    out["student_ppl"] = math.exp(min(out["student_nll"], 50.0))
    if adapter.teacher.present:  # without a teacher (CE only) these would be the student's own
        out.update({"teacher_nll": v["teacher_ce"] / n, "top1_agreement": v["top1_agree"] / n,
                    "kl": v["kl"] / n, "d1": v["d1"] / n, "at_d2": v["at_d2"] / n, "kd": v["kd"] / n})
        out["teacher_ppl"] = math.exp(min(out["teacher_nll"], 50.0))
    adapter.train()
    return out


def step_scalars(res, cfg) -> dict[str, float]:
    """TensorBoard scalars of one training step (global means over valid tokens)."""
    v = res.stats
    n = max(v["valid_count"], 1.0)
    mean = lambda k: v[k] / n  # noqa: E731
    spread = lambda k: math.sqrt(max(v[f"{k}_sq"] / n - mean(k) ** 2, 0.0))  # noqa: E731
    total = cfg.loss.ce_weight * mean("ce") + cfg.loss.kd_weight * mean("kd") + cfg.loss.hidden_weight * mean("hidden_cos")
    out = {
        "loss/total": total, "loss/ce": mean("ce"), "loss/kl": mean("kl"), "loss/d1": mean("d1"),
        "loss/at_d2": mean("at_d2"), f"loss/{cfg.loss.divergence}": mean("kd"),
        "tail/teacher_mass_aT_mean": mean("a_t"), "tail/teacher_mass_aT_std": spread("a_t"),
        "tail/student_mass_aS_mean": mean("a_s"), "tail/student_mass_aS_std": spread("a_s"),
        "tail/topk_coverage": 1.0 - mean("a_s"),
        "entropy/teacher": mean("teacher_entropy"), "entropy/student": mean("student_entropy"),
        "agreement/top1": mean("top1_agree"),
        "optim/lr": res.lr, "optim/grad_norm": res.grad_norm,
    }
    if cfg.loss.divergence == "tad":
        out["tail/beta_x_mean"] = mean("beta_x")
    if cfg.loss.hidden_weight:
        out["loss/hidden_cos"] = mean("hidden_cos")
    if not getattr(res, "monitored", True):  # a step between logged ones: its losses only
        out = {k: v for k, v in out.items() if k in _EVERY_STEP or k == f"loss/{cfg.loss.divergence}"}
    return out


# What every step reports; the rest needs the loss's monitoring statistics (logged steps).
_EVERY_STEP = ("loss/total", "loss/ce", "loss/hidden_cos", "optim/lr", "optim/grad_norm")


class TensorBoard:
    """Rank 0 writes, everyone else is a no-op (torch.utils.tensorboard, no TensorFlow)."""

    def __init__(self, log_dir: str | None):
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, x in values.items():
                self.writer.add_scalar(k, x, step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
