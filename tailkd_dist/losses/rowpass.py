"""The row passes of a chunk: all element-wise work of the fused loss in four pure functions.

Per chunk the logits are written once by the lm_head matmuls; then each pass reads them row by
row and returns per-row columns (``Columns`` schemas below), and the last one stores
d(loss)/d(student logits) over the student's logits:

* ``teacher_pass``: the teacher's sum of exp, the sum of exp outside its own top-k and its
  minimum (a NaN / inf check), after the top-k itself (``common.topk_lowest_index``: a top-k
  is not an element-wise kernel, so it stays one library call);
* ``student_pass``: the student's max, argmax, sum of exp and its tail's (outside the
  teacher's K) max and sum of exp;
* ``sweep``: the per-token partial sums the group adds up and, when the divergence's gradient
  does not need them reduced first, the gradient (reverse KL and JSD: a second ``sweep``).

Why pure functions: ``torch.compile`` fuses each into one row kernel (Triton on a GPU, C++ on
a CPU), so a pass reads each logit once and writes nothing but its per-row columns (the
sweep: the gradient, in place). The same functions run eagerly where compiling is off; they
then make block-sized temporaries, so the caller hands them row blocks.

K membership inside a compiled pass is k compares per element against the row's K columns
(no [rows, V] mask is written); eagerly, one scatter of k values per row into the temporary
that excludes K (``divergences.fill_at``).

Specification: ``docs/loss.md`` ("The chunked form", "The element-wise pass budget").
"""
from __future__ import annotations

import functools
import importlib.util
import time
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .columns import Columns
from .divergences import HOOKS, RowBlock, fill_at, rowdot


# --------------------------------------------------------------------------- what travels


def teacher_columns(k: int, *, tails: bool = True) -> Columns:
    """Per rank and position, all-gathered (step 1). With ``tails`` (TAD, or statistics
    asked for): the top-(k+1) values (the (k+1)-th is the maximum of the entries outside the
    rank's own top-k), the top-k global ids, the sum of exp relative to the rank's max, the
    sum of exp of the entries outside its own top-k relative to their max, and a flag for
    NaN / inf logits. Without: the max, the sum of exp and the flag."""
    if not tails:
        return Columns.of("max", "sumexp", "nonfinite")
    return Columns.of(values=k + 1, ids=k) + Columns.of("sumexp", "rest_sumexp", "nonfinite")


def student_columns(*, raw_ce: bool, tails: bool = True) -> Columns:
    """Per rank and position, all-gathered (step 2): max and sum of exp relative to it; with
    ``tails`` also the argmax (global id) and the tail's (entries outside K) max and sum of
    exp relative to it; with tau != 1 the sum of exp at tau = 1 (CE's normaliser)."""
    names = ("max", "argmax", "sumexp", "tail_max", "tail_sumexp") if tails else ("max", "sumexp")
    return Columns.of(*names, *(("sumexp_raw",) if raw_ce else ()))


def sum_columns(divergence: str, *, stats: bool = True) -> Columns:
    """Per position, SUM all-reduced (step 3): the rank's share of log q(label); of KL(p||q),
    split into its sums over K and over the tail when K is known; with ``stats`` of sum p log p
    and sum q log q; then the divergence's own."""
    tails = stats or HOOKS[divergence].needs_tails
    kl = Columns.of("kl_top", "kl_tail") if tails else Columns.of("kl")
    entropies = Columns.of("plogp", "qlogq") if stats else Columns(())
    return Columns.of("lq_label") + kl + entropies + HOOKS[divergence].sums


# --------------------------------------------------------------------------- the passes


def pad_ids(ids: torch.Tensor) -> torch.Tensor:
    """[b, m] column ids -> padded with -1 to a multiple of 8 columns: a compiled pass is
    specialised on the width (its compares are unrolled), so k = 1..8, 9..16, ... share one."""
    return F.pad(ids, (0, -ids.shape[1] % 8), value=-1)


def teacher_pass(t: torch.Tensor, top_values: torch.Tensor | None, own: torch.Tensor | None) -> torch.Tensor:
    """Raw teacher logits [b, V_r] -> [b, 3]: (max or -, sum of exp, sum of exp outside own top-k).

    With ``top_values`` ([b, k+1], the rank's top-(k+1), -inf padded) and ``own`` (its top-k's
    columns, -1 padded, as wide as ``pad_ids`` makes it): sum exp(t - top[0]), sum over entries outside ``own`` of
    exp(t - top[k]) (their max), and min(t). Without: max, sum exp(t - max), min(t). The min
    is the non-finite check: NaN propagates through it and an inf shows in max or min."""
    # In-place ops below act on the pass's own temporaries only: eagerly they save a
    # block-sized allocation each; compiled they change nothing.
    if top_values is None:
        mx = t.amax(-1)
        return torch.stack([mx, torch.sub(t, mx[:, None]).exp_().sum(-1), t.amin(-1)], 1)
    sumexp = torch.sub(t, top_values[:, :1]).exp_().sum(-1)
    k = top_values.shape[1] - 1
    if k >= t.shape[1]:  # the rank's slice has no entry outside its own top-k
        rest = torch.zeros_like(sumexp)
    else:
        rest = fill_at(torch.sub(t, top_values[:, k : k + 1]), own, float("-inf"))
        rest = rest.exp_().sum(-1)
    return torch.stack([sumexp, rest, t.amin(-1)], 1)


def student_pass_outputs(*, tails: bool, raw_ce: bool) -> tuple[str, ...]:
    """The columns ``student_pass`` returns, in order."""
    return ("max", "argmax", "sumexp") + (("tail_max", "tail_sumexp") if tails else ()) + (
        ("sumexp_raw",) if raw_ce else ())


def student_pass(s: torch.Tensor, k_cols: torch.Tensor | None, tau: float, raw_ce: bool) -> torch.Tensor:
    """Raw student logits [b, V_r] (at temperature tau) -> [b, n]: max, argmax (local column,
    the lowest among ties), sum exp(s - max); with ``k_cols`` ([b, k], K's columns on this
    rank, -1 elsewhere) the tail's max and sum of exp relative to it (0 when the rank holds
    no tail entry); with ``raw_ce`` sum exp(tau (s - max)) (CE's normaliser at tau = 1).
    Column names: ``student_pass_outputs``."""
    mx, arg = s.max(-1)
    out = [mx, arg.to(s.dtype), torch.sub(s, mx[:, None]).exp_().sum(-1)]
    if k_cols is not None:
        tail = fill_at(s.clone(), k_cols, float("-inf"))
        tmax = tail.amax(-1)
        tsum = tail.sub_(tmax[:, None]).exp_().sum(-1)  # NaN where tmax = -inf: replaced next
        out += [tmax, torch.where(torch.isfinite(tmax), tsum, 0.0)]
    if raw_ce:
        out.append(torch.sub(s, mx[:, None]).mul_(tau).exp_().sum(-1))
    return torch.stack(out, 1)


def _gather_or_zero(x: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x[row, cols] ([b, m]; 0 where cols = -1) and the mask cols >= 0."""
    has = cols >= 0
    return torch.where(has, x.gather(1, cols.clamp(min=0)), 0.0), has


def _minus_at(g: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """g[row, cols[row]] -= values[row] where cols >= 0 ([b] each)."""
    if torch.compiler.is_compiling():  # a compare per element, fused into the pass
        at = torch.arange(g.shape[1], device=g.device) == cols[:, None]
        return g - torch.where(at, values[:, None], 0.0)
    # Eagerly one accumulate at b entries (rows without a column add 0 to column 0: exact).
    flat = cols.clamp(min=0) + torch.arange(g.shape[0], device=g.device) * g.shape[1]
    g.view(-1).index_put_((flat,), torch.where(cols >= 0, -values, 0.0).to(g.dtype), accumulate=True)
    return g


def sweep(
    s: torch.Tensor, t: torch.Tensor, lse_t: torch.Tensor, lse_s: torch.Tensor, k_cols: torch.Tensor | None,
    label_col: torch.Tensor, beta_x: torch.Tensor, log_ratio: torch.Tensor | None, kd_row: torch.Tensor,
    ce_row: torch.Tensor, lse_raw: torch.Tensor | None, sums: torch.Tensor | None, tau: float,
    jsd_beta: float, divergence: str, stats: bool, partials: bool, grad_out: torch.Tensor | None,
) -> torch.Tensor:
    """One pass over a row block of raw logits (teacher ``t``, student ``s``, at tau).

    ``partials``: returns the block's per-token partial sums laid out by ``sum_columns`` (else
    a [b, 0] tensor).
    ``grad_out``: stores d(loss)/d(s) there (``sums``: the reduced sums, for the divergences
    whose gradient reads them). It may be ``s`` itself when run eagerly; compiled, a separate
    buffer lets the pass store each gradient element where it reads the logits (a store over
    its own input makes Inductor keep p and q in [b, V] buffers until every read is done).
    ``label_col``: the label's column on this rank, -1 where the rank does not own it or the
    position is masked; per-row scales ``kd_row`` / ``ce_row`` carry the mask and weights."""
    hook = HOOKS[divergence]
    cols = sum_columns(divergence, stats=stats)
    log_p, log_q = torch.sub(t, lse_t[:, None]), torch.sub(s, lse_s[:, None])
    blk = RowBlock(
        log_p=log_p, log_q=log_q, k_cols=k_cols,
        beta_x=beta_x[:, None], log_ratio=None if log_ratio is None else log_ratio[:, None], jsd_beta=jsd_beta,
        sums={} if sums is None else {n: v[:, None] for n, v in cols.unpack(sums).items()},
    )
    out = s.new_empty(s.shape[0], 0)
    if partials:
        got = dict(hook.partials(blk))
        if stats:
            got.update(plogp=rowdot(blk.p, log_p), qlogq=rowdot(blk.q, log_q))
        if k_cols is not None:
            # KL over K from K's own k entries; over the tail, the rest of the row: exact.
            lp_k, has = _gather_or_zero(log_p, k_cols)
            lq_k, _ = _gather_or_zero(log_q, k_cols)
            got["kl_top"] = torch.where(has, lp_k.exp() * (lp_k - lq_k), 0.0).sum(-1)
            got["kl_tail"] = blk.outside_k(torch.mul(blk.p, blk.diff)).sum(-1)
        else:
            got["kl"] = rowdot(blk.p, blk.diff)
        lq, has_label = _gather_or_zero(log_q, label_col[:, None])
        lq = lq.squeeze(1)
        if lse_raw is not None:  # CE is at tau = 1
            lq = torch.where(has_label.squeeze(1), tau * (lq + lse_s) - lse_raw, 0.0)
        got["lq_label"] = lq
        out = torch.stack([got[n] for n, _ in cols.fields], 1)
    if grad_out is not None:
        g = hook.grad(blk).mul_(kd_row[:, None])
        # CE's gradient q1 - onehot(label), its softmax at tau = 1 (q itself when tau = 1).
        q1 = blk.q if lse_raw is None else torch.add(log_q, lse_s[:, None]).mul_(tau).sub_(lse_raw[:, None]).exp_()
        g = _minus_at(g.addcmul_(q1, ce_row[:, None]), label_col, ce_row)
        grad_out.copy_(g)
    return out


class RowPasses:
    """The passes as run: eagerly, or compiled by ``torch.compile`` (once per process and
    shape class; ``dynamic=True`` so chunk and vocabulary sizes do not recompile)."""

    def __init__(self, *, compiled: bool):
        self.compiled = compiled

    def teacher(self, t, top_values, own):
        return self._fn("teacher_pass")(t, top_values, own)

    def student(self, s, k_cols, tau, raw_ce):
        return self._fn("student_pass")(s, k_cols, tau, raw_ce)

    def sweep(self, *args):
        return self._fn("sweep")(*args)

    def _fn(self, name):
        return _OPS[name] if self.compiled else _PASSES[name]


_PASSES = {"teacher_pass": teacher_pass, "student_pass": student_pass, "sweep": sweep}

# Graphs per pass: one per divergence, flag set (statistics, tails, tau != 1, gradient) and
# dtype, far above Dynamo's default of 8 per function; sizes are dynamic and do not count.
_VARIANTS = 256
# Keep every element-wise intermediate in registers: Inductor's defaults (CPU especially)
# store an intermediate read by several reductions as a [b, V] buffer, i.e. one more pass.
_INDUCTOR = {"realize_reads_threshold": 64, "realize_opcount_threshold": 1000, "realize_cpu_opcount_threshold": 1000,
             "realize_acc_reads_threshold": 64, "realize_cpu_acc_reads_threshold": 64}


def inductor_options() -> dict:
    """``_INDUCTOR``, less the keys this torch's Inductor does not have (versions differ)."""
    import torch._inductor.config as inductor

    return {k: v for k, v in _INDUCTOR.items() if hasattr(inductor, k)}


# Compilation paid so far in this process: seconds of the calls that compiled a graph, and
# how many graphs (the trainer reports it after its first step).
COMPILE_STATS = {"seconds": 0.0, "graphs": 0}


def _graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@functools.cache
def _compiled(name):
    # fullgraph: a graph break would silently run part of a pass eagerly.
    fn = torch.compile(_PASSES[name], dynamic=True, fullgraph=True, options=inductor_options())
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"

    def call(*args):
        graphs = _graphs_compiled()
        t0 = time.perf_counter()
        with torch._dynamo.config.patch(**{limit: _VARIANTS}):
            out = fn(*args)
        if _graphs_compiled() != graphs:  # this call compiled (or loaded from Inductor's cache)
            COMPILE_STATS["seconds"] += time.perf_counter() - t0
            COMPILE_STATS["graphs"] += _graphs_compiled() - graphs
        return out

    return call


# Each compiled pass is one operator to the dispatcher: profilers and the element-wise pass
# counter (tools/bench_loss.py --passes) see one kernel with its inputs and outputs.
Tensor, Opt = torch.Tensor, typing.Optional[torch.Tensor]


@torch.library.custom_op("tailkd::teacher_pass", mutates_args=())
def _teacher_op(t: Tensor, top_values: Opt, own: Opt) -> Tensor:
    return _compiled("teacher_pass")(t, top_values, own)


@torch.library.custom_op("tailkd::student_pass", mutates_args=())
def _student_op(s: Tensor, k_cols: Opt, tau: float, raw_ce: bool) -> Tensor:
    return _compiled("student_pass")(s, k_cols, tau, raw_ce)


@torch.library.custom_op("tailkd::sweep", mutates_args=("grad_out",))
def _sweep_op(
    s: Tensor, t: Tensor, lse_t: Tensor, lse_s: Tensor, k_cols: Opt, label_col: Tensor, beta_x: Tensor,
    log_ratio: Opt, kd_row: Tensor, ce_row: Tensor, lse_raw: Opt, sums: Opt, tau: float, jsd_beta: float,
    divergence: str, stats: bool, partials: bool, grad_out: Opt,
) -> Tensor:
    return _compiled("sweep")(s, t, lse_t, lse_s, k_cols, label_col, beta_x, log_ratio, kd_row, ce_row, lse_raw,
                              sums, tau, jsd_beta, divergence, stats, partials, grad_out)


_OPS = {"teacher_pass": _teacher_op, "student_pass": _student_op, "sweep": _sweep_op}


@dataclass(frozen=True)
class RowPath:
    """Which row passes a device runs, and why (said once at the start of a run)."""

    compiled: bool
    reason: str


@functools.cache
def row_path(device: torch.device, compiled: bool | None = None) -> RowPath:
    """The row passes for ``device``: ``compiled`` True / False forces them; None decides.

    Compiled by default on CUDA with Triton: there the element-wise work is most of the
    loss's time. Eager by default on CPUs: the matmuls dominate there, and a first compile
    costs ~20 s per pass and shape class (the same code compiles on a CPU when asked).
    Cached: the loss asks on every call."""
    dev = torch.device(device)
    if compiled is not None:
        return RowPath(bool(compiled), "compiled as asked" if compiled else "eager as asked")
    if dev.type != "cuda":
        return RowPath(False, f"eager on {dev.type} (the default off CUDA; compiled=True compiles them)")
    if importlib.util.find_spec("triton") is None:
        return RowPath(False, "eager: Triton is not installed, so torch.compile cannot emit GPU kernels")
    return RowPath(True, "compiled by torch.compile (Inductor -> Triton)")
