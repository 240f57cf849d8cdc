"""Vocabulary-parallel fused loss (issue 3): parity with the single-process fused loss.

Every case builds full inputs (positions of the whole loss group concatenated in rank order,
full lm_heads), runs the single-process ``fused_linear_distill`` (``vocab_group=None``) on them
in this process as the reference, and runs the sharded form in a loss group of 1, 2 or 4 gloo
processes: rank r of the group gets rows ``shards[r]`` of each lm_head (and bias) and its own
positions. Compared: loss (sum over ranks), every stats key (sum over ranks), the gradients of
each rank's hidden states (its slice), and every weight/bias shard; norm-relative error
``||a - b|| / ||b||`` <= 1e-10 (float64) or 1e-5 (float32).

All cases run inside ONE launch of 4 processes: cases of group size 4 use the whole world,
size 2 the pairs {0,1} and {2,3} (cases alternate between them), size 1 a single rank each
(round robin) — the groups come from :class:`Topology` (loss_group_size 4, 2, 1), so the pair
{2,3} also checks that the loss uses ranks inside its group, not global ranks.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from numerics import rel_err

DIVERGENCES = ("tad", "forward_kl", "reverse_kl", "jsd", "none")
TOL = {"float64": 1e-10, "float32": 1e-5}
LAUNCH_TIMEOUT_S = 300.0


# ------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    group_size: int
    vocab: int
    positions: tuple[int, ...]  # per group rank
    shards: tuple[int, ...] | None = None  # rows per group rank; None = as even as possible
    divergence: str = "tad"
    k: int = 10
    temperature: float = 1.0
    dtype: str = "float64"
    chunk_size: int = 4
    docs: str = "span"  # "none": doc_ids=None | "span": documents cross rank boundaries |
    # "scatter" | "chunked": each document inside one chunk (TAD: no pre-pass)
    mask: bool = True  # some positions carry ignore_index
    masked_rank: int | None = None  # every position of this group rank is masked
    tie: bool = False  # teacher rows (last of rank 0, first of rank 1) equal and k-th/(k+1)-th
    bias: bool = True
    beta: float = 2.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    jsd_beta: float = 0.5
    ignore_index: int = -100
    teacher_scale: float = 1.5
    d_s: int = 8
    d_t: int = 12
    seed: int = 0
    # White-box: after TAD's pre-pass the teacher's logits are made this many rows (of the
    # largest shard) at a time (fused._TEACHER_ELEMENTS; default: whole chunks at test sizes).
    # Only the group run is patched, so the single-process reference keeps whole chunks.
    teacher_rows: int | None = None
    stats: bool = True  # False: the monitoring statistics are skipped (compared to a P = 1 run with them)
    compiled: bool | None = None  # the row passes (fused_linear_distill(compiled=...)); the P = 1 reference is eager

    def row_shards(self) -> tuple[int, ...]:
        if self.shards is not None:
            assert len(self.shards) == self.group_size and sum(self.shards) == self.vocab
            return self.shards
        base, extra = divmod(self.vocab, self.group_size)
        return tuple(base + (1 if r < extra else 0) for r in range(self.group_size))

    def kwargs(self) -> dict:
        return dict(
            divergence=self.divergence,
            k=self.k,
            beta=self.beta,
            temperature=self.temperature,
            ce_weight=self.ce_weight,
            kd_weight=self.kd_weight,
            jsd_beta=self.jsd_beta,
            chunk_size=self.chunk_size,
            ignore_index=self.ignore_index,
            stats=self.stats,
            compiled=self.compiled,
        )


def _cases() -> list[Case]:
    cases: list[Case] = []
    pos = {1: (13,), 2: (7, 11), 4: (5, 9, 3, 7)}
    # Every divergence, in every group size: a small vocabulary in float64 at tau = 1, and a
    # large odd one (V = 32003: uneven shards) in float32 at tau = 2 with k = 1.
    for g in (1, 2, 4):
        for i, div in enumerate(DIVERGENCES):
            cases.append(Case(f"g{g}-{div}-V128-k10-f64-t1", g, 128, pos[g], divergence=div,
                              chunk_size=3 + i, docs=("span", "scatter", "none")[i % 3],
                              seed=100 * g + i))
            cases.append(Case(f"g{g}-{div}-V32003-k1-f32-t2", g, 32003, pos[g], divergence=div,
                              k=1, temperature=2.0, dtype="float32", chunk_size=5,
                              docs=("none", "span")[i % 2], bias=i % 2 == 0,
                              seed=100 * g + 50 + i))
    cases += [
        # large vocabulary, k = 10, float64, documents across ranks, a fully masked rank
        Case("g4-tad-V32003-k10-f64-maskedrank", 4, 32003, (5, 9, 3, 7), masked_rank=2,
             chunk_size=4, seed=7),
        Case("g2-tad-V32003-k10-f32-maskedrank", 2, 32003, (9, 5), masked_rank=0,
             dtype="float32", chunk_size=4, seed=8),
        Case("g1-tad-V32003-k10-f64", 1, 32003, (12,), chunk_size=5, seed=9),
        Case("g1-fkl-V128-k1-f32-t2", 1, 128, (13,), divergence="forward_kl", k=1,
             dtype="float32", temperature=2.0, seed=21),
        # k larger than a rank's shard; uneven shards, including a one-row shard
        Case("g4-tad-V13-k10-shards1543-tie", 4, 13, (6, 4, 5, 3), shards=(1, 5, 4, 3), tie=True,
             temperature=2.0, chunk_size=2, seed=10),
        Case("g4-fkl-V13-k10-shards1543-f32", 4, 13, (4, 6, 3, 5), shards=(1, 5, 4, 3),
             divergence="forward_kl", dtype="float32", chunk_size=3, seed=11),
        Case("g2-tad-V13-k10-shards310-tie", 2, 13, (8, 5), shards=(3, 10), tie=True,
             chunk_size=3, seed=12),
        Case("g4-jsd-V128-k10-shards-uneven", 4, 128, (3, 8, 5, 6), shards=(40, 3, 70, 15),
             divergence="jsd", jsd_beta=0.3, temperature=2.0, seed=13),
        # exact ties on a shard boundary at the k-th place (k = 10 and k = 1), large V
        Case("g4-tad-V32003-k10-tie-f32", 4, 32003, (5, 9, 3, 7), tie=True, dtype="float32",
             seed=14),
        Case("g2-tad-V32003-k10-tie", 2, 32003, (7, 11), tie=True, temperature=2.0, seed=15),
        Case("g2-rkl-V128-k1-tie", 2, 128, (6, 6), tie=True, k=1, divergence="reverse_kl",
             seed=16),
        Case("g4-tad-V128-k1-tie-f32", 4, 128, (5, 4, 6, 3), tie=True, k=1, dtype="float32",
             docs="scatter", seed=17),
        # other settings: weights, beta, custom ignore index, chunk larger than positions
        Case("g4-tad-V128-weights", 4, 128, (5, 9, 3, 7), beta=1.5, ce_weight=0.5,
             kd_weight=1.5, ignore_index=-1, chunk_size=1024, seed=18),
        Case("g2-tad-V128-rank1-masked-nodocs", 2, 128, (6, 4), masked_rank=1, docs="none",
             seed=19),
        Case("g4-none-V32003-k10-f64-nomask", 4, 32003, (4, 4, 4, 4), divergence="none",
             mask=False, docs="none", seed=20),
        # every document inside one chunk but spanning ranks: TAD without its pre-pass
        Case("g4-tad-V32003-k10-f32-docs-in-chunks", 4, 32003, (5, 9, 3, 7), chunk_size=6,
             docs="chunked", dtype="float32", seed=24),
        # TAD's streamed teacher in blocks of 2 (1) rows inside chunks of 5 (3), uneven shards
        Case("g2-tad-V32003-k10-f64-teacherblocks", 2, 32003, (7, 11), chunk_size=5,
             teacher_rows=2, docs="scatter", seed=22),
        Case("g4-tad-V13-k10-shards1543-teacherrows1-f32", 4, 13, (6, 4, 5, 3),
             shards=(1, 5, 4, 3), tie=True, dtype="float32", chunk_size=3, teacher_rows=1,
             seed=23),
    ]
    # Without the monitoring statistics (a step that logs nothing): every divergence, uneven
    # shards, both dtypes, documents across ranks and chunks (TAD's pre-pass)
    for i, div in enumerate(DIVERGENCES):
        cases.append(Case(f"g4-{div}-V32003-k10-f64-t2-nostats", 4, 32003, (5, 9, 3, 7), divergence=div,
                          temperature=2.0, chunk_size=4, stats=False, seed=300 + i))
        cases.append(Case(f"g2-{div}-V128-k3-f32-nostats", 2, 128, (7, 11), divergence=div, k=3,
                          dtype="float32", chunk_size=5, docs="scatter", stats=False, seed=310 + i))
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    return cases


def skipped_stats(case: Case) -> set[str]:
    """The statistics a stats=False call leaves out (NaN): the entropies, and unless the
    divergence is TAD also K's split of KL and the tail masses."""
    if case.stats:
        return set()
    tails = {"d1", "at_d2", "a_t", "a_s", "top1_agree", "a_t_sq", "a_s_sq"}
    return {"teacher_entropy", "student_entropy"} | (set() if case.divergence == "tad" else tails)


CASES = _cases()


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------
def _offsets(sizes) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def make_full_inputs(case: Case) -> dict:
    """The whole group's inputs (float64 draws cast to the case's dtype), deterministic."""
    g = torch.Generator().manual_seed(1000 + case.seed)
    dtype = getattr(torch, case.dtype)
    V, n, d_s, d_t = case.vocab, sum(case.positions), case.d_s, case.d_t
    s_hidden = torch.randn(n, d_s, generator=g, dtype=torch.float64)
    s_weight = 0.5 * torch.randn(V, d_s, generator=g, dtype=torch.float64)
    s_bias = 0.1 * torch.randn(V, generator=g, dtype=torch.float64)
    if case.tie:
        # Dyadic values: every teacher logit is exact in float32 and float64 whatever the
        # summation order, so equal rows give bit-equal logits on both ranks. Column 0 of the
        # hidden state is 1 and column 0 of the weight an offset: k-1 tokens at 8, the pair
        # (last row of rank 0, first row of rank 1) at 4, the rest at 0; the other columns add
        # at most 11 * 0.5 * 0.25 = 1.375, the bias 0.25. So for every position the pair ties
        # for the k-th place, and the lower index (rank 0's row) must win.
        t_hidden = torch.randint(-2, 3, (n, d_t), generator=g).to(torch.float64) / 4
        t_hidden[:, 0] = 1.0
        t_weight = torch.randint(-2, 3, (V, d_t), generator=g).to(torch.float64) / 8
        t_bias = torch.randint(-2, 3, (V,), generator=g).to(torch.float64) / 8
        b = case.row_shards()[0]  # first row of rank 1
        pair = [b - 1, b]
        others = [v for v in torch.randperm(V, generator=g).tolist() if v not in pair]
        top = others[: case.k - 1]
        t_weight[:, 0] = 0.0
        t_weight[top, 0] = 8.0
        t_weight[pair, 0] = 4.0
        t_weight[b] = t_weight[b - 1]
        t_bias[b] = t_bias[b - 1]
    else:
        t_hidden = torch.randn(n, d_t, generator=g, dtype=torch.float64)
        t_weight = case.teacher_scale * torch.randn(V, d_t, generator=g, dtype=torch.float64)
        t_bias = 0.3 * torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (n,), generator=g)
    offs = _offsets(case.positions)
    if case.mask:
        labels[torch.rand(n, generator=g) < 0.2] = case.ignore_index
    if case.masked_rank is not None:
        labels[offs[case.masked_rank] : offs[case.masked_rank + 1]] = case.ignore_index
    if case.mask or case.masked_rank is not None:
        # keep at least two valid positions in the group
        valid_ranks = [r for r in range(case.group_size) if r != case.masked_rank]
        for r in valid_ranks[:2]:
            labels[offs[r]] = int(torch.randint(0, V, (1,), generator=g))
    assert (labels != case.ignore_index).sum() >= 1
    if case.docs == "none":
        doc_ids = None
    elif case.docs == "scatter":  # every document has pieces on every rank, interleaved
        doc_ids = torch.arange(n) % 3 + 40
    elif case.docs == "chunked":  # every document inside one chunk of the group's positions
        doc_ids = torch.arange(n) // case.chunk_size * 5 + 1
    else:  # contiguous documents, each boundary 2 positions after a rank boundary
        cuts = sorted({min(o + 2, n - 1) for o in offs[1:-1]} | {max(1, n // 2)})
        doc_ids = torch.zeros(n, dtype=torch.long)
        for c in cuts:
            doc_ids[c:] += 1
        doc_ids = doc_ids * 7 + 3  # arbitrary ids
    return dict(
        student_hidden=s_hidden.to(dtype),
        student_weight=s_weight.to(dtype),
        student_bias=s_bias.to(dtype) if case.bias else None,
        teacher_hidden=t_hidden.to(dtype),
        teacher_weight=t_weight.to(dtype),
        teacher_bias=t_bias.to(dtype) if case.bias else None,
        labels=labels,
        doc_ids=doc_ids,
    )


def shard_inputs(case: Case, full: dict, group_rank: int) -> dict:
    """Rank ``group_rank``'s rows of each lm_head and its own positions (fresh leaves)."""
    rows = _offsets(case.row_shards())
    pos = _offsets(case.positions)
    r0, r1 = rows[group_rank], rows[group_rank + 1]
    p0, p1 = pos[group_rank], pos[group_rank + 1]
    out = {}
    for key in ("student_weight", "teacher_weight", "student_bias", "teacher_bias"):
        out[key] = None if full[key] is None else full[key][r0:r1].clone()
    for key in ("student_hidden", "teacher_hidden", "labels", "doc_ids"):
        out[key] = None if full[key] is None else full[key][p0:p1].clone()
    return out


GRAD_KEYS = ("student_hidden", "student_weight", "student_bias")


def run_loss(case: Case, inputs: dict, vocab_group=None) -> dict:
    """Loss, stats and student gradients of one call (inputs are made leaves here)."""
    import tailkd_dist.losses.fused as fused_mod

    leaves = {k: (v.clone().requires_grad_(True) if k in GRAD_KEYS and v is not None else v)
              for k, v in inputs.items()}

    default_elements = fused_mod._TEACHER_ELEMENTS
    if vocab_group is not None and case.teacher_rows is not None:
        fused_mod._TEACHER_ELEMENTS = case.teacher_rows * max(case.row_shards())
    try:
        loss_sum, stats = _call(leaves, vocab_group, case)
    finally:
        fused_mod._TEACHER_ELEMENTS = default_elements
    loss_sum.backward()
    grads = {k: (None if leaves[k] is None else leaves[k].grad) for k in GRAD_KEYS}
    return {
        "loss": loss_sum.detach(),
        "stats": {k: v.detach() for k, v in stats.items()},
        "grads": {k: (None if v is None else v.detach()) for k, v in grads.items()},
    }


def _call(leaves, vocab_group, case):
    from tailkd_dist.losses import fused_linear_distill

    return fused_linear_distill(
        leaves["student_hidden"],
        leaves["student_weight"],
        leaves["teacher_hidden"],
        leaves["teacher_weight"],
        leaves["labels"],
        doc_ids=leaves["doc_ids"],
        student_bias=leaves["student_bias"],
        teacher_bias=leaves["teacher_bias"],
        vocab_group=vocab_group,
        **case.kwargs(),
    )


# ------------------------------------------------------------------------------------------
# The distributed side: one launch, all cases
# ------------------------------------------------------------------------------------------
def _assignment(cases: list[Case], world: int = 4) -> dict[str, list[int]]:
    """Global ranks that run each case, in group-rank order."""
    out: dict[str, list[int]] = {}
    count = {1: 0, 2: 0}
    for c in cases:
        if c.group_size == 4:
            out[c.name] = [0, 1, 2, 3]
        else:
            i = count[c.group_size]
            count[c.group_size] += 1
            first = (i % (world // c.group_size)) * c.group_size
            out[c.name] = list(range(first, first + c.group_size))
    return out


def _parity_worker(rank: int, world_size: int, cases: list[Case]) -> dict:
    from tailkd_dist.parallel import Topology

    topologies = {size: Topology.build(loss_group_size=size, timeout_s=LAUNCH_TIMEOUT_S)
                  for size in (4, 2, 1)}
    assignment = _assignment(cases, world_size)
    results = {}
    for case in cases:
        members = assignment[case.name]
        if rank not in members:
            continue
        topo = topologies[case.group_size]
        group = topo.group("loss")
        assert dist.get_process_group_ranks(group) == members
        group_rank = members.index(rank)
        inputs = shard_inputs(case, make_full_inputs(case), group_rank)
        try:
            results[case.name] = run_loss(case, inputs, vocab_group=group)
        except Exception as exc:
            raise RuntimeError(f"case {case.name} (group rank {group_rank}) failed: {exc}") from exc
    return results


@pytest.fixture(scope="module")
def parity_results() -> dict[str, list[dict]]:
    per_rank = run_distributed(_parity_worker, 4, args=(CASES,), timeout_s=LAUNCH_TIMEOUT_S)
    assignment = _assignment(CASES)
    return {c.name: [per_rank[r][c.name] for r in assignment[c.name]] for c in CASES}


# ------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------
def check_close(what: str, a: torch.Tensor, b: torch.Tensor, tol: float, errors: list[str]):
    if not torch.isfinite(a).all():
        errors.append(f"{what}: non-finite values {a.flatten()[:6].tolist()}")
        return
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = rel_err(a, b)
    if not err <= tol:
        errors.append(
            f"{what}: relative error {err:.3e} > {tol:.0e} "
            f"(got {a.flatten()[:4].tolist()}, want {b.flatten()[:4].tolist()})"
        )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parity_with_single_process(case: Case, parity_results):
    check_parity(case, parity_results[case.name])


def check_parity(case: Case, got: list[dict]) -> None:
    """The group's results (one per group rank) against one process on the whole batch."""
    tol = TOL[case.dtype]
    full = make_full_inputs(case)
    # stats=False is checked against a single process that computes everything, eagerly
    ref = run_loss(dataclasses.replace(case, stats=True, compiled=False), full, vocab_group=None)
    errors: list[str] = []

    check_close("loss_sum (sum over ranks)", sum(r["loss"] for r in got), ref["loss"], tol, errors)
    for r, res in enumerate(got):
        if set(res["stats"]) != set(ref["stats"]):
            errors.append(f"rank {r} stats keys {sorted(res['stats'])} != {sorted(ref['stats'])}")
    for key in ref["stats"]:
        total = sum(res["stats"][key] for res in got)
        if key in skipped_stats(case):
            if not torch.isnan(total):
                errors.append(f"stats[{key!r}] was to be skipped (NaN) but is {float(total)}")
            continue
        check_close(f"stats[{key!r}] (sum over ranks)", total, ref["stats"][key], tol, errors)

    rows = _offsets(case.row_shards())
    pos = _offsets(case.positions)
    for r, res in enumerate(got):
        g_ref, g_got = ref["grads"], res["grads"]
        # hidden-state gradient: this rank's own positions
        want = g_ref["student_hidden"][pos[r] : pos[r + 1]]
        have = g_got["student_hidden"]
        if have is None:
            errors.append(f"rank {r}: no gradient for student_hidden")
        elif want.norm() == 0:  # e.g. a fully masked rank: must be exactly zero
            if have.abs().max() != 0:
                errors.append(f"rank {r}: student_hidden grad should be 0, max {have.abs().max()}")
        else:
            check_close(f"rank {r} grad student_hidden", have, want, tol, errors)
        # lm_head shard gradients: complete on the owner
        for key in ("student_weight", "student_bias"):
            if g_ref[key] is None:
                continue
            have = g_got[key]
            if have is None:
                errors.append(f"rank {r}: no gradient for {key} shard")
                continue
            check_close(f"rank {r} grad {key} rows [{rows[r]}, {rows[r + 1]})", have,
                        g_ref[key][rows[r] : rows[r + 1]], tol, errors)
    assert not errors, f"{case.name}:\n" + "\n".join(errors)


def test_case_coverage():
    """The case list covers what the issue asks for."""
    for g in (1, 2, 4):
        for div in DIVERGENCES:
            assert any(c.group_size == g and c.divergence == div for c in CASES), (g, div)
        for V in (32003, 128):
            for k in (1, 10):
                assert any(c.group_size == g and c.vocab == V and c.k == k for c in CASES), (g, V, k)
    assert {c.temperature for c in CASES} == {1.0, 2.0}
    assert {c.dtype for c in CASES} == {"float32", "float64"}
    assert any(c.k > min(c.row_shards()) for c in CASES if c.group_size == 4)
    assert any(c.tie and c.group_size > 1 and c.k == 10 for c in CASES)
    assert any(c.tie and c.group_size > 1 and c.k == 1 for c in CASES)
    assert any(c.masked_rank is not None and c.group_size == 4 for c in CASES)
    assert any(c.docs == "span" and c.group_size == 4 for c in CASES)
    assert any(c.docs == "scatter" and c.group_size == 4 for c in CASES)
    assert any(c.chunk_size < max(c.positions) for c in CASES)
    for div in DIVERGENCES:
        assert any(not c.stats and c.divergence == div and c.group_size == 4 for c in CASES), div
    # uneven positions and uneven shards
    assert any(len(set(c.positions)) > 1 and len(set(c.row_shards())) > 1 for c in CASES)


def test_tie_construction():
    """The tie cases really put two equal teacher logits, on the two sides of the rank-0/rank-1
    boundary, at the k-th and (k+1)-th places of every position."""
    for case in (c for c in CASES if c.tie):
        full = make_full_inputs(case)
        logits = full["teacher_hidden"] @ full["teacher_weight"].T + full["teacher_bias"]
        b = case.row_shards()[0]
        assert torch.equal(logits[:, b - 1], logits[:, b])
        srt = torch.sort(logits, dim=-1, descending=True).values
        assert torch.equal(srt[:, case.k - 1], logits[:, b - 1]), case.name
        assert torch.equal(srt[:, case.k], logits[:, b]), case.name
        if case.k < case.vocab - 2:
            assert (srt[:, case.k + 1] < srt[:, case.k]).all(), case.name


# ------------------------------------------------------------------------------------------
# Mismatched calls: the same ValueError on every rank, no hang
# ------------------------------------------------------------------------------------------
def _mismatch_scenarios(rank: int) -> dict[str, dict]:
    """Per scenario, this rank's deviation from a valid call on a 4-rank group (V = 128,
    shards of 32 rows)."""
    return {
        # teacher shards add up to 127 rows, student shards to 128
        "teacher_vocab_short": {"teacher_rows": 31 if rank == 1 else 32},
        # both add up to 128 but the slices differ (token 32 owned by rank 0 for the student,
        # by rank 1 for the teacher)
        "misaligned_slices": {"teacher_rows": {0: 31, 1: 33}.get(rank, 32)},
        # one rank asks for a different k
        "different_k": {"k": 5 if rank == 3 else 10},
        # one rank chunks differently (the chunk loop's exchanges would no longer pair up)
        "different_chunk": {"chunk_size": 4 if rank == 1 else 3},
        # k >= V for everybody
        "k_not_below_vocab": {"k": 128},
        # an error only rank 2 can see (labels of the wrong shape)
        "bad_labels_on_rank2": {"bad_labels": rank == 2},
    }


def _mismatch_worker(rank: int, world_size: int) -> dict[str, str]:
    from tailkd_dist.losses import fused_linear_distill

    group = dist.group.WORLD
    g = torch.Generator().manual_seed(5)
    V, d, n = 128, 8, 4
    sw_full = torch.randn(V, d, generator=g, dtype=torch.float64)
    tw_full = torch.randn(V + 1, d, generator=g, dtype=torch.float64)
    h = torch.randn(world_size * n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (world_size * n,), generator=g)
    out: dict[str, str] = {}
    scenarios = dict(_mismatch_scenarios(rank))
    scenarios["valid_call_afterwards"] = {}
    for name, dev in scenarios.items():
        # teacher row offsets follow the (possibly uneven) teacher shard sizes of all ranks
        t_sizes = [_mismatch_scenarios(r).get(name, {}).get("teacher_rows", 32)
                   for r in range(world_size)]
        t_start, t_rows = sum(t_sizes[:rank]), t_sizes[rank]
        sw = sw_full[32 * rank : 32 * (rank + 1)].clone().requires_grad_(True)
        tw = tw_full[t_start : t_start + t_rows]
        hs = h[n * rank : n * (rank + 1)].clone().requires_grad_(True)
        lab = labels[n * rank : n * (rank + 1)]
        if dev.get("bad_labels"):
            lab = lab[:-1]
        try:
            loss, _ = fused_linear_distill(hs, sw, hs.detach(), tw, lab, k=dev.get("k", 10),
                                           chunk_size=dev.get("chunk_size", 3), vocab_group=group)
            loss.backward()
            out[name] = "ok"
        except ValueError as exc:
            out[name] = f"ValueError: {exc}"
    return out


def test_mismatched_calls_fail_on_every_rank_alike():
    results = run_distributed(_mismatch_worker, 4, timeout_s=120)
    expect = {
        "teacher_vocab_short": ("rank 1", "32 student", "31 teacher"),
        "misaligned_slices": ("rank 0", "31 teacher", "rank 1", "33 teacher"),
        "different_k": ("identical loss settings", "k"),
        "different_chunk": ("identical loss settings", "chunk_size"),
        "k_not_below_vocab": ("k=128", "V=128"),
        "bad_labels_on_rank2": ("rank 2", "labels"),
    }
    for name, needles in expect.items():
        msgs = [res[name] for res in results]
        assert all(m.startswith("ValueError: ") for m in msgs), (name, msgs)
        assert len(set(msgs)) == 1, (name, msgs)  # the same message on every rank
        for needle in needles:
            assert needle in msgs[0], (name, needle, msgs[0])
    # the group is still usable after the errors
    assert [res["valid_call_afterwards"] for res in results] == ["ok"] * 4


# ------------------------------------------------------------------------------------------
# Communication counter
# ------------------------------------------------------------------------------------------
_COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "all_to_all", "all_to_all_single",
    "gather", "scatter", "send", "recv", "isend", "irecv", "all_gather_object",
    "broadcast_object_list", "barrier",
)


class _Wiretap:
    """Independent count: wraps torch.distributed's collectives and records what passes."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, torch.dtype | None]] = []
        self._saved = {}

    def __enter__(self):
        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def wrapper(*args, __name=name, __fn=fn, **kwargs):
                t = args[0] if args and torch.is_tensor(args[0]) else None
                # what each op moves: the result buffer (all_gather_into_tensor: args[0];
                # all_reduce: the tensor); reduce_scatter_tensor: its input (the mirror image
                # of a gather: every rank's full-size contribution)
                if __name in ("reduce_scatter_tensor", "reduce_scatter_single"):
                    t = args[1]
                # torch 2.13's names for the same collectives as the older *_tensor names
                op = {"all_gather_single": "all_gather_into_tensor",
                      "reduce_scatter_single": "reduce_scatter_tensor"}.get(__name, __name)
                self.calls.append((op, tuple(t.shape) if t is not None else (),
                                   t.dtype if t is not None else None))
                return __fn(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _counter_configs():
    # (group size, k, divergence, temperature, positions per rank, chunk, dtype)
    return [
        (2, 10, "tad", 1.0, (5, 9), 4, "float64"),   # several chunks: TAD pre-pass
        (2, 10, "tad", 1.0, (5, 9), 64, "float64"),  # one chunk: no pre-pass
        (2, 1, "reverse_kl", 2.0, (6, 3), 4, "float32"),
        (4, 10, "jsd", 1.0, (3, 4, 5, 2), 5, "float32"),
        (4, 3, "forward_kl", 2.0, (3, 4, 5, 2), 100, "float64"),
        (4, 10, "none", 1.0, (2, 2, 2, 2), 3, "float64"),
        (4, 3, "tad", 2.0, (3, 4, 5, 2), 5, "float32"),  # pre-pass at tau != 1
        # without the monitoring statistics: no K for KL, smaller teacher / student gathers
        (4, 3, "forward_kl", 2.0, (3, 4, 5, 2), 5, "float32", False),
        (2, 10, "jsd", 1.0, (5, 9), 4, "float64", False),
        (2, 10, "tad", 1.0, (5, 9), 4, "float64", False),
    ]


def _counter_worker(rank: int, world_size: int) -> list[dict]:
    from tailkd_dist.losses import fused_linear_distill
    from tailkd_dist.parallel import Topology
    from tailkd_dist.losses.traffic import loss_numbers_per_token
    from tailkd_dist.parallel.vocab_parallel import CommCounter

    topos = {4: Topology.build(loss_group_size=4), 2: Topology.build(loss_group_size=2)}
    V, d_s, d_t = 203, 8, 6
    out = []
    for i, (P, k, div, tau, positions, chunk, dtype, *stats) in enumerate(_counter_configs()):
        stats = stats[0] if stats else True
        topo = topos[P]
        gr = topo.loss_rank
        g = torch.Generator().manual_seed(i)
        dt = getattr(torch, dtype)
        n = positions[gr]
        shards = [V // P + (1 if r < V % P else 0) for r in range(P)]
        v_r = shards[gr]
        sh = torch.randn(n, d_s, generator=g, dtype=torch.float64).to(dt).requires_grad_(True)
        th = torch.randn(n, d_t, generator=g, dtype=torch.float64).to(dt)
        sw = torch.randn(v_r, d_s, generator=g, dtype=torch.float64).to(dt).requires_grad_(True)
        tw = torch.randn(v_r, d_t, generator=g, dtype=torch.float64).to(dt)
        labels = torch.randint(0, V, (n,), generator=g)
        with _Wiretap() as tap, CommCounter() as cc:
            loss, _ = fused_linear_distill(sh, sw, th, tw, labels, divergence=div, k=k,
                                           temperature=tau, chunk_size=chunk, stats=stats,
                                           vocab_group=topo.group("loss"))
            loss.backward()
        out.append(dict(
            config=(P, k, div, tau, positions, chunk, dtype, stats),
            tap=tap.calls,
            numbers_per_token=cc.numbers_per_token,
            by_op=dict(cc.by_op),
            bytes=cc.bytes,
            tokens=cc.tokens,
            formula=loss_numbers_per_token(group_size=P, k=k, divergence=div, temperature=tau,
                                           prepass=div == "tad" and sum(positions) > chunk, stats=stats),
        ))
    return out


def _spec_numbers_per_token(P, k, div, tau, prepass=False):
    """Per-token numbers of the loss's scalar collectives, counted from the spec.

    Spec ("Vocabulary-sharded form"): 2 (MAX of the teacher's and student's maxima) + 2Pk
    (all-gather of every rank's k candidates, value and index) + 8 (one SUM of the partial
    sums). This design exchanges, per rank, the teacher's top-(k+1) values and top-k ids, its
    sum of exp, the sum of exp beyond its own top-k and a non-finite flag (2k+4), then the
    student's max, argmax, sum of exp and its tail's max and sum of exp (5); the MAX goes and
    the SUM keeps 5 columns (the tails are exact from the gathers): 2Pk + 9P + 5 = spec + 9P - 5,
    with or without TAD's pre-pass (which only moves the teacher's gather earlier). Further
    additions: one more sum of exp at tau = 1 for CE when tau != 1 (+P), and the divergences'
    own sums (reverse KL +1, JSD +2).
    """
    extras = {"reverse_kl": 1, "jsd": 2}.get(div, 0)
    spec = 2 + 2 * P * k + 8
    return spec + 9 * P - 5 + (P if tau != 1.0 else 0) + extras


def _expected_calls(P, k, div, tau, positions, chunk, d_s, d_t, stats=True):
    """The collectives the design implies, sizes as each moves them: [(op, numel)] in call
    order, and the per-token numbers of the scalar ones (candidates, partial sums)."""
    N, n_max = sum(positions), max(positions)
    extras = {"tad": 0, "forward_kl": 0, "none": 0, "reverse_kl": 1, "jsd": 2}[div]
    tails = stats or div == "tad"  # K and the tail masses: TAD's value, or the statistics
    # teacher: k+1 values, k ids, sum of exp, sum of exp beyond the rank's own top-k, flag;
    # without K: max, sum of exp, flag
    teacher = 2 * k + 4 if tails else 3
    # student: max, argmax, sum of exp, tail max, tail sum; without K: max, sum of exp [+ raw]
    student = (5 if tails else 2) + (1 if tau != 1.0 else 0)
    # SUM: log q(label), KL (over K and over the tail, or whole), [entropies], divergence's own
    sums = 1 + (2 if tails else 1) + (2 if stats else 0) + extras
    calls = [
        ("all_gather_into_tensor", None),  # the call's layout/settings (size not pinned)
        ("all_gather_into_tensor", P * n_max * 2),  # labels + doc ids of the group
        ("all_gather_into_tensor", P * n_max * (d_s + d_t)),  # hidden states of the group
    ]
    chunks = [min(chunk, N - c0) for c0 in range(0, N, chunk)]
    prepass = div == "tad" and N > chunk  # doc_ids=None on [N] inputs: one document
    scalar = 0
    if prepass:  # teacher-only pass first, one gather per chunk
        calls += [("all_gather_into_tensor", P * c * teacher) for c in chunks]
    for c in chunks:
        if not prepass:
            calls.append(("all_gather_into_tensor", P * c * teacher))
        calls += [("all_gather_into_tensor", P * c * student), ("all_reduce", c * sums)]
        scalar += P * c * teacher + P * c * student + c * sums
    calls.append(("reduce_scatter_tensor", P * n_max * d_s))  # hidden-state gradient
    return calls, scalar / N


def test_comm_counter_matches_an_independent_count():
    results = run_distributed(_counter_worker, 4, timeout_s=120)
    d_s, d_t = 8, 6
    for rank, per_rank in enumerate(results):
        for res in per_rank:
            P, k, div, tau, positions, chunk, dtype, stats = res["config"]
            N = sum(positions)
            expected_calls, scalar_per_token = _expected_calls(P, k, div, tau, positions,
                                                                chunk, d_s, d_t, stats=stats)
            tapped = [(op, math.prod(shape)) for op, shape, _ in res["tap"]]
            assert [op for op, _ in tapped] == [op for op, _ in expected_calls], res["config"]
            for (op, got), (_, want) in zip(tapped, expected_calls):
                if want is not None:
                    assert got == want, (res["config"], op, got, want)
            # the counter saw every number that passed through torch.distributed
            assert sum(res["by_op"].values()) == sum(n for _, n in tapped), res["config"]
            tapped_bytes = sum(
                math.prod(shape) * (torch.empty((), dtype=dt).element_size())
                for _, shape, dt in res["tap"]
            )
            assert res["bytes"] == tapped_bytes, res["config"]
            assert res["tokens"] == N
            # numbers per token: counter == the module's formula == the count derived here
            # == the spec's formula plus the design's documented additions
            assert res["numbers_per_token"] == pytest.approx(scalar_per_token, rel=1e-12)
            assert res["formula"] == pytest.approx(scalar_per_token, rel=1e-12)
            if stats:
                assert scalar_per_token == _spec_numbers_per_token(
                    P, k, div, tau, prepass=div == "tad" and N > chunk)


def test_loss_traffic_is_small_against_gathering_logits():
    """Issue, "Done when": at P = 8, k = 10, V = 128256 the loss's per-token numbers are
    <= 1% of the V numbers per token that gathering the logits would move."""
    from tailkd_dist.losses.traffic import loss_numbers_per_token

    for div in DIVERGENCES:
        for tau in (1.0, 2.0):
            n = loss_numbers_per_token(group_size=8, k=10, divergence=div, temperature=tau)
            assert n == _spec_numbers_per_token(8, 10, div, tau)
            assert n <= 0.01 * 128256, (div, tau, n)
