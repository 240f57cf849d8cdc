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

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .columns import Columns


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) on a row block. Not bmm: its float32 accumulation over a 32k-long row
    drifts ~4e-6 relative; sum() reduces pairwise (~1e-7). The temporary is block-sized."""
    return (a * b).sum(-1)


def add_at(buf: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor, values) -> None:
    """buf[row, idx] += values where ``owned``. Entries not owned by this rank point at column
    0 and add exactly 0, so an accumulating index_put is exact whatever the duplicates (also
    for values of -inf: x + 0 stays x)."""
    n, v = buf.shape
    flat = (idx + torch.arange(n, device=idx.device)[:, None] * v).reshape(-1)
    if not torch.is_tensor(values):
        values = torch.full(idx.shape, float(values), dtype=buf.dtype, device=buf.device)
    vals = torch.where(owned, values.to(buf.dtype), torch.zeros((), dtype=buf.dtype, device=buf.device))
    buf.view(-1).index_put_((flat,), vals.reshape(-1), accumulate=True)


@dataclass
class RowBlock:
    """Rows of a chunk during its element-wise sweep: views of the normalised logits and the
    per-row quantities a divergence reads. p, q and log p - log q are block-sized temporaries
    made on first use."""

    log_p: torch.Tensor  # [b, V_r] teacher log-probabilities (this rank's vocabulary slice)
    log_q: torch.Tensor  # [b, V_r] student log-probabilities; the gradient overwrites it
    top_local: torch.Tensor | None  # [b, k] column of each K member in this slice (0 if not
    top_owned: torch.Tensor | None  # owned), and does this rank own it; None without K
    beta_x: torch.Tensor  # [b] TAD's beta(X) of the row's document (0 for the others)
    log_ratio: torch.Tensor  # [b] log aT - log aS
    jsd_beta: float
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # reduced sums (second sweep)

    @functools.cached_property
    def p(self) -> torch.Tensor:
        return self.log_p.exp()

    @functools.cached_property
    def q(self) -> torch.Tensor:
        return self.log_q.exp()

    @functools.cached_property
    def diff(self) -> torch.Tensor:
        return torch.sub(self.log_p, self.log_q)

    def drop(self, name: str) -> None:
        """Free a made-on-first-use temporary (made again if read later)."""
        self.__dict__.pop(name, None)

    def add_at_top(self, buf: torch.Tensor, values) -> None:
        """buf[row, K_local] += values where this rank owns the K entry (duplicates-safe)."""
        add_at(buf, self.top_local, self.top_owned, values)

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

    def grad(self, blk: RowBlock, out: torch.Tensor) -> None:
        raise NotImplementedError


class ForwardKL(Divergence):
    def value(self, tok, jsd_beta):
        return tok["kl"]

    def grad(self, blk, out):
        torch.sub(blk.q, blk.p, out=out)


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

    def grad(self, blk, out):
        # j in K: q_j - p_j; j in tail: (q_j - p_j) + (beta(X)-1) (q_j aT/aS - p_j)  (spec).
        # q_j aT/aS is formed as exp(log q_j + log aT - log aS): exact even when aS underflows.
        # Clamped: top-k entries (zeroed next) could overflow; tail entries are <= aT <= 1.
        tail = torch.add(blk.log_q, blk.log_ratio[:, None]).clamp_(max=0.0).exp_()
        blk.add_at_top(tail, -tail.gather(1, blk.top_local))
        tail.sub_(blk.p)
        blk.add_at_top(tail, blk.p.gather(1, blk.top_local))  # K entries back to exactly 0
        torch.sub(blk.q, blk.p, out=out)
        out.addcmul_(tail, (blk.beta_x - 1.0)[:, None])


class ReverseKL(Divergence):
    sums = Columns.of("rkl")
    grad_needs_sums = True

    def partials(self, blk):
        # sum q (log q - log p) on the rank's slice: from log q - log p directly (no cancellation).
        return {"rkl": -rowdot(blk.q, blk.diff)}

    def value(self, tok, jsd_beta):
        return tok["rkl"]

    def grad(self, blk, out):
        # d/ds_j sum q log(q/p) = q_j (log q_j - log p_j - RKL)
        torch.add(blk.diff, blk.sums["rkl"][:, None], out=out)
        out.neg_().mul_(blk.q)


class JSD(Divergence):
    sums = Columns.of("jsd_p", "jsd_q")
    grad_needs_sums = True

    def partials(self, blk):
        log_m = blk.log_m()
        scratch = torch.sub(blk.log_p, log_m)
        jp = rowdot(blk.p, scratch)
        torch.sub(blk.log_q, log_m, out=scratch)
        return {"jsd_p": jp, "jsd_q": rowdot(blk.q, scratch)}

    def value(self, tok, jsd_beta):
        return jsd_beta * tok["jsd_p"] + (1.0 - jsd_beta) * tok["jsd_q"]

    def grad(self, blk, out):
        # dJSD/dq_i = (1-b) log(q_i/m_i); through the softmax: q_j (g_j - sum_i q_i g_i),
        # and sum_i q_i g_i = (1-b) KL(q||m) = (1-b) * jsd_q.
        torch.sub(blk.log_q, blk.log_m(), out=out)
        out.sub_(blk.sums["jsd_q"][:, None]).mul_((1.0 - blk.jsd_beta) * blk.q)


class CrossEntropyOnly(Divergence):
    def value(self, tok, jsd_beta):
        return torch.zeros_like(tok["kl"])

    def grad(self, blk, out):
        out.zero_()


HOOKS: dict[str, Divergence] = {
    "tad": TAD(), "forward_kl": ForwardKL(), "reverse_kl": ReverseKL(), "jsd": JSD(),
    "none": CrossEntropyOnly(),
}
