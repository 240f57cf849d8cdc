"""Dense divergences on full logits ``[..., V]``: small vocabularies, references, offline use.

Each returns per-position values of the logits' shape without the last dim, exactly 0 where
masked, differentiable by autograd w.r.t. the student's logits. The teacher is treated as a
constant. KD divergences follow the usual convention: p = softmax(t / tau),
q = softmax(s / tau), and the divergence is multiplied by tau**2. CE is always at tau = 1.

For [tokens, V] logits that do not fit in memory use :func:`fused_linear_distill`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import (
    check_loss_args,
    check_vocab,
    default_doc_ids,
    document_segments,
    per_document_beta,
    topk_lowest_index,
)


def _prepare(student_logits, teacher_logits, temperature, mask):
    if student_logits.shape != teacher_logits.shape:
        check_vocab(k=1, student_vocab=student_logits.shape[-1], teacher_vocab=teacher_logits.shape[-1])
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    teacher_logits = teacher_logits.detach()
    if not torch.isfinite(teacher_logits).all():
        raise ValueError("teacher_logits contain NaN or inf: check the teacher's forward pass")
    if mask is None:
        mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    elif mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} must have shape {tuple(student_logits.shape[:-1])}")
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    return log_p, log_q, mask.bool()


def _masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where() (not multiply) so a non-finite value at a masked position cannot leak a NaN.
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def forward_kl(student_logits, teacher_logits, *, temperature: float = 1.0, mask=None):
    """tau^2 * KL(p_teacher || q_student) per position."""
    check_loss_args(k=1, beta=1.0, temperature=temperature)
    log_p, log_q, mask = _prepare(student_logits, teacher_logits, temperature, mask)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return _masked(kl, mask) * temperature**2


def reverse_kl(student_logits, teacher_logits, *, temperature: float = 1.0, mask=None):
    """tau^2 * KL(q_student || p_teacher) per position."""
    check_loss_args(k=1, beta=1.0, temperature=temperature)
    log_p, log_q, mask = _prepare(student_logits, teacher_logits, temperature, mask)
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return _masked(rkl, mask) * temperature**2


def jsd(student_logits, teacher_logits, *, beta: float = 0.5, temperature: float = 1.0, mask=None):
    """Generalised JSD of GKD (Agarwal et al. 2024), times tau^2, per position:
    m = beta*p + (1-beta)*q, JSD = beta*KL(p||m) + (1-beta)*KL(q||m)."""
    check_loss_args(k=1, beta=1.0, temperature=temperature, divergence="jsd", jsd_beta=beta, jsd_name="beta")
    log_p, log_q, mask = _prepare(student_logits, teacher_logits, temperature, mask)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    val = beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (
        log_q.exp() * (log_q - log_m)
    ).sum(-1)
    return _masked(val, mask) * temperature**2


def cross_entropy(student_logits, labels, *, ignore_index: int = -100):
    """-log softmax(student_logits)[label] per position (tau = 1); 0 where label == ignore_index."""
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have shape {tuple(student_logits.shape[:-1])}")
    valid = labels != ignore_index
    log_q = F.log_softmax(student_logits, dim=-1)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -log_q.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return _masked(nll, valid)


def tad_terms(
    student_logits,
    teacher_logits,
    *,
    k: int = 10,
    beta: float = 2.0,
    temperature: float = 1.0,
    mask=None,
    doc_ids=None,
) -> dict[str, torch.Tensor]:
    """Every TAD quantity per position, at temperature tau (spec: tad-loss.md, Eqs. 1-6).

    Keys: "d1", "at_d2", "kl", "a_t", "a_s", "beta_x" (without the tau^2 factor) and "tad"
    (= tau^2 * (d1 + beta_x * at_d2), the value :func:`tad_divergence` returns).
    Everything is in log space: log aT = logsumexp(tail of log p), never 1 - sum(top-k).
    """
    check_loss_args(k=k, beta=beta, temperature=temperature)
    check_vocab(k=k, student_vocab=student_logits.shape[-1], teacher_vocab=teacher_logits.shape[-1])
    log_p, log_q, mask = _prepare(student_logits, teacher_logits, temperature, mask)
    lead = log_p.shape[:-1]
    _, top = topk_lowest_index(log_p, k)
    in_k = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, top, True)
    neg_inf = torch.tensor(float("-inf"), dtype=log_p.dtype, device=log_p.device)
    log_a_t = torch.logsumexp(torch.where(in_k, neg_inf, log_p), dim=-1)
    log_a_s = torch.logsumexp(torch.where(in_k, neg_inf, log_q), dim=-1)
    p = log_p.exp()
    diff = log_p - log_q
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    kl_top = torch.where(in_k, p * diff, zero).sum(-1)
    a_t = log_a_t.exp()
    d1 = kl_top + a_t * (log_a_t - log_a_s)
    # aT * D2 straight from the renormalised tails: sum_tail p * (log(p/aT) - log(q/aS)).
    tail_ratio = (log_p - log_a_t.unsqueeze(-1)) - (log_q - log_a_s.unsqueeze(-1))
    at_d2 = torch.where(in_k, zero, p * tail_ratio).sum(-1)
    kl = (p * diff).sum(-1)

    if doc_ids is None:
        doc_ids = default_doc_ids(lead, log_p.device)
    elif doc_ids.shape != lead:
        raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must have shape {tuple(lead)}")
    seg = document_segments(doc_ids.reshape(-1))
    beta_x = per_document_beta(a_t.reshape(-1), mask.reshape(-1), seg, beta).view(lead)
    tad = (d1 + beta_x * at_d2) * temperature**2
    out = {
        "d1": d1, "at_d2": at_d2, "kl": kl, "a_t": a_t, "a_s": log_a_s.exp(),
        "beta_x": beta_x, "tad": tad,
    }
    return {name: _masked(v, mask) for name, v in out.items()}


def tad_divergence(
    student_logits,
    teacher_logits,
    *,
    k: int = 10,
    beta: float = 2.0,
    temperature: float = 1.0,
    mask=None,
    doc_ids=None,
):
    """Per-position TAD divergence L_div = tau^2 * (D1 + beta(X) * aT * D2), 0 where masked.

    ``mask`` (bool, True = valid) and ``doc_ids`` (int) have the logits' shape without the
    last dim. Equal doc ids are the same document wherever they stand; without ``doc_ids`` each
    row of [B, T, V] logits is one document and all N positions of [N, V] are one document.
    beta(X) = beta / mean over the valid positions of X of aT (teacher-only, no gradient).
    """
    return tad_terms(
        student_logits, teacher_logits, k=k, beta=beta, temperature=temperature,
        mask=mask, doc_ids=doc_ids,
    )["tad"]
