"""Streaming data for tailkd_dist: `tailkd-prepare-data` writes MDS shards; the loader reads them.

- `tailkd_dist.data.prepare`: the prepare tool (corpus -> tokens -> packed rows -> MDS shards).
- `tailkd_dist.data.dataset`: `LoaderConfig`, `make_loader`, `PackedTokenDataset`, `check_compat`.

Submodules are imported on demand, so `import tailkd_dist.data` stays cheap; `streaming` is only
ever imported through `tailkd_dist.data.streaming_compat` (see there why).
"""

MANIFEST = "manifest.json"
"""Written beside the split directories, last: tokenizer, seq_len, source and counts."""
FORMAT = "tailkd-packed-tokens/1"
"""Layout version recorded in the manifest; the loader refuses other layouts."""
MIN_BPE_VOCAB = 256 + 2
"""The smallest vocabulary ``--train-tokenizer`` trains: the 256 byte symbols, EOS and PAD."""


def check_bpe_vocab(vocab_size: int) -> None:
    """ValueError unless ``--train-tokenizer`` can train a byte-level BPE of ``vocab_size``."""
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"--train-tokenizer {vocab_size} is too small: a byte-level BPE needs "
                         f"at least {MIN_BPE_VOCAB} ids (256 bytes + EOS + PAD).")
