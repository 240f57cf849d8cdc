"""Independent reference tests of the TAD loss family (dense and fused) against a plain float64
reference (tests/reference_losses.py), which never calls the code under test.

Tolerances (issue 2): float64 <= 1e-10 relative, float32 <= 1e-5 relative, where relative for a
tensor is ||a - b|| / max(||b||, tiny) and for a scalar |a - b| / max(|b|, tiny); tiny is the
smallest normal number of the dtype under test (values below it cannot be represented there).
float32 runs feed the SAME float32-rounded inputs to the float64 reference.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_losses as R  # noqa: E402
from numerics import rel_err  # noqa: E402

F64 = torch.float64
F32 = torch.float32
DTYPES = [F32, F64]
TOL = {F32: 1e-5, F64: 1e-10}
DT_ID = {F32: "f32", F64: "f64"}


@pytest.fixture(autouse=True, scope="module")
def _one_intraop_thread():
    """Every tensor here is tiny: on a small, shared CPU machine torch's intra-op threads only
    add synchronisation (measured: 2 min vs 25 s for this file on 2 busy cores). Restored
    after the module so other test files are unaffected."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def impl():
    """The code under test, imported lazily so the reference self-tests run on their own.
    A failing import FAILS the test (never skips it)."""
    import tailkd_dist.losses as L  # noqa: WPS433
    from tailkd_dist.losses.dense import tad_terms  # noqa: WPS433
    return L, tad_terms


# ----------------------------------------------------------------------------------------------
# comparison helpers
# ----------------------------------------------------------------------------------------------
def _flat64(x):
    return torch.as_tensor(x).detach().to(F64).reshape(-1)


def assert_rel(a, b, dtype, what, floor=None):
    a_t = torch.as_tensor(a).detach()
    assert torch.isfinite(a_t).all(), f"{what}: non-finite values in the implementation's output"
    tol = TOL[dtype]
    floor = torch.finfo(dtype).tiny if floor is None else floor
    err = rel_err(a_t, b, floor)
    assert err <= tol, (
        f"{what}: relative error {err:.3e} > {tol:.0e} "
        f"(|ref| = {torch.linalg.vector_norm(_flat64(b)).item():.6e}, "
        f"|impl - ref| = {torch.linalg.vector_norm(_flat64(a_t) - _flat64(b)).item():.3e})")


def norm(x):
    return torch.linalg.vector_norm(_flat64(x)).item()


# ----------------------------------------------------------------------------------------------
# input generators
# ----------------------------------------------------------------------------------------------
def make_doc_ids(gen, pos, mode):
    if mode is None:
        return None
    if mode == "multi":  # several documents inside each row, ids unique per row
        if len(pos) == 1:
            pos2 = (1, pos[0])
        else:
            pos2 = pos
        B, T = pos2
        rows = []
        for b in range(B):
            cuts = sorted(torch.randperm(T - 1, generator=gen)[:2].add(1).tolist())
            seg = torch.zeros(T, dtype=torch.int64)
            for c in cuts:
                seg[c:] += 1
            rows.append(seg + 10 * b)
        return torch.stack(rows).reshape(pos)
    if mode == "across":  # a few ids scattered everywhere: documents span rows, non-contiguous
        return torch.randint(0, 3, pos, generator=gen) * 7 + 3
    raise AssertionError(mode)


def make_mask(gen, pos, on):
    if not on:
        return None
    m = torch.rand(pos, generator=gen) > 0.3
    flat = m.reshape(-1)
    flat[0] = False  # at least one masked
    flat[-1] = True  # at least one valid
    return flat.reshape(pos)


def make_dense(case, dtype, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    pos, V = case["pos"], case["V"]
    t = torch.randn(*pos, V, generator=gen, dtype=F64) * case.get("ts", 3.0)
    s = torch.randn(*pos, V, generator=gen, dtype=F64) * case.get("ss", 2.0)
    if case.get("pm"):  # logits exactly +-1e4 (teacher), +-1e4 plus noise (student)
        t = torch.sign(t) * 1e4
        s = torch.sign(s) * 1e4 + torch.randn(*pos, V, generator=gen, dtype=F64)
    mask = make_mask(gen, pos, case.get("mask", False))
    doc_ids = make_doc_ids(gen, pos, case.get("docs"))
    g = torch.randn(*pos, generator=gen, dtype=F64)
    labels = torch.randint(0, V, pos, generator=gen)
    labels.reshape(-1)[::3] = -100
    return s.to(dtype), t.to(dtype), mask, doc_ids, g.to(dtype), labels


V_BIG = 32003
DENSE_CASES = [
    dict(id="N7_V13_k5", pos=(7,), V=13, k=5),
    dict(id="N7_V13_k1_beta0.7", pos=(7,), V=13, k=1, beta=0.7),
    dict(id="B2T5_V31_k1_tau2_mask_docs", pos=(2, 5), V=31, k=1, tau=2.0, mask=True, docs="multi"),
    dict(id="B3T4_V17_kVm1_mask", pos=(3, 4), V=17, k=16, mask=True),
    dict(id="B2T6_V23_k10_tau2_docs_across_rows", pos=(2, 6), V=23, k=10, tau=2.0, mask=True,
         docs="across"),
    dict(id="N9_V11_k10=Vm1_docs", pos=(9,), V=11, k=10, docs="across", beta=5.0),
    dict(id="B2T2_V32003_k10_mask_docs", pos=(2, 2), V=V_BIG, k=10, mask=True, docs="across"),
    dict(id="B1T3_V32003_kVm1_tau2", pos=(1, 3), V=V_BIG, k=V_BIG - 1, tau=2.0),
    dict(id="B2T5_V47_k7_tau0.7_mask_docs", pos=(2, 5), V=47, k=7, tau=0.7, mask=True,
         docs="multi"),
    dict(id="N8_V33_k2_tau1.5_beta3", pos=(8,), V=33, k=2, tau=1.5, beta=3.0),
    dict(id="peaked50_B3T5_V29_k5_mask_docs", pos=(3, 5), V=29, k=5, ts=50.0, mask=True,
         docs="multi"),
    dict(id="peaked80_N9_V41_k1_tau2", pos=(9,), V=41, k=1, ts=80.0, tau=2.0),
    dict(id="peaked60_N6_V19_kVm1", pos=(6,), V=19, k=18, ts=60.0),
    dict(id="flat1e-3_B2T6_V23_k10_docs", pos=(2, 6), V=23, k=10, ts=1e-3, ss=1.0, docs="multi"),
    dict(id="flat1e-3_N5_V19_kVm1_tau2", pos=(5,), V=19, k=18, ts=1e-3, ss=1.0, tau=2.0),
    dict(id="huge1e4_B2T4_V19_k3_mask", pos=(2, 4), V=19, k=3, ts=1e4, ss=1e4, mask=True),
    dict(id="huge1e4_N6_V37_k10_tau2", pos=(6,), V=37, k=10, ts=1e4, ss=1e4, tau=2.0),
    dict(id="pm1e4_B2T4_V40_k5_docs", pos=(2, 4), V=40, k=5, pm=True, docs="across"),
]


def _kw(case):
    return dict(k=case["k"], beta=case.get("beta", 2.0), temperature=case.get("tau", 1.0))


def dense_params():
    return [pytest.param(c, dt, id=f"{c['id']}-{DT_ID[dt]}") for c in DENSE_CASES for dt in DTYPES]


# ----------------------------------------------------------------------------------------------
# 0. the reference checks itself (runs without the implementation)
# ----------------------------------------------------------------------------------------------
def test_reference_log_softmax_matches_torch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 37, generator=gen, dtype=F64) * 4
    assert torch.allclose(R.log_softmax64(x), torch.log_softmax(x, -1), rtol=0, atol=1e-13)
    # very peaked: log p of the argmax must not round to 0
    y = torch.tensor([[0.0, -50.0, -60.0]], dtype=F64)
    lp = R.log_softmax64(y)
    expect = -math.log1p(math.exp(-50.0) + math.exp(-60.0))
    assert lp[0, 0].item() != 0.0 and abs(lp[0, 0].item() - expect) <= 1e-15 * abs(expect)


def test_reference_topk_tie_rule_hand_example():
    t = torch.tensor([1.0, 7.0, 5.0, 0.0, 5.0, -2.0, 5.0, 5.0, 3.0, -1.0, 5.0, 2.0])
    low = R.topk_member_mask(t, 3)
    high = R.topk_member_mask(t, 3, tie="high")
    assert torch.nonzero(low).flatten().tolist() == [1, 2, 4]
    assert torch.nonzero(high).flatten().tolist() == [1, 7, 10]
    assert torch.nonzero(R.topk_member_mask(t, 1)).flatten().tolist() == [1]


def test_reference_identity_and_kl():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, 29, generator=gen, dtype=F64) * 2
    t = torch.randn(3, 4, 29, generator=gen, dtype=F64) * 3
    for tau in (1.0, 2.0):
        r = R.tad_terms(s, t, k=5, temperature=tau)
        kl_torch = torch.nn.functional.kl_div(torch.log_softmax(s / tau, -1),
                                              torch.log_softmax(t / tau, -1),
                                              log_target=True, reduction="none").sum(-1)
        assert rel_err(r["kl"], kl_torch, 1e-300) <= 1e-13
        assert rel_err(r["d1"] + r["at_d2"], r["kl"], 1e-300) <= 1e-13
        # aT, aS straight from 1 - sum over the top-k
        assert rel_err(r["a_t"], 1 - (r["p"] * r["member"]).sum(-1), 1e-300) <= 1e-12
        assert rel_err(r["a_s"], 1 - (r["q"] * r["member"]).sum(-1), 1e-300) <= 1e-12
        # D2 from the definition, in probability space
        pt = torch.where(r["member"], 0.0, r["p"]) / r["a_t"].unsqueeze(-1)
        qt = torch.where(r["member"], 0.0, r["q"]) / r["a_s"].unsqueeze(-1)
        d2 = torch.where(r["member"], 0.0, pt * torch.log(pt / qt)).sum(-1)
        assert rel_err(r["d2"], d2, 1e-300) <= 1e-12
        assert r["d1"].min() > 0 and r["at_d2"].min() > 0


REF_GRAD_CASES = [c for c in DENSE_CASES if c["V"] < 1000]


@pytest.mark.parametrize("case", REF_GRAD_CASES, ids=[c["id"] for c in REF_GRAD_CASES])
def test_reference_closed_form_gradient_matches_autograd(case):
    """The spec's tail-vs-top-k gradient formula equals autograd of the definition (beta(X)
    teacher-only), at tau = 1 and tau = 2, with masks and documents."""
    s, t, mask, doc_ids, g, _ = make_dense(case, F64)
    s = s.detach().clone().requires_grad_(True)
    out = R.tad_divergence(s, t, mask=mask, doc_ids=doc_ids, **_kw(case))
    (out * g).sum().backward()
    closed = R.tad_grad_closed_form(s.detach(), t, g, mask=mask, doc_ids=doc_ids, **_kw(case))
    assert norm(s.grad) > 0
    assert rel_err(closed, s.grad, 1e-300) <= 1e-12, rel_err(closed, s.grad, 1e-300)


def test_reference_beta_x_hand_example():
    a_t = torch.tensor([[0.1, 0.3, 0.9, 0.2], [0.4, 0.05, 0.5, 0.7]], dtype=F64)
    mask = torch.tensor([[True, True, False, True], [True, True, True, False]])
    doc = torch.tensor([[0, 0, 0, 1], [1, 2, 2, 0]])
    bx = R.beta_per_position(a_t, mask, 2.0, doc)
    m0 = (0.1 + 0.3) / 2          # position (0,2) masked, (1,3) masked
    m1 = (0.2 + 0.4) / 2
    m2 = (0.05 + 0.5) / 2
    expect = torch.tensor([[2 / m0, 2 / m0, 0, 2 / m1], [2 / m1, 2 / m2, 2 / m2, 0]], dtype=F64)
    assert torch.allclose(bx, expect, rtol=1e-15, atol=0)
    # rows as documents, and the floor
    bx_rows = R.beta_per_position(a_t, torch.ones_like(mask), 2.0)
    assert math.isclose(bx_rows[1, 0].item(), 2 / ((0.4 + 0.05 + 0.5 + 0.7) / 4), rel_tol=1e-15)
    tiny = torch.full((3,), 1e-9, dtype=F64)
    assert torch.equal(R.beta_per_position(tiny, torch.ones(3, dtype=torch.bool), 2.0),
                       torch.full((3,), 2e6, dtype=F64))


def test_reference_jsd_sanity():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(4, 11, generator=gen, dtype=F64)
    t = torch.randn(4, 11, generator=gen, dtype=F64)
    assert R.jsd(t, t, beta=0.3).abs().max() < 1e-15
    v = R.jsd(s, t, beta=0.5)
    assert torch.allclose(v, R.jsd(t, s, beta=0.5), rtol=1e-13, atol=0)
    assert (v > 0).all() and (v < math.log(2)).all()
    # straight from probabilities
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    m = 0.3 * p + 0.7 * q
    direct = 0.3 * (p * torch.log(p / m)).sum(-1) + 0.7 * (q * torch.log(q / m)).sum(-1)
    assert rel_err(R.jsd(s, t, beta=0.3), direct, 1e-300) <= 1e-12


# ----------------------------------------------------------------------------------------------
# 1. dense functions vs the reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,dtype", dense_params())
def test_dense_tad_divergence_loss_and_grad(case, dtype):
    L, _ = impl()
    s, t, mask, doc_ids, g, _ = make_dense(case, dtype)
    kw = _kw(case)
    s_i = s.detach().clone().requires_grad_(True)
    out = L.tad_divergence(s_i, t, mask=mask, doc_ids=doc_ids, **kw)
    assert tuple(out.shape) == tuple(case["pos"])
    assert torch.isfinite(out).all()
    (out * g).sum().backward()
    assert s_i.grad is not None and torch.isfinite(s_i.grad).all()

    s64 = s.detach().to(F64).clone().requires_grad_(True)
    ref = R.tad_divergence(s64, t.to(F64), mask=mask, doc_ids=doc_ids, **kw)
    (ref * g.to(F64)).sum().backward()
    assert ref.sum() > 0 and norm(s64.grad) > 0  # not vacuous

    assert_rel(out, ref, dtype, "tad_divergence")
    if mask is not None:
        assert (out.detach()[~mask] == 0).all(), "tad_divergence must be exactly 0 where masked"
        assert (s_i.grad[~mask] == 0).all(), "gradient must be exactly 0 at masked positions"
    assert_rel(s_i.grad, s64.grad, dtype, "d tad / d student_logits (vs autograd of reference)")
    closed = R.tad_grad_closed_form(s, t, g, mask=mask, doc_ids=doc_ids, **kw)
    assert_rel(s_i.grad, closed, dtype, "d tad / d student_logits (vs spec's closed form)")


@pytest.mark.parametrize("case,dtype", dense_params())
def test_dense_tad_terms(case, dtype):
    _, tad_terms = impl()
    s, t, mask, doc_ids, _, _ = make_dense(case, dtype)
    kw = _kw(case)
    got = tad_terms(s, t, mask=mask, doc_ids=doc_ids, **kw)
    ref = R.tad_terms(s, t, mask=mask, doc_ids=doc_ids, **kw)
    assert set(got) >= {"d1", "at_d2", "kl", "a_t", "a_s", "beta_x", "tad"}, sorted(got)
    valid = ref["mask"]
    for key in ("d1", "at_d2", "kl", "a_t", "a_s", "beta_x", "tad"):
        assert tuple(got[key].shape) == tuple(case["pos"]), key
    kl_norm = norm(ref["kl"][valid])
    assert kl_norm > 0 and norm(ref["d1"][valid]) > 0
    if case.get("ts", 3.0) < 1e3:  # (with +-1e4 logits the teacher tail mass underflows to 0)
        assert norm(ref["a_t"][valid]) > 0 and norm(ref["at_d2"][valid]) >= 0
    for key in ("d1", "at_d2", "kl", "a_t", "a_s", "beta_x"):
        ref_v = ref[key][valid]
        # a reference that is exactly 0 (aT*D2 when k = V-1, or when aT underflows) is judged
        # on the scale of the KL it is a part of
        floor = kl_norm if (key == "at_d2" and norm(ref_v) == 0) else None
        assert_rel(got[key][valid], ref_v, dtype, f"tad_terms[{key!r}]", floor=floor)
    assert_rel(got["tad"], ref["tad"], dtype, "tad_terms['tad']")
    if mask is not None:
        assert (got["tad"][~mask] == 0).all()
    # the identity D1 + aT*D2 = KL, per position, on the implementation's own terms
    ident = (got["d1"].to(F64) + got["at_d2"].to(F64))[valid]
    assert_rel(ident, got["kl"].to(F64)[valid], dtype, "identity D1 + aT*D2 = KL (impl)")
    assert rel_err(ref["d1"] + ref["at_d2"], ref["kl"], 1e-300) <= 1e-12
    # tad_terms' 'tad' is the same value tad_divergence returns
    L, _ = impl()
    assert_rel(L.tad_divergence(s, t, mask=mask, doc_ids=doc_ids, **kw), ref["tad"], dtype,
               "tad_divergence vs tad_terms reference")


@pytest.mark.parametrize("case,dtype", dense_params())
def test_dense_other_divergences_and_ce(case, dtype):
    L, _ = impl()
    s, t, mask, doc_ids, g, labels = make_dense(case, dtype)
    tau = case.get("tau", 1.0)
    huge = case.get("ts", 3.0) >= 1e3 or case.get("pm", False)
    checks = [
        ("forward_kl", lambda f, x: f.forward_kl(x, t, temperature=tau, mask=mask),
         lambda x: R.forward_kl(x, t, temperature=tau, mask=mask)),
        ("reverse_kl", lambda f, x: f.reverse_kl(x, t, temperature=tau, mask=mask),
         lambda x: R.reverse_kl(x, t, temperature=tau, mask=mask)),
        ("jsd(0.5)", lambda f, x: f.jsd(x, t, temperature=tau, mask=mask),
         lambda x: R.jsd(x, t, beta=0.5, temperature=tau, mask=mask)),
        ("jsd(0.2)", lambda f, x: f.jsd(x, t, beta=0.2, temperature=tau, mask=mask),
         lambda x: R.jsd(x, t, beta=0.2, temperature=tau, mask=mask)),
        ("cross_entropy", lambda f, x: f.cross_entropy(x, labels),
         lambda x: R.cross_entropy(x, labels)),
        ("cross_entropy(ignore_index=5)",
         lambda f, x: f.cross_entropy(x, torch.where(labels == -100, 5, labels), ignore_index=5),
         lambda x: R.cross_entropy(x, torch.where(labels == -100, 5, labels), ignore_index=5)),
    ]
    for name, fn_impl, fn_ref in checks:
        s_i = s.detach().clone().requires_grad_(True)
        out = fn_impl(L, s_i)
        assert tuple(out.shape) == tuple(case["pos"]), name
        (out * g).sum().backward()
        s64 = s.detach().to(F64).clone().requires_grad_(True)
        ref = fn_ref(s64)
        (ref * g.to(F64)).sum().backward()
        # With +-1e4 logits the student distribution is one-hot to machine precision, so the
        # gradients of reverse KL and JSD (q-weighted: q_j (g_j - E_q g)) are 0 or ~1e-12 and
        # formed by cancellation in ANY dtype (torch's own float64 autograd differs from the
        # reference by ~3e-2 relative there). For those, the error is judged on the natural
        # O(1) scale of a gradient w.r.t. logits: ||a - b|| <= tol * max(||b||, 1).
        q_weighted_huge = huge and name.startswith(("reverse_kl", "jsd"))
        assert ref.sum() > 0 and (q_weighted_huge or norm(s64.grad) > 0), name
        assert_rel(out, ref, dtype, name)
        assert_rel(s_i.grad, s64.grad, dtype, f"d {name} / d student_logits",
                   floor=1.0 if q_weighted_huge else None)
        zero_at = (labels == -100) if name.startswith("cross_entropy") else (
            None if mask is None else ~mask)
        if zero_at is not None:
            assert (out.detach()[zero_at] == 0).all(), f"{name} must be 0 where masked"


# ----------------------------------------------------------------------------------------------
# 2. ties, documents, masks
# ----------------------------------------------------------------------------------------------
TIE_TEACHER = torch.tensor([
    [1.0, 7.0, 5.0, 0.0, 5.0, -2.0, 5.0, 5.0, 3.0, -1.0, 5.0, 2.0],   # k=3: {1,2,4} not {1,7,10}
    [4.0, 4.0, 9.0, 4.0, 0.0, 4.0, -3.0, 8.0, 4.0, 1.0, 2.0, 4.0],    # k=3: {2,7,0} not {2,7,11}
    [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],     # all tied: {0,1,2}
    [0.5, 6.0, 6.0, 6.0, 6.0, 6.0, 6.0, -1.0, 0.0, 1.0, 6.0, 6.0],    # 8 tied at the top
])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_dense_ties_at_kth_value_lower_index_wins(dtype, tau):
    _, tad_terms = impl()
    L, _ = impl()
    k = 3
    t = TIE_TEACHER.to(dtype)
    gen = torch.Generator().manual_seed(7)
    # student logits rising with the token index, so the two tie rules give very different q
    s = (torch.linspace(-3.0, 3.0, t.shape[-1], dtype=F64)
         + 0.3 * torch.randn(t.shape, generator=gen, dtype=F64)).to(dtype)
    # ties really straddle the k-th boundary in every row
    srt = torch.sort(t, dim=-1, descending=True).values
    assert (srt[:, k - 1] == srt[:, k]).all()
    ref_low = R.tad_terms(s, t, k=k, temperature=tau)
    ref_high = R.tad_terms(s, t, k=k, temperature=tau, tie="high")
    assert torch.nonzero(ref_low["member"][0]).flatten().tolist() == [1, 2, 4]
    # the two rules give the same aT but clearly different D1, so D1 tells which set was used
    assert rel_err(ref_high["a_t"], ref_low["a_t"], 1e-300) < 1e-14
    assert ((ref_high["d1"] - ref_low["d1"]).abs() > 1e-3 * ref_low["d1"].abs()).all()
    got = tad_terms(s, t, k=k, temperature=tau)
    for key in ("d1", "at_d2", "a_t", "a_s", "kl", "tad"):
        assert_rel(got[key], ref_low[key], dtype, f"tie case tad_terms[{key!r}]")
    s_i = s.detach().clone().requires_grad_(True)
    L.tad_divergence(s_i, t, k=k, temperature=tau).sum().backward()
    closed_low = R.tad_grad_closed_form(s, t, k=k, temperature=tau)
    assert_rel(s_i.grad, closed_low, dtype, "tie case gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_beta_x_from_documents_own_valid_positions(dtype):
    """A masked position does not enter its document's mean(aT); equal doc ids are one document
    even in different rows."""
    _, tad_terms = impl()
    L, _ = impl()
    gen = torch.Generator().manual_seed(11)
    B, T, V = 2, 6, 29
    t = torch.randn(B, T, V, generator=gen, dtype=F64) * 6.0   # fairly confident: small aT
    t[0, 2] = torch.randn(V, generator=gen, dtype=F64) * 1e-3  # flat: aT ~ 1, but MASKED
    s = torch.randn(B, T, V, generator=gen, dtype=F64) * 2.0
    s, t = s.to(dtype), t.to(dtype)
    doc = torch.tensor([[4, 4, 4, 9, 9, 9], [9, 9, 2, 2, 2, 4]])   # doc 9 spans rows, 4 too
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2] = False
    mask[1, 3] = False
    k, beta = 5, 2.0
    ref = R.tad_terms(s, t, k=k, beta=beta, mask=mask, doc_ids=doc)
    a_t = ref["a_t"]
    # non-vacuous: counting the masked position, or grouping by rows, would change beta(X) a lot
    wrong_mean = a_t[doc == 4].mean()
    right_mean = a_t[(doc == 4) & mask].mean()
    assert (wrong_mean / right_mean) > 1.5
    rows_bx = R.beta_per_position(a_t, mask, beta)
    assert (rows_bx[mask] - ref["beta_x"][mask]).abs().max() > 0.1 * ref["beta_x"].max()
    assert math.isclose(ref["beta_x"][0, 0].item(), beta / right_mean.item(), rel_tol=1e-14)

    got = tad_terms(s, t, k=k, beta=beta, mask=mask, doc_ids=doc)
    assert_rel(got["beta_x"][mask], ref["beta_x"][mask], dtype, "beta_x")
    assert_rel(got["tad"], ref["tad"], dtype, "tad")
    s_i = s.detach().clone().requires_grad_(True)
    out = L.tad_divergence(s_i, t, k=k, beta=beta, mask=mask, doc_ids=doc)
    assert_rel(out, ref["tad"], dtype, "tad_divergence")
    out.sum().backward()
    assert_rel(s_i.grad, R.tad_grad_closed_form(s, t, k=k, beta=beta, mask=mask, doc_ids=doc),
               dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_beta_x_default_documents_rows_and_flat(dtype):
    """Without doc_ids: each row of [B, T, V] is a document; all N of [N, V] are one."""
    _, tad_terms = impl()
    gen = torch.Generator().manual_seed(12)
    t = torch.randn(3, 5, 19, generator=gen, dtype=F64)
    t[1] *= 8.0  # row 1 far more confident than the others
    s = torch.randn(3, 5, 19, generator=gen, dtype=F64)
    s, t = s.to(dtype), t.to(dtype)
    ref3 = R.tad_terms(s, t, k=4)
    bx = ref3["beta_x"]
    assert bx[1, 0] > 1.5 * bx[0, 0]  # rows really differ
    got3 = tad_terms(s, t, k=4)
    assert_rel(got3["beta_x"], bx, dtype, "beta_x rows")
    assert_rel(got3["tad"], ref3["tad"], dtype, "tad rows")
    ref2 = R.tad_terms(s.reshape(15, 19), t.reshape(15, 19), k=4)
    assert torch.allclose(ref2["beta_x"], ref2["beta_x"][0].expand(15))
    got2 = tad_terms(s.reshape(15, 19), t.reshape(15, 19), k=4)
    assert_rel(got2["beta_x"], ref2["beta_x"], dtype, "beta_x flat")
    assert_rel(got2["tad"], ref2["tad"], dtype, "tad flat")


def test_dense_all_masked_is_zero_with_finite_zero_grads():
    L, tad_terms = impl()
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4, 17, generator=gen, requires_grad=True)
    t = torch.randn(2, 4, 17, generator=gen)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    doc = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 2]])
    for fn in (lambda x: L.tad_divergence(x, t, k=3, mask=mask, doc_ids=doc),
               lambda x: L.tad_divergence(x, t, k=3, mask=mask),
               lambda x: L.forward_kl(x, t, mask=mask),
               lambda x: L.reverse_kl(x, t, mask=mask),
               lambda x: L.jsd(x, t, mask=mask),
               lambda x: L.cross_entropy(x, torch.full((2, 4), -100))):
        s.grad = None
        out = fn(s)
        assert torch.equal(out.detach(), torch.zeros(2, 4))
        out.sum().backward()
        assert s.grad is None or (torch.isfinite(s.grad).all() and (s.grad == 0).all())
    terms = tad_terms(s.detach(), t, k=3, mask=mask, doc_ids=doc)
    assert all(torch.isfinite(v).all() for v in terms.values())


# ----------------------------------------------------------------------------------------------
# 3. dense ValueErrors
# ----------------------------------------------------------------------------------------------
def _dense_bad_calls():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(3, 10, generator=gen)
    t = torch.randn(3, 10, generator=gen)
    t_nan = t.clone()
    t_nan[1, 3] = float("nan")
    t_inf = t.clone()
    t_inf[2, 0] = float("inf")
    t_wide = torch.randn(3, 12, generator=gen)
    return [
        ("k0", lambda L: L.tad_divergence(s, t, k=0), r"\bk\b"),
        ("k=V", lambda L: L.tad_divergence(s, t, k=10), r"\bk\b"),
        ("k>V", lambda L: L.tad_divergence(s, t, k=11), r"\bk\b"),
        ("beta0", lambda L: L.tad_divergence(s, t, k=2, beta=0.0), r"\bbeta\b"),
        ("beta<0", lambda L: L.tad_divergence(s, t, k=2, beta=-1.0), r"\bbeta\b"),
        ("tau0", lambda L: L.tad_divergence(s, t, k=2, temperature=0.0), "temperature"),
        ("tau<0", lambda L: L.forward_kl(s, t, temperature=-1.0), "temperature"),
        ("tau0_rkl", lambda L: L.reverse_kl(s, t, temperature=0.0), "temperature"),
        ("tau0_jsd", lambda L: L.jsd(s, t, temperature=0.0), "temperature"),
        ("vocab", lambda L: L.tad_divergence(s, t_wide, k=2), r"(?i)vocab|teacher|student"),
        ("vocab_fkl", lambda L: L.forward_kl(s, t_wide), r"(?i)vocab|teacher|student"),
        ("nan_teacher", lambda L: L.tad_divergence(s, t_nan, k=2), r"(?i)teacher"),
        ("inf_teacher", lambda L: L.tad_divergence(s, t_inf, k=2), r"(?i)teacher"),
        ("jsd_beta0", lambda L: L.jsd(s, t, beta=0.0), r"\bbeta\b"),
        ("jsd_beta1", lambda L: L.jsd(s, t, beta=1.0), r"\bbeta\b"),
        ("jsd_beta>1", lambda L: L.jsd(s, t, beta=1.5), r"\bbeta\b"),
    ]


@pytest.mark.parametrize("idx", range(len(_dense_bad_calls())),
                         ids=[c[0] for c in _dense_bad_calls()])
def test_dense_value_errors(idx):
    L, _ = impl()
    _, call, pattern = _dense_bad_calls()[idx]
    with pytest.raises(ValueError, match=pattern):
        call(L)


# ----------------------------------------------------------------------------------------------
# 4. float64 gradcheck, dense
# ----------------------------------------------------------------------------------------------
def test_gradcheck_dense():
    L, _ = impl()
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 6, generator=gen, dtype=F64, requires_grad=True)
    t = torch.randn(2, 3, 6, generator=gen, dtype=F64) * 2
    mask = torch.tensor([[True, False, True], [True, True, True]])
    doc = torch.tensor([[0, 0, 1], [1, 1, 0]])
    labels = torch.tensor([[1, -100, 5], [0, 2, 3]])
    fns = {
        "tad": lambda x: L.tad_divergence(x, t, k=2, beta=2.0, temperature=1.5, mask=mask,
                                          doc_ids=doc),
        "tad_rows": lambda x: L.tad_divergence(x, t, k=4, beta=0.5),
        "forward_kl": lambda x: L.forward_kl(x, t, temperature=2.0, mask=mask),
        "reverse_kl": lambda x: L.reverse_kl(x, t, temperature=0.7, mask=mask),
        "jsd": lambda x: L.jsd(x, t, beta=0.3, temperature=1.3, mask=mask),
        "ce": lambda x: L.cross_entropy(x, labels),
    }
    for name, fn in fns.items():
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7, rtol=1e-5), name


# ----------------------------------------------------------------------------------------------
# 5. fused vs the reference
# ----------------------------------------------------------------------------------------------
def make_fused(case, dtype, seed=99):
    gen = torch.Generator().manual_seed(seed)
    pos, V, ds, dt = case["pos"], case["V"], case["ds"], case["dt"]
    hs = torch.randn(*pos, ds, generator=gen, dtype=F64)
    Ws = torch.randn(V, ds, generator=gen, dtype=F64) * (case.get("ss", 2.0) / math.sqrt(ds))
    ht = torch.randn(*pos, dt, generator=gen, dtype=F64)
    Wt = torch.randn(V, dt, generator=gen, dtype=F64) * (case.get("ts", 3.0) / math.sqrt(dt))
    bs = torch.randn(V, generator=gen, dtype=F64) * 0.5 if case.get("bs") else None
    bt = torch.randn(V, generator=gen, dtype=F64) * 0.5 if case.get("bt") else None
    labels = torch.randint(0, V, pos, generator=gen)
    drop = torch.rand(pos, generator=gen) < 0.2
    labels[drop] = -100
    doc_ids = case.get("doc_ids")
    if doc_ids is not None:
        doc_ids = doc_ids.reshape(pos)
        if case.get("mask_doc") is not None:
            labels[doc_ids == case["mask_doc"]] = -100  # a document with no valid position
    labels.reshape(-1)[1] = -100  # at least one masked position
    labels.reshape(-1)[-1] = int(torch.randint(0, V, (1,), generator=gen))
    for i, valid in case.get("force", {}).items():  # flat position -> masked (False) / valid
        labels.reshape(-1)[i] = int(torch.randint(0, V, (1,), generator=gen)) if valid else -100
    if case.get("ignore_index", -100) != -100:
        labels[labels == -100] = case["ignore_index"]
    cast = (lambda x: None if x is None else x.to(dtype))
    return dict(hs=cast(hs), Ws=cast(Ws), ht=cast(ht), Wt=cast(Wt), bs=cast(bs), bt=cast(bt),
                labels=labels, doc_ids=doc_ids)


_DOC37 = torch.tensor([0] * 6 + [1] * 9 + [2] * 4 + [0] * 5 + [3] * 13)
_DOC24 = torch.tensor([4] * 8 + [9] * 8 + [2] * 6 + [9] + [2])
_DOC3x13 = torch.tensor([5] * 9 + [6] * 7 + [7] * 10 + [5] * 8 + [8] * 5)
FUSED_CASES = [
    dict(id="N37_ds16_dt24_V97_chunk8_docs", pos=(37,), ds=16, dt=24, V=97, chunk=8, k=10,
         bs=True, bt=True, doc_ids=_DOC37, mask_doc=2),
    dict(id="B3T13_V97_chunk5_docs_tau2_k5", pos=(3, 13), ds=16, dt=12, V=97, chunk=5, k=5,
         tau=2.0, bs=True, doc_ids=_DOC3x13, mask_doc=8),
    dict(id="N37_V53_chunk1000_nobias_k1", pos=(37,), ds=8, dt=8, V=53, chunk=1000, k=1),
    dict(id="B2T9_V41_chunk4_rows_kVm1_beta0.5_ignore-1", pos=(2, 9), ds=10, dt=6, V=41,
         chunk=4, k=40, beta=0.5, bt=True, ignore_index=-1),
    dict(id="N23_V61_chunk6_tau0.7_docs", pos=(23,), ds=12, dt=9, V=61, chunk=6, k=4, tau=0.7,
         bs=True, bt=True, doc_ids=torch.tensor([1] * 7 + [2] * 9 + [1] * 7)),
    dict(id="N12_V37_chunk5_huge1e4_docs", pos=(12,), ds=8, dt=8, V=37, chunk=5, k=4,
         ts=1e4, ss=1e4, bs=True, doc_ids=torch.tensor([0] * 5 + [1] * 7), f64_only=True,
         entropy_floor=1.0),
    dict(id="N11_V29_chunk1_peaked", pos=(11,), ds=8, dt=8, V=29, chunk=1, k=3, ts=40.0,
         bs=True, bt=True, f64_only=True),
    # Every document inside one chunk although N > chunk (TAD: no pre-pass, beta(X) per
    # chunk): rows of 5 in chunks of 2 rows; and documents whose only position outside their
    # chunk is masked (position 22 of document 1 lies in the third chunk).
    dict(id="B4T5_V61_chunk10_rowdocs_fit", pos=(4, 5), ds=8, dt=12, V=61, chunk=10, k=4,
         bs=True, bt=True),
    dict(id="N24_V61_chunk8_docs_fit_masked_spill", pos=(24,), ds=10, dt=8, V=61, chunk=8,
         k=3, bs=True, doc_ids=_DOC24, force={22: False, 7: True, 8: True}),
]


def _fused_kw(case, divergence, chunk=None):
    return dict(divergence=divergence, k=case["k"], beta=case.get("beta", 2.0),
                temperature=case.get("tau", 1.0), chunk_size=chunk or case["chunk"],
                ce_weight=case.get("cew", 1.0), kd_weight=case.get("kdw", 1.0),
                jsd_beta=case.get("jsd_beta", 0.5), ignore_index=case.get("ignore_index", -100))


STAT_KEYS = ("valid_count", "ce", "kd", "kl", "d1", "at_d2", "a_t", "a_s", "teacher_entropy",
             "student_entropy", "top1_agree", "beta_x")


def run_fused_and_compare(case, divergence, dtype, chunk=None, check_stats=True, tie=None, monitor=True):
    L, _ = impl()
    x = make_fused(case, dtype) if tie is None else tie
    kw = _fused_kw(case, divergence, chunk)
    if not monitor:
        kw["stats"] = False

    hs_i = x["hs"].detach().clone().requires_grad_(True)
    Ws_i = x["Ws"].detach().clone().requires_grad_(True)
    bs_i = None if x["bs"] is None else x["bs"].detach().clone().requires_grad_(True)
    loss, stats = L.fused_linear_distill(hs_i, Ws_i, x["ht"], x["Wt"], x["labels"],
                                         doc_ids=x["doc_ids"], student_bias=bs_i,
                                         teacher_bias=x["bt"], **kw)
    assert loss.numel() == 1 and torch.isfinite(loss)
    loss.backward()

    hs64 = x["hs"].detach().to(F64).clone().requires_grad_(True)
    Ws64 = x["Ws"].detach().to(F64).clone().requires_grad_(True)
    bs64 = None if x["bs"] is None else x["bs"].detach().to(F64).clone().requires_grad_(True)
    kw_ref = {k: v for k, v in kw.items() if k not in ("chunk_size", "stats")}
    ref_loss, ref_stats = R.fused_linear_distill(hs64, Ws64, x["ht"], x["Wt"], x["labels"],
                                                 doc_ids=x["doc_ids"], student_bias=bs64,
                                                 teacher_bias=x["bt"], **kw_ref)
    ref_loss.backward()
    # not vacuous
    assert ref_loss > 0 and norm(hs64.grad) > 0 and norm(Ws64.grad) > 0
    V = x["Ws"].shape[0]
    assert ref_stats["valid_count"] > 0 and ref_stats["kl"] > 0
    if case["k"] < V - 1 and case.get("ts", 3.0) < 1e3:
        assert ref_stats["at_d2"] > 0
    elif case["k"] < V - 1:  # +-1e4 logits: the teacher's tail mass underflows
        assert ref_stats["at_d2"] >= 0
    else:  # k = V-1: one-token tail, aT*D2 is exactly 0
        assert ref_stats["at_d2"] == 0
    assert ref_stats["valid_count"] < x["labels"].numel()  # some positions are masked
    if divergence != "none":
        assert ref_stats["kd"] > 0

    what = f"fused[{divergence}]"
    assert_rel(loss, ref_loss, dtype, f"{what} loss_sum")
    assert_rel(hs_i.grad, hs64.grad, dtype, f"{what} grad student_hidden")
    assert_rel(Ws_i.grad, Ws64.grad, dtype, f"{what} grad student_weight")
    if bs_i is not None:
        assert norm(bs64.grad) > 0
        assert_rel(bs_i.grad, bs64.grad, dtype, f"{what} grad student_bias")
    # stats=False: what only the monitoring statistics need is skipped, and says so with NaN:
    # the entropies, and without TAD also K's split of KL and the tail masses.
    skipped = set() if monitor else {"teacher_entropy", "student_entropy"} | (
        set() if divergence == "tad" else {"d1", "at_d2", "a_t", "a_s", "top1_agree", "a_t_sq", "a_s_sq"})
    for key in skipped:
        assert torch.isnan(stats[key]), (key, stats[key])
    if check_stats:
        missing = set(STAT_KEYS) - set(stats)
        assert not missing, f"stats lacks {sorted(missing)}"
        for key in STAT_KEYS:
            if key == "beta_x" and divergence != "tad" or key in skipped:
                continue
            got = stats[key]
            assert torch.is_tensor(got) and got.dim() == 0, key
            if key in ("valid_count", "top1_agree"):
                assert float(got) == float(ref_stats[key]), (key, float(got), float(ref_stats[key]))
            else:
                # an exactly-0 aT*D2 (k = V-1) is judged on the scale of the KL it is part of
                floor = float(ref_stats["kl"]) if (key == "at_d2" and ref_stats[key] == 0) \
                    else None
                # +-1e4 logits: one-hot distributions whose entropies (~1e-40 nats) are judged
                # in absolute nats, not relative to themselves
                if key.endswith("entropy") and case.get("entropy_floor"):
                    floor = case["entropy_floor"]
                assert_rel(got, ref_stats[key], dtype, f"{what} stats[{key!r}]", floor=floor)
    return loss, stats, ref_loss, ref_stats


def fused_params():
    out = []
    for c in FUSED_CASES:
        for div in R.DIVERGENCES:
            for dt in DTYPES:
                if c.get("f64_only") and dt == F32:
                    continue
                out.append(pytest.param(c, div, dt, id=f"{c['id']}-{div}-{DT_ID[dt]}"))
    return out


@pytest.mark.parametrize("case,divergence,dtype", fused_params())
def test_fused_vs_reference(case, divergence, dtype):
    run_fused_and_compare(case, divergence, dtype)


@pytest.mark.parametrize("force_spill,prepasses", [(False, 0), (True, 1)])
def test_tad_prepass_only_when_a_document_spans_chunks(monkeypatch, force_spill, prepasses):
    """White-box (spec, "Chunked form": a document that fits inside one chunk needs no
    pre-pass): with every document's valid positions inside one chunk TAD runs without the
    teacher pre-pass; make the spilled position of document 9 valid and it needs it. Both
    match the reference. (raising=False: if the pre-pass is renamed, only the count check
    goes.)"""
    import tailkd_dist.losses.fused as fused_mod

    calls = []
    original = getattr(fused_mod._Chunker, "teacher_prepass", None)
    if original is not None:
        def counted(self):
            calls.append(1)
            return original(self)
        monkeypatch.setattr(fused_mod._Chunker, "teacher_prepass", counted)
    case = dict(FUSED_CASES[-1], force={22: force_spill, 7: True, 8: True})
    for dtype in DTYPES:
        calls.clear()
        run_fused_and_compare(case, "tad", dtype)
        if original is not None:
            assert len(calls) == prepasses, (force_spill, calls)


BIG_CASE = dict(id="N13_V32003_chunk5", pos=(13,), ds=8, dt=12, V=V_BIG, chunk=5, k=10,
                tau=2.0, bs=True, bt=True,
                doc_ids=torch.tensor([0] * 4 + [1] * 6 + [0] * 3), mask_doc=None)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("divergence", ["tad", "jsd"])
def test_fused_vocab_32003(divergence, dtype):
    run_fused_and_compare(BIG_CASE, divergence, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("divergence", ["tad", "reverse_kl", "jsd"])
@pytest.mark.parametrize("cew,kdw", [(0.3, 1.7), (0.0, 1.0), (1.0, 0.0)])
def test_fused_loss_weights(cew, kdw, divergence, dtype):
    """ce_weight / kd_weight other than 1 (and jsd_beta other than 0.5), at tau = 2 (CE stays
    at tau = 1); the stats 'ce' and 'kd' stay the unweighted sums, the loss is
    ce_weight*ce + kd_weight*kd."""
    case = dict(FUSED_CASES[1], cew=cew, kdw=kdw, jsd_beta=0.25)
    loss, stats, ref_loss, ref_stats = run_fused_and_compare(case, divergence, dtype)
    assert_rel(loss, cew * ref_stats["ce"] + kdw * ref_stats["kd"], dtype, "weighted loss")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_fused_ties_at_kth_value_lower_index_wins(chunk, dtype):
    """Integer teacher hidden states and weights make exact ties in the teacher logits (exact in
    float32 too); every chunking must pick the lower-index members."""
    gen = torch.Generator().manual_seed(21)
    N, ds, dt, V, k = 19, 6, 4, 20, 5
    ht = torch.randint(-2, 3, (N, dt), generator=gen).to(F64)
    Wt = torch.randint(-1, 2, (V, dt), generator=gen).to(F64)
    zt = ht @ Wt.T
    srt = torch.sort(zt, -1, descending=True).values
    straddle = srt[:, k - 1] == srt[:, k]
    assert straddle.sum() >= N // 2  # ties at the boundary in most positions
    hs = torch.randn(N, ds, generator=gen, dtype=F64)
    Ws = torch.randn(V, ds, generator=gen, dtype=F64) * 0.8
    bs = torch.randn(V, generator=gen, dtype=F64) * 0.3
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[3] = -100
    x = dict(hs=hs.to(dtype), Ws=Ws.to(dtype), ht=ht.to(dtype), Wt=Wt.to(dtype),
             bs=bs.to(dtype), bt=None, labels=labels, doc_ids=None)
    case = dict(k=k, chunk=chunk, tau=1.0)
    # the opposite tie rule gives a clearly different D1 sum
    _, st_low = R.fused_linear_distill(hs, Ws, ht, Wt, labels, k=k, student_bias=bs)
    _, st_high = R.fused_linear_distill(hs, Ws, ht, Wt, labels, k=k, student_bias=bs, tie="high")
    assert abs(st_high["d1"] - st_low["d1"]) > 1e-3 * abs(st_low["d1"])
    loss, stats, _, ref_stats = run_fused_and_compare(case, "tad", dtype, chunk=chunk,
                                                      check_stats=False, tie=x)
    for key in ("d1", "at_d2", "a_t", "a_s", "kl", "kd", "beta_x"):
        assert_rel(stats[key], ref_stats[key], dtype, f"tie stats[{key!r}]")
    # teacher argmax among tied maxima: the lower index too (top-1 = top-k with k = 1)
    assert float(stats["top1_agree"]) == float(ref_stats["top1_agree"])


@pytest.mark.parametrize("case,divergence,dtype", fused_params())
def test_fused_without_statistics(case, divergence, dtype):
    """stats=False (a training step that logs nothing): loss, gradients and the statistics
    still computed match the float64 reference; the skipped ones are NaN."""
    run_fused_and_compare(case, divergence, dtype, monitor=False)


def _stable_topk_reference(x: torch.Tensor, k: int):
    """Plain float64 reference of the tie rule: sort by (value desc, index asc)."""
    rows = x.double().reshape(-1, x.shape[-1]).tolist()
    ids = [sorted(range(len(r)), key=lambda j: (-r[j], j))[:k] for r in rows]
    return torch.tensor(ids).reshape(*x.shape[:-1], k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_topk_keys_follow_the_tie_rule(dtype):
    """The accelerator's top-k (one torch.topk over packed value/index keys, no host sync),
    called directly on CPU: ties, -0.0 against +0.0, infinities and negative values pick the
    lower indices, values come back exactly."""
    from tailkd_dist.losses.common import _topk_packed

    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (40, 37), generator=gen).to(torch.float32) * 0.5
    x[0] = 0.0
    x[1, ::2] = -0.0
    x[2, 5] = float("inf")
    x[3, :] = float("-inf")
    x[3, 30] = -1e30
    x[4] = -torch.rand(37, generator=gen) * 1e-40  # negative subnormals
    x = x.to(dtype)
    for k in (1, 2, 5, 11, 36, 37):
        vals, idx = _topk_packed(x, k)
        want = _stable_topk_reference(x, k)
        assert torch.equal(idx, want), k
        assert torch.equal(vals, x.gather(-1, want)), k


def _force_packed_topk(monkeypatch):
    import tailkd_dist.losses.common as common

    calls = []
    packed = common._topk_packed
    monkeypatch.setattr(common, "_packed_topk_applies", lambda x: x.dtype == torch.float32)
    monkeypatch.setattr(common, "_topk_packed", lambda x, k: (calls.append(1), packed(x, k))[1])
    return calls


@pytest.mark.parametrize("chunk", [1, 7])
def test_fused_ties_through_the_packed_topk(monkeypatch, chunk):
    """The whole fused loss with the accelerator's top-k forced on CPU (float32): the tie case
    and a reference case give the reference's numbers."""
    calls = _force_packed_topk(monkeypatch)
    test_fused_ties_at_kth_value_lower_index_wins(chunk, F32)
    run_fused_and_compare(FUSED_CASES[1], "tad", F32)
    assert calls, "the packed top-k was not used"


def test_fused_upstream_gradient_scales():
    """loss_sum.backward(gradient=c) (e.g. 1 / global token count) scales every gradient."""
    L, _ = impl()
    case = FUSED_CASES[0]
    x = make_fused(case, F64)
    grads = []
    for c in (1.0, 0.37):
        hs = x["hs"].detach().clone().requires_grad_(True)
        Ws = x["Ws"].detach().clone().requires_grad_(True)
        bs = x["bs"].detach().clone().requires_grad_(True)
        loss, _ = L.fused_linear_distill(hs, Ws, x["ht"], x["Wt"], x["labels"],
                                         doc_ids=x["doc_ids"], student_bias=bs,
                                         teacher_bias=x["bt"], **_fused_kw(case, "tad"))
        (loss * c).backward()
        grads.append((hs.grad, Ws.grad, bs.grad))
    for g1, gc in zip(*grads):
        assert norm(g1) > 0
        assert_rel(gc, 0.37 * g1, F64, "scaled upstream gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("divergence", ["tad", "jsd"])
@pytest.mark.parametrize("case_index", [0, 1])
def test_fused_small_row_blocks_white_box(monkeypatch, case_index, divergence, dtype):
    """White-box: the fused code also splits each chunk into row blocks bounded by a number of
    elements (fused._BLOCK_ELEMENTS, ~1M, never reached at test sizes), and after TAD's
    pre-pass makes the teacher's logits in blocks of rows (fused._TEACHER_ELEMENTS, ~8M).
    Shrink both so element blocks of 2 rows fall inside teacher blocks of 3 rows inside
    chunks, and check the result is unchanged. (raising=False: if a knob disappears this is
    still a valid reference test.)"""
    case = FUSED_CASES[case_index]
    try:
        import tailkd_dist.losses.fused as fused_mod
    except ImportError:  # the module was renamed: still a valid (black-box) reference test
        fused_mod = None
    if fused_mod is not None:
        monkeypatch.setattr(fused_mod, "_BLOCK_ELEMENTS", 2 * case["V"] + 1, raising=False)
        monkeypatch.setattr(fused_mod, "_TEACHER_ELEMENTS", 3 * case["V"] + 1, raising=False)
    run_fused_and_compare(case, divergence, dtype)


@pytest.mark.parametrize("divergence", ["tad", "forward_kl"])
@pytest.mark.parametrize("who", ["teacher", "student"])
def test_fused_float32_peaked_no_nan(who, divergence):
    """float32, one distribution very peaked (logit gaps > 88 nats, beyond exp's float32 range):
    loss and gradients finite and equal to the reference; every stat finite. (Per-term stats
    are compared in float64 by the peaked / +-1e4 fused cases; in float32 the lm_head matmul's
    own rounding of 100-nat logits already moves aT by ~1e-5.)"""
    case = dict(id="peaked_f32", pos=(11,), ds=8, dt=8, V=29, chunk=4, k=3, bs=True,
                doc_ids=torch.tensor([0] * 6 + [1] * 5))
    L, _ = impl()
    if who == "teacher":
        case["ts"] = 100.0
        x = make_fused(case, F32)
    else:  # a peaked student that agrees with the teacher: its top lies inside the teacher's K
        x = make_fused(case, F32)
        x["hs"] = x["ht"].clone()
        x["Ws"] = x["Wt"] * 60.0
    hs = x["hs"].detach().clone().requires_grad_(True)
    Ws = x["Ws"].detach().clone().requires_grad_(True)
    bs = x["bs"].detach().clone().requires_grad_(True)
    loss, stats = L.fused_linear_distill(hs, Ws, x["ht"], x["Wt"], x["labels"],
                                         doc_ids=x["doc_ids"], student_bias=bs,
                                         **_fused_kw(case, divergence))
    loss.backward()
    bad = [key for key, v in stats.items() if not torch.isfinite(v).all()]
    assert not bad, f"non-finite stats: {bad}"
    hs64 = x["hs"].detach().to(F64).clone().requires_grad_(True)
    Ws64 = x["Ws"].detach().to(F64).clone().requires_grad_(True)
    bs64 = x["bs"].detach().to(F64).clone().requires_grad_(True)
    kw = {k: v for k, v in _fused_kw(case, divergence).items() if k != "chunk_size"}
    ref_loss, ref_stats = R.fused_linear_distill(hs64, Ws64, x["ht"], x["Wt"], x["labels"],
                                                 doc_ids=x["doc_ids"], student_bias=bs64, **kw)
    ref_loss.backward()
    zt = x["ht"].to(F64) @ x["Wt"].to(F64).T
    zs = x["hs"].to(F64) @ x["Ws"].to(F64).T
    z = zt if who == "teacher" else zs
    srt = torch.sort(z, -1, descending=True).values
    assert (srt[:, 0] - srt[:, case["k"]]).max() > 90  # really beyond float32's exp range
    assert_rel(loss, ref_loss, F32, "loss")
    for name, a, b in (("hidden", hs, hs64), ("weight", Ws, Ws64), ("bias", bs, bs64)):
        assert norm(b.grad) > 0
        assert_rel(a.grad, b.grad, F32, f"grad student_{name}")


def test_fused_teacher_gets_no_gradient():
    L, _ = impl()
    x = make_fused(FUSED_CASES[0], F64)
    ht = x["ht"].detach().clone().requires_grad_(True)
    Wt = x["Wt"].detach().clone().requires_grad_(True)
    bt = x["bt"].detach().clone().requires_grad_(True)
    hs = x["hs"].detach().clone().requires_grad_(True)
    loss, _ = L.fused_linear_distill(hs, x["Ws"], ht, Wt, x["labels"], k=10, chunk_size=8,
                                     doc_ids=x["doc_ids"], teacher_bias=bt)
    loss.backward()
    assert norm(hs.grad) > 0
    for name, tens in (("teacher_hidden", ht), ("teacher_weight", Wt), ("teacher_bias", bt)):
        assert tens.grad is None or (tens.grad == 0).all(), f"{name} received a gradient"


@pytest.mark.parametrize("divergence", R.DIVERGENCES)
def test_fused_all_masked(divergence):
    L, _ = impl()
    x = make_fused(FUSED_CASES[1], F32)
    hs = x["hs"].detach().clone().requires_grad_(True)
    Ws = x["Ws"].detach().clone().requires_grad_(True)
    bs = x["bs"].detach().clone().requires_grad_(True)
    labels = torch.full_like(x["labels"], -100)
    loss, stats = L.fused_linear_distill(hs, Ws, x["ht"], x["Wt"], labels, divergence=divergence,
                                         k=5, chunk_size=5, doc_ids=x["doc_ids"],
                                         student_bias=bs)
    assert float(loss.detach()) == 0.0
    for key, v in stats.items():
        assert torch.isfinite(torch.as_tensor(v)).all(), key
    assert float(stats["valid_count"]) == 0
    loss.backward()  # must not raise
    for name, tens in (("student_hidden", hs), ("student_weight", Ws), ("student_bias", bs)):
        g = tens.grad
        assert g is None or (torch.isfinite(g).all() and (g == 0).all()), name


# ----------------------------------------------------------------------------------------------
# 6. fused ValueErrors
# ----------------------------------------------------------------------------------------------
def _fused_bad_calls():
    gen = torch.Generator().manual_seed(6)
    N, ds, dt, V = 6, 4, 5, 11
    hs = torch.randn(N, ds, generator=gen)
    Ws = torch.randn(V, ds, generator=gen)
    ht = torch.randn(N, dt, generator=gen)
    Wt = torch.randn(V, dt, generator=gen)
    y = torch.randint(0, V, (N,), generator=gen)
    ht_nan = ht.clone()
    ht_nan[2, 1] = float("nan")
    Wt_inf = Wt.clone()
    Wt_inf[4, 0] = float("-inf")
    Wt_wide = torch.randn(V + 128, dt, generator=gen)
    bt_nan = torch.zeros(V)
    bt_nan[3] = float("nan")

    def call(**over):
        args = dict(student_hidden=hs, student_weight=Ws, teacher_hidden=ht, teacher_weight=Wt,
                    labels=y)
        kw = {k: v for k, v in over.items() if k not in args}
        args.update({k: v for k, v in over.items() if k in args})
        return lambda L: L.fused_linear_distill(
            args["student_hidden"], args["student_weight"], args["teacher_hidden"],
            args["teacher_weight"], args["labels"], **kw)

    return [
        ("k0", call(k=0), r"\bk\b"),
        ("k=V", call(k=V), r"\bk\b"),
        ("beta0", call(beta=0.0), r"\bbeta\b"),
        ("beta<0", call(beta=-2.0), r"\bbeta\b"),
        ("tau0", call(temperature=0.0), "temperature"),
        ("tau<0", call(temperature=-1.0, divergence="forward_kl"), "temperature"),
        ("vocab", call(teacher_weight=Wt_wide), r"(?i)vocab|teacher_weight|student_weight"),
        ("student_hidden_vs_weight", call(student_hidden=torch.randn(N, ds + 1)),
         r"(?i)student_hidden|student_weight|hidden"),
        ("teacher_hidden_vs_weight", call(teacher_hidden=torch.randn(N, dt - 1)),
         r"(?i)teacher_hidden|teacher_weight|hidden"),
        ("nan_teacher_hidden", call(teacher_hidden=ht_nan), r"(?i)teacher"),
        ("inf_teacher_weight", call(teacher_weight=Wt_inf), r"(?i)teacher"),
        ("nan_teacher_bias", call(teacher_bias=bt_nan), r"(?i)teacher"),
        ("unknown_divergence", call(divergence="kl"), "divergence"),
        ("jsd_beta0", call(divergence="jsd", jsd_beta=0.0), "jsd_beta"),
        ("jsd_beta1", call(divergence="jsd", jsd_beta=1.0), "jsd_beta"),
        ("jsd_beta>1", call(divergence="jsd", jsd_beta=1.5), "jsd_beta"),
    ]


@pytest.mark.parametrize("idx", range(len(_fused_bad_calls())),
                         ids=[c[0] for c in _fused_bad_calls()])
def test_fused_value_errors(idx):
    L, _ = impl()
    _, call, pattern = _fused_bad_calls()[idx]
    with pytest.raises(ValueError, match=pattern):
        call(L)


# ----------------------------------------------------------------------------------------------
# 7. float64 gradcheck, fused (student hidden, weight, bias)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", ["tad", "forward_kl", "reverse_kl", "jsd", "none"])
@pytest.mark.parametrize("layout", ["N", "BT"])
def test_gradcheck_fused(divergence, layout):
    L, _ = impl()
    gen = torch.Generator().manual_seed(8)
    pos = (6,) if layout == "N" else (2, 3)
    V, ds, dt = 7, 3, 4
    hs = torch.randn(*pos, ds, generator=gen, dtype=F64, requires_grad=True)
    Ws = torch.randn(V, ds, generator=gen, dtype=F64, requires_grad=True)
    bs = torch.randn(V, generator=gen, dtype=F64, requires_grad=True)
    ht = torch.randn(*pos, dt, generator=gen, dtype=F64)
    Wt = torch.randn(V, dt, generator=gen, dtype=F64)
    bt = torch.randn(V, generator=gen, dtype=F64)
    labels = torch.randint(0, V, pos, generator=gen)
    labels.reshape(-1)[1] = -100
    doc = torch.tensor([0, 0, 1, 1, 0, 1]).reshape(pos)

    def fn(h, w, b):
        loss, _ = L.fused_linear_distill(h, w, ht, Wt, labels, divergence=divergence, k=2,
                                         beta=2.0, temperature=1.5, chunk_size=4, doc_ids=doc,
                                         student_bias=b, teacher_bias=bt, ce_weight=0.7,
                                         kd_weight=1.3, jsd_beta=0.4)
        return loss

    assert torch.autograd.gradcheck(fn, (hs, Ws, bs), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_default_chunk_size_per_device():
    """Chunk sizes worked out by hand from the budgets (128 MiB per fp32 [chunk, V_r] buffer on a
    CPU, 1 GiB on an accelerator; a power of two in [64, 4096])."""
    L, _ = impl()
    cases = [
        (False, 128256, 256),   # 2**27 / (128256 * 4) = 261.6
        (False, 32003, 1024),   # 1048.6
        (True, 128256, 2048),   # 2**30 / (128256 * 4) = 2093
        (True, 32003, 4096),    # 8387 -> the cap
        (True, 64128, 4096),    # V/G of a 2-rank group at V = 128256: 4186
        (False, 1000, 4096),    # 33554 -> the cap
        (False, 10**6, 64),     # 33 -> the floor
    ]
    for accelerator, v, rows in cases:
        assert L.default_chunk_size(accelerator=accelerator, vocab_local=v) == rows, (accelerator, v)
    assert L.default_chunk_size(accelerator=False, vocab_local=128256, elem_bytes=8) == 128


def test_fused_default_chunk_is_the_derived_one(monkeypatch):
    """chunk_size=None runs the chunks the device's rule gives (on a CPU at V = 300 000: 64
    positions, the floor), and the same numbers as that chunk size named explicitly."""
    import tailkd_dist.losses.fused as fused_mod

    L, _ = impl()
    g = torch.Generator().manual_seed(5)
    n, d, v = 100, 4, 300_000
    hs = torch.randn(n, d, generator=g, dtype=torch.float64)
    ws = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.3
    ht = torch.randn(n, d, generator=g, dtype=torch.float64)
    wt = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.3
    lab = torch.randint(0, v, (n,), generator=g)
    rows, real = [], fused_mod._logits
    monkeypatch.setattr(fused_mod, "_logits", lambda h, *a, **k: rows.append(h.shape[0]) or real(h, *a, **k))
    got, _ = L.fused_linear_distill(hs, ws, ht, wt, lab, divergence="forward_kl", stats=False)
    rows_default = list(rows)
    rows.clear()
    want, _ = L.fused_linear_distill(hs, ws, ht, wt, lab, divergence="forward_kl", stats=False, chunk_size=64)
    assert rows_default == rows == [64, 64, 36, 36], rows_default  # student and teacher per chunk
    assert torch.equal(got, want)
