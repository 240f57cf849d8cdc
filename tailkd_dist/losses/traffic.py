"""The vocabulary-parallel loss's traffic model: how many numbers per token its collectives
carry, as a function of the loss group's size and the loss settings. Checked against what
``parallel.vocab_parallel.CommCounter`` counts on the wire (tests/test_vocab_parallel.py) and
used by tools/bench_vocab_parallel.py. It lives beside the loss, whose column layout it counts;
the parallel layer below never imports the loss.
"""
from __future__ import annotations

from .fused import partial_names


def loss_numbers_per_token(
    *, group_size: int, k: int, divergence: str, temperature: float = 1.0, prepass: bool | None = None
) -> int:
    """Numbers per token in the loss's scalar collectives (what CommCounter.numbers_per_token
    measures), for a loss group of ``group_size`` ranks.

    Per chunk: (1) all-gather, per rank, of the teacher's top-k values and global ids and its
    sum of exp (2k+1), and the student's max, argmax and sum of exp (3; one more sum of exp at
    temperature 1 when tau != 1, for CE); (2) MAX all-reduce of the teacher's and the student's
    tail maxima (2); (3) one SUM all-reduce of the per-token partial sums (``partial_names``).

    Against the spec's estimate (2 + 2Pk + 8) this is 2Pk + 4P + 2 + 8 (tau = 1, TAD or
    forward KL): the per-rank (max, sum of exp) pairs (4P) replace the spec's MAX of the two
    maxima and make both normalisers exact in one gather; the MAX of the tails' maxima (2)
    keeps log aT / log aS exact in log space; the SUM has 8 columns. Reverse KL adds 1 sum,
    JSD 2, tau != 1 adds P (CE's normaliser at tau = 1).

    With the TAD pre-pass (a document spans chunks) the teacher is seen in row blocks
    that are gone before any exchange, so every rank sends what the tail needs up front:
    the pre-pass gathers, per rank, k+1 values (the (k+1)-th is the maximum of the rank's
    entries outside its own top-k), k ids, the sum of exp, the sum of exp of those outside
    entries and a non-finite flag (2k+4); the main pass gathers the student's max, argmax,
    sum of exp and its tail's local (max, sum of exp) (5, +1 at tau != 1) and SUMs the 5
    common partial sums: P(2k+9) + 5, i.e. 5P - 5 more than one pass, for half the memory.
    """
    raw = 1 if temperature != 1.0 else 0
    if prepass:
        return group_size * ((2 * k + 4) + (5 + raw)) + len(partial_names(divergence, streamed=True))
    return group_size * ((2 * k + 1) + (3 + raw)) + 2 + len(partial_names(divergence, streamed=False))
