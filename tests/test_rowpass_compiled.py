"""The fused loss with its row passes compiled (what a GPU runs by default), on CPU.

Inductor's CPU backend compiles the same pure functions (``tailkd_dist.losses.rowpass``) that
it compiles to Triton on a GPU, including the compiled-only code: K membership by unrolled
compares, the label's gradient by a compare. Checked here:

* against the plain float64 reference (``tests/reference_losses.py``) for every divergence and
  both dtypes, with ties at the k-th value on chunk boundaries, tau != 1, k = V - 1, TAD's
  pre-pass, and without the statistics;
* vocabulary-parallel against one eager process, with uneven shards (V = 32003, one-row
  shards), ties on a shard boundary, K entries and labels on other ranks;
* that no compiled pass stores a [rows, V] intermediate (Inductor's generated code), which is
  what makes each pass one read of the logits.

Compilation is slow on a CPU (seconds per graph): the cases are few, chosen to reach every
graph the loss makes, and Inductor's on-disk cache serves the later processes.
"""
from __future__ import annotations

import re

import pytest
import torch

import test_losses_reference as ref
import test_vocab_parallel as vpt
from dist_harness import run_distributed
from tailkd_dist.losses import fused as fused_mod
from tailkd_dist.losses import rowpass

F32, F64 = torch.float32, torch.float64


@pytest.fixture
def compiled(monkeypatch):
    """Every fused_linear_distill call in the test runs its row passes compiled."""
    seen = []

    def forced(device, compiled=None):
        seen.append(compiled)
        return rowpass.RowPath(True, "compiled (test)")

    monkeypatch.setattr(fused_mod, "row_path", forced)
    yield seen
    assert seen, "the loss never asked for its row path"


_CASES = {c["id"]: c for c in ref.FUSED_CASES}
_REFERENCE = [
    # k = 10 (one K-width class), documents across chunks (TAD's pre-pass), both biases;
    # float32 for the divergences whose passes differ most
    ("N37_ds16_dt24_V97_chunk8_docs", div, dt) for div in ref.R.DIVERGENCES for dt in (F32, F64)
    if dt == F64 or div in ("tad", "forward_kl", "jsd")
] + [
    # tau = 2 (CE's own normaliser), k = 5; k = V - 1 = 40 with ignore_index = -1
    ("B3T13_V97_chunk5_docs_tau2_k5", "tad", F64), ("B3T13_V97_chunk5_docs_tau2_k5", "jsd", F32),
    ("B2T9_V41_chunk4_rows_kVm1_beta0.5_ignore-1", "tad", F64),
    ("B2T9_V41_chunk4_rows_kVm1_beta0.5_ignore-1", "reverse_kl", F32),
]


@pytest.mark.parametrize("case_id,divergence,dtype", _REFERENCE,
                         ids=[f"{c}-{d}-{ref.DT_ID[t]}" for c, d, t in _REFERENCE])
def test_compiled_vs_float64_reference(compiled, case_id, divergence, dtype):
    ref.run_fused_and_compare(_CASES[case_id], divergence, dtype)


@pytest.mark.parametrize("divergence", ["tad", "forward_kl", "jsd"])
def test_compiled_without_statistics(compiled, divergence):
    ref.run_fused_and_compare(_CASES["N37_ds16_dt24_V97_chunk8_docs"], divergence, F64, monitor=False)


@pytest.mark.parametrize("chunk", [1, 7])
def test_compiled_ties_at_kth_value_on_chunk_boundaries(compiled, chunk):
    ref.test_fused_ties_at_kth_value_lower_index_wins(chunk, F64)


_VP_CASES = [
    vpt.Case("c-g4-tad-V32003-k10-tie-f32", 4, 32003, (5, 9, 3, 7), tie=True, dtype="float32", seed=14,
             compiled=True),
    vpt.Case("c-g4-fkl-V13-k10-shards1543-f32", 4, 13, (4, 6, 3, 5), shards=(1, 5, 4, 3),
             divergence="forward_kl", dtype="float32", chunk_size=3, seed=11, compiled=True),
    vpt.Case("c-g4-jsd-V128-k10-shards-uneven", 4, 128, (3, 8, 5, 6), shards=(40, 3, 70, 15),
             divergence="jsd", jsd_beta=0.3, temperature=2.0, seed=13, compiled=True),
    vpt.Case("c-g2-tad-V32003-k10-f64-teacherblocks", 2, 32003, (7, 11), chunk_size=5, teacher_rows=2,
             docs="scatter", seed=22, compiled=True),
    vpt.Case("c-g2-rkl-V128-k1-tie", 2, 128, (6, 6), tie=True, k=1, divergence="reverse_kl", seed=16,
             compiled=True),
    vpt.Case("c-g4-tad-V32003-k10-f64-t2-nostats", 4, 32003, (5, 9, 3, 7), temperature=2.0, chunk_size=4,
             stats=False, seed=300, compiled=True),
]


@pytest.fixture(scope="module")
def vp_results():
    per_rank = run_distributed(vpt._parity_worker, 4, args=(_VP_CASES,), timeout_s=vpt.LAUNCH_TIMEOUT_S)
    assignment = vpt._assignment(_VP_CASES)
    return {c.name: [per_rank[r][c.name] for r in assignment[c.name]] for c in _VP_CASES}


@pytest.mark.parametrize("case", _VP_CASES, ids=[c.name for c in _VP_CASES])
def test_compiled_vocab_parallel_vs_one_eager_process(case, vp_results):
    vpt.check_parity(case, vp_results[case.name])


def _generated_code(fn, *args):
    from torch._inductor.utils import run_and_get_code

    # A fresh compile (no cache) so that Inductor generates, and hands over, its code.
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):
        return run_and_get_code(torch.compile(fn, dynamic=True, fullgraph=True, options=rowpass.inductor_options()), *args)


def test_compiled_passes_store_no_rows_by_vocab_intermediate():
    b, v = 16, 1003
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(b, v, generator=g), torch.randn(b, v, generator=g)
    vals, ids = torch.topk(t, 11)
    own = rowpass.pad_ids(ids[:, :10])
    k_cols = rowpass.pad_ids(torch.where(torch.rand(b, 10, generator=g) < 0.7, ids[:, :10], -1))
    lse_t, lse_s = torch.logsumexp(t, 1), torch.logsumexp(s, 1)
    row = torch.rand(b, generator=g)
    label = torch.where(row < 0.8, torch.randint(0, v, (b,), generator=g), -1)
    runs = {
        "teacher_pass": (rowpass.teacher_pass, (t, vals, own)),
        "student_pass": (rowpass.student_pass, (s, k_cols, 2.0, True)),
    }
    for div in ("tad", "forward_kl", "jsd"):
        cols = rowpass.sum_columns(div).width
        runs[f"sweep {div}"] = (rowpass.sweep, (
            s, t, lse_t, lse_s, k_cols, label, row, row - 0.5, row, row, None, torch.randn(b, cols), 1.0, 0.5,
            div, True, True, torch.empty(b, v)))
    # A [rows, V] buffer shows in the wrapper as empty_strided_cpu((R, sV), ...) with the
    # vocabulary a symbol (dynamic) or 1003; the per-row outputs are [rows] or [rows, n < 64].
    two_dim = re.compile(r"empty_strided_\w+\(\((s\w+|\d+), (s\w+|\d+)\)")
    for name, (fn, args) in runs.items():
        _, codes = _generated_code(fn, *args)
        buffers = [m for m in two_dim.finditer("\n".join(codes))]
        assert buffers, f"{name}: no buffer found in the generated code (did its format change?)"
        big = [m.group(0) for m in buffers if not (m.group(2).isdigit() and int(m.group(2)) < 64)]
        assert not big, f"{name}: the compiled pass stores [rows, V] intermediates: {big}"
    torch._dynamo.reset()


def test_fill_at_eager_and_compiled_against_a_loop():
    """divergences.fill_at: K's columns set, -1 entries ignored, column 0 left alone unless it
    is one of the row's columns; eager (scatter) and compiled (compares) alike, checked against
    a plain loop."""
    from tailkd_dist.losses.divergences import fill_at

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 11, generator=g, dtype=F64)
    cols = torch.tensor([[0, 3, -1], [-1, -1, -1], [10, 0, 0], [2, -1, 7], [-1, 5, 0]])
    want = x.clone()
    for r in range(cols.shape[0]):
        for c in cols[r].tolist():
            if c >= 0:
                want[r, c] = -7.5
    assert torch.equal(fill_at(x.clone(), cols, -7.5), want)
    assert torch.equal(fill_at(x.clone(), cols[:, :0], -7.5), x)
    compiled_fill = torch.compile(fill_at, fullgraph=True, dynamic=True)
    assert torch.equal(compiled_fill(x.clone(), cols, -7.5), want)
