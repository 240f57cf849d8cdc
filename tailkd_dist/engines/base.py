"""What both engine adapters share: the models' roles, the student's forward, AdamW's
parameter groups, the RNG state of a checkpoint, the clipping coefficient.

An engine (DeepSpeed, FSDP2) differs in how it wraps the two bodies and holds the heads, in
the hooks of the optimizer step, and in how it saves, loads and exports the student
(``interface.Engine`` declares what the rest of the trainer calls). docs/engines.md.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.distributed as dist

from tailkd_dist.config import TrainConfig
from tailkd_dist.engines.teacher import (CachedTeacher, CacheHeadModel, ModelTeacher, NoTeacher, body_kwargs,
                                         final_hidden)
from tailkd_dist.models import body_of, full_shape, hidden_scale, lm_head_of, untie_warning
from tailkd_dist.parallel.lm_head import gathered
from tailkd_dist.parallel.topology import Topology


def decay_groups(params, weight_decay: float):
    """AdamW groups: matrices decay, vectors (norms, biases) do not."""
    params = [p for p in params if p.requires_grad]
    matrix = lambda p: len(full_shape(p)) >= 2  # noqa: E731  (ZeRO-3 partitions are flat)
    return [
        {"params": [p for p in params if matrix(p)], "weight_decay": weight_decay},
        {"params": [p for p in params if not matrix(p)], "weight_decay": 0.0},
    ]


class EngineAdapter:
    """What both engines share: the models' roles and scales, the student's forward, the rows
    the export puts back; an engine adds the wrapping, the heads, the step hooks and the
    state (``interface.Engine`` lists what the rest of the trainer calls)."""

    name = "base"

    def __init__(self, *, cfg: TrainConfig, topo: Topology, teacher, student, vocab: int):
        self.cfg, self.topo, self.vocab = cfg, topo, vocab
        self.device = topo.device
        self.loss_group = topo.group("loss")
        untie_warning(student, "student")
        # Rows of a padded student lm_head beyond the common vocabulary are not trained; the
        # export puts them back unchanged.
        with gathered(lm_head_of(student).weight):
            extra = lm_head_of(student).weight[vocab:].detach()
            if self.loads_from_rank0("student"):  # only rank 0 read the weights
                extra = extra.to(self.device) if topo.rank == 0 else torch.empty(
                    extra.shape, dtype=extra.dtype, device=self.device)
                if extra.numel():
                    dist.broadcast(extra, src=0)
            self.student_extra_rows = extra.cpu().clone()
        self.student_scale = hidden_scale(student.config, role="student")
        self.student_config = student.config
        self.student_body = body_of(student)
        self.teacher_body = body_of(teacher) if teacher is not None else None
        # A cached teacher's hidden states carry its scale already (and it has no body).
        self.cached_teacher = isinstance(teacher, CacheHeadModel)
        self.teacher_scale = hidden_scale(teacher.config, role="teacher") if self.teacher_body is not None else 1.0
        self.body_prefix = student.base_model_prefix
        for p in teacher.parameters() if teacher is not None else ():
            p.requires_grad_(False)
        if cfg.models.freeze_embeddings:
            # Before the engine builds its optimizer, which takes only trainable parameters.
            student.get_input_embeddings().weight.requires_grad_(False)

    def loads_from_rank0(self, role: str) -> bool:
        """Did only rank 0 read this model's weights (the others built it on the meta device)?
        An engine with such a sharded load (FSDP2) overrides this."""
        return False

    def _teacher(self, module, head) -> ModelTeacher | CachedTeacher | NoTeacher:
        if self.cached_teacher:
            return CachedTeacher(head=head)
        return NoTeacher() if module is None else ModelTeacher(module=module, scale=self.teacher_scale, head=head)

    def student_hidden(self, batch) -> torch.Tensor:
        return final_hidden(self.student_module(**body_kwargs(batch)), self.student_scale)


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch, cuda) for a checkpoint, as tensors and
    plain values only, so the checkpoint loads with ``weights_only`` (nothing is unpickled)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    n = rng["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    if max_norm <= 0 or not math.isfinite(total_norm) or total_norm <= max_norm:
        return 1.0
    return max_norm / (total_norm + 1e-6)
