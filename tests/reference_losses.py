"""A deliberately plain float64 reference for the TAD loss family.

Used only by tests/test_losses_reference.py. It NEVER imports tailkd_dist: everything is written
straight from the definitions in docs/loss.md (JSD and the fused contract included), in
float64, with no cleverness beyond working in log space:

    p = softmax(z_teacher / tau)          q = softmax(z_student / tau)
    K       = indices of the k largest teacher logits, ties: lower token index wins
    aT      = 1 - sum_{K} p          (computed as exp(logsumexp of the tail of log p))
    aS      = 1 - sum_{K} q
    D1      = sum_{K} p log(p/q) + aT log(aT/aS)
    D2      = sum_{not K} (p/aT) log((p/aT) / (q/aS))
    KL      = D1 + aT D2
    beta(X) = beta / max(mean_{valid t' in X} aT(t'), 1e-6)     (teacher only)
    L_div   = tau^2 (D1 + beta(X) aT D2)

All functions take logits of shape [..., V] (any float dtype; they are converted to float64) and
return per-position float64 tensors of shape [...]. Gradients come from torch autograd on these
float64 expressions (beta(X) depends on the teacher only, so it carries no gradient by
construction), and, separately, from the closed-form TAD gradient of the spec
(`tad_grad_closed_form`).
"""
from __future__ import annotations

import numpy as np
import torch

F64 = torch.float64
MEAN_AT_FLOOR = 1e-6


# ----------------------------------------------------------------------------------------------
# basic pieces
# ----------------------------------------------------------------------------------------------
def log_softmax64(x: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax, written out: (x - max) - log1p(sum of exp(x_j - max) over j != argmax).

    The log1p form keeps log p of the argmax accurate even when the rest of the mass is below
    float64's epsilon (very peaked distributions), which torch.log_softmax rounds to exactly 0.
    Differentiable (the max's gradient flows to the same index that is scattered out).
    """
    x = x.to(F64)
    m, idx = x.max(dim=-1, keepdim=True)
    z = x - m
    e = torch.exp(z).scatter(-1, idx, 0.0)
    return z - torch.log1p(e.sum(dim=-1, keepdim=True))


def topk_member_mask(teacher_logits: torch.Tensor, k: int, tie: str = "low") -> torch.Tensor:
    """Boolean [..., V] mask of the teacher's top-k set K.

    Ranking is by the teacher logit (the same order as the teacher probability at any tau > 0),
    sorted by (-value, index) with a stable lexicographic sort, so among equal values the LOWER
    token index comes first (tie="low", the spec's rule). tie="high" gives the opposite rule and
    exists only so the tests can show that the two rules give different answers.
    """
    t = teacher_logits.detach().to(F64).cpu().numpy()
    V = t.shape[-1]
    flat = t.reshape(-1, V)
    index = np.broadcast_to(np.arange(V), flat.shape)
    secondary = index if tie == "low" else -index
    order = np.lexsort((secondary, -flat), axis=-1)  # last key is the primary key
    member = np.zeros(flat.shape, dtype=bool)
    np.put_along_axis(member, order[:, :k], True, axis=-1)
    return torch.from_numpy(member.reshape(t.shape)).to(teacher_logits.device)


def position_groups(pos_shape, doc_ids=None) -> torch.Tensor:
    """A document label for every position (flattened). Equal doc_ids are one document wherever
    they stand; without doc_ids each row of a [B, T] layout is a document, and a flat [N]
    layout is a single document."""
    n = int(np.prod(pos_shape)) if len(pos_shape) else 1
    if doc_ids is not None:
        assert tuple(doc_ids.shape) == tuple(pos_shape), (doc_ids.shape, pos_shape)
        return doc_ids.reshape(-1).to(torch.int64).cpu()
    if len(pos_shape) == 1:
        return torch.zeros(n, dtype=torch.int64)
    if len(pos_shape) == 2:
        B, T = pos_shape
        return torch.arange(B).repeat_interleave(T)
    raise ValueError("reference: give doc_ids for layouts other than [N] and [B, T]")


def beta_per_position(a_t, mask, beta, doc_ids=None) -> torch.Tensor:
    """beta(X) = beta / max(mean of aT over the VALID positions of X, 1e-6), for every position
    (0 at masked positions). Plain python loop over documents."""
    pos_shape = a_t.shape
    groups = position_groups(pos_shape, doc_ids)
    a = a_t.detach().to(F64).reshape(-1).cpu()
    valid = mask.reshape(-1).cpu()
    out = torch.zeros_like(a)
    for g in torch.unique(groups).tolist():
        members = groups == g
        sel = members & valid
        if int(sel.sum()) == 0:
            continue
        mean_at = float(a[sel].sum()) / int(sel.sum())
        out[sel] = beta / max(mean_at, MEAN_AT_FLOOR)
    return out.reshape(pos_shape).to(a_t.device)


def _full_mask(pos_shape, mask, device):
    if mask is None:
        return torch.ones(pos_shape, dtype=torch.bool, device=device)
    return mask.to(torch.bool)


# ----------------------------------------------------------------------------------------------
# TAD terms
# ----------------------------------------------------------------------------------------------
def tad_terms(student_logits, teacher_logits, *, k=10, beta=2.0, temperature=1.0, mask=None,
              doc_ids=None, tie="low"):
    """Per-position float64 terms. Keys: d1, at_d2, d2, kl, a_t, a_s, log_a_t, log_a_s, beta_x,
    tad (tad includes tau^2 and is 0 at masked positions; the others are raw, unmasked values
    except beta_x, which is 0 at masked positions), member (the K mask), p, q, lp, lq, mask."""
    s = student_logits.to(F64)
    t = teacher_logits.to(F64)
    tau = float(temperature)
    pos_shape = s.shape[:-1]
    valid = _full_mask(pos_shape, mask, s.device)

    lp = log_softmax64(t / tau)
    lq = log_softmax64(s / tau)
    p = torch.exp(lp)
    q = torch.exp(lq)
    member = topk_member_mask(t, k, tie=tie)
    tail = ~member
    ninf = torch.tensor(float("-inf"), dtype=F64, device=s.device)
    zero = torch.zeros((), dtype=F64, device=s.device)

    log_a_t = torch.logsumexp(torch.where(tail, lp, ninf), dim=-1)
    log_a_s = torch.logsumexp(torch.where(tail, lq, ninf), dim=-1)
    a_t = torch.exp(log_a_t)
    a_s = torch.exp(log_a_s)

    kl = (p * (lp - lq)).sum(-1)
    d1 = torch.where(member, p * (lp - lq), zero).sum(-1) + a_t * (log_a_t - log_a_s)
    # D2: KL of the renormalised tails, computed with the tail distributions themselves
    # (top-k entries are replaced by 0 BEFORE exp so that no inf*0 reaches autograd)
    log_r_t = torch.where(tail, lp - log_a_t.unsqueeze(-1), zero)
    log_r_s = torch.where(tail, lq - log_a_s.unsqueeze(-1), zero)
    d2 = torch.where(tail, torch.exp(log_r_t) * (log_r_t - log_r_s), zero).sum(-1)
    at_d2 = a_t * d2

    beta_x = beta_per_position(a_t, valid, beta, doc_ids)
    tad = torch.where(valid, tau * tau * (d1 + beta_x * at_d2), zero)
    return dict(d1=d1, at_d2=at_d2, d2=d2, kl=kl, a_t=a_t, a_s=a_s, log_a_t=log_a_t,
                log_a_s=log_a_s, beta_x=beta_x, tad=tad, member=member, p=p, q=q, lp=lp, lq=lq,
                mask=valid)


def tad_divergence(student_logits, teacher_logits, **kw):
    return tad_terms(student_logits, teacher_logits, **kw)["tad"]


def tad_grad_closed_form(student_logits, teacher_logits, upstream=None, *, k=10, beta=2.0,
                         temperature=1.0, mask=None, doc_ids=None):
    """d/d(student logits) of sum(upstream * L_div) from the spec's formula (tau = 1 form,
    times tau for the chain rule of z/tau and the tau^2 factor):
        j in K:      q_j - p_j
        j not in K:  (q_j - p_j) + (beta(X) - 1) (q_j aT/aS - p_j)
    """
    with torch.no_grad():
        r = tad_terms(student_logits, teacher_logits, k=k, beta=beta, temperature=temperature,
                      mask=mask, doc_ids=doc_ids)
        p, q = r["p"], r["q"]
        # q_j aT/aS formed in log space: for a tail j, log q_j <= log aS, so it cannot overflow
        # (aT/aS alone can: aS may underflow where aT does not)
        log_shift = (r["log_a_t"] - r["log_a_s"]).unsqueeze(-1)
        q_scaled = torch.exp(torch.where(r["member"], float("-inf"), r["lq"] + log_shift))
        bx = r["beta_x"].unsqueeze(-1)
        g = q - p
        g = torch.where(r["member"], g, g + (bx - 1.0) * (q_scaled - p))
        w = r["mask"].to(F64)
        if upstream is not None:
            w = w * upstream.to(F64)
        return float(temperature) * g * w.unsqueeze(-1)


# ----------------------------------------------------------------------------------------------
# other divergences (per position, 0 where masked, tau^2 included)
# ----------------------------------------------------------------------------------------------
def _masked(value, mask):
    valid = _full_mask(value.shape, mask, value.device)
    return torch.where(valid, value, torch.zeros((), dtype=F64, device=value.device))


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None):
    tau = float(temperature)
    lp = log_softmax64(teacher_logits.to(F64) / tau)
    lq = log_softmax64(student_logits.to(F64) / tau)
    return _masked(tau * tau * (torch.exp(lp) * (lp - lq)).sum(-1), mask)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None):
    tau = float(temperature)
    lp = log_softmax64(teacher_logits.to(F64) / tau)
    lq = log_softmax64(student_logits.to(F64) / tau)
    return _masked(tau * tau * (torch.exp(lq) * (lq - lp)).sum(-1), mask)


def jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None):
    """Generalised JSD of GKD: m = beta p_teacher + (1 - beta) p_student,
    JSD = beta KL(p_teacher || m) + (1 - beta) KL(p_student || m), times tau^2."""
    tau = float(temperature)
    lp = log_softmax64(teacher_logits.to(F64) / tau)
    lq = log_softmax64(student_logits.to(F64) / tau)
    lm = torch.logaddexp(lp + np.log(beta), lq + np.log1p(-beta))
    value = beta * (torch.exp(lp) * (lp - lm)).sum(-1) \
        + (1.0 - beta) * (torch.exp(lq) * (lq - lm)).sum(-1)
    return _masked(tau * tau * value, mask)


def cross_entropy(student_logits, labels, *, ignore_index=-100):
    lq = log_softmax64(student_logits.to(F64))
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).to(torch.int64)
    nll = -lq.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, nll, torch.zeros((), dtype=F64, device=nll.device))


def entropy(logits, *, temperature=1.0):
    lp = log_softmax64(logits.to(F64) / float(temperature))
    return -(torch.exp(lp) * lp).sum(-1)


# ----------------------------------------------------------------------------------------------
# fused (hidden states + lm_head) reference: logits are built in float64 and everything above
# is applied to them; gradients come from autograd on this float64 graph.
# ----------------------------------------------------------------------------------------------
DIVERGENCES = ("tad", "forward_kl", "reverse_kl", "jsd", "none")


def fused_linear_distill(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *,
                         divergence="tad", k=10, beta=2.0, temperature=1.0, ce_weight=1.0,
                         kd_weight=1.0, jsd_beta=0.5, doc_ids=None, ignore_index=-100,
                         student_bias=None, teacher_bias=None, tie="low"):
    """Returns (loss_sum, stats) in float64; loss_sum is differentiable w.r.t. whichever student
    tensors passed in require grad (pass float64 leaves)."""
    assert divergence in DIVERGENCES
    zs = student_hidden.to(F64) @ student_weight.to(F64).T
    if student_bias is not None:
        zs = zs + student_bias.to(F64)
    with torch.no_grad():
        zt = teacher_hidden.to(F64) @ teacher_weight.to(F64).T
        if teacher_bias is not None:
            zt = zt + teacher_bias.to(F64)
    mask = labels != ignore_index
    tau = float(temperature)

    terms = tad_terms(zs, zt, k=k, beta=beta, temperature=tau, mask=mask, doc_ids=doc_ids,
                      tie=tie)
    ce = cross_entropy(zs, labels, ignore_index=ignore_index)
    if divergence == "tad":
        kd = terms["tad"]
    elif divergence == "forward_kl":
        kd = forward_kl(zs, zt, temperature=tau, mask=mask)
    elif divergence == "reverse_kl":
        kd = reverse_kl(zs, zt, temperature=tau, mask=mask)
    elif divergence == "jsd":
        kd = jsd(zs, zt, beta=jsd_beta, temperature=tau, mask=mask)
    else:
        kd = torch.zeros(mask.shape, dtype=F64)

    m = mask.to(F64)
    loss = (m * (ce_weight * ce + kd_weight * kd)).sum()

    def msum(x):
        return (m * x).sum().detach()

    with torch.no_grad():
        stats = {
            "valid_count": m.sum(),
            "ce": msum(ce),
            "kd": msum(kd),
            "kl": msum(terms["kl"]),
            "d1": msum(terms["d1"]),
            "at_d2": msum(terms["at_d2"]),
            "a_t": msum(terms["a_t"]),
            "a_s": msum(terms["a_s"]),
            "teacher_entropy": msum(entropy(zt, temperature=tau)),
            "student_entropy": msum(entropy(zs, temperature=tau)),
            "top1_agree": msum((zt.argmax(-1) == zs.argmax(-1)).to(F64)),
            "beta_x": msum(terms["beta_x"]),
        }
    return loss, stats
