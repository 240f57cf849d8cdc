"""The element-wise pass counter of tools/bench_loss.py (--passes), on operators whose passes
are known by hand."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_loss import count_passes  # noqa: E402

ROWS, V = 6, 37


def test_counts_inputs_and_outputs_of_elementwise_ops_only():
    x = torch.randn(ROWS, V)
    w = torch.randn(V, 5)

    def fn():
        y = x.exp()            # reads x, writes y: 2
        y.add_(1.0)            # reads and writes y: 2
        y.view(ROWS * V).view(ROWS, V)  # views move nothing: 0
        (y @ w).sum()          # a matmul: not counted; its [ROWS, 5] output is not logit-sized
        return y.sum(-1)       # reads y: 1

    r = count_passes(fn, vocab=V, rows=ROWS)
    assert r["passes"] == 2 + 2 + 1, r
    assert dict(r["top"]) == {"exp": 2.0, "add_": 2.0, "sum": 1.0}


def test_backward_is_counted():
    x = torch.randn(ROWS, V, requires_grad=True)
    forward_only = count_passes(lambda: torch.log_softmax(x, -1).detach(), vocab=V, rows=ROWS)["passes"]
    both = count_passes(lambda: torch.log_softmax(x, -1).sum().backward(), vocab=V, rows=ROWS)["passes"]
    assert forward_only == 2  # reads x, writes the result
    assert both >= forward_only + 3, both  # the backward reads grad and result, writes grad x


def test_allocations_and_the_self_of_new_ops_are_not_passes():
    x = torch.randn(ROWS, V)

    def fn():
        buf = torch.empty(ROWS, V)       # allocates, writes nothing: 0
        x.new_zeros(ROWS, 3)             # reads nothing of x, writes [ROWS, 3]: 0
        z = x.new_zeros(ROWS, V)         # writes zeros: 1
        buf.copy_(x)                     # reads x, reads and writes buf (in place): 3
        return z

    r = count_passes(fn, vocab=V, rows=ROWS)
    assert r["passes"] == 1 + 3, r


def test_writes_at_indices_touch_only_those_elements():
    x = torch.randn(ROWS, V)
    idx = torch.randint(0, V, (ROWS, 3))

    def fn():
        y = x.clone()                                    # reads x, writes y: 2
        y.scatter_(1, idx, 0.0)                          # 3 entries per row: 0 passes
        y.view(-1).index_fill_(0, idx.flatten(), 1.0)    # likewise
        z = x.scatter(1, idx, 0.0)                       # out of place: copies x, reads x: 2
        return y, z

    r = count_passes(fn, vocab=V, rows=ROWS)
    assert r["passes"] == 2 + 2, r


def test_an_argument_written_in_place_but_not_returned_counts_as_written():

    @torch.library.custom_op("passcount_test::fill_from", mutates_args=("out",))
    def fill_from(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out.copy_(x * 2)
        return x.sum(-1)

    x, out = torch.randn(ROWS, V), torch.empty(ROWS, V)
    r = count_passes(lambda: fill_from(x, out), vocab=V, rows=ROWS)
    assert r["passes"] == 1 + 1 + 1, r  # x read; out passed; out written (not returned)
    assert torch.equal(out, x * 2)
