"""What the training step, the evaluation, the checkpoints and the export call on an engine,
declared once. The two engines (``deepspeed_engine``, ``fsdp2_engine``) implement it; nothing
outside ``tailkd_dist/engines`` calls DeepSpeed or FSDP2. docs/engines.md has the design.
"""
from __future__ import annotations

from typing import Protocol

import torch

from tailkd_dist.parallel.topology import Topology


class Rows(Protocol):
    """This rank's rows of an lm_head, as the vocabulary-parallel fused loss takes them."""

    weight: torch.Tensor
    bias: torch.Tensor | None


class Teacher(Protocol):
    """What the loss needs of the teacher for one micro-batch. A model today; a cache of its
    final hidden states can stand in without the step changing."""

    present: bool
    """False for CE-only training (the student's own detached outputs stand in)."""

    def hidden(self, batch: dict) -> torch.Tensor | None:
        """Final hidden states [B, T, d] (logit scale folded in), None without a teacher."""

    def head(self) -> Rows | None:
        """This rank's rows of the teacher's lm_head (frozen), None without a teacher."""


class Engine(Protocol):
    name: str
    topo: Topology
    device: torch.device
    loss_group: object
    """The vocabulary-parallel group of the fused loss (None with one rank)."""
    teacher: Teacher
    student_head: Rows
    """This rank's rows of the student's lm_head (trained)."""

    # ---- forward (the step and the evaluation)
    def train(self) -> None: ...
    def eval(self) -> None: ...

    def student_hidden(self, batch: dict) -> torch.Tensor:
        """The student's final hidden states [B, T, d], logit scale folded in."""

    # ---- the step: backward per micro-batch, then the optimizer step (step.optimizer_step)
    def loss_scale(self, n_global: torch.Tensor) -> torch.Tensor:
        """Factor for each micro-batch's loss SUM such that, after ``finish_grads``, every
        gradient is that of the sum over all ranks and micro-batches / N_global."""

    grad_replica_factor: float
    """What a gradient the engine does not reduce (the hidden term's projection) carries
    on each rank after backward of the scaled loss, beyond the rank's own share: its sum over
    the ranks is divided by this."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def micro_step(self) -> None:
        """Between two micro-batches of one step."""

    def finish_grads(self) -> None:
        """After the last micro-batch: every gradient the engine owns is final."""

    def grad_sq_norm(self) -> torch.Tensor:
        """Squared global norm of the student's gradients (body and head), on every rank."""

    def clip_grads(self, coef: float) -> None:
        """Multiply every gradient by ``coef`` (< 1), now or within ``apply_step``."""

    def apply_step(self, lr: float) -> None:
        """The optimizer step at learning rate ``lr``; gradients zeroed after."""

    # ---- checkpoints
    def save(self, ckpt_dir: str, tag: str) -> None:
        """Body, head and optimizer states, collectively."""

    def load(self, ckpt_dir: str, tag: str) -> None: ...

    def extra_state(self) -> dict:
        """This rank's state outside the engine's own files (tensors and plain values only)."""

    def load_extra_state(self, state: dict) -> None: ...

    # ---- export
    student_config: object
    body_prefix: str
    student_extra_rows: torch.Tensor
    """The student's lm_head rows beyond the common vocabulary (not trained, put back at export)."""

    def body_state_dict(self) -> dict | None:
        """The student body's full fp32 state dict on rank 0, None elsewhere."""

    def full_student_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole student lm_head, on every rank."""
