"""Tokenisers for the data path: load an HF tokenizer directory, or train a byte-level BPE.

The hash that identifies a tokenizer (`tokenizer_sha256`) covers only the tokenizer's own files,
so a teacher's model directory (weights, config.json next to tokenizer.json) hashes the same as a
directory holding just its tokenizer. It is a hash of bytes: re-saving the same tokenizer with
another transformers version may rewrite tokenizer_config.json and change it; pass the expected
hash explicitly (`check_compat(tokenizer_sha256=...)`) when that happens.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tailkd_dist.data import check_bpe_vocab

# Every file name an HF tokenizer may be saved as (fast, BPE, WordPiece, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def tokenizer_sha256(tokenizer_dir: str | os.PathLike) -> str:
    """sha256 of what token ids MEAN for the tokenizer in `tokenizer_dir`: every token string
    with its id (added and special tokens included), in id order.

    Not a hash of the files' bytes: the same tokenizer re-saved by another transformers version
    (or copied into a model directory by `save_pretrained`) writes different bytes but maps ids
    to the same tokens, which is all that token-level distillation and the shards need."""
    root = Path(tokenizer_dir)
    if not any((root / n).is_file() for n in TOKENIZER_FILES):
        raise ValueError(
            f"{root} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}): "
            "pass a directory written by `tokenizer.save_pretrained`."
        )
    tokenizer = load_tokenizer(root)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = sorted(tokenizer.all_special_tokens)
    digest = hashlib.sha256(json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode())
    return digest.hexdigest()


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load an HF tokenizer directory offline; it must have an EOS token (documents end with it)."""
    if not Path(tokenizer_dir).is_dir():
        raise ValueError(f"tokenizer directory {tokenizer_dir} does not exist: pass an HF "
                         "tokenizer directory, or --train-tokenizer VOCAB to train one.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as error:  # transformers raises OSError/ValueError/... depending on the file
        raise ValueError(f"cannot load the tokenizer in {tokenizer_dir}: {error}") from error
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {tokenizer_dir} has no EOS token, which ends every "
                         "document: set eos_token in its tokenizer_config.json.")
    return tokenizer


def train_bpe_tokenizer(
    texts: Iterable[str], *, vocab_size: int, out_dir: str | os.PathLike
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style) on `texts` and save it as an HF tokenizer directory.

    Ids 0 and 1 are EOS and PAD; `vocab_size` counts them and the 256 byte symbols, so
    `len(tokenizer) <= vocab_size` and a model with that vocabulary can embed every id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_bpe_vocab(vocab_size)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=1 << 30,  # documents are packed by us, never truncated by the tokenizer
    )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
