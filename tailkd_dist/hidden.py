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

import os

import torch
from torch import nn

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
