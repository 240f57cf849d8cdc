"""The hidden-state cosine term's pieces against plain formulas."""
import json

import pytest
import torch

from tailkd_dist.hidden import (
    HiddenProjection, check_layer_map, cosine_distance_sum, default_layer_map,
)


def test_cosine_distance_sum_matches_a_plain_loop():
    torch.manual_seed(0)
    s = [torch.randn(2, 5, 8, dtype=torch.float64) for _ in range(3)]
    t = [torch.randn(2, 5, 8, dtype=torch.float64) for _ in range(3)]
    valid = torch.rand(2, 5) > 0.3
    want = 0.0
    for b in range(2):
        for p in range(5):
            if valid[b, p]:
                d = [1 - float(torch.dot(x[b, p], y[b, p]) / (x[b, p].norm() * y[b, p].norm())) for x, y in zip(s, t)]
                want += sum(d) / len(d)
    got = cosine_distance_sum(s, t, valid)
    assert want > 0 and abs(got.item() - want) <= 1e-6 * want


def test_identical_states_cost_nothing_and_teacher_gets_no_gradient():
    s = torch.randn(1, 4, 6, requires_grad=True)
    t = s.detach().clone().requires_grad_()
    loss = cosine_distance_sum([s * 3.0], [t], torch.ones(1, 4, dtype=torch.bool))
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert t.grad is None


def test_projection_only_when_widths_differ():
    assert HiddenProjection(n_layers=2, student_width=8, teacher_width=8).proj is None
    p = HiddenProjection(n_layers=2, student_width=8, teacher_width=12, seed=3)
    q = HiddenProjection(n_layers=2, student_width=8, teacher_width=12, seed=3)
    out = p([torch.randn(1, 3, 8), torch.randn(1, 3, 8)])
    assert [o.shape[-1] for o in out] == [12, 12]
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(p.proj, q.proj))  # same on every rank


def test_layer_maps(tmp_path):
    assert default_layer_map(student_layers=2, teacher_layers=4, student_path=None) == [1, 3]
    assert default_layer_map(student_layers=3, teacher_layers=12, student_path=None) == [3, 7, 11]
    (tmp_path / "tailkd_derivation.json").write_text(json.dumps({"layer_map": [0, 2]}))
    assert default_layer_map(student_layers=2, teacher_layers=4, student_path=str(tmp_path)) == [0, 2]
    with pytest.raises(ValueError, match="belongs to another student"):
        default_layer_map(student_layers=3, teacher_layers=4, student_path=str(tmp_path))
    with pytest.raises(ValueError, match="hidden_layer_map"):
        check_layer_map([0, 9], student_layers=2, teacher_layers=4)


def test_cosine_term_gradients_match_the_plain_reference():
    torch.manual_seed(1)
    s = [torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    t = [torch.randn(2, 3, 5, dtype=torch.float64) for _ in range(2)]
    valid = torch.tensor([[True, False, True], [True, True, False]])
    got = cosine_distance_sum(s, t, valid)
    g_got = torch.autograd.grad(got, s)
    ref = 0.0
    for b in range(2):
        for p in range(3):
            if valid[b, p]:
                terms = [1 - torch.dot(x[b, p], y[b, p]) / (x[b, p].norm() * y[b, p].norm()) for x, y in zip(s, t)]
                ref = ref + sum(terms) / len(terms)
    g_ref = torch.autograd.grad(ref, s)
    assert abs(got.item() - ref.item()) <= 1e-12 * abs(ref.item())
    for a, b in zip(g_got, g_ref):
        assert b.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: cosine_distance_sum([a, b], t, valid), tuple(s))
