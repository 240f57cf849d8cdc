"""What every engine adapter shares: the vocabulary-sharded heads, their optimizer, the body
forward, the global gradient norm, and the per-rank extra state of a checkpoint.

An engine (DeepSpeed, FSDP2) differs only in how it wraps the two bodies, runs backward and
the optimizer step, and saves/loads/exports the body (``tailkd_dist.engines.*``); the training
step (``tailkd_dist.step``) talks to this interface alone. What an engine provides, and the
engines' design: docs/engines.md.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.distributed as dist

from tailkd_dist.config import TrainConfig
from tailkd_dist.models import body_of, decoder_blocks, full_shape, hidden_scale, lm_head_of, untie_warning
from tailkd_dist.parallel.lm_head import ShardedHead, gathered
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
    """Base: owns the heads (see parallel/lm_head.py) and the step's bookkeeping."""

    name = "base"

    def __init__(self, *, cfg: TrainConfig, topo: Topology, teacher, student, vocab: int):
        self.cfg, self.topo, self.vocab = cfg, topo, vocab
        self.device = topo.device
        self.loss_group = topo.group("loss")
        untie_warning(student, "student")
        self._init_heads(teacher=teacher, student=student, vocab=vocab)
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
        self.teacher_scale = hidden_scale(teacher.config, role="teacher") if teacher is not None else 1.0
        self.student_config = student.config
        self.student_body = body_of(student)
        self.teacher_body = body_of(teacher) if teacher is not None else None
        self.body_prefix = student.base_model_prefix
        for p in teacher.parameters() if teacher is not None else ():
            p.requires_grad_(False)
        if cfg.models.freeze_embeddings:
            # Before the engine builds its optimizer, which takes only trainable parameters.
            student.get_input_embeddings().weight.requires_grad_(False)
        self._init_hidden_term(teacher=teacher, student=student)

    def loads_from_rank0(self, role: str) -> bool:
        """Did only rank 0 read this model's weights (the others built it on the meta device)?
        An engine with such a sharded load (FSDP2) overrides this."""
        return False

    def _init_hidden_term(self, *, teacher, student) -> None:
        """The hidden-state cosine term (tailkd_dist/hidden.py): which layers, and the learned
        projection when widths differ. The projection is small and replicated on every rank,
        trained beside the heads (``aux_prepare`` / ``aux_step``), saved in the per-rank extra
        state and never exported."""
        from tailkd_dist.hidden import HiddenProjection, check_layer_map, default_layer_map

        self.hidden_pairs: list[tuple[int, int]] = []
        self.aux = self.aux_opt = None
        self.last_states = {}
        if self.cfg.loss.hidden_weight == 0:
            return
        ls, lt = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        layer_map = self.cfg.loss.hidden_layer_map or default_layer_map(
            student_layers=ls, teacher_layers=lt, student_path=self.cfg.models.student.path)
        check_layer_map(list(layer_map), student_layers=ls, teacher_layers=lt)
        self.hidden_pairs = [(i, j) for i, j in enumerate(layer_map) if j >= 0]
        # Forward hooks on the decoder layers, not HF's output_hidden_states: they fire the same
        # under ZeRO-3, FSDP2 and activation-checkpoint wrappers. They capture only during the
        # forward the step asked for (not during a checkpoint's recompute).
        self._capturing = None
        for role, model, idx in (("student", student, [i for i, _ in self.hidden_pairs]),
                                 ("teacher", teacher, [j for _, j in self.hidden_pairs])):
            layers = [block for _, _, block in decoder_blocks(body_of(model))]
            if len(layers) != model.config.num_hidden_layers:
                raise ValueError(f"the {role} has {model.config.num_hidden_layers} layers but {len(layers)} decoder "
                                 "blocks were found: the hidden-state term cannot pair them")
            for slot, k in enumerate(idx):
                layers[k].register_forward_hook(self._capture_hook(role, slot))
        self.aux = HiddenProjection(n_layers=len(self.hidden_pairs), student_width=student.config.hidden_size,
                                    teacher_width=teacher.config.hidden_size, seed=self.cfg.seed).to(self.device)
        params = list(self.aux.parameters())
        if params:
            o = self.cfg.optim
            self.aux_opt = torch.optim.AdamW(decay_groups(params, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)

    def _init_heads(self, *, teacher, student, vocab: int) -> None:
        """``student_head`` / ``teacher_head`` (objects whose ``.weight`` / ``.bias`` are this
        rank's row slice, as the fused loss takes them) and ``head_opt``. Default: shards held
        outside the engine, with their own AdamW (parallel/lm_head.py). An engine that keeps
        the heads inside its own sharded model (FSDP2) overrides this."""
        lr, ls = self.topo.loss_rank, self.topo.loss_size
        self.student_head = ShardedHead.from_linear(
            lm_head_of(student), vocab=vocab, rank=lr, size=ls, trainable=True).to(self.device)
        # No teacher (CE-only training): the student's own detached outputs stand in, so the
        # loss's teacher-side statistics are trivially those of the student.
        self.has_teacher = teacher is not None
        self.teacher_head = None if teacher is None else ShardedHead.from_linear(
            lm_head_of(teacher), vocab=vocab, rank=lr, size=ls, trainable=False).to(self.device)
        o = self.cfg.optim
        self.head_opt = torch.optim.AdamW(
            decay_groups(self.student_head.parameters(), o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)

    # -- forward ---------------------------------------------------------------------------
    @staticmethod
    def _body_kwargs(batch):
        # No KV cache: then HF (>= 4.53) reads document starts from the restarting position ids
        # of packed rows and masks attention per document (packed-sequence detection), so a
        # document never attends to the one before it in the row.
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}

    def _capture_hook(self, role: str, slot: int):
        def hook(module, args, output):
            if self._capturing == role:
                self.last_states[role][slot] = output[0] if isinstance(output, tuple) else output
        return hook

    def _hidden(self, module, batch, scale, role: str):
        """Final hidden states; with the hidden-state term also the mapped layers' outputs,
        left in ``last_states[role]`` for the step that asked (same forward, no extra cost)."""
        if self.hidden_pairs:
            self.last_states[role] = [None] * len(self.hidden_pairs)
            self._capturing = role
        try:
            out = module(**self._body_kwargs(batch))
        finally:
            self._capturing = None
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return h * scale if scale != 1.0 else h

    def student_hidden(self, batch) -> torch.Tensor:
        return self._hidden(self.student_module, batch, self.student_scale, "student")

    @torch.no_grad()
    def teacher_hidden(self, batch) -> torch.Tensor | None:
        if not self.has_teacher:
            return None
        return self._hidden(self.teacher_module, batch, self.teacher_scale, "teacher")

    def hidden_term_sum(self, valid: torch.Tensor) -> torch.Tensor | None:
        """Sum over this rank's valid positions of the cosine term (None when off)."""
        if not self.hidden_pairs:
            return None
        from tailkd_dist.hidden import cosine_distance_sum

        s, t = self.last_states.pop("student"), self.last_states.pop("teacher")
        return cosine_distance_sum(self.aux(s), t, valid)

    def aux_prepare(self) -> float:
        """After the last micro-batch: the projection's gradient summed over every rank (each
        saw its own positions) and divided by W like the heads'; returns its squared norm."""
        if self.aux_opt is None:
            return 0.0
        params = [p for p in self.aux.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        world = self.topo.group("world")
        if world is not None:
            dist.all_reduce(flat, group=world)
        flat.div_(self.topo.world_size)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return float(flat.double().pow(2).sum())

    def aux_step(self, *, lr: float, coef: float) -> None:
        if self.aux_opt is None:
            return
        for p in self.aux.parameters():
            if p.grad is not None and coef < 1.0:
                p.grad.mul_(coef)
        for g in self.aux_opt.param_groups:
            g["lr"] = lr
        self.aux_opt.step()
        self.aux_opt.zero_grad(set_to_none=True)

    def teacher_weights(self):
        """(weight, bias) of the teacher's head shard (the student's, detached, without one)."""
        head = self.teacher_head if self.has_teacher else self.student_head
        return head.weight.detach(), None if head.bias is None else head.bias.detach()

    # -- the step ---------------------------------------------------------------------------
    def loss_scale(self, n_global: torch.Tensor) -> torch.Tensor:
        """Factor for each micro-batch's loss SUM so the final gradients are those of the
        sum over all ranks and micro-batches divided once by the global valid-token count."""
        raise NotImplementedError

    def body_grad_sq_norm(self) -> torch.Tensor:
        raise NotImplementedError

    def finish_head_grads(self) -> None:
        """After the last micro-batch: the head shard's gradient summed over its replicas."""
        raise NotImplementedError

    def global_grad_norm(self, *, extra_sq: float = 0.0) -> tuple[float, float]:
        """(total, body) gradient norms: total = sqrt(|body|^2 + |all head shards|^2 + extra),
        identical on every rank. One host sync: the clip decision needs the value."""
        head_sq = self.student_head.grad_sq_norm().to(self.device)
        if self.loss_group is not None:
            dist.all_reduce(head_sq, group=self.loss_group)  # shards differ within a loss group
        body_sq = self.body_grad_sq_norm().to(head_sq)
        total, body = (body_sq + head_sq + extra_sq).sqrt().item(), body_sq.sqrt().item()
        return total, body

    def set_lr(self, lr: float) -> None:
        for g in self.head_opt.param_groups:
            g["lr"] = lr

    def clip_head(self, coef: float) -> None:
        if coef < 1.0:
            for p in self.student_head.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)

    # -- state ------------------------------------------------------------------------------
    def extra_state(self) -> dict:
        """Per-rank state outside the engine: head shard + its optimizer, RNG states."""
        return {
            "student_head": self.student_head.state_dict(),
            "head_opt": self.head_opt.state_dict(),
            "student_extra_rows": self.student_extra_rows,
            "rng": rng_state(),
            **self.aux_state(),
        }

    def load_extra_state(self, state: dict) -> None:
        self.student_head.load_state_dict(state["student_head"])
        self.head_opt.load_state_dict(state["head_opt"])
        set_rng_state(state["rng"])
        self.load_aux_state(state)

    def aux_state(self) -> dict:
        """The hidden-state projection and its optimizer (empty when there is none)."""
        if self.aux_opt is None:
            return {}
        return {"aux": self.aux.state_dict(), "aux_opt": self.aux_opt.state_dict()}

    def load_aux_state(self, state: dict) -> None:
        if self.aux_opt is not None:
            if "aux" not in state:
                raise RuntimeError("the checkpoint has no hidden-state projection: it was written without "
                                   "loss.hidden_weight; resume with the same loss settings")
            self.aux.load_state_dict(state["aux"])
            self.aux_opt.load_state_dict(state["aux_opt"])

    def full_student_head(self):
        return self.student_head.gather_full(self.loss_group)


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
