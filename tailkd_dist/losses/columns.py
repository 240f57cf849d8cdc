"""Named column layouts for what the fused loss's collectives carry per token.

Every per-token exchange of the loss group moves one [positions, width] tensor: an all-gather
of each rank's candidates, or a SUM of partial sums. A :class:`Columns` names the columns of
such a tensor (some, like the teacher's top-k values, are several columns wide), writes named
pieces into one tensor for a single collective and hands back named views of the result, so
no code reads a collective by offset.

Specification: ``docs/loss.md`` ("The vocabulary-parallel form").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Columns:
    """An ordered layout of named per-token columns.

    fields: (name, width) pairs in wire order; a width of None is one scalar column per
        position, unpacked to [..., positions]; an int is a group of that many columns,
        unpacked to [..., positions, width] (also when it is 1).
    """

    fields: tuple[tuple[str, int | None], ...]

    @classmethod
    def of(cls, *names: str, **wide: int) -> "Columns":
        """Scalar columns ``names`` followed by the ``wide`` groups (name=width)."""
        return cls(tuple((n, None) for n in names) + tuple(wide.items()))

    def __add__(self, other: "Columns") -> "Columns":
        return Columns(self.fields + other.fields)

    @property
    def width(self) -> int:
        return sum(1 if w is None else w for _, w in self.fields)

    def zeros(self, rows: int, *, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(rows, self.width)

    def unpack(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., rows, width] -> {name: view}; no copy."""
        out, at = {}, 0
        for n, w in self.fields:
            out[n] = x[..., at] if w is None else x[..., at : at + w]
            at += 1 if w is None else w
        return out

    def write(self, dest: torch.Tensor, rows: slice, **pieces: torch.Tensor) -> None:
        """Write some named pieces into rows of a [rows, width] tensor laid out by this schema."""
        views = self.unpack(dest[rows])
        for n, v in pieces.items():
            views[n].copy_(v)
