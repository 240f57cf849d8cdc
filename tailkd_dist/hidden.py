"""The hidden-state cosine term (DistilBERT-style), used by the paper's larger-teacher runs.

For each mapped pair (student layer i -> teacher layer j), per valid position,
1 - cos(P_i h_s, h_t), averaged over the mapped layers; SUMMED over valid positions like the
other loss terms and normalised once by the global valid-token count. P_i is a learned linear
projection when the widths differ (identity otherwise); it trains with the student, lives in
its checkpoint, and is not exported into the HF student.

Layer i's state is the output of decoder block i (captured by a forward hook; for the last
block that is before the final norm). The default map is the one
``tailkd-derive-student`` recorded (student layer i <- the teacher layer it was copied from),
else an even spread (student layer i <- teacher layer round((i+1) L_t / L_s) - 1).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

from tailkd_dist.models import body_of, decoder_blocks
from tailkd_dist.staging import read_json

DERIVATION_FILE = "tailkd_derivation.json"


def default_layer_map(*, student_layers: int, teacher_layers: int, student_path: str | None) -> list[int]:
    record = os.path.join(student_path, DERIVATION_FILE) if student_path else None
    if record and os.path.isfile(record):
        fix = "derive the student again, or give loss.hidden_layer_map"
        layer_map = read_json(record, fix=fix)
        layer_map = layer_map.get("layer_map") if isinstance(layer_map, dict) else None
        if not isinstance(layer_map, list) or not all(isinstance(j, int) and not isinstance(j, bool)
                                                      for j in layer_map):
            raise ValueError(f"{record} holds no layer_map (a list of teacher layers): {fix}")
        if len(layer_map) != student_layers:
            raise ValueError(f"{record} maps {len(layer_map)} layers but the student has "
                             f"{student_layers}: the file belongs to another student")
        return [int(j) for j in layer_map]
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def check_layer_map(layer_map: list[int], *, student_layers: int, teacher_layers: int) -> list[int]:
    if len(layer_map) != student_layers:
        raise ValueError(f"config key 'loss.hidden_layer_map' has {len(layer_map)} entries; the student has "
                         f"{student_layers} layers (one teacher layer per student layer, -1 to skip one)")
    for j in layer_map:
        if not -1 <= j < teacher_layers:
            raise ValueError(f"config key 'loss.hidden_layer_map': teacher layer {j} does not exist "
                             f"(the teacher has {teacher_layers}; -1 skips a student layer)")
    return layer_map


class HiddenProjection(nn.Module):
    """One bias-free linear map student width -> teacher width per mapped layer (none when the
    widths are equal)."""

    def __init__(self, *, n_layers: int, student_width: int, teacher_width: int, seed: int = 0):
        super().__init__()
        self.proj = None
        if student_width != teacher_width:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # identical on every rank
                self.proj = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in range(n_layers))

    def forward(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.proj is None:
            return states
        return [p(h) for p, h in zip(self.proj, states)]


def cosine_distance_sum(student_states, teacher_states, valid: torch.Tensor) -> torch.Tensor:
    """Sum over valid positions of the mean over layers of 1 - cos(s, t). States [B, T, d]."""
    if not student_states:
        return torch.zeros((), device=valid.device)
    # fp32 at least (bf16 activations), fp64 kept as is
    up = lambda x: x.to(torch.promote_types(x.dtype, torch.float32))  # noqa: E731
    per_layer = [1.0 - torch.nn.functional.cosine_similarity(up(s), up(t).detach(), dim=-1, eps=1e-8)
                 for s, t in zip(student_states, teacher_states)]
    per_pos = torch.stack(per_layer).mean(0)
    return torch.where(valid, per_pos, torch.zeros((), device=per_pos.device)).sum()


class HiddenTerm:
    """The term as a component of the training step: forward hooks on the mapped decoder
    blocks of both models, the projection and its AdamW. The step opens ``capture(role)``
    around the forward it wants the layers of; evaluation never does, so it costs nothing
    there. ``build`` returns None when the term is off (``loss.hidden_weight`` 0)."""

    def __init__(self, *, cfg, teacher, student, device: torch.device):
        from tailkd_dist.engines.base import decay_groups

        ls, lt = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        layer_map = cfg.loss.hidden_layer_map or default_layer_map(
            student_layers=ls, teacher_layers=lt, student_path=cfg.models.student.path)
        check_layer_map(list(layer_map), student_layers=ls, teacher_layers=lt)
        self.pairs = [(i, j) for i, j in enumerate(layer_map) if j >= 0]
        self.device = device
        self.states: dict[str, list] = {}
        self._capturing: str | None = None
        # Hooks on the decoder blocks, not HF's output_hidden_states: they fire the same under
        # ZeRO-3, FSDP2 and activation-checkpoint wrappers (registered before any wrapping),
        # and only inside capture(): never during a checkpoint's recompute or an evaluation.
        for role, model, idx in (("student", student, [i for i, _ in self.pairs]),
                                 ("teacher", teacher, [j for _, j in self.pairs])):
            blocks = [block for _, _, block in decoder_blocks(body_of(model))]
            if len(blocks) != model.config.num_hidden_layers:
                raise ValueError(f"the {role} has {model.config.num_hidden_layers} layers but {len(blocks)} decoder "
                                 "blocks were found: the hidden-state term cannot pair them")
            for slot, k in enumerate(idx):
                blocks[k].register_forward_hook(self._hook(role, slot))
        self.projection = HiddenProjection(
            n_layers=len(self.pairs), student_width=student.config.hidden_size,
            teacher_width=teacher.config.hidden_size, seed=cfg.seed).to(device)
        params = list(self.projection.parameters())
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(decay_groups(params, o.weight_decay), lr=o.lr, betas=o.betas,
                                           eps=o.eps) if params else None

    @classmethod
    def build(cls, *, cfg, teacher, student, device: torch.device) -> "HiddenTerm | None":
        if cfg.loss.hidden_weight == 0:
            return None
        return cls(cfg=cfg, teacher=teacher, student=student, device=device)

    def _hook(self, role: str, slot: int):
        def hook(module, args, output):
            if self._capturing == role:
                self.states[role][slot] = output[0] if isinstance(output, tuple) else output
        return hook

    @contextlib.contextmanager
    def capture(self, role: str):
        """Keep the mapped layers' outputs of the forward run inside the block."""
        self.states[role] = [None] * len(self.pairs)
        self._capturing = role
        try:
            yield
        finally:
            self._capturing = None

    def loss_sum(self, valid: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's valid positions of the cosine term, from the captured states."""
        s, t = self.states.pop("student"), self.states.pop("teacher")
        return cosine_distance_sum(self.projection(s), t, valid)

    # ---- its share of the optimizer step
    def reduce_grads(self, *, group, divide_by: float) -> torch.Tensor:
        """After the last micro-batch: the projection's gradient summed over every rank (each
        saw its own positions) and divided like the body's (``Engine.grad_replica_factor``);
        returns its squared norm, a float64 tensor (the caller syncs once for all norms)."""
        params = [p for p in self.projection.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat.div_(divide_by)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
        return flat.double().pow(2).sum()

    def step(self, *, lr: float, coef: float) -> None:
        if self.optimizer is None:
            return
        if coef < 1.0:
            for p in self.projection.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- checkpoints: kept in each rank's extra state, never exported
    def state_dict(self) -> dict:
        if self.optimizer is None:
            return {}
        return {"aux": self.projection.state_dict(), "aux_opt": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is None:
            return
        if "aux" not in state:
            raise RuntimeError("the checkpoint has no hidden-state projection: it was written without "
                               "loss.hidden_weight; resume with the same loss settings")
        self.projection.load_state_dict(state["aux"])
        self.optimizer.load_state_dict(state["aux_opt"])
