"""The teacher as the loss sees it: a frozen model's final hidden states and head rows."""
from __future__ import annotations

import torch


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
