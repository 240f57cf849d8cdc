"""The teacher as the loss sees it: a frozen model's final hidden states and head rows, or
the same read from a teacher cache (data/teacher_cache.py)."""
from __future__ import annotations

import torch
from torch import nn


class ModelTeacher:
    """A teacher model whose body runs in an engine (``module``) and whose head rows are
    ``head``: both frozen."""

    present = True

    def __init__(self, *, module, scale: float, head):
        self.module, self.scale, self._head = module, scale, head

    @torch.no_grad()
    def hidden(self, batch: dict) -> torch.Tensor:
        out = self.module(**body_kwargs(batch))
        return final_hidden(out, self.scale)

    def head(self):
        return self._head


class CachedTeacher:
    """A teacher cache: the hidden states the teacher computed for these rows, read with them
    (the batch's ``teacher_hidden``, logit scale already folded in); the head rows from the
    cache's copy of its lm_head. No body exists."""

    present = True

    def __init__(self, *, head):
        self._head = head

    def hidden(self, batch: dict) -> torch.Tensor:
        if "teacher_hidden" not in batch:
            raise ValueError("a teacher cache is configured but the batch has no teacher_hidden: the loader "
                             "reads token shards, not the cache")
        return batch["teacher_hidden"]

    def head(self):
        return self._head


class CacheHeadModel(nn.Module):
    """What the engines build a cached teacher's head from: the teacher's config and its
    lm_head, with no body (``body_of`` gives None, so no engine wraps one)."""

    base_model_prefix = "body"

    def __init__(self, *, config, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.config, self.body = config, None
        self.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            self.lm_head.weight.copy_(weight)
            if bias is not None:
                self.lm_head.bias.copy_(bias)
        self.requires_grad_(False)

    def get_output_embeddings(self):
        return self.lm_head


class NoTeacher:
    """CE-only training: no teacher model (the step lets the student's outputs stand in)."""

    present = False

    def hidden(self, batch: dict) -> None:
        return None

    def head(self) -> None:
        return None


def body_kwargs(batch: dict) -> dict:
    # No KV cache: then HF (>= 4.53) reads document starts from the restarting position ids of
    # packed rows and masks attention per document (packed-sequence detection), so a document
    # never attends to the one before it in the row.
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}


def final_hidden(out, scale: float) -> torch.Tensor:
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h * scale if scale != 1.0 else h
