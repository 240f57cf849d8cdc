"""The divergences of the fused loss, each a small hook plugged into one chunk loop.

A hook says which per-token partial sums it adds to the group's SUM (``sums``), its per-token
value from the reduced sums, its gradient w.r.t. the student's logits on one row block
(written in place), whether that gradient needs the reduced sums (then the loop sweeps the
chunk a second time after the SUM) and how the teacher is seen (``plan``): every divergence
but TAD sees the chunk's teacher logits beside the student's; TAD decides here whether a
document spans chunks, so that beta(X) needs a teacher pre-pass first.

Specification: ``docs/loss.md`` ("The divergences", "The chunked form").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .columns import Columns


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) on a row block. Not bmm: its float32 accumulation over a 32k-long row
    drifts ~4e-6 relative; sum() reduces pairwise (~1e-7)."""
    return (a * b).sum(-1)


def fill_at(x: torch.Tensor, cols: torch.Tensor, value: float) -> torch.Tensor:
    """x with x[row, c] = value for each of the row's columns c in ``cols`` ([b, m]; -1: none).

    ``x`` must be the caller's own temporary: eagerly it is written in place by one scatter of
    b*m entries (no [b, V] mask is made or read); compiled, m compares per element fuse into the
    pass."""
    if cols.shape[1] == 0:
        return x
    if torch.compiler.is_compiling():
        at = torch.arange(x.shape[1], device=x.device)
        hit = at == cols[:, :1]
        for i in range(1, cols.shape[1]):
            hit = hit | (at == cols[:, i : i + 1])
        return x.masked_fill(hit, value)
    # The -1 entries land on column 0; it is put back afterwards unless 0 is a real column.
    col0 = x[:, 0].clone()
    x.scatter_(1, cols.clamp(min=0), value)
    x[:, 0] = torch.where((cols == 0).any(1), value, col0)
    return x


@dataclass
class RowBlock:
    """Rows of a chunk inside a row pass, as pure tensors: the normalised logits and the
    per-row quantities a divergence reads (per-row ones as [b, 1] columns so they broadcast).
    p, q and log p - log q are made on first use. Hooks never write into these tensors (only
    into temporaries of their own): a row pass is one function that ``torch.compile`` fuses
    whole (``rowpass``)."""

    log_p: torch.Tensor  # [b, V_r] teacher log-probabilities (this rank's vocabulary slice)
    log_q: torch.Tensor  # [b, V_r] student log-probabilities
    k_cols: torch.Tensor | None  # [b, m] columns of the teacher's top-k K in this slice (-1: none)
    beta_x: torch.Tensor  # [b, 1] TAD's beta(X) of the row's document (0 for the others)
    log_ratio: torch.Tensor | None  # [b, 1] log aT - log aS
    jsd_beta: float
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # reduced sums [b, 1] (second pass)

    # Made on first use (not functools.cached_property: its lock stops torch.compile on 3.11).
    _p: torch.Tensor | None = field(default=None, init=False, repr=False)
    _q: torch.Tensor | None = field(default=None, init=False, repr=False)
    _diff: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def p(self) -> torch.Tensor:
        if self._p is None:
            self._p = self.log_p.exp()
        return self._p

    @property
    def q(self) -> torch.Tensor:
        if self._q is None:
            self._q = self.log_q.exp()
        return self._q

    @property
    def diff(self) -> torch.Tensor:
        if self._diff is None:
            self._diff = self.log_p - self.log_q
        return self._diff

    def outside_k(self, x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """x (the caller's own temporary) with K's entries set to ``value``."""
        return fill_at(x, self.k_cols, value)

    def log_m(self) -> torch.Tensor:
        """JSD's mixture log(b p + (1-b) q), from the logs (no underflow of p or q)."""
        b = self.jsd_beta
        return torch.logaddexp(self.log_p + math.log(b), self.log_q + math.log1p(-b))


@dataclass(frozen=True)
class TeacherPlan:
    """How one call sees the teacher: ``teacher`` gives each chunk's K, log-normaliser and
    log aT and its normalised logits in row blocks; ``beta_x(rows, teacher_rows)`` gives TAD's
    beta(X) of those positions (zeros for the other divergences)."""

    teacher: object
    beta_x: Callable


class Divergence:
    """The default hook: no extra sums, teacher logits seen chunk by chunk, no beta(X)."""

    sums = Columns(())
    grad_needs_sums = False  # True: the gradient reads the group's reduced sums
    # True: the value or gradient needs the teacher's top-k K and both tail masses (else only
    # the monitoring statistics do, and they are computed only when asked for)
    needs_tails = False

    def plan(self, run) -> TeacherPlan:
        return TeacherPlan(run.in_chunk_teacher(), lambda rows, t: torch.zeros_like(t.lse))

    def partials(self, blk: RowBlock) -> dict[str, torch.Tensor]:
        return {}

    def value(self, tok: dict, jsd_beta: float) -> torch.Tensor:
        raise NotImplementedError

    def grad(self, blk: RowBlock) -> torch.Tensor:
        """d(divergence)/d(student logits) on the block (a new tensor; the row pass stores it
        over the student's logits)."""
        raise NotImplementedError


class ForwardKL(Divergence):
    def value(self, tok, jsd_beta):
        return tok["kl"]

    def grad(self, blk):
        return torch.sub(blk.q, blk.p)


class TAD(Divergence):
    """KL plus (beta(X) - 1) times the tail term (spec, "TAD")."""

    needs_tails = True

    def plan(self, run):
        # beta(X) needs the teacher's tail mass at every valid position of a document before
        # any of its tail gradients is final: a document spanning chunks needs the pre-pass.
        if run.positions > run.chunk_size and not run.documents_within_chunks():
            teacher = run.streamed_teacher()
            beta_all = run.beta_from(teacher.summary.log_tail.exp())
            return TeacherPlan(teacher, lambda rows, t: beta_all[rows])
        return TeacherPlan(run.in_chunk_teacher(), lambda rows, t: run.beta_from(t.log_tail.exp(), rows))

    def value(self, tok, jsd_beta):
        return tok["kl"] + (tok["beta_x"] - 1.0) * tok["at_d2"]

    def grad(self, blk):
        # j in K: q_j - p_j; j in tail: (q_j - p_j) + (beta(X)-1) (q_j aT/aS - p_j)  (spec).
        # q_j aT/aS is formed as exp(log q_j + log aT - log aS): exact even when aS underflows.
        # Clamped: K entries (masked out) could overflow; tail entries are <= aT <= 1.
        # In place on the hook's own temporary (one block-sized allocation when eager).
        tail = blk.outside_k(torch.add(blk.log_q, blk.log_ratio).clamp_(max=0.0).exp_().sub_(blk.p))
        return tail.mul_(blk.beta_x - 1.0).add_(blk.q).sub_(blk.p)


class ReverseKL(Divergence):
    sums = Columns.of("rkl")
    grad_needs_sums = True

    def partials(self, blk):
        # sum q (log q - log p) on the rank's slice: from log q - log p directly (no cancellation).
        return {"rkl": -rowdot(blk.q, blk.diff)}

    def value(self, tok, jsd_beta):
        return tok["rkl"]

    def grad(self, blk):
        # d/ds_j sum q log(q/p) = q_j (log q_j - log p_j - RKL)
        return torch.add(blk.diff, blk.sums["rkl"]).mul_(blk.q).neg_()


class JSD(Divergence):
    sums = Columns.of("jsd_p", "jsd_q")
    grad_needs_sums = True

    def partials(self, blk):
        log_m = blk.log_m()
        return {"jsd_p": rowdot(blk.p, blk.log_p - log_m), "jsd_q": rowdot(blk.q, blk.log_q - log_m)}

    def value(self, tok, jsd_beta):
        return jsd_beta * tok["jsd_p"] + (1.0 - jsd_beta) * tok["jsd_q"]

    def grad(self, blk):
        # dJSD/dq_i = (1-b) log(q_i/m_i); through the softmax: q_j (g_j - sum_i q_i g_i),
        # and sum_i q_i g_i = (1-b) KL(q||m) = (1-b) * jsd_q.
        return torch.sub(blk.log_q, blk.log_m()).sub_(blk.sums["jsd_q"]).mul_(blk.q).mul_(1.0 - blk.jsd_beta)


class CrossEntropyOnly(Divergence):
    def value(self, tok, jsd_beta):
        return torch.zeros_like(tok["kl"])

    def grad(self, blk):
        return torch.zeros_like(blk.q)


HOOKS: dict[str, Divergence] = {
    "tad": TAD(), "forward_kl": ForwardKL(), "reverse_kl": ReverseKL(), "jsd": JSD(),
    "none": CrossEntropyOnly(),
}
