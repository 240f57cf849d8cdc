"""Vocabulary-sharded lm_heads, owned by the project, outside the ZeRO/FSDP engines.

Why outside: ZeRO partitions every parameter as a flat byte range over ALL ranks and
all-reduces (averages) its gradient over all ranks, assuming every rank trains the same
replica. The vocab-parallel loss instead needs rank r of a loss group to own the contiguous
rows [off_r, off_r + V_r) of each lm_head as a plain tensor, and the gradient of those rows is
complete on its owner (the loss gathers the group's hidden states). So:

* the student's shard is a trainable ``nn.Parameter`` with its own AdamW state (same
  hyper-parameters and schedule as the body); after the micro-batches of a step its gradient
  is SUM-all-reduced over the data-parallel replica group (ranks holding the same slice) and
  divided once (``finish_grads``); its squared norm joins the body's in the global norm that
  clips both (``engines``);
* the teacher's shard is a frozen tensor (no optimizer, no gradient);
* tied input/output embeddings are untied: the input embedding stays in the engine, the
  output rows become the shard (a warning says so; the HF export writes them untied).

A rank never needs the whole lm_head for the loss; at start-up each rank slices its rows from
the loaded model, and the HF export all-gathers the student's rows once.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn


def vocab_slice(vocab: int, *, rank: int, size: int) -> tuple[int, int]:
    """Contiguous [start, stop) of ``rank`` among ``size`` ranks; the first V % size ranks
    get one row more (uneven V such as 32003 is fine)."""
    if vocab < size:
        raise ValueError(f"vocabulary of {vocab} rows cannot be split over {size} ranks of a loss group")
    base, extra = divmod(vocab, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@contextlib.contextmanager
def gathered(*params):
    """Read the full values of ZeRO-3 partitioned parameters inside the block (every rank
    must enter it: it all-gathers); ordinary parameters pass through untouched."""
    parts = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=None):
        yield


class ShardedHead(nn.Module):
    """Rows [start, stop) of an lm_head (weight [V_r, d], optional bias [V_r])."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, start: int, vocab: int,
                 trainable: bool):
        super().__init__()
        self.start, self.vocab = start, vocab
        self.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=trainable)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().contiguous(),
                                                           requires_grad=trainable)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, vocab: int, rank: int, size: int, trainable: bool):
        start, stop = vocab_slice(vocab, rank=rank, size=size)
        bias = getattr(linear, "bias", None)
        # A head loaded into ZeRO-3 partitions is gathered once, for the copy of its rows.
        with gathered(linear.weight, bias):
            return cls(linear.weight[start:stop], None if bias is None else bias[start:stop],
                       start=start, vocab=vocab, trainable=trainable)

    def finish_grads(self, dp_group, *, divide_by: float) -> None:
        """Sum the shard's gradient over the replica group and scale it once (end of a step)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(flat, group=dp_group)  # one collective for weight and bias
        flat.div_(divide_by)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def grad_sq_norm(self) -> torch.Tensor:
        """Squared norm of this rank's shard gradient (identical across replicas after
        finish_grads, so the global norm sums it over the loss group only)."""
        sq = [p.grad.float().pow(2).sum() for p in self.parameters() if p.grad is not None]
        return torch.stack(sq).sum() if sq else torch.zeros((), device=self.weight.device)

    def gather_full(self, loss_group) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole lm_head, assembled from the loss group's shards (export only)."""
        if loss_group is None or dist.get_world_size(loss_group) == 1:
            return self.weight.detach(), None if self.bias is None else self.bias.detach()
        parts = [None] * dist.get_world_size(loss_group)
        dist.all_gather_object(parts, (self.weight.detach().cpu(), None if self.bias is None else self.bias.detach().cpu()),
                               group=loss_group)
        weight = torch.cat([p[0] for p in parts])
        bias = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        return weight, bias
