"""Collectives of the vocabulary-parallel loss, as small steps (Megatron-core style).

A loss group of P ranks shares the vocabulary: rank r owns the contiguous rows
[offset_r, offset_r + V_r) of each lm_head. Every function takes its process group as an
argument; ``group=None`` means a single process and every step is the identity, so the fused
loss has one code path for P = 1 and P > 1.

Each collective is recorded by an active :class:`CommCounter` (if any), so tests and the
benchmark can read what the loss sent.
"""
from __future__ import annotations

import contextvars
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def _all_gather_single(out, x, *, group):
    # torch 2.13 renamed the tensor collectives (the old names warn); older torch has only
    # those. Looked up per call so instrumentation of torch.distributed sees every call.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, x, group=group)


def _reduce_scatter_single(out, x, *, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, x, group=group)


_COUNTERS: contextvars.ContextVar[tuple["CommCounter", ...]] = contextvars.ContextVar(
    "tailkd_comm_counters", default=()
)

# Tags of the per-token scalar collectives (what the spec's formula counts); the rest move
# hidden states and their gradients, or the call's small metadata.
SCALAR_TAGS = ("stats_gather", "tail_max", "partial_sum")


@dataclass
class CommCounter:
    """Counts what the loss puts through collectives while the ``with`` block is active.

    Accounting follows the spec: an all-reduce of [n, m] counts n*m, an all-gather of [n, m]
    from P ranks counts its result, P*n*m, and a reduce-scatter counts its input.
    ``tokens`` is the number of positions the loss group processed (summed over calls).
    """

    numbers: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_by_tag: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tokens: int = 0

    def __enter__(self) -> "CommCounter":
        self._token = _COUNTERS.set(_COUNTERS.get() + (self,))
        return self

    def __exit__(self, *exc) -> None:
        _COUNTERS.reset(self._token)

    @property
    def by_op(self) -> dict[str, int]:
        return dict(self.numbers)

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_tag.values())

    @property
    def numbers_per_token(self) -> float:
        """Per-token numbers of the loss's scalar collectives (candidates + partial sums)."""
        return sum(self.numbers[t] for t in SCALAR_TAGS) / max(self.tokens, 1)

    @property
    def hidden_numbers_per_token(self) -> float:
        """Per-token numbers that move hidden states (forward gather, backward reduce-scatter)."""
        return (self.numbers["hidden_gather"] + self.numbers["grad_reduce"]) / max(self.tokens, 1)


def _record(tag: str, numel: int, itemsize: int) -> None:
    for counter in _COUNTERS.get():
        counter.numbers[tag] += numel
        counter.bytes_by_tag[tag] += numel * itemsize
        counter.calls[tag] += 1


def _record_tokens(n: int) -> None:
    for counter in _COUNTERS.get():
        counter.tokens += n


# --------------------------------------------------------------------------- group helpers


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_gather_meta(meta: torch.Tensor, group) -> torch.Tensor:
    """[m] int64 per rank -> [P, m] on every rank (the call's layout and settings)."""
    if group is None:
        return meta.unsqueeze(0)
    return _gather_stacked(meta, group, tag="meta")


def all_gather_messages(message: str, group) -> list[str]:
    """Only on the error path: every rank learns every rank's error text."""
    out: list = [None] * group_size(group)
    dist.all_gather_object(out, message, group=group)
    return out


def gather_rows(x: torch.Tensor, counts: list[int], group, *, tag: str = "hidden_gather") -> torch.Tensor:
    """Concatenate every rank's rows [n_r, ...] in rank order -> [sum n_r, ...] on every rank.

    Ranks may hold different numbers of rows: pad to the largest, gather, drop the padding.
    """
    if group is None:
        return x
    n_max = max(counts)
    padded = x.new_zeros((n_max,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    out = x.new_empty((len(counts) * n_max,) + tuple(x.shape[1:]))
    _all_gather_single(out, padded, group=group)
    _record(tag, out.numel(), out.element_size())
    if all(c == n_max for c in counts):
        return out
    return torch.cat([out[r * n_max : r * n_max + c] for r, c in enumerate(counts)])


def reduce_scatter_rows(x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """Inverse of gather_rows for gradients: sum every rank's [sum n_r, ...] and hand rank r
    its own rows. Used for the hidden-state gradient, whose vocabulary slices live on all ranks."""
    if group is None:
        return x
    n_max = max(counts)
    padded = x.new_zeros((len(counts), n_max) + tuple(x.shape[1:]))
    start = 0
    for r, c in enumerate(counts):
        padded[r, :c] = x[start : start + c]
        start += c
    out = x.new_empty((n_max,) + tuple(x.shape[1:]))
    _reduce_scatter_single(out, padded.view((-1,) + tuple(x.shape[1:])), group=group)
    _record("grad_reduce", padded.numel(), padded.element_size())
    return out[: counts[group_rank(group)]]


def all_gather_stats(x: torch.Tensor, group) -> torch.Tensor:
    """Per-token candidates [c, m] of every rank -> [P, c, m]."""
    if group is None:
        return x.unsqueeze(0)
    return _gather_stacked(x, group, tag="stats_gather")


def _gather_stacked(x: torch.Tensor, group, *, tag: str) -> torch.Tensor:
    # all_gather_into_tensor wants the ranks' tensors concatenated along dim 0 (gloo checks).
    p = group_size(group)
    out = x.new_empty((p * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    _record(tag, out.numel(), out.element_size())
    return out.view((p,) + tuple(x.shape))


def all_reduce_sum(x: torch.Tensor, group, *, tag: str = "partial_sum") -> torch.Tensor:
    """Per-token partial sums [c, m], batched into one all-reduce."""
    if group is None:
        return x
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    _record(tag, x.numel(), x.element_size())
    return x


def all_reduce_max(x: torch.Tensor, group) -> torch.Tensor:
    """Per-token maxima [c, m] (the tails' maxima), one all-reduce."""
    if group is None:
        return x
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    _record("tail_max", x.numel(), x.element_size())
    return x


def record_tokens(n: int) -> None:
    _record_tokens(n)
