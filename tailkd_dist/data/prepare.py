"""`tailkd-prepare-data`: tokenise a corpus, pack it into rows and write MDS shards.

Output layout (OUT is `--output`):
    OUT/manifest.json         tokenizer (path, sha256 of its files, len, eos/pad ids), seq_len,
                              source, per-split counts; written last, so its presence means done
    OUT/train/                MDS shards + index.json (streaming's format)
    OUT/validation/           same, when the split is not empty
    OUT/tokenizer/            only with --train-tokenizer: the trained HF tokenizer directory

Packing: every document is tokenised without special tokens (BOS first with --add-bos), EOS is
appended, documents are concatenated in input order and cut into rows of `seq_len + 1` tokens
(input_ids = row[:-1], labels = row[1:]). Every row also stores the document id of every
position (0, 1, ... within the split). Rows do not overlap, so the one transition across a row
boundary is not trained. The last, partial row of a split is padded with the pad id (the
tokenizer's pad token, else EOS) and document id -1: those positions are never targets, and they
are counted in the padding fraction. Documents with empty text are skipped (and counted).

Everything is written into a temporary sibling directory and moved into place at the end, so a
failure (bad input, Ctrl-C) never leaves a half-written OUT nor touches an existing one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import numpy as np
from tqdm import tqdm

from tailkd_dist import __version__
from tailkd_dist.signals import raise_if_stopping, unwind_on_signals
from tailkd_dist.staging import check_replaceable, owned_tempdir, staged_dir
from tailkd_dist.user_error import ArgumentParser, say_error, whole_number
from tailkd_dist.data import FORMAT, MANIFEST, MIN_BPE_VOCAB, check_bpe_vocab
from tailkd_dist.data.corpus import STDLIB, load_corpus

# `--num-proc N` should mean N cores: parallelism comes from our worker processes, not from the
# fast tokenizer's own thread pool (which also must not have run before workers are forked).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# streaming (torch) and transformers are imported where they are used: together they take
# seconds to import, and `--help` or a bad argument should answer at once.

SHARD_HASH = "xxh64"  # fast; the loader validates downloaded shards with it
_DOCS_PER_TASK = 32  # documents sent to a worker at once: big enough to amortise pickling


@dataclass(kw_only=True)
class PrepareConfig:
    """What to read, how to tokenise and pack it, and where to write the shards."""

    inputs: list[str]
    """Files/globs that `datasets` reads, one `save_to_disk` directory, or ["python-stdlib"]."""
    output: str
    """Output directory (must be absent or empty unless `overwrite`)."""
    seq_len: int = 256
    """Model sequence length; rows hold seq_len + 1 tokens (inputs and shifted labels)."""
    tokenizer: str | None = None
    """HF tokenizer directory (the teacher's). Exactly one of this and `train_tokenizer`."""
    train_tokenizer: int | None = None
    """Vocabulary size of a byte-level BPE to train on the train split (saved in OUT/tokenizer)."""
    text_column: str = "text"
    """Column holding the documents' text (files and save_to_disk inputs)."""
    val_fraction: float = 0.05
    """Fraction of documents (stdlib: files) that go to the validation split, by key hash."""
    max_docs: int | None = None
    """Keep only the first N documents (stdlib: files) of the input, for quick slices."""
    num_proc: int = 1
    """Tokeniser processes (each tokenises single-threaded; the main process packs and writes)."""
    add_bos: bool = False
    """Start every document with the tokenizer's BOS token (for teachers trained that way)."""
    txt_sample_by: str = "document"
    """For .txt inputs: a document is a "document" (whole file), "paragraph" or "line"."""
    shard_size_limit: int | str = "64mb"
    """MDSWriter's size_limit: shard size before a new shard is started."""
    overwrite: bool = False
    """Replace an existing output of this tool (a directory with manifest.json)."""
    progress: bool = True
    """Show tqdm progress bars."""


@dataclass
class SplitStats:
    """Counts of one written split (also stored in manifest.json)."""

    documents: int = 0
    """Documents written (after skipping empty ones)."""
    skipped_empty: int = 0
    """Documents skipped because their text was empty."""
    tokens: int = 0
    """Document tokens written, EOS (and BOS) included, padding excluded."""
    rows: int = 0
    """Rows (samples) of seq_len + 1 tokens."""
    padding_tokens: int = 0
    """Pad positions (doc id -1) in the last row."""
    shards: int = 0
    """MDS shard files."""
    bytes: int = 0
    """Bytes on disk of the split directory (shards and index.json)."""
    padding_fraction: float = 0.0
    """padding_tokens / (rows * (seq_len + 1))."""
    seconds: float = 0.0
    """Wall time of tokenising, packing and writing the split."""


# ---- tokeniser workers -------------------------------------------------------------------------
_worker_tokenizer: Any = None


_STOPS = (signal.SIGTERM, signal.SIGINT)


def _init_worker(tokenizer_dir: str) -> None:
    # Each worker loads the tokenizer from disk: works under fork, spawn and forkserver alike.
    global _worker_tokenizer
    from tailkd_dist.data.tokenizer import load_tokenizer

    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _start_worker(tokenizer_dir: str) -> None:
    # A forked worker inherits the parent's unwind handler, which may raise where Python drops
    # the exception: the worker then lives on past Pool.terminate()'s SIGTERM, blocked on the
    # queue lock the terminating parent holds, and the parent waits for it forever. Workers
    # die of SIGTERM at once and leave Ctrl-C to the parent (the parent blocked both signals
    # across the fork, so none can arrive before this line).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
    _init_worker(tokenizer_dir)


def _encode(texts: list[str]) -> list[np.ndarray]:
    ids = _worker_tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                            verbose=False)["input_ids"]
    return [np.asarray(x, dtype=np.int32) for x in ids]


@contextlib.contextmanager
def _encoder(num_proc: int, tokenizer_dir: str) -> Iterator[Callable]:
    """An ordered `map(_encode, chunks)`: in `num_proc` worker processes, or here when 1."""
    if num_proc == 1:
        _init_worker(tokenizer_dir)
        yield map
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        pool = multiprocessing.Pool(num_proc, _start_worker, (tokenizer_dir,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a signal that came meanwhile arrives now
    try:
        yield pool.imap  # imap keeps document order
    finally:
        pool.terminate()


class _RowPacker:
    """Concatenates documents and writes full rows of `row_len` tokens (plus doc ids)."""

    def __init__(self, writer: Any, *, row_len: int, pad_id: int) -> None:
        self.writer, self.row_len, self.pad_id = writer, row_len, pad_id
        self.tokens: list[np.ndarray] = []
        self.doc_ids: list[np.ndarray] = []
        self.pending = self.rows = self.padding = 0

    def add(self, ids: np.ndarray, doc_id: int) -> None:
        self.tokens.append(ids)
        self.doc_ids.append(np.full(len(ids), doc_id, np.int32))
        self.pending += len(ids)
        if self.pending >= 64 * self.row_len:  # concatenate in blocks, not per document
            self.flush(final=False)

    def flush(self, *, final: bool) -> None:
        if not self.pending:
            return
        tokens, doc_ids = np.concatenate(self.tokens), np.concatenate(self.doc_ids)
        if final and (short := -len(tokens) % self.row_len):
            tokens = np.concatenate([tokens, np.full(short, self.pad_id, np.int32)])
            doc_ids = np.concatenate([doc_ids, np.full(short, -1, np.int32)])
            self.padding += short
        full = len(tokens) // self.row_len
        for r in range(full):
            cut = slice(r * self.row_len, (r + 1) * self.row_len)
            self.writer.write({"tokens": tokens[cut], "doc_ids": doc_ids[cut]})
        self.rows += full
        self.tokens, self.doc_ids = [tokens[full * self.row_len:]], [doc_ids[full * self.row_len:]]
        self.pending = len(self.tokens[0])


def _write_split(texts, *, encode: Callable, out: Path, name: str, tokenizer,
                 config: PrepareConfig, pad_id: int) -> SplitStats:
    from tailkd_dist.data.streaming_compat import MDSWriter

    start, stats = time.perf_counter(), SplitStats()
    row_len = config.seq_len + 1
    columns = {"tokens": f"ndarray:int32:{row_len}", "doc_ids": f"ndarray:int32:{row_len}"}
    prefix = [tokenizer.bos_token_id] if config.add_bos else []
    chunks = ([t or "" for t in batch["text"]] for batch in texts.iter(batch_size=_DOCS_PER_TASK))
    with MDSWriter(out=str(out), columns=columns, hashes=[SHARD_HASH],
                   size_limit=config.shard_size_limit) as writer, \
            tqdm(total=len(texts), unit="doc", desc=f"{name:>10}",
                 disable=not config.progress) as bar:
        packer = _RowPacker(writer, row_len=row_len, pad_id=pad_id)
        for batch in encode(_encode, chunks):
            for ids in batch:
                if not len(ids):
                    stats.skipped_empty += 1
                    continue
                ids = np.concatenate([prefix, ids, [tokenizer.eos_token_id]]).astype(np.int32)
                packer.add(ids, stats.documents)
                stats.documents += 1
                stats.tokens += len(ids)
            bar.update(len(batch))
            raise_if_stopping()
        packer.flush(final=True)
    index = json.loads((out / "index.json").read_text())
    stats.rows, stats.padding_tokens = packer.rows, packer.padding
    stats.shards = len(index["shards"])
    stats.bytes = sum(f.stat().st_size for f in out.iterdir())
    stats.padding_fraction = stats.padding_tokens / max(1, stats.rows * row_len)
    stats.seconds = time.perf_counter() - start
    return stats


def _check_config(config: PrepareConfig) -> Path:
    if config.seq_len < 1:
        raise ValueError(f"--seq-len {config.seq_len} must be at least 1.")
    if config.num_proc < 1:
        raise ValueError(f"--num-proc {config.num_proc} must be at least 1.")
    if config.train_tokenizer is not None:  # before the corpus is read: a large one takes minutes
        check_bpe_vocab(config.train_tokenizer)
    if (config.tokenizer is None) == (config.train_tokenizer is None):
        raise ValueError("pass exactly one of --tokenizer DIR (an HF tokenizer, e.g. the "
                         "teacher's) and --train-tokenizer VOCAB (train a byte-level BPE).")
    # Inputs that are local files or directories must stay apart from the output (a replaced
    # output would delete them); names of built-in corpora and globs are not paths.
    inputs = [("the input", p) for p in config.inputs if os.path.exists(p)]
    return check_replaceable(config.output, overwrite=config.overwrite, marker=MANIFEST,
                             producer="tailkd-prepare-data", keep_apart=inputs)


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Run the whole preparation; returns the manifest. Bad input raises ValueError."""
    out = _check_config(config)
    bars = datasets.is_progress_bar_enabled()
    if not config.progress:
        datasets.disable_progress_bars()
    try:
        return _prepare(config, out)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _prepare(config: PrepareConfig, out: Path) -> dict[str, Any]:
    # datasets' cache of the corpus: removed on exit, or by the next run if this one is killed
    cache = owned_tempdir("tailkd-prepare-cache-")
    try:
        return _prepare_cached(config, out, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _prepare_cached(config: PrepareConfig, out: Path, cache: Path) -> dict[str, Any]:
    corpus = load_corpus(config.inputs, text_column=config.text_column,
                         max_docs=config.max_docs, val_fraction=config.val_fraction,
                         txt_sample_by=config.txt_sample_by, cache_dir=cache)
    if len(corpus.train) == 0:
        raise ValueError(f"the input {' '.join(config.inputs)} holds no documents: "
                         "check the files (or the glob) you passed.")
    if config.val_fraction > 0 and corpus.validation is None:
        raise ValueError(f"--val-fraction {config.val_fraction} selected no validation "
                         f"document out of {len(corpus.train)}: use more documents or "
                         "--val-fraction 0.")
    with staged_dir(out) as staging:  # --overwrite was checked above
        return _prepare_into(staging, corpus, config)


def _prepare_into(staging: Path, corpus, config: PrepareConfig) -> dict[str, Any]:
    from tailkd_dist.data.tokenizer import load_tokenizer, tokenizer_sha256, train_bpe_tokenizer

    if config.train_tokenizer is not None:
        tokenizer_dir = staging / "tokenizer"
        texts = (t for b in corpus.train.iter(batch_size=256) for t in b["text"] if t)
        train_bpe_tokenizer(texts, vocab_size=config.train_tokenizer, out_dir=tokenizer_dir)
    else:
        tokenizer_dir = Path(config.tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir)
    if config.add_bos and tokenizer.bos_token_id is None:
        raise ValueError(f"--add-bos, but the tokenizer in {tokenizer_dir} has no BOS token.")
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    splits: dict[str, SplitStats] = {}
    with _encoder(config.num_proc, str(tokenizer_dir)) as encode:
        for name, texts in (("train", corpus.train), ("validation", corpus.validation)):
            if texts is None:
                continue
            splits[name] = _write_split(texts, encode=encode, out=staging / name, name=name,
                                        tokenizer=tokenizer, config=config, pad_id=pad_id)
            if splits[name].rows == 0:
                raise ValueError(f"the {name} split has no non-empty document: the input's "
                                 f"{config.text_column!r} column is empty.")
    trained = config.train_tokenizer is not None
    manifest = {
        "format": FORMAT,
        "created_by": f"tailkd_dist {__version__}",
        "seq_len": config.seq_len,
        "columns": {"tokens": f"ndarray:int32:{config.seq_len + 1}",
                    "doc_ids": f"ndarray:int32:{config.seq_len + 1}"},
        "shard_hashes": [SHARD_HASH],
        "tokenizer": {
            "name": "tokenizer" if trained else tokenizer.name_or_path,
            "path": "tokenizer" if trained else str(Path(tokenizer_dir).resolve()),
            "trained": trained,
            "sha256": tokenizer_sha256(tokenizer_dir),
            "vocab_size": len(tokenizer),
            "eos_id": tokenizer.eos_token_id,
            "pad_id": pad_id,
            "bos_id": tokenizer.bos_token_id if config.add_bos else None,
        },
        "padding": "last row of each split padded with pad_id, doc id -1 (never a target)",
        "source": corpus.source,
        "splits": {n: {k: v for k, v in asdict(s).items() if k != "seconds"}
                   for n, s in splits.items()},
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _print_summary(config, splits)
    return manifest


def _print_summary(config: PrepareConfig, splits: dict[str, SplitStats]) -> None:
    print(f"\nwrote {config.output} (seq_len {config.seq_len})")
    print(f"{'split':<11}{'documents':>10}{'tokens':>12}{'rows':>9}{'shards':>7}{'bytes':>13}"
          f"{'padding':>9}{'tokens/s':>11}")
    for name, s in splits.items():
        print(f"{name:<11}{s.documents:>10,}{s.tokens:>12,}{s.rows:>9,}{s.shards:>7}{s.bytes:>13,}"
              f"{s.padding_fraction:>9.3%}{s.tokens / max(s.seconds, 1e-9):>11,.0f}")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="tailkd-prepare-data",
        description="Tokenise a corpus, pack it into rows of seq_len+1 tokens and write MDS "
        "shards (train/, validation/, manifest.json) for tailkd_dist.data's loader.")
    p.add_argument("inputs", nargs="+", help=f"files or globs (jsonl/json/parquet/csv/txt), a "
                   f"save_to_disk directory, or {STDLIB!r}")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--seq-len", type=whole_number(), default=256, help="model sequence length (default 256)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="DIR", help="HF tokenizer directory (the teacher's)")
    tok.add_argument("--train-tokenizer", metavar="VOCAB", type=whole_number(MIN_BPE_VOCAB),
                     help="train a byte-level BPE of this vocabulary size on the train split")
    p.add_argument("--text-column", default="text", help="column with the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of documents (stdlib: files) for validation (default 0.05)")
    p.add_argument("--max-docs", "--max-files", dest="max_docs", type=whole_number(),
                   help="keep only the first N documents (python-stdlib: files)")
    p.add_argument("--num-proc", type=whole_number(), default=1, help="tokeniser processes (default 1)")
    p.add_argument("--add-bos", action="store_true", help="start each document with BOS")
    p.add_argument("--txt-sample-by", default="document", choices=["document", "paragraph", "line"],
                   help="for .txt inputs: what one document is (default: a whole file)")
    p.add_argument("--shard-size-limit", default="64mb", help="shard size (default 64mb)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output of this tool (directory with manifest.json)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 on bad input, with one clear message)."""
    args = build_parser().parse_args(argv)
    limit = args.shard_size_limit
    limit = int(limit) if limit.isdigit() else limit  # bytes, or streaming's "64mb" form
    config = PrepareConfig(**{**vars(args), "shard_size_limit": limit})
    with unwind_on_signals("tailkd-prepare-data"):
        try:
            prepare(config)
        except ValueError as error:
            say_error("tailkd-prepare-data", error)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
