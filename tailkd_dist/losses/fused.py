"""Fused linear distillation: hidden states + lm_heads -> loss and gradients, chunk by chunk.

No [tokens, V] logits ever exist: positions are processed ``chunk_size`` at a time, the
gradient of every chunk is formed inside the loop (no autograd graph over logits), and the
element-wise work on a chunk runs over row blocks with small scratch buffers, so the extra
memory is two [chunk, V_r] logit buffers plus O(block * V_r) (TAD over several chunks: one
[chunk, V_r] buffer, the teacher's logits streamed in row blocks; see ``_Chunker``).

One loop serves every divergence and both layouts:

* **divergences** are small hooks (``divergences.HOOKS``): which extra per-token partial sums
  they need, their per-token value from the reduced sums, their gradient w.r.t. the
  student's logits (written in place) and how they see the teacher (TAD decides there
  whether it needs a pre-pass);
* **vocabulary parallelism** (``vocab_group``): rank r owns rows [off_r, off_r + V_r) of both
  lm_heads and its own positions. Every rank gathers the group's hidden states, makes logits
  for its vocabulary slice, and per chunk the group exchanges per-token scalars only: an
  all-gather of the teacher's per-rank candidates, one of the student's, and one SUM
  all-reduce of per-token partial sums, each laid out by a named ``Columns`` schema. With
  ``vocab_group=None`` every exchange is the identity (P = 1).

TAD's beta(X) needs the teacher's tail mass of every position of a document before any tail
gradient is final; when a document spans chunks a teacher-only pre-pass computes it (one extra
teacher lm_head matmul: 5 matmuls against forward KL's 4; docs/loss.md, "The chunked form").
Having K and log aT first also lets the main pass stream the teacher's logits in row blocks.

Host syncs, per call and never inside the chunk loop: the group's layout before allocating,
TAD's "does every document fit inside a chunk?" (it decides the plan) and the finiteness /
label check at the end. On a CPU (where syncs cost nothing) and for float64 the top-k also
checks each row block for ties at its boundary (``common.topk_lowest_index``).

Specification: ``docs/loss.md``.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

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
from .divergences import HOOKS, TeacherPlan
from .rowpass import (
    RowPasses, pad_ids, row_path, student_columns, student_pass_outputs, sum_columns, teacher_columns,
)

STAT_KEYS = (
    "valid_count", "ce", "kd", "kl", "d1", "at_d2", "a_t", "a_s",
    "teacher_entropy", "student_entropy", "top1_agree", "beta_x", "a_t_sq", "a_s_sq",
)

# Elements per row block of an eager pass: bounds each of its temporaries to ~4 MiB (fp32)
# however large the vocabulary slice is; on CPU small blocks stay in cache. (1 MiB blocks
# peaked 70 MiB lower at V = 32003 but, at 2 rows per block at V = 128256, spent the time on
# per-op overhead.) Compiled passes make no temporaries and take whole chunks.
_BLOCK_ELEMENTS = 1 << 20
_BLOCK_ELEMENTS_CUDA = 1 << 27
# Elements per block of teacher logits after the TAD pre-pass (a block is one matmul): ~32 MiB
# (fp32) keeps the CPU matmul efficient (~65 rows at V = 128256) and far below the student's
# [chunk, V_r] buffer; on a GPU a whole default chunk at V = 128k (one large matmul).
_TEACHER_ELEMENTS = 1 << 23
_TEACHER_ELEMENTS_CUDA = 1 << 27

# Bytes of one [chunk, V_r] logit buffer when the chunk size is derived (chunk_size=None).
# A CPU's matmul is as fast on 256 rows as on 1024 and the buffers are what the loss adds to
# the peak (2-3 of them): 128 MiB (256 rows at V = 128256, 1024 at V = 32003). An
# accelerator's matmul needs thousands of rows to reach its peak and has the memory: 1 GiB
# (2048 rows at V = 128256, the 4096 cap at V = 32003).
_CHUNK_BYTES_CPU = 128 << 20
_CHUNK_BYTES_ACCELERATOR = 1 << 30
_CHUNK_ROWS_MAX = 4096


def default_chunk_size(*, accelerator: bool, vocab_local: int, elem_bytes: int = 4) -> int:
    """Positions per chunk when the caller names none: the largest power of two whose
    [chunk, vocab_local] buffer fits the device's budget (powers of two, so a chunk holds whole
    rows of a power-of-two sequence length and TAD needs no pre-pass; at least 64 rows, at most
    ``_CHUNK_ROWS_MAX``)."""
    budget = _CHUNK_BYTES_ACCELERATOR if accelerator else _CHUNK_BYTES_CPU
    rows = max(1, budget // max(1, vocab_local * elem_bytes))
    return max(64, min(_CHUNK_ROWS_MAX, 1 << (rows.bit_length() - 1)))


def group_chunk_size(*, accelerator: bool, vocab: int, group_size: int) -> int:
    """``default_chunk_size`` for a loss group over V: every rank derives it from the same
    ceil(V / G) (the slices may be uneven, the chunk may not)."""
    return default_chunk_size(accelerator=accelerator, vocab_local=-(-vocab // max(1, group_size)))


# --------------------------------------------------------------------------- small helpers


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
                 "student_bias given", "teacher_bias given", "stats", "chunk_size")
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
    stats: bool  # compute the monitoring statistics (else NaN in the returned sums)
    compiled: bool  # run the row passes compiled (rowpass.RowPasses)


def _blocks(n_rows: int, v_local: int, device=None):
    # GPUs: bigger blocks (each element-wise kernel launch costs microseconds, and a GPU has
    # the memory); CPUs: small, cache-friendly ones.
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


@dataclass
class TeacherRows:
    """What the group knows about the teacher at some positions, before its logits are
    swept: the global top-k K, the log-normaliser, log aT (exact in log space) and how many
    of the ranks' logits there are NaN or inf (identical on every rank)."""

    top: torch.Tensor | None  # [c, k] global token ids of K, canonical order (None: not needed)
    lse: torch.Tensor  # [c]
    log_tail: torch.Tensor | None  # [c] log aT (None with K)
    nonfinite: torch.Tensor  # [c] ranks whose slice holds a NaN or inf

    def __getitem__(self, rows: slice) -> "TeacherRows":
        return TeacherRows(*(None if x is None else x[rows] for x in (self.top, self.lse, self.log_tail, self.nonfinite)))


@dataclass
class StudentRows:
    """The student's normalisers of a chunk after its exchange."""

    lse: torch.Tensor  # [c] log-normaliser at temperature tau
    argmax: torch.Tensor | None  # [c] global argmax (lowest id among ties); None without K
    log_tail: torch.Tensor | None  # [c] log aS; None without K
    lse_raw: torch.Tensor | None  # [c] log-normaliser at tau = 1 (CE) when tau != 1


@dataclass
class _ChunkRows:
    """Per-row quantities of one chunk that its sweeps read."""

    rows: slice  # the chunk's positions in the call
    vf: torch.Tensor  # 1.0 at valid positions, else 0.0
    k_cols: torch.Tensor | None  # [c, k] K's columns in this rank's slice, -1 where not owned
    label_col: torch.Tensor  # [c] the label's column in this slice, -1 (not owned or masked)
    lse_t: torch.Tensor
    lse_s: torch.Tensor
    lse_raw: torch.Tensor | None
    beta_x: torch.Tensor
    log_ratio: torch.Tensor | None
    kd_row: torch.Tensor
    ce_row: torch.Tensor


def _nonfinite(mx: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    # NaN propagates through max/min; an inf anywhere shows in one of them.
    return (~(torch.isfinite(mx) & torch.isfinite(mn))).to(mx.dtype)


def _teacher_from_candidates(g: dict, k: int) -> TeacherRows:
    """Every rank's teacher candidates [P, c, ...] -> TeacherRows (a pure step).

    Rank r's part of the tail is the set of its entries outside its own top-k (their max is
    its (k+1)-th value, and it sent their sum of exp relative to it) plus those of its own
    top-k that K leaves out (values it sent anyway): K restricted to a rank is always part of
    that rank's own top-k (same tie rule). So log aT is exact, in log space, from one gather.
    """
    if "values" not in g:  # no K asked for: the normaliser only
        _, lse = merge_lse(g["max"], g["sumexp"])
        return TeacherRows(None, lse, None, g["nonfinite"].sum(0))
    vals, ids = g["values"], g["ids"]
    c = vals.shape[1]
    _, top = merge_topk(vals[..., :k].permute(1, 0, 2).reshape(c, -1), ids.permute(1, 0, 2).reshape(c, -1), k)
    top = top.long()
    _, lse = merge_lse(vals[..., 0], g["sumexp"])
    in_top = (ids.long()[..., None] == top[None, :, None, :]).any(-1)
    out_k = torch.where(in_top, torch.full_like(ids, float("-inf")), vals[..., :k])
    rest_max = vals[..., k]
    tmax = torch.maximum(out_k.amax(-1), rest_max).amax(0)
    tail = (g["rest_sumexp"] * torch.exp(rest_max - tmax)).sum(0) + torch.exp(out_k - tmax[:, None]).sum((0, 2))
    return TeacherRows(top, lse, tmax + torch.log(tail) - lse, g["nonfinite"].sum(0))


def _student_from_candidates(g: dict, tau: float) -> StudentRows:
    """Every rank's student (max, argmax, sum of exp, tail max, tail sum of exp[, sum of exp
    at tau = 1]) [P, c] -> StudentRows (a pure step)."""
    smax, lse = merge_lse(g["max"], g["sumexp"])
    lse_raw = merge_lse(tau * g["max"], g["sumexp_raw"])[1] if "sumexp_raw" in g else None
    if "argmax" not in g:
        return StudentRows(lse, None, None, lse_raw)
    # Ranks hold vocabulary slices in order: the first rank holding the max has the lowest id.
    first = torch.where(g["max"] == smax, g["argmax"], torch.full_like(g["argmax"], float(2**24)))
    log_tail = merge_lse(g["tail_max"], g["tail_sumexp"])[1] - lse
    return StudentRows(lse, first.amin(0).long(), log_tail, lse_raw)


class _InChunkTeacher:
    """The teacher's logits of each chunk, made beside the student's and kept for the
    chunk's sweeps (two [chunk, V_r] buffers in all)."""

    def __init__(self, run: "_Chunker"):
        self.run = run
        self.buf = run.buffer(run.chunk_rows)
        self.logits = None

    def rows(self, rows: slice) -> TeacherRows:
        r = self.run
        self.logits = _logits(r.ht[rows], r.wt, r.bt, r.o.tau, r.cdtype, self.buf)
        return r.summarise_teacher([(0, self.logits.shape[0], self.logits)], self.logits.shape[0])

    def blocks(self, rows: slice):
        yield 0, rows.stop - rows.start, self.logits


class _StreamedTeacher:
    """After TAD's pre-pass K, the log-normaliser and log aT of every position are known, so
    the sweep needs the teacher's logits element-wise only: they are made ``teacher_rows``
    rows at a time (``_TEACHER_ELEMENTS``), used once and dropped, and a chunk costs one
    [chunk, V_r] buffer (the student's) plus a [teacher rows, V_r] one."""

    def __init__(self, run: "_Chunker"):
        self.run = run
        self.summary = run.teacher_prepass()

    def rows(self, rows: slice) -> TeacherRows:
        return self.summary[rows]

    def blocks(self, rows: slice):
        yield from self.run.raw_teacher_blocks(rows)


class _Chunker:
    """Runs one call on the gathered positions of the loss group, chunk by chunk.

    Per chunk (spec, "Vocabulary-sharded form"; the exchanges are the only collectives):
      1. the teacher: per rank its top-(k+1) candidates, sum of exp, sum of exp beyond its
         own top-k and a non-finite flag; one all-gather -> K, log-normaliser, log aT
         (``summarise_teacher``; after TAD's pre-pass this is already known);
      2. the student: per rank max, argmax, sum of exp and its tail's (max, sum of exp),
         computable before any exchange because K is known; one all-gather -> log-normaliser,
         argmax, log aS (``student_rows``);
      3. one sweep over row blocks: the per-token partial sums and, unless the divergence's
         gradient needs the reduced sums, the gradient w.r.t. the student's logits, written
         in place; one SUM all-reduce of the partial sums (``sums``);
      4. (reverse KL, JSD) a second sweep for the gradient; then the two backward matmuls.
    """

    def __init__(self, *, opts: _Opts, layout: _Layout, hs, ws, bs, ht, wt, bt, labels, valid, docs, cdtype):
        self.o, self.L, self.docs = opts, layout, docs
        self.hook = HOOKS[opts.divergence]
        self.hs, self.ws, self.bs, self.ht, self.wt, self.bt = hs, ws, bs, ht, wt, bt
        self.labels, self.valid, self.cdtype = labels, valid, cdtype
        self.kk = min(opts.k + 1, layout.vocab_local)
        self.raw_ce = opts.tau != 1.0  # CE (loss term and stat) is at tau = 1
        self.positions = hs.shape[0]
        self.chunk_size = opts.chunk_size
        self.chunk_rows = min(opts.chunk_size, hs.shape[0])
        elems = _TEACHER_ELEMENTS_CUDA if hs.device.type == "cuda" else _TEACHER_ELEMENTS
        self.teacher_rows = max(1, min(self.chunk_rows, elems // layout.vocab_local))
        # K and the tail masses: for TAD's value, or for the statistics when asked for.
        self.tails = opts.stats or self.hook.needs_tails
        self.teacher_cols = teacher_columns(opts.k, tails=self.tails)
        self.student_cols = student_columns(raw_ce=self.raw_ce, tails=self.tails)
        self.sum_cols = sum_columns(opts.divergence, stats=opts.stats)
        self.passes = RowPasses(compiled=opts.compiled)

    def blocks(self, n_rows: int, v_local: int):
        """Row blocks for a pass: a compiled pass makes no temporaries and takes a whole
        chunk; an eager one makes block-sized ones."""
        if self.passes.compiled:
            return [(0, n_rows)]
        return _blocks(n_rows, v_local, self.hs.device)

    def buffer(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, self.L.vocab_local, dtype=self.cdtype, device=self.hs.device)

    # -- the teacher ----------------------------------------------------------------------
    def in_chunk_teacher(self) -> _InChunkTeacher:
        return _InChunkTeacher(self)

    def streamed_teacher(self) -> _StreamedTeacher:
        return _StreamedTeacher(self)

    def summarise_teacher(self, raw_blocks, c: int) -> TeacherRows:
        """Step 1 for the c positions of a chunk, from its raw logits in row blocks."""
        k, kk, dt = self.o.k, self.kk, self.cdtype
        mine = self.teacher_cols.zeros(c, like=self.hs.new_empty((), dtype=dt))
        for b0, b1, tb in raw_blocks:
            for r0, r1 in self.blocks(b1 - b0, self.L.vocab_local):
                t, rows = tb[r0:r1], slice(b0 + r0, b0 + r1)
                if not self.tails:
                    mx, sumexp, tmin = self.passes.teacher(t, None, None).unbind(1)
                    self.teacher_cols.write(mine, rows, max=mx, sumexp=sumexp, nonfinite=_nonfinite(mx, tmin))
                    continue
                v, i = topk_lowest_index(t, kk)
                vals = F.pad(v, (0, k + 1 - kk), value=float("-inf"))
                own = pad_ids(i[:, :k])
                sumexp, rest, tmin = self.passes.teacher(t, vals, own).unbind(1)
                # Ids travel as floats (exact below 2**24); padding sorts after real ids.
                ids = F.pad((i[:, :k] + self.L.vocab_offset).to(dt), (0, k - min(kk, k)), value=float(2**24))
                self.teacher_cols.write(mine, rows, values=vals, ids=ids, sumexp=sumexp, rest_sumexp=rest,
                                        nonfinite=_nonfinite(vals[:, 0], tmin))
        g = vp.all_gather_stats(mine, self.L.group)
        return _teacher_from_candidates(self.teacher_cols.unpack(g), k)

    def teacher_prepass(self) -> TeacherRows:
        """TAD with a document spanning chunks: step 1 for every position first, the teacher's
        logits streamed in row blocks (one extra teacher lm_head matmul in all)."""
        parts = []
        for c0 in range(0, self.positions, self.chunk_size):
            rows = slice(c0, min(c0 + self.chunk_size, self.positions))
            parts.append(self.summarise_teacher(self.raw_teacher_blocks(rows), rows.stop - rows.start))
        return TeacherRows(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(TeacherRows)))

    @functools.cached_property
    def stream_buf(self) -> torch.Tensor:
        return self.buffer(self.teacher_rows)

    def raw_teacher_blocks(self, rows: slice):
        """The teacher's raw logits of a chunk, ``teacher_rows`` rows at a time."""
        for b0 in range(0, rows.stop - rows.start, self.teacher_rows):
            b1 = min(b0 + self.teacher_rows, rows.stop - rows.start)
            h = self.ht[rows.start + b0 : rows.start + b1]
            yield b0, b1, _logits(h, self.wt, self.bt, self.o.tau, self.cdtype, self.stream_buf)

    # -- the student ----------------------------------------------------------------------
    def student_rows(self, s, k_cols) -> StudentRows:
        """Step 2 on the chunk's student logits (raw, at temperature tau)."""
        mine = self.student_cols.zeros(s.shape[0], like=s)
        names = student_pass_outputs(tails=self.tails, raw_ce=self.raw_ce)
        wanted = {n for n, _ in self.student_cols.fields}
        for r0, r1 in self.blocks(*s.shape):
            kc = None if k_cols is None else k_cols[r0:r1]
            got = dict(zip(names, self.passes.student(s[r0:r1], kc, self.o.tau, self.raw_ce).unbind(1)))
            got["argmax"] = got["argmax"] + self.L.vocab_offset
            self.student_cols.write(mine, slice(r0, r1), **{n: v for n, v in got.items() if n in wanted})
        g = vp.all_gather_stats(mine, self.L.group)
        return _student_from_candidates(self.student_cols.unpack(g), self.o.tau)

    # -- one chunk ------------------------------------------------------------------------
    def localise(self, ids, mask=None):
        """Global token ids -> (column in this rank's slice, 0 where not owned; owned), for K
        and for the labels (``mask``: valid positions)."""
        if ids is None:
            return None, None
        off, vl = self.L.vocab_offset, self.L.vocab_local
        owned = (ids >= off) & (ids < off + vl)
        if mask is not None:
            owned &= mask
        return torch.where(owned, ids - off, torch.zeros_like(ids)), owned

    def chunk(self, rows: slice, plan: TeacherPlan):
        """Steps 1-4 for one chunk -> (per-token stats rows, count of non-finite teachers)."""
        L, hook = self.L, self.hook
        t = plan.teacher.rows(rows)
        top_local, owned = self.localise(t.top)
        k_cols = None if top_local is None else pad_ids(torch.where(owned, top_local, -1))
        s = _logits(self.hs[rows], self.ws, self.bs, self.o.tau, self.cdtype, self.s_buf)
        st = self.student_rows(s, k_cols)
        vf = self.valid[rows].to(self.cdtype)
        lab_local, lab_owned = self.localise(self.labels[rows], self.valid[rows])
        cr = _ChunkRows(
            rows, vf, k_cols, torch.where(lab_owned, lab_local, -1), t.lse, st.lse, st.lse_raw,
            plan.beta_x(rows, t), None if t.log_tail is None else t.log_tail - st.log_tail,
            # d(tau^2 L(s/tau))/ds = tau * dL/d(s/tau); the row mask rides on the row scales.
            kd_row=(self.o.kd_weight * self.o.tau) * vf, ce_row=self.o.ce_weight * vf,
        )
        # Compiled passes store the gradient in a buffer of its own (rowpass.sweep).
        g = (self.g_buf[: s.shape[0]] if self.passes.compiled else s) if L.needs_grad else None
        grad_now = g if not hook.grad_needs_sums else None
        sums = torch.cat(list(self.sweep(plan.teacher, s, cr, partials=True, grad_out=grad_now)))
        sums = vp.all_reduce_sum(sums, L.group)
        if g is not None and hook.grad_needs_sums:
            for _ in self.sweep(plan.teacher, s, cr, partials=False, grad_out=g, sums=sums):
                pass
        if g is not None:
            self.grad_matmuls(g, rows)
        return self.finish(self.sum_cols.unpack(sums), cr, t, st), (t.nonfinite * vf).sum()

    def sweep(self, teacher, s, cr: _ChunkRows, *, partials: bool, grad_out=None, sums=None):
        """The chunk's row pass, block by block: yields each block's partial sums (with
        ``partials``); with ``grad_out`` ([chunk, V_r]) the gradient is stored there."""
        cut = lambda x, a, b: None if x is None else x[a:b]  # noqa: E731
        for b0, b1, tb in teacher.blocks(cr.rows):
            for r0, r1 in self.blocks(b1 - b0, self.L.vocab_local):
                a, b = b0 + r0, b0 + r1
                yield self.passes.sweep(
                    s[a:b], tb[r0:r1], cr.lse_t[a:b], cr.lse_s[a:b], cut(cr.k_cols, a, b), cr.label_col[a:b],
                    cr.beta_x[a:b], cut(cr.log_ratio, a, b), cr.kd_row[a:b], cr.ce_row[a:b],
                    cut(cr.lse_raw, a, b), cut(sums, a, b), self.o.tau, self.o.jsd_beta, self.o.divergence,
                    self.o.stats, partials, cut(grad_out, a, b),
                )

    def finish(self, tok: dict, cr: _ChunkRows, t: TeacherRows, st: StudentRows):
        """Per-token values from the reduced sums (identical on every rank of the group), one
        column per STAT_KEYS entry; NaN for the statistics not asked for."""
        o, vf = self.o, cr.vf
        out = dict(valid_count=vf, ce=-tok["lq_label"], beta_x=cr.beta_x)
        if self.tails:
            a_t, a_s = t.log_tail.exp(), st.log_tail.exp()
            bucket = torch.where(a_t > 0, a_t * (t.log_tail - st.log_tail), 0.0)
            tok = dict(tok, kl=tok["kl_top"] + tok["kl_tail"], d1=tok["kl_top"] + bucket,
                       at_d2=tok["kl_tail"] - bucket)
            out.update(a_t=a_t, a_s=a_s, a_t_sq=a_t * a_t, a_s_sq=a_s * a_s, d1=tok["d1"], at_d2=tok["at_d2"],
                       top1_agree=(t.top[:, 0] == st.argmax).to(self.cdtype))
        tok["beta_x"] = cr.beta_x
        out.update(kl=tok["kl"], kd=self.hook.value(tok, o.jsd_beta) * (o.tau**2))
        if o.stats:
            out.update(teacher_entropy=-tok["plogp"], student_entropy=-tok["qlogq"])
        nan = torch.full_like(vf, float("nan"))
        return torch.stack([out.get(key, nan) for key in STAT_KEYS], 1) * vf[:, None]

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

    # -- TAD's beta(X) --------------------------------------------------------------------
    def beta_from(self, a_t, rows=slice(None)):
        seg = document_segments(self.docs[rows])
        return per_document_beta(a_t, self.valid[rows], seg, self.o.beta)

    def documents_within_chunks(self) -> bool:
        """Do the valid positions of every document lie inside one chunk? Then each chunk's
        beta(X) is final within the chunk and TAD needs no pre-pass (spec, "Chunked form"):
        e.g. rows of T <= chunk_size positions with chunk_size a multiple of T, documents
        inside rows. A per-call host sync (before the chunk loop): the answer decides the
        plan; it is the same on every rank of the group."""
        n = self.docs.shape[0]
        seg = document_segments(self.docs)
        chunk = torch.arange(n, device=seg.device) // self.o.chunk_size
        lo = torch.full((n,), n, dtype=torch.long, device=seg.device)
        hi = torch.full((n,), -1, dtype=torch.long, device=seg.device)
        lo.scatter_reduce_(0, seg, torch.where(self.valid, chunk, n), "amin")
        hi.scatter_reduce_(0, seg, torch.where(self.valid, chunk, -1), "amax")
        return bool((hi <= lo).all())

    def run(self):
        n, dev, dt = self.positions, self.hs.device, self.cdtype
        self.s_buf = self.buffer(self.chunk_rows)
        self.g_buf = self.buffer(self.chunk_rows) if self.passes.compiled and self.L.needs_grad else None
        per_tok = torch.zeros(n, len(STAT_KEYS), dtype=dt, device=dev)
        self.gh = self.gw = self.gb = None
        if self.L.needs_grad:
            acc = torch.float64 if self.hs.dtype == torch.float64 else torch.float32  # fp32 grads for bf16
            self.gh = torch.empty(n, self.hs.shape[1], dtype=acc, device=dev)
            self.gw = torch.zeros(self.ws.shape, dtype=acc, device=dev)
            self.gb = torch.zeros(self.ws.shape[0], dtype=acc, device=dev) if self.bs is not None else None
        plan = self.hook.plan(self)  # TAD: the teacher pre-pass here when a document spans chunks
        nonfinite = torch.zeros((), dtype=dt, device=dev)
        for c0 in range(0, n, self.chunk_size):
            rows = slice(c0, min(c0 + self.chunk_size, n))
            per_tok[rows], bad = self.chunk(rows, plan)
            nonfinite += bad
        return per_tok, nonfinite, (self.gh, self.gw, self.gb)


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


def _check_call(sh, sw, th, tw, labels, doc_ids, sb, tb, *, k, beta, temperature, divergence, jsd_beta,
                ce_weight, kd_weight, chunk_size, stats, vocab_group) -> _Layout:
    """Every check of a call's arguments, agreed across the loss group -> its layout."""
    local_problem = None
    try:
        check_loss_args(k=k, beta=beta, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size={chunk_size!r} must be a positive integer (positions per chunk) "
                             "or None (derived for the device: fused.default_chunk_size)")
    except ValueError as e:
        if vocab_group is None:
            raise
        local_problem = str(e)
    if local_problem is None:
        local_problem = _local_problems(sh, sw, th, tw, labels, doc_ids, sb, tb)
    if local_problem is not None and vocab_group is None:
        raise ValueError(local_problem)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (sh, sw, sb))
    settings = [
        k if isinstance(k, int) else -1,
        DIVERGENCES.index(divergence) if divergence in DIVERGENCES else -1,
        _float_bits(beta), _float_bits(temperature), _float_bits(ce_weight), _float_bits(kd_weight),
        _float_bits(jsd_beta), int(sb is not None), int(tb is not None), int(bool(stats)),
        chunk_size if isinstance(chunk_size, int) and not isinstance(chunk_size, bool) else 0,
    ]
    return _agree(local_problem, sh=sh, sw=sw, tw=tw, needs_grad=needs_grad, settings=settings, group=vocab_group)


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
    chunk_size: int | None = None,
    doc_ids: torch.Tensor | None = None,
    ignore_index: int = -100,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_group=None,
    stats: bool = True,
    compiled: bool | None = None,
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
        chunk_size: positions per chunk; extra memory ~ 2 * chunk_size * V_r logits (3 with
            compiled row passes; TAD with a document that spans chunks: one fewer, the
            teacher's logits streamed in blocks of rows after its pre-pass). None: derived
            for the device and the group's vocabulary slice (``default_chunk_size``: 128 MiB
            per buffer on a CPU, 1 GiB on an accelerator).
        vocab_group: process group sharing the vocabulary (None: single process).
        stats: compute the monitoring statistics. False (a training step that logs nothing)
            skips what only they need: for forward KL, reverse KL, JSD and CE the teacher's
            top-k and both tail masses, for every divergence the two entropies; those
            entries of ``stats`` are then NaN. Loss and gradients are the same either way.
        compiled: run the element-wise row passes compiled by ``torch.compile`` (True), eagerly
            (False), or as ``rowpass.row_path`` decides for the device (None: compiled where
            Inductor emits Triton, i.e. on CUDA). Same numbers either way.

    Returns:
        ``(loss_sum, stats)``: the SUM over valid positions of ce_weight*CE + kd_weight*L_div
        (with vocab_group: over this rank's own positions, so the group's sum is the total),
        differentiable w.r.t. the student's hidden states, weight and bias (teacher inputs get
        no gradient; with vocab_group the gradients are those of the group's total, assuming
        every rank back-propagates the same scale, e.g. 1 / global token count). ``stats``:
        sums over valid positions, keys ``STAT_KEYS``; kl, d1, at_d2, a_t, a_s and the entropies
        at temperature tau without tau^2, ``kd`` as it enters the loss; a_t_sq / a_s_sq (sums
        of squares) give the tail masses' spread.

    Host syncs: three per call, none inside the chunk loop (module docstring).
    """
    layout = _check_call(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, doc_ids, student_bias,
        teacher_bias, k=k, beta=beta, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta,
        ce_weight=ce_weight, kd_weight=kd_weight, chunk_size=chunk_size, stats=stats, vocab_group=vocab_group,
    )
    opts = _Opts(
        divergence=divergence, k=k, beta=float(beta), tau=float(temperature),
        ce_weight=float(ce_weight), kd_weight=float(kd_weight), jsd_beta=float(jsd_beta),
        chunk_size=chunk_size if chunk_size is not None else group_chunk_size(
            accelerator=student_hidden.device.type != "cpu", vocab=layout.vocab, group_size=len(layout.counts)),
        ignore_index=ignore_index, stats=bool(stats),
        compiled=row_path(student_hidden.device, compiled).compiled,
    )
    th = teacher_hidden.detach()
    tw, tb = teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach()
    loss, sums = _FusedDistill.apply(
        student_hidden, student_weight, student_bias, th, tw, tb, labels, doc_ids, opts, layout
    )
    return loss, dict(zip(STAT_KEYS, sums.unbind(0)))
