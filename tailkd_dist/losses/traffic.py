"""The vocabulary-parallel loss's traffic model: how many numbers per token its collectives
carry, as a function of the loss group's size and the loss settings. Checked against what
``parallel.vocab_parallel.CommCounter`` counts on the wire (tests/test_vocab_parallel.py) and
used by tools/bench_vocab_parallel.py. It lives beside the loss, whose column layout it counts;
the parallel layer below never imports the loss.
"""
from __future__ import annotations

from .divergences import HOOKS
from .rowpass import student_columns, sum_columns, teacher_columns


def loss_numbers_per_token(
    *, group_size: int, k: int, divergence: str, temperature: float = 1.0, prepass: bool | None = None,
    stats: bool = True,
) -> int:
    """Numbers per token in the loss's scalar collectives (what CommCounter.numbers_per_token
    measures), for a loss group of ``group_size`` ranks.

    Every position is seen by three exchanges, whether TAD runs its teacher pre-pass or not
    (``prepass`` only moves the first one earlier): (1) an all-gather, per rank, of the
    teacher's top-(k+1) values, top-k ids, sum of exp, sum of exp beyond its own top-k and a
    non-finite flag (2k+4); (2) an all-gather, per rank, of the student's max, argmax, sum of
    exp and its tail's (max, sum of exp) (5; one more sum of exp at temperature 1 when
    tau != 1, for CE); (3) one SUM all-reduce of the per-token partial sums (5, reverse KL 6,
    JSD 7). So P(2k+9) + 5 at tau = 1 for TAD and forward KL: against the spec's estimate
    (2 + 2Pk + 8) the per-rank sums of exp and tail pieces (9P) replace the MAX of the maxima
    and make both normalisers and both tail masses exact in log space, and the SUM needs 5
    columns instead of 8.

    ``stats=False`` (a step that logs nothing): without TAD the teacher sends its max, sum of
    exp and flag (3) and the student its max and sum of exp (2), the SUM carries no entropies
    and KL in one column: 5P + 2 (+ the divergence's own); TAD keeps K and the tails and drops
    the entropies: P(2k+9) + 3.
    """
    del prepass  # the same traffic either way
    raw = temperature != 1.0
    tails = stats or HOOKS[divergence].needs_tails
    return (group_size * (teacher_columns(k, tails=tails).width + student_columns(raw_ce=raw, tails=tails).width)
            + sum_columns(divergence, stats=stats).width)
