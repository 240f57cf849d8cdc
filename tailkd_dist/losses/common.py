"""Pieces shared by the dense and the fused losses: argument checks, the teacher's top-k with
the spec's tie rule, and per-document means (for TAD's beta(X)).

Specification: ``docs/loss.md``.
"""
from __future__ import annotations

import torch

DIVERGENCES = ("tad", "forward_kl", "reverse_kl", "jsd", "none")

# mean(aT) of a document is clamped below by this, so a fully confident teacher (aT -> 0)
# cannot divide by zero (spec, DECIDED).
MEAN_TAIL_FLOOR = 1e-6


def merge_lse(maxes: torch.Tensor, sumexp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-rank (max, sum exp(x - max)) [P, c] -> global (max, logsumexp) [c]: the
    step that turns each vocabulary shard's normaliser into the whole vocabulary's."""
    m = maxes.amax(0)
    return m, m + torch.log((sumexp * torch.exp(maxes - m)).sum(0))


def check_loss_args(
    *, k: int, beta: float, temperature: float, divergence: str = "tad", jsd_beta: float = 0.5,
    jsd_name: str = "jsd_beta",
) -> None:
    """ValueError (naming the argument and the fix) for settings that can never be right."""
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"divergence={divergence!r} is not known; use one of {', '.join(DIVERGENCES)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: the teacher's top-k size must be an integer >= 1 (paper: k=10)")
    if not beta > 0:
        raise ValueError(f"beta={beta!r}: TAD's tail weight must be > 0 (paper: beta=2)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 (1.0 = no softening)")
    if divergence == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(
            f"{jsd_name}={jsd_beta!r} must lie strictly between 0 and 1; for the end points use "
            "divergence='forward_kl' or 'reverse_kl'"
        )


def check_vocab(*, k: int, student_vocab: int, teacher_vocab: int) -> None:
    """Vocabulary-size checks that need the (global) vocabulary sizes."""
    if student_vocab != teacher_vocab:
        larger, smaller = (
            ("teacher", "student") if teacher_vocab > student_vocab else ("student", "teacher")
        )
        raise ValueError(
            f"vocabulary sizes differ: teacher V={teacher_vocab}, student V={student_vocab} "
            f"(the {larger}'s is larger). If one is a padded copy of the other (e.g. 151936 vs "
            f"152064 rows), slice both lm_heads (and logits) to the common first "
            f"{min(student_vocab, teacher_vocab)} rows, the tokens the tokenizer can produce; "
            "otherwise the tokenizers differ and the models cannot be distilled token by token"
        )
    if k >= student_vocab:
        raise ValueError(
            f"k={k} must be smaller than the vocabulary size V={student_vocab} "
            "(with k >= V the tail is empty and TAD's tail term is undefined)"
        )


def topk_lowest_index(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, ties at the k-th value broken towards the lower index.

    ``torch.topk`` leaves the choice among equal values unspecified (the CPU kernel and the
    CUDA kernel differ), but the spec requires every rank and every chunking to pick the same
    set. Returns values sorted descending and, among equal values, indices ascending.

    Two exact ways to the same answer (``_packed_topk_applies`` picks): on an accelerator
    one top-k over packed (value, index) keys, with no host sync; on a CPU, where a "sync"
    costs nothing and the packed keys cost ~5x the top-k itself, torch.topk and a repair of
    the rows whose boundary is a tie.
    """
    if _packed_topk_applies(x):
        return _topk_packed(x, k)
    n = x.shape[-1]
    vals, idx = torch.topk(x, min(k + 1, n), dim=-1, sorted=True)
    if k < n:
        # A tie straddles the boundary iff the k-th and (k+1)-th largest values are equal.
        # Finding the rows is a host sync (only float64 reaches it on an accelerator); such
        # rows are rare in fp32 and repaired below.
        bad = (vals[..., k - 1] == vals[..., k]).nonzero(as_tuple=True)
        vals, idx = vals[..., :k], idx[..., :k]
        if bad[0].numel():
            rows = x[bad]
            # Stable sort of -x: larger values first and, among equals, lower indices first.
            order = torch.sort(-rows, dim=-1, stable=True).indices[..., :k]
            idx, vals = idx.clone(), vals.clone()
            idx[bad] = order
            vals[bad] = rows.gather(-1, order)
    # Inside the chosen set, order equal values by index so downstream merges are canonical.
    return _canonical_order(vals, idx)


def _packed_topk_applies(x: torch.Tensor) -> bool:
    # float64 values leave no room for the index in a 64-bit key.
    return x.device.type != "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _topk_packed(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same top-k from one torch.topk over int64 keys (order-preserving value bits << 32
    | (2**32 - 1 - index)): larger keys are larger values and, among equal values, lower
    indices, so the tie rule needs no second look (and no host sync)."""
    x32 = x.float() + 0.0  # + 0.0 turns -0.0 into +0.0: equal values must get equal bits
    bits = x32.view(torch.int32)
    # Negative floats order backwards as integers: flipping their magnitude bits fixes that.
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    low = 0xFFFFFFFF - torch.arange(x.shape[-1], dtype=torch.int64, device=x.device)
    keys, _ = torch.topk((ordered << 32) | low, min(k, x.shape[-1]), dim=-1, sorted=True)
    idx = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return x.gather(-1, idx), idx


def _canonical_order(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort (value desc, index asc): two stable sorts, cheap on [.., k] tensors."""
    by_idx = torch.sort(idx, dim=-1, stable=True).indices
    vals, idx = vals.gather(-1, by_idx), idx.gather(-1, by_idx)
    by_val = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    return vals.gather(-1, by_val), idx.gather(-1, by_val)


def merge_topk(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of a set of candidates [..., M] (M >= k), with the same tie rule."""
    vals, idx = _canonical_order(vals, idx)
    return vals[..., :k], idx[..., :k]


def document_segments(doc_ids: torch.Tensor) -> torch.Tensor:
    """Map arbitrary document ids [N] to dense segment ids in [0, N), equal ids -> equal segment.

    Sort-based (no torch.unique) so the output size is static: no host sync.
    """
    flat = doc_ids.reshape(-1)
    n = flat.numel()
    if n == 0:
        return flat.to(torch.long)
    sorted_ids, order = torch.sort(flat, stable=True)
    new_seg = torch.ones_like(sorted_ids, dtype=torch.long)
    new_seg[0] = 0
    new_seg[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    seg_sorted = torch.cumsum(new_seg, 0)
    seg = torch.empty_like(seg_sorted)
    seg[order] = seg_sorted
    return seg


def default_doc_ids(lead_shape: torch.Size, device: torch.device, row_offset: int = 0) -> torch.Tensor:
    """Without doc_ids each row of [B, T] is one document; all of [N] is one document."""
    if len(lead_shape) <= 1:
        return torch.zeros(lead_shape, dtype=torch.long, device=device)
    rows = torch.arange(lead_shape[0], device=device) + row_offset
    return rows.view(-1, *([1] * (len(lead_shape) - 1))).expand(lead_shape).contiguous()


def per_document_beta(
    a_t: torch.Tensor, valid: torch.Tensor, segments: torch.Tensor, beta: float
) -> torch.Tensor:
    """beta(X) = beta / mean of aT over the valid positions of each position's document.

    All inputs flat [N]; masked positions count nowhere. Returns [N] (teacher-only, detached).
    """
    a_t = a_t.detach()
    vf = valid.to(a_t.dtype)
    n = a_t.numel()
    sums = torch.zeros(n, dtype=a_t.dtype, device=a_t.device).index_add_(0, segments, a_t * vf)
    counts = torch.zeros(n, dtype=a_t.dtype, device=a_t.device).index_add_(0, segments, vf)
    mean = sums / counts.clamp_min(1.0)
    return (beta / mean.clamp_min(MEAN_TAIL_FLOOR))[segments]
