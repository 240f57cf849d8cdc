"""The one comparison the numeric tests use."""
from __future__ import annotations

import math

import torch


def rel_err(a, b, floor: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor), both flattened to float64; 0 when both are exactly zero,
    inf when only ``a`` is non-zero (and the floor is 0)."""
    a = torch.as_tensor(a).detach().to(torch.float64).reshape(-1)
    b = torch.as_tensor(b).detach().to(torch.float64).reshape(-1)
    assert a.shape == b.shape, (a.shape, b.shape)
    num = torch.linalg.vector_norm(a - b).item()
    den = max(torch.linalg.vector_norm(b).item(), floor)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den
