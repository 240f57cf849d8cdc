"""Distillation losses: TAD (tail-aware divergence), forward/reverse KL, JSD and CE.

Dense forms work on full logits (references, small vocabularies); the fused form works from
hidden states and lm_head weights, chunk by chunk, optionally vocabulary-parallel.
Specification: ``docs/loss.md``.
"""
from .common import DIVERGENCES, topk_lowest_index
from .dense import cross_entropy, forward_kl, jsd, reverse_kl, tad_divergence, tad_terms
from .fused import STAT_KEYS, default_chunk_size, fused_linear_distill, group_chunk_size

__all__ = [
    "DIVERGENCES", "STAT_KEYS", "cross_entropy", "default_chunk_size", "forward_kl", "fused_linear_distill", "group_chunk_size", "jsd",
    "reverse_kl", "tad_divergence", "tad_terms", "topk_lowest_index",
]
