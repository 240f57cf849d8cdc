"""Fused linear distillation: hidden states + lm_heads -> loss and gradients, chunk by chunk.

No [tokens, V] logits ever exist: positions are processed ``chunk_size`` at a time, the
gradient of every chunk is formed inside the loop (no autograd graph over logits), and the
element-wise work on a chunk runs over row blocks with small scratch buffers, so the extra
memory is two [chunk, V_r] logit buffers plus O(block * V_r) (TAD over several chunks: one
[chunk, V_r] buffer, the teacher's logits streamed in row blocks; see ``_Chunker``).

One mechanism serves every divergence and both layouts:

* **divergences** are small hooks (``_DIVERGENCES``): which extra per-token partial sums they
  need, their per-token value from the reduced sums, and their gradient w.r.t. the student's
  logits, written in place;
* **vocabulary parallelism** (``vocab_group``): rank r owns rows [off_r, off_r + V_r) of both
  lm_heads and its own positions. Every rank gathers the group's hidden states, makes logits
  for its vocabulary slice, and per chunk the group exchanges per-token scalars only: an
  all-gather of per-rank candidates (top-k values and ids, sums of exp), a MAX of the tails'
  maxima where needed, and one SUM all-reduce of per-token partial sums. With
  ``vocab_group=None`` every exchange is the identity (P = 1).

TAD's beta(X) needs the teacher's tail mass of every position of a document before any tail
gradient is final; when a document spans chunks a teacher-only pre-pass computes it (one extra
teacher lm_head matmul: 5 matmuls against forward KL's 4; docs/loss.md, "The chunked form"). Having K and
log aT first also lets the main pass stream the teacher's logits in row blocks.

Specification: ``docs/loss.md``.
"""
from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass

import torch

from tailkd_dist.parallel import vocab_parallel as vp

from .common import (
    DIVERGENCES,
    check_loss_args,
    check_vocab,
    default_doc_ids,
    document_segments,
    merge_lse,
    merge_topk,
    per_document_beta,
    topk_lowest_index,
)

# Columns of the per-token SUM all-reduce. Every divergence: the rank's share of
# sum_K p log(p/q), sum_tail p log(p/q), sum p log p, sum q log q and log q(label). The one-pass
# chunk adds the tails' sums of exp relative to their exact maxima ("t_tail", "s_tail": log aT,
# log aS exact in log space) and a count of non-finite teacher logits ("t_bad"); after the
# TAD pre-pass those are known before the sweep and travel elsewhere.
_COMMON = ("kl_top", "kl_tail", "plogp", "qlogq", "lq_label")
_ONE_PASS = ("t_tail", "t_bad", "s_tail")

STAT_KEYS = (
    "valid_count", "ce", "kd", "kl", "d1", "at_d2", "a_t", "a_s",
    "teacher_entropy", "student_entropy", "top1_agree", "beta_x", "a_t_sq", "a_s_sq",
)

# Elements per scratch block: bounds each temporary of the element-wise phases to ~4 MiB
# (fp32) however large the vocabulary slice is. On CPU small blocks stay in cache (measured:
# 4 MiB blocks are ~8% faster than 16 MiB ones at V = 128256, and the five or so live
# temporaries are a fixed cost that vocabulary sharding does not divide).
_BLOCK_ELEMENTS = 1 << 20
_BLOCK_ELEMENTS_CUDA = 1 << 27
# Elements per block of teacher logits after the TAD pre-pass (a block is one matmul): ~32 MiB
# (fp32) keeps the CPU matmul efficient (~65 rows at V = 128256) and far below the student's
# [chunk, V_r] buffer; on a GPU a whole default chunk at V = 128k (one large matmul).
_TEACHER_ELEMENTS = 1 << 23
_TEACHER_ELEMENTS_CUDA = 1 << 27


def partial_names(divergence: str, *, streamed: bool) -> tuple[str, ...]:
    """Names of the per-token SUM columns for this divergence (the all-reduce's layout);
    ``streamed``: TAD's main pass after the teacher pre-pass."""
    extra = _DIVERGENCES[divergence].partials
    return (() if streamed else _ONE_PASS) + _COMMON + extra


# --------------------------------------------------------------------------- divergences


@dataclass(frozen=True)
class _Divergence:
    """A divergence plugged into the chunk loop.

    partials: names of extra per-token SUM columns, computed by ``partial_fn``.
    value_fn(tok) -> per-token L_div at temperature tau (before the tau^2 factor).
    grad_fn(blk) writes dL_div/d(student logits / tau) into ``blk.out`` (in place).
    """

    partials: tuple[str, ...]
    partial_fn: object
    value_fn: object
    grad_fn: object


def _no_partials(blk):
    return {}


def _rkl_partials(blk):
    # sum q (log q - log p) on the rank's slice: from log q - log p directly (no cancellation).
    return {"rkl": -_rowdot(blk.q, blk.diff)}


def _jsd_partials(blk):
    b = blk.jsd_beta
    log_m = torch.logaddexp(blk.log_p + math.log(b), blk.log_q + math.log1p(-b))
    scratch = torch.sub(blk.log_p, log_m)
    jp = _rowdot(blk.p, scratch)
    torch.sub(blk.log_q, log_m, out=scratch)
    return {"jsd_p": jp, "jsd_q": _rowdot(blk.q, scratch)}


def _fkl_grad(blk):
    torch.sub(blk.q, blk.p, out=blk.out)


def _tad_grad(blk):
    # j in K: q_j - p_j; j in tail: (q_j - p_j) + (beta(X)-1) (q_j aT/aS - p_j)  (spec).
    # q_j aT/aS is formed as exp(log q_j + log aT - log aS): exact even when aS underflows.
    # Clamped: top-k entries (zeroed next) could overflow; tail entries are <= aT <= 1 anyway.
    tail = torch.add(blk.log_q, blk.log_ratio[:, None]).clamp_(max=0.0).exp_()
    blk.add_at_top(tail, -tail.gather(1, blk.top_local))
    tail.sub_(blk.p)
    blk.add_at_top(tail, blk.p.gather(1, blk.top_local))  # K entries back to exactly 0
    torch.sub(blk.q, blk.p, out=blk.out)
    blk.out.addcmul_(tail, (blk.beta_x - 1.0)[:, None])


def _rkl_grad(blk):
    # d/ds_j sum q log(q/p) = q_j (log q_j - log p_j - RKL)
    torch.add(blk.diff, blk.tok["rkl"][:, None], out=blk.out)
    blk.out.neg_().mul_(blk.q)


def _jsd_grad(blk):
    # dJSD/dq_i = (1-b) log(q_i/m_i); through the softmax: q_j (g_j - sum_i q_i g_i),
    # and sum_i q_i g_i = (1-b) KL(q||m) = (1-b) * jsd_q.
    b = blk.jsd_beta
    log_m = torch.logaddexp(blk.log_p + math.log(b), blk.log_q + math.log1p(-b))
    torch.sub(blk.log_q, log_m, out=blk.out)
    blk.out.sub_(blk.tok["jsd_q"][:, None]).mul_((1.0 - b) * blk.q)


def _none_grad(blk):
    blk.out.zero_()


_DIVERGENCES = {
    "tad": _Divergence((), _no_partials, lambda t: t["kl"] + (t["beta_x"] - 1.0) * t["at_d2"], _tad_grad),
    "forward_kl": _Divergence((), _no_partials, lambda t: t["kl"], _fkl_grad),
    "reverse_kl": _Divergence(("rkl",), _rkl_partials, lambda t: t["rkl"], _rkl_grad),
    "jsd": _Divergence(
        ("jsd_p", "jsd_q"), _jsd_partials,
        lambda t: t["jsd_beta"] * t["jsd_p"] + (1.0 - t["jsd_beta"]) * t["jsd_q"], _jsd_grad,
    ),
    "none": _Divergence((), _no_partials, lambda t: torch.zeros_like(t["kl"]), _none_grad),
}
assert set(_DIVERGENCES) == set(DIVERGENCES)


# --------------------------------------------------------------------------- small helpers


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) on a row block. Not bmm: its float32 accumulation over a 32k-long row
    drifts ~4e-6 relative; sum() reduces pairwise (~1e-7). The temporary is block-sized."""
    return (a * b).sum(-1)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@dataclass
class _Layout:
    """What the group agreed on: sizes, offsets, flags (identical on every rank)."""

    group: object
    rank: int
    counts: list[int]  # positions per rank
    row_offset: int  # rows of [B, T] inputs before this rank's (default doc ids)
    vocab_offset: int
    vocab_local: int
    vocab: int
    needs_grad: bool

    @property
    def pos_offset(self) -> int:
        return sum(self.counts[: self.rank])


# --------------------------------------------------------------------------- validation


def _local_problems(sh, sw, th, tw, labels, doc_ids, sb, tb) -> str | None:
    """Input errors one rank can see by itself (returned, not raised: in a group every rank
    must hear about them, or the others would wait forever in the next collective)."""
    if sh.dim() not in (2, 3) or th.dim() != sh.dim():
        return (f"student_hidden {tuple(sh.shape)} and teacher_hidden {tuple(th.shape)} must both be "
                "[N, d] or [B, T, d]")
    if sh.shape[:-1] != th.shape[:-1]:
        return (f"student_hidden {tuple(sh.shape)} and teacher_hidden {tuple(th.shape)} must cover "
                "the same positions (same leading dims)")
    if sw.dim() != 2 or sw.shape[1] != sh.shape[-1]:
        return (f"student_weight {tuple(sw.shape)} must be [V, d] with d = student_hidden's last dim "
                f"{sh.shape[-1]}")
    if tw.dim() != 2 or tw.shape[1] != th.shape[-1]:
        return (f"teacher_weight {tuple(tw.shape)} must be [V, d] with d = teacher_hidden's last dim "
                f"{th.shape[-1]}")
    if labels.shape != sh.shape[:-1]:
        return f"labels {tuple(labels.shape)} must have shape {tuple(sh.shape[:-1])}"
    if doc_ids is not None and doc_ids.shape != sh.shape[:-1]:
        return f"doc_ids {tuple(doc_ids.shape)} must have shape {tuple(sh.shape[:-1])}"
    for name, b, w in (("student_bias", sb, sw), ("teacher_bias", tb, tw)):
        if b is not None and b.shape != w.shape[:1]:
            return f"{name} {tuple(b.shape)} must be [V] = [{w.shape[0]}] like its weight's rows"
    if sw.shape[0] < 1:
        return "student_weight has no rows: every rank of the loss group must own at least one vocabulary row"
    if sh.is_floating_point() is False or th.is_floating_point() is False:
        return "hidden states must be floating point"
    return None


def _agree(local_problem, *, sh, sw, tw, needs_grad, settings, group) -> _Layout:
    """One all-gather of every rank's layout and settings; any problem -> the same ValueError
    on every rank."""
    n = sh.shape[:-1].numel()
    rows = sh.shape[0] if sh.dim() == 3 else 0
    meta = torch.tensor(
        [int(local_problem is not None), n, rows, sw.shape[0], tw.shape[0], int(needs_grad)]
        + list(settings),
        dtype=torch.long,
        device=sh.device,
    )
    table = vp.all_gather_meta(meta, group).tolist()  # host sync: sizes decide allocations
    rank = vp.group_rank(group)
    problems = []
    if any(row[0] for row in table):
        msgs = vp.all_gather_messages(local_problem or "", group) if group is not None else [local_problem]
        problems = [f"rank {r}: {m}" if group is not None else m for r, m in enumerate(msgs) if m]
    else:
        names = ("k", "divergence", "beta", "temperature", "ce_weight", "kd_weight", "jsd_beta",
                 "student_bias given", "teacher_bias given")
        for r, row in enumerate(table):
            differ = [nm for nm, a, b in zip(names, row[6:], table[0][6:]) if a != b]
            if differ:
                problems.append(
                    f"rank {r} passed a different {', '.join(differ)} than rank 0: every rank of "
                    "the loss group must pass identical loss settings"
                )
        for r, row in enumerate(table):
            if row[3] != row[4]:
                problems.append(
                    f"rank {r} holds {row[3]} student lm_head rows but {row[4]} teacher rows: both "
                    "lm_heads must be split into the same contiguous vocabulary slices"
                )
    if not problems:
        vs, vt = sum(row[3] for row in table), sum(row[4] for row in table)
        try:
            check_vocab(k=settings[0], student_vocab=vs, teacher_vocab=vt)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("fused_linear_distill: " + "; ".join(problems))
    return _Layout(
        group=group,
        rank=rank,
        counts=[row[1] for row in table],
        row_offset=sum(row[2] for row in table[:rank]),
        vocab_offset=sum(row[3] for row in table[:rank]),
        vocab_local=sw.shape[0],
        vocab=sum(row[3] for row in table),
        needs_grad=any(row[5] for row in table),
    )


# --------------------------------------------------------------------------- the chunk loop


@dataclass
class _Opts:
    divergence: str
    k: int
    beta: float
    tau: float
    ce_weight: float
    kd_weight: float
    jsd_beta: float
    chunk_size: int
    ignore_index: int


class _Block:
    """Row block of a chunk during the element-wise phases: views of log p / log q and
    per-row quantities; p, q and log p - log q are block-sized and made on first use."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    @functools.cached_property
    def p(self):
        return self.log_p.exp()

    @functools.cached_property
    def q(self):
        return self.log_q.exp()

    @functools.cached_property
    def diff(self):
        return torch.sub(self.log_p, self.log_q)

    def add_at_top(self, buf: torch.Tensor, values: torch.Tensor) -> None:
        """buf[row, K_local] += values where this rank owns the K entry (duplicates-safe)."""
        _add_at(buf, self.top_local, self.top_owned, values)


def _add_at(buf: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor, values: torch.Tensor) -> None:
    # Entries not owned by this rank point at column 0 and add exactly 0, so an accumulating
    # index_put is exact whatever the duplicates.
    n, v = buf.shape
    flat = (idx + torch.arange(n, device=idx.device)[:, None] * v).reshape(-1)
    vals = torch.where(owned, values, torch.zeros((), dtype=buf.dtype, device=buf.device))
    buf.view(-1).index_put_((flat,), vals.reshape(-1).to(buf.dtype), accumulate=True)


def _blocks(n_rows: int, v_local: int, device=None):
    # GPUs: bigger blocks (each element-wise kernel launch and tie check costs microseconds
    # of launch and host sync, and a GPU has the memory); CPUs: small, cache-friendly ones.
    elems = _BLOCK_ELEMENTS_CUDA if device is not None and device.type == "cuda" else _BLOCK_ELEMENTS
    step = max(1, min(n_rows, elems // max(v_local, 1)))
    return [(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]


def _logits(h: torch.Tensor, w: torch.Tensor, b, tau: float, cdtype, buf: torch.Tensor) -> torch.Tensor:
    """Logits of a chunk written into a buffer reused across chunks: a fresh [chunk, V_r]
    allocation per chunk costs page faults comparable to the element-wise work itself."""
    z = buf[: h.shape[0]]
    if w.dtype == cdtype:
        torch.addmm(b, h, w.t(), out=z) if b is not None else torch.mm(h, w.t(), out=z)
    else:  # bf16/fp16 matmul, fp32 math
        z.copy_(torch.addmm(b, h, w.t()) if b is not None else h @ w.t())
    if tau != 1.0:
        z.div_(tau)
    return z


def _local_candidates(x: torch.Tensor, kk: int, v_offset: int, k_pad: int):
    """Per row: local top-(k+1) (values, global indices as floats, padded to k_pad) and
    sum exp(x - local max). The (k+1)-th entry is kept for the tail's maximum: whatever the
    global top-k is, the largest local entry outside it is among the local top-(k+1)."""
    vals = x.new_full((x.shape[0], k_pad), float("-inf"))
    idx = x.new_full((x.shape[0], k_pad), float(2**24))  # padding sorts after real indices
    sumexp = x.new_empty(x.shape[0])
    for r0, r1 in _blocks(x.shape[0], x.shape[1], x.device):
        xb = x[r0:r1]
        v, i = topk_lowest_index(xb, kk)
        vals[r0:r1, :kk] = v
        idx[r0:r1, :kk] = (i + v_offset).to(x.dtype)
        scratch = torch.sub(xb, v[:, :1])
        sumexp[r0:r1] = scratch.exp_().sum(-1)
    return vals, idx, sumexp


def _tail_max(vals: torch.Tensor, idx: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Largest local candidate that is not in the global top-k (-inf if none)."""
    in_top = (idx.long()[:, :, None] == top[:, None, :]).any(-1)
    return torch.where(in_top, torch.full_like(vals, float("-inf")), vals).amax(-1)


class _Chunker:
    """Runs the passes of one call on the gathered positions of the loss group.

    Two shapes of main pass, sharing every element-wise step (``_partials``, ``_grad``):

    * **one pass** (forward KL, reverse KL, JSD, CE only, and TAD when every document lies
      inside one chunk): teacher and student logits of the chunk side by side. Per chunk the group
      talks three times (spec, "Vocabulary-sharded form"):
      1. all-gather of per-rank candidates: teacher top-k (values, global ids) and sum of exp
         relative to the rank's max; student max, argmax and sum of exp -> every rank knows
         the global top-k K, both log-normalisers and the student's argmax;
      2. MAX all-reduce of the two tails' local maxima (outside K) -> sums over the tails are
         taken relative to their exact maxima, so log aT and log aS are exact in log space
         even when a tail is thousands of nats below the top;
      3. one SUM all-reduce of every per-token partial sum (``partial_names``).
    * **TAD with a teacher pre-pass** (a document's valid positions span chunks): the
      pre-pass leaves K, the teacher's log-normaliser and log aT of every position, so the
      main pass needs the teacher only element-wise. The student's logits of the chunk sit in one buffer;
      the teacher's are made ``teacher_rows`` rows at a time (``_TEACHER_ELEMENTS``), used
      once (partial sums and the gradient in the same sweep) and dropped: the extra memory
      is one [chunk, V_r] buffer plus a [teacher rows, V_r] one, about half of the one-pass
      shape. Per chunk the group talks twice: an all-gather of the student's candidates
      with its local tail (maximum, sum of exp outside K, both known before any exchange
      since K is), and the SUM of the partial sums after the sweep (TAD's gradient needs
      none of them).
    """

    def __init__(self, *, opts: _Opts, layout: _Layout, hs, ws, bs, ht, wt, bt, labels, valid, docs, cdtype):
        self.o, self.L, self.docs = opts, layout, docs
        self.hs, self.ws, self.bs, self.ht, self.wt, self.bt = hs, ws, bs, ht, wt, bt
        self.labels, self.valid, self.cdtype = labels, valid, cdtype
        self.k_pad = opts.k + 1
        self.kk = min(opts.k + 1, layout.vocab_local)
        self.raw_ce = opts.tau != 1.0  # CE (loss term and stat) is at tau = 1
        self.chunk_rows = min(opts.chunk_size, hs.shape[0])
        elems = _TEACHER_ELEMENTS_CUDA if hs.device.type == "cuda" else _TEACHER_ELEMENTS
        self.teacher_rows = max(1, min(self.chunk_rows, elems // layout.vocab_local))
        self.t_buf = self.s_buf = None  # allocated by run(), sized for the pass it takes

    def candidates(self, x):
        return _local_candidates(x, self.kk, self.L.vocab_offset, self.k_pad)

    def teacher_global(self, vals, idx, sumexp):
        """Per-rank candidates [P, c, k] (values, ids) and sums of exp [P, c] (relative to
        each rank's max, vals[..., 0]) -> global top-k ids [c, k], log-normaliser [c]."""
        k, c = self.o.k, vals.shape[1]
        _, top = merge_topk(vals.permute(1, 0, 2).reshape(c, -1), idx.permute(1, 0, 2).reshape(c, -1), k)
        _, lse = merge_lse(vals[..., 0], sumexp)
        return top.long(), lse

    def localise(self, top):
        off, vl = self.L.vocab_offset, self.L.vocab_local
        owned = (top >= off) & (top < off + vl)
        return torch.where(owned, top - off, torch.zeros_like(top)), owned

    def tail_sum(self, x, tail_max, top_local, owned):
        """sum over this rank's tail entries of exp(x - tail_max), row-blocked."""
        out = x.new_empty(x.shape[0])
        for r0, r1 in _blocks(x.shape[0], x.shape[1], x.device):
            # Top-k entries lie above the tail's max: clamp so their exp cannot overflow before
            # they are zeroed (tail entries are <= 0 anyway).
            s = torch.sub(x[r0:r1], tail_max[r0:r1, None]).clamp_(max=0.0).exp_()
            _add_at(s, top_local[r0:r1], owned[r0:r1], -s.gather(1, top_local[r0:r1]))
            out[r0:r1] = s.sum(-1)
        return out

    def rest_sum(self, x, vals, idx):
        """sum of exp(x - vals[:, k]) over the entries outside the rank's own top-k (0 if the
        slice has no more than k entries). vals[:, k], the (k+1)-th largest, is their max."""
        k = self.o.k
        out = x.new_zeros(x.shape[0])
        if x.shape[1] <= k:
            return out
        local = idx[:, :k].long() - self.L.vocab_offset
        for r0, r1 in _blocks(x.shape[0], x.shape[1], x.device):
            s = torch.sub(x[r0:r1], vals[r0:r1, k : k + 1]).clamp_(max=0.0).exp_()
            out[r0:r1] = s.scatter_(1, local[r0:r1], 0.0).sum(-1)
        return out

    def teacher_prepass(self):
        """TAD with several chunks: K, log-normaliser and log aT of every position first.

        The teacher's logits exist ``teacher_rows`` rows at a time and are consumed before
        the exchange: rank r's tail is the set of its entries outside its own top-k (their
        max is its (k+1)-th value; the rank sends their sum of exp relative to it) plus
        those of its own top-k that the global K leaves out (values it sends anyway), because
        K restricted to a rank is always part of that rank's own top-k (same tie rule). So
        one all-gather per chunk gives log aT exactly, in log space, with no second look at
        the logits.
        """
        n, k = self.hs.shape[0], self.o.k
        dev, dt = self.hs.device, self.cdtype
        top = torch.empty(n, k, dtype=torch.long, device=dev)
        lse = torch.empty(n, dtype=dt, device=dev)
        log_at = torch.empty_like(lse)
        bad = torch.zeros((), dtype=dt, device=dev)
        for c0 in range(0, n, self.o.chunk_size):
            c1 = min(c0 + self.o.chunk_size, n)
            # per rank and position: k+1 values, k ids, sum of exp, rest sum, non-finite flag
            mine = torch.empty(c1 - c0, 2 * k + 4, dtype=dt, device=dev)
            for b0 in range(c0, c1, self.teacher_rows):
                b1 = min(b0 + self.teacher_rows, c1)
                t = _logits(self.ht[b0:b1], self.wt, self.bt, self.o.tau, dt, self.t_buf)
                vals, idx, z = self.candidates(t)
                mine[b0 - c0 : b1 - c0] = torch.cat(
                    [vals, idx[:, :k], z[:, None], self.rest_sum(t, vals, idx)[:, None],
                     self.nonfinite_rows(t, vals)[:, None]], 1,
                )
            g = vp.all_gather_stats(mine, self.L.group)
            vals, ids = g[..., : k + 1], g[..., k + 1 : 2 * k + 1]
            top_c, lse_c = self.teacher_global(vals[..., :k], ids, g[..., 2 * k + 1])
            # The tail: every rank's rest (max vals[..., k]) and its candidates outside K.
            in_top = (ids.long()[..., None] == top_c[None, :, None, :]).any(-1)
            out_k = torch.where(in_top, torch.full_like(ids, float("-inf")), vals[..., :k])
            rest_max, rest = vals[..., k], g[..., 2 * k + 2]
            tmax = torch.maximum(out_k.amax(-1), rest_max).amax(0)
            tail = (rest * torch.exp(rest_max - tmax)).sum(0) + torch.exp(out_k - tmax[:, None]).sum((0, 2))
            top[c0:c1], lse[c0:c1] = top_c, lse_c
            log_at[c0:c1] = tmax + torch.log(tail) - lse_c
            bad += (g[..., 2 * k + 3].sum(0) * self.valid[c0:c1]).sum()
        return top, lse, log_at, bad

    def nonfinite_rows(self, t, vals):
        # NaN propagates through max/min; an inf anywhere shows in one of them.
        ok = torch.isfinite(vals[:, 0]) & torch.isfinite(t.amin(-1))
        return (~ok).to(self.cdtype)

    # -- pieces shared by both main passes -------------------------------------------------
    def labels_local(self, rows):
        L = self.L
        lab = self.labels[rows]
        owned = self.valid[rows] & (lab >= L.vocab_offset) & (lab < L.vocab_offset + L.vocab_local)
        return torch.where(owned, lab - L.vocab_offset, torch.zeros_like(lab)), owned

    def student_normalisers(self, g, raw_col):
        """Gathered student (max, argmax, sum of exp[, sum of exp at tau=1]) -> global lse,
        argmax and (tau != 1) CE's log-normaliser."""
        smax, lse_s = merge_lse(g[..., 0], g[..., 2])
        # argmax: ranks hold vocabulary slices in order, so the first rank holding the max
        # has the lowest index among ties.
        first = torch.where(g[..., 0] == smax, g[..., 1], torch.full_like(g[..., 1], float(2**24)))
        lse_raw = merge_lse(self.o.tau * g[..., 0], g[..., raw_col])[1] if self.raw_ce else None
        return lse_s, first.amin(0).long(), lse_raw

    def raw_sumexp(self, s, smax_local):
        # CE is at tau = 1: the student's sum of exp of the raw logits, same local max.
        raw = torch.empty(s.shape[0], dtype=s.dtype, device=s.device)
        for r0, r1 in _blocks(*s.shape, s.device):
            raw[r0:r1] = torch.sub(s[r0:r1], smax_local[r0:r1, None]).mul_(self.o.tau).exp_().sum(-1)
        return raw

    def _partials(self, blk, cols, r0, r1, lab_local, lab_owned, lse_s, lse_raw):
        """Per-token partial sums of one row block (rows r0:r1 of the chunk) into ``cols``."""
        p_top = blk.p.gather(1, blk.top_local)
        d_top = blk.diff.gather(1, blk.top_local)
        cols["kl_top"][r0:r1] = torch.where(blk.top_owned, p_top * d_top, 0.0).sum(-1)
        cols["plogp"][r0:r1] = _rowdot(blk.p, blk.log_p)
        cols["qlogq"][r0:r1] = _rowdot(blk.q, blk.log_q)
        for nm, v in _DIVERGENCES[self.o.divergence].partial_fn(blk).items():
            cols[nm][r0:r1] = v
        blk.add_at_top(blk.p, -p_top)  # p restricted to the tail: exact zeros at K
        cols["kl_tail"][r0:r1] = _rowdot(blk.p, blk.diff)
        blk.add_at_top(blk.p, p_top)  # and back: 0 + p_j is p_j exactly
        lq = blk.log_q.gather(1, lab_local[r0:r1, None]).squeeze(1)
        if self.raw_ce:
            lq = self.o.tau * (lq + lse_s[r0:r1]) - lse_raw[r0:r1]
        cols["lq_label"][r0:r1] = torch.where(lab_owned[r0:r1], lq, 0.0)

    def _grad(self, blk, r0, r1, kd_row, ce_row, lab_local, lab_owned, lse_s, lse_raw):
        """d(loss)/d(student logits) of one row block, written in place over its log q."""
        o = self.o
        q1 = None
        if o.ce_weight != 0.0:
            # CE's softmax at tau = 1, formed before the block's log q is overwritten.
            q1 = blk.q if lse_raw is None else (
                (blk.log_q + lse_s[r0:r1, None]).mul_(o.tau).sub_(lse_raw[r0:r1, None]).exp_()
            )
        blk.q, blk.p  # noqa: B018  (materialise before ``out`` overwrites log q)
        blk.out = blk.log_q
        _DIVERGENCES[o.divergence].grad_fn(blk)
        g = blk.out.mul_(kd_row[r0:r1, None])
        if q1 is not None:
            g.addcmul_(q1, ce_row[r0:r1, None])
            _add_at(g, lab_local[r0:r1, None], lab_owned[r0:r1, None], -ce_row[r0:r1, None])

    def row_scales(self, rows):
        vf = self.valid[rows].to(self.cdtype)
        # d(tau^2 L(s/tau))/ds = tau * dL/d(s/tau); the row mask rides on the row scales.
        return (self.o.kd_weight * self.o.tau) * vf, self.o.ce_weight * vf

    def finish(self, tok, rows, top, s_argmax, log_at, log_as, beta_x_all):
        """Per-token values from the reduced sums (identical on every rank of the group)."""
        o = self.o
        a_t, a_s = log_at.exp(), log_as.exp()
        bucket = torch.where(a_t > 0, a_t * (log_at - log_as), 0.0)
        kl = tok["kl_top"] + tok["kl_tail"]
        tok.update(
            kl=kl, d1=tok["kl_top"] + bucket, at_d2=tok["kl_tail"] - bucket, a_t=a_t, a_s=a_s,
            jsd_beta=o.jsd_beta,
        )
        if o.divergence == "tad":
            # Without the pre-pass every document's valid positions lie inside this chunk.
            tok["beta_x"] = self.beta_from(a_t, rows) if beta_x_all is None else beta_x_all[rows]
        else:
            tok["beta_x"] = torch.zeros_like(kl)
        vf = self.valid[rows].to(self.cdtype)
        kd = _DIVERGENCES[o.divergence].value_fn(tok) * (o.tau**2)
        return torch.stack(
            [
                vf, -tok["lq_label"], kd, kl, tok["d1"], tok["at_d2"], a_t, a_s, -tok["plogp"],
                -tok["qlogq"], (top[:, 0] == s_argmax).to(self.cdtype), tok["beta_x"], a_t * a_t,
                a_s * a_s,
            ],
            1,
        ) * vf[:, None]

    def _block(self, t, s, r0, r1, top_local, owned, **extra):
        return _Block(
            log_p=t[r0:r1], log_q=s[r0:r1], top_local=top_local[r0:r1], top_owned=owned[r0:r1],
            jsd_beta=self.o.jsd_beta, **extra,
        )

    # -- one chunk, teacher and student side by side ----------------------------------------
    def chunk(self, c0, c1):
        o, L, k = self.o, self.L, self.o.k
        rows = slice(c0, c1)
        t = _logits(self.ht[rows], self.wt, self.bt, o.tau, self.cdtype, self.t_buf)
        s = _logits(self.hs[rows], self.ws, self.bs, o.tau, self.cdtype, self.s_buf)
        tv, ti, tz = self.candidates(t)
        t_bad = self.nonfinite_rows(t, tv)
        sv, si, sz = self.candidates(s)
        parts = [tv[:, :k], ti[:, :k], tz[:, None], sv[:, :1], si[:, :1], sz[:, None]]
        if self.raw_ce:
            parts.append(self.raw_sumexp(s, sv[:, 0])[:, None])
        g = vp.all_gather_stats(torch.cat(parts, 1), L.group)
        top, lse_t = self.teacher_global(g[..., :k], g[..., k : 2 * k], g[..., 2 * k])
        lse_s, s_argmax, lse_raw = self.student_normalisers(g[..., 2 * k + 1 :], 3)
        tail_max = vp.all_reduce_max(torch.stack([_tail_max(tv, ti, top), _tail_max(sv, si, top)], 1), L.group)
        t_tmax, s_tmax = tail_max[:, 0], tail_max[:, 1]
        top_local, owned = self.localise(top)
        lab_local, lab_owned = self.labels_local(rows)

        # Tail sums, normalisation to log p / log q in place, partial sums.
        names = partial_names(o.divergence, streamed=False)
        cols = {nm: torch.zeros(c1 - c0, dtype=self.cdtype, device=s.device) for nm in names}
        cols["t_tail"] = self.tail_sum(t, t_tmax, top_local, owned)
        cols["t_bad"] = t_bad
        cols["s_tail"] = self.tail_sum(s, s_tmax, top_local, owned)
        t.sub_(lse_t[:, None])
        s.sub_(lse_s[:, None])
        for r0, r1 in _blocks(c1 - c0, L.vocab_local, s.device):
            self._partials(self._block(t, s, r0, r1, top_local, owned), cols, r0, r1,
                           lab_local, lab_owned, lse_s, lse_raw)
        sums = vp.all_reduce_sum(torch.stack([cols[nm] for nm in names], 1), L.group)
        tok = {nm: sums[:, i] for i, nm in enumerate(names)}
        log_at = t_tmax + torch.log(tok["t_tail"]) - lse_t
        log_as = s_tmax + torch.log(tok["s_tail"]) - lse_s
        per_tok = self.finish(tok, rows, top, s_argmax, log_at, log_as, None)
        bad = (tok["t_bad"] * self.valid[rows].to(self.cdtype)).sum()
        if not L.needs_grad:
            return per_tok, bad

        # The gradient needs the reduced sums (beta(X) of a lone chunk, reverse KL, JSD).
        kd_row, ce_row = self.row_scales(rows)
        log_ratio = log_at - log_as
        for r0, r1 in _blocks(c1 - c0, L.vocab_local, t.device):
            blk = self._block(
                t, s, r0, r1, top_local, owned,
                tok={k_: v[r0:r1] for k_, v in tok.items() if torch.is_tensor(v)},
                beta_x=tok["beta_x"][r0:r1], log_ratio=log_ratio[r0:r1],
            )
            self._grad(blk, r0, r1, kd_row, ce_row, lab_local, lab_owned, lse_s, lse_raw)
        self.grad_matmuls(s, rows)
        return per_tok, bad

    # -- one chunk of TAD after the pre-pass: the teacher streamed in row blocks -------------
    def chunk_streamed(self, c0, c1, cache, beta_x_all):
        o, L = self.o, self.L
        rows = slice(c0, c1)
        top, lse_t, log_at = (x[rows] for x in cache)
        top_local, owned = self.localise(top)
        s = _logits(self.hs[rows], self.ws, self.bs, o.tau, self.cdtype, self.s_buf)
        sv, si, sz = self.candidates(s)
        # K is known, so each rank sums its own tail before any exchange (relative to its own
        # tail max; -inf when it owns no tail entry, whose sum is then 0, not exp(nan)).
        tmax_local = _tail_max(sv, si, top)
        tail_local = self.tail_sum(s, tmax_local, top_local, owned)
        tail_local = torch.where(torch.isfinite(tmax_local), tail_local, 0.0)
        parts = [sv[:, :1], si[:, :1], sz[:, None], tmax_local[:, None], tail_local[:, None]]
        if self.raw_ce:
            parts.append(self.raw_sumexp(s, sv[:, 0])[:, None])
        g = vp.all_gather_stats(torch.cat(parts, 1), L.group)
        lse_s, s_argmax, lse_raw = self.student_normalisers(g, 5)
        log_as = merge_lse(g[..., 3], g[..., 4])[1] - lse_s
        s.sub_(lse_s[:, None])
        lab_local, lab_owned = self.labels_local(rows)
        beta_x = beta_x_all[rows]
        log_ratio = log_at - log_as
        kd_row, ce_row = self.row_scales(rows)

        names = partial_names(o.divergence, streamed=True)
        cols = {nm: torch.zeros(c1 - c0, dtype=self.cdtype, device=s.device) for nm in names}
        for b0 in range(0, c1 - c0, self.teacher_rows):
            b1 = min(b0 + self.teacher_rows, c1 - c0)
            t = _logits(self.ht[c0 + b0 : c0 + b1], self.wt, self.bt, o.tau, self.cdtype, self.t_buf)
            t.sub_(lse_t[b0:b1, None])
            for r0, r1 in _blocks(b1 - b0, L.vocab_local, s.device):
                blk = _Block(
                    log_p=t[r0:r1], log_q=s[b0 + r0 : b0 + r1], top_local=top_local[b0 + r0 : b0 + r1],
                    top_owned=owned[b0 + r0 : b0 + r1], jsd_beta=o.jsd_beta,
                    beta_x=beta_x[b0 + r0 : b0 + r1], log_ratio=log_ratio[b0 + r0 : b0 + r1],
                )
                self._partials(blk, cols, b0 + r0, b0 + r1, lab_local, lab_owned, lse_s, lse_raw)
                if L.needs_grad:
                    self._grad(blk, b0 + r0, b0 + r1, kd_row, ce_row, lab_local, lab_owned, lse_s, lse_raw)
        sums = vp.all_reduce_sum(torch.stack([cols[nm] for nm in names], 1), L.group)
        tok = {nm: sums[:, i] for i, nm in enumerate(names)}
        per_tok = self.finish(tok, rows, top, s_argmax, log_at, log_as, beta_x_all)
        if L.needs_grad:
            self.grad_matmuls(s, rows)
        return per_tok

    def grad_matmuls(self, g, rows):
        """The two backward matmuls of a chunk, accumulated straight into the call's gradient
        buffers (no [V_r, d] temporary per chunk when the dtypes agree)."""
        gs = g.to(self.ws.dtype)
        h = self.hs[rows]
        if self.gh.dtype == gs.dtype:
            torch.mm(gs, self.ws, out=self.gh[rows])
            self.gw.addmm_(gs.t(), h)
        else:
            self.gh[rows] = gs @ self.ws
            self.gw += gs.t() @ h
        if self.gb is not None:
            self.gb += gs.sum(0)

    def beta_from(self, a_t, rows=slice(None)):
        seg = document_segments(self.docs[rows])
        return per_document_beta(a_t, self.valid[rows], seg, self.o.beta)

    def documents_within_chunks(self) -> bool:
        """Do the valid positions of every document lie inside one chunk? Then each chunk's
        beta(X) is final within the chunk and TAD needs no pre-pass (spec, "Chunked form"):
        e.g. rows of T <= chunk_size positions with chunk_size a multiple of T, documents
        inside rows. One host sync; the answer is the same on every rank of the group."""
        n = self.docs.shape[0]
        seg = document_segments(self.docs)
        chunk = torch.arange(n, device=seg.device) // self.o.chunk_size
        lo = torch.full((n,), n, dtype=torch.long, device=seg.device)
        hi = torch.full((n,), -1, dtype=torch.long, device=seg.device)
        lo.scatter_reduce_(0, seg, torch.where(self.valid, chunk, n), "amin")
        hi.scatter_reduce_(0, seg, torch.where(self.valid, chunk, -1), "amax")
        return bool((hi <= lo).all())

    def run(self):
        n = self.hs.shape[0]
        dev, dt, v_r = self.hs.device, self.cdtype, self.L.vocab_local
        streamed = self.o.divergence == "tad" and n > self.o.chunk_size and not self.documents_within_chunks()
        self.s_buf = torch.empty(self.chunk_rows, v_r, dtype=dt, device=dev)
        self.t_buf = torch.empty(self.teacher_rows if streamed else self.chunk_rows, v_r, dtype=dt, device=dev)
        per_tok = torch.zeros(n, len(STAT_KEYS), dtype=dt, device=dev)
        self.gh = self.gw = self.gb = None
        if self.L.needs_grad:
            acc = torch.float64 if self.hs.dtype == torch.float64 else torch.float32  # fp32 grads for bf16
            self.gh = torch.empty(n, self.hs.shape[1], dtype=acc, device=dev)
            self.gw = torch.zeros(self.ws.shape, dtype=acc, device=dev)
            self.gb = torch.zeros(self.ws.shape[0], dtype=acc, device=dev) if self.bs is not None else None
        bad_total = torch.zeros((), dtype=dt, device=dev)
        if streamed:
            top, lse, log_at, bad_total = self.teacher_prepass()
            beta_x_all = self.beta_from(log_at.exp())
        for c0 in range(0, n, self.o.chunk_size):
            c1 = min(c0 + self.o.chunk_size, n)
            if streamed:
                per_tok[c0:c1] = self.chunk_streamed(c0, c1, (top, lse, log_at), beta_x_all)
            else:
                per_tok[c0:c1], bad = self.chunk(c0, c1)
                bad_total = bad_total + bad
        return per_tok, bad_total, (self.gh, self.gw, self.gb)


class _FusedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, labels, doc_ids, opts: _Opts, layout: _Layout):
        lead = sh.shape[:-1]
        hs, ht = sh.reshape(-1, sh.shape[-1]), th.reshape(-1, th.shape[-1])
        lab = labels.reshape(-1).long()
        docs = (doc_ids if doc_ids is not None else default_doc_ids(lead, sh.device, layout.row_offset))
        docs = docs.reshape(-1).long()
        group, counts = layout.group, layout.counts
        vp.record_tokens(sum(counts))
        if group is not None:
            ints = vp.gather_rows(torch.stack([lab, docs], 1), counts, group, tag="meta")
            lab, docs = ints[:, 0], ints[:, 1]
            if hs.dtype == ht.dtype:
                both = vp.gather_rows(torch.cat([hs, ht], 1), counts, group)
                hs, ht = both[:, : hs.shape[1]], both[:, hs.shape[1] :]
            else:
                hs, ht = vp.gather_rows(hs, counts, group), vp.gather_rows(ht, counts, group)
        valid = lab != opts.ignore_index
        # Masked positions may hold NaN (fully masked attention rows): zero those entries so
        # they cannot poison sums or gradients. Finite rows are left alone: an all-zero row
        # would tie every logit and send the top-k into its slow tie repair.
        hs = torch.where(valid[:, None] | torch.isfinite(hs), hs, 0.0)
        ht = torch.where(valid[:, None] | torch.isfinite(ht), ht, 0.0)
        cdtype = torch.float64 if sh.dtype == torch.float64 else torch.float32
        if layout.vocab >= 2**24 and cdtype == torch.float32:
            raise ValueError(f"V={layout.vocab} >= 2**24: token ids would not be exact in the float32 candidate exchange")
        # Matmuls run in the hidden states' dtype (bf16 bodies with fp32 master heads: one cast
        # of each weight shard per call, not per chunk); the math stays in fp32/fp64 and the
        # gradients are accumulated in fp32 and returned in each input's own dtype.
        mm = lambda x, like: None if x is None else (x if x.dtype == like.dtype else x.to(like.dtype))  # noqa: E731
        runner = _Chunker(
            opts=opts, layout=layout, hs=hs, ws=mm(sw, hs), bs=mm(sb, hs), ht=ht, wt=mm(tw, ht), bt=mm(tb, ht),
            labels=lab, valid=valid, docs=docs, cdtype=cdtype,
        )
        per_tok, bad_teacher, (gh, gw, gb) = runner.run()
        bad_labels = (valid & ((lab < 0) | (lab >= layout.vocab))).sum()
        # The one host sync of the loss: a NaN teacher or an out-of-range label must stop the
        # run with a message, on every rank alike (both counts are identical across the group).
        n_bad_t, n_bad_l = torch.stack([bad_teacher.to(torch.float64), bad_labels.to(torch.float64)]).tolist()
        if n_bad_t:
            raise ValueError(
                f"teacher logits are NaN or inf at {int(n_bad_t)} valid position(s): check the "
                "teacher's forward pass (dtype overflow, a NaN weight or hidden state)"
            )
        if n_bad_l:
            raise ValueError(
                f"{int(n_bad_l)} label(s) outside [0, V={layout.vocab}) (and not ignore_index="
                f"{opts.ignore_index}): the labels do not come from this model's tokenizer"
            )
        off = layout.pos_offset
        own = per_tok[off : off + counts[layout.rank]]
        sums = own.sum(0)
        loss = opts.ce_weight * sums[1] + opts.kd_weight * sums[2]
        if layout.needs_grad:
            gh = vp.reduce_scatter_rows(gh, counts, group)
            ctx.save_for_backward(
                gh.to(sh.dtype).view(sh.shape), gw.to(sw.dtype), None if gb is None else gb.to(sb.dtype)
            )
        else:
            ctx.save_for_backward(None, None, None)
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        gh, gw, gb = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_loss.to(g.dtype)  # noqa: E731
        return (
            scale(gh) if ctx.needs_input_grad[0] else None,
            scale(gw) if ctx.needs_input_grad[1] else None,
            scale(gb) if ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None, None,
        )


def fused_linear_distill(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str = "tad",
    k: int = 10,
    beta: float = 2.0,
    temperature: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    jsd_beta: float = 0.5,
    chunk_size: int = 1024,
    doc_ids: torch.Tensor | None = None,
    ignore_index: int = -100,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Distillation loss straight from hidden states and lm_head weights, chunk by chunk.

    Args:
        student_hidden, teacher_hidden: [N, d] or [B, T, d] final hidden states (widths may
            differ). With ``vocab_group``: this rank's own positions (counts may differ).
        student_weight, teacher_weight: [V, d] lm_head weights (with ``vocab_group``: this
            rank's contiguous row slice, slices in rank order, uneven sizes allowed; student
            and teacher sliced identically). Biases [V] likewise.
        labels: [N] / [B, T], already shifted (label t is the target of position t);
            ``ignore_index`` masks a position for CE and KD alike.
        divergence: "tad", "forward_kl", "reverse_kl", "jsd" or "none" (CE only).
        k, beta: TAD's top-k size (teacher-chosen, ties -> lower token id) and tail weight.
        temperature: p = softmax(t/tau), q = softmax(s/tau); the divergence is scaled by tau^2;
            CE stays at tau = 1.
        doc_ids: [N] / [B, T] int document ids for TAD's per-document beta(X) (equal ids = one
            document wherever they stand; global across the group). Default: each row of
            [B, T] is a document, all of [N] is one.
        chunk_size: positions per chunk; extra memory ~ 2 * chunk_size * V_r logits (TAD
            with a document that spans chunks: ~ chunk_size * V_r, the teacher's logits
            streamed in blocks of rows after its pre-pass).
        vocab_group: process group sharing the vocabulary (None: single process).

    Returns:
        ``(loss_sum, stats)``: the SUM over valid positions of ce_weight*CE + kd_weight*L_div
        (with vocab_group: over this rank's own positions, so the group's sum is the total),
        differentiable w.r.t. the student's hidden states, weight and bias (teacher inputs get
        no gradient; with vocab_group the gradients are those of the group's total, assuming
        every rank back-propagates the same scale, e.g. 1 / global token count). ``stats``:
        sums over valid positions, keys ``STAT_KEYS``; kl, d1, at_d2, a_t, a_s and the entropies
        at temperature tau without tau^2, ``kd`` as it enters the loss; a_t_sq / a_s_sq (sums
        of squares) give the tail masses' spread.

    Host syncs: two per call (the group's layout before allocating, and the finiteness /
    label check at the end), one more for TAD over several chunks (does every document fit
    inside a chunk? then no pre-pass is needed), plus one per row block where the top-k
    check looks for ties.
    """
    local_problem = None
    try:
        check_loss_args(k=k, beta=beta, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer (positions per chunk)")
    except ValueError as e:
        if vocab_group is None:
            raise
        local_problem = str(e)
    if local_problem is None:
        local_problem = _local_problems(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, doc_ids,
            student_bias, teacher_bias,
        )
    if local_problem is not None and vocab_group is None:
        raise ValueError(local_problem)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student_hidden, student_weight, student_bias)
    )
    settings = [
        k if isinstance(k, int) else -1,
        DIVERGENCES.index(divergence) if divergence in DIVERGENCES else -1,
        _float_bits(beta), _float_bits(temperature), _float_bits(ce_weight), _float_bits(kd_weight),
        _float_bits(jsd_beta), int(student_bias is not None), int(teacher_bias is not None),
    ]
    layout = _agree(
        local_problem, sh=student_hidden, sw=student_weight, tw=teacher_weight,
        needs_grad=needs_grad, settings=settings, group=vocab_group,
    )
    opts = _Opts(
        divergence=divergence, k=k, beta=float(beta), tau=float(temperature),
        ce_weight=float(ce_weight), kd_weight=float(kd_weight), jsd_beta=float(jsd_beta),
        chunk_size=chunk_size, ignore_index=ignore_index,
    )
    th = teacher_hidden.detach()
    tw, tb = teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach()
    loss, sums = _FusedDistill.apply(
        student_hidden, student_weight, student_bias, th, tw, tb, labels, doc_ids, opts, layout
    )
    return loss, dict(zip(STAT_KEYS, sums.unbind(0)))
