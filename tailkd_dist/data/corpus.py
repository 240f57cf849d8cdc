"""Inputs of the prepare tool, as `datasets.Dataset`s with one `text` column per split.

Three kinds of input:
- local files that `datasets` reads (jsonl/json/parquet/csv/txt, optionally .gz/.bz2/.xz/.zst
  compressed; one or many paths or globs, all of one format), with a text column;
- a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- `python-stdlib`: the .py files of the running Python's standard library, found through
  `sysconfig` (real text that every machine has; the demo and the tests use it).

Train/validation split: a document goes to validation when a hash of its key (the file's path
relative to the stdlib root, or the row number for datasets inputs) falls below `val_fraction`.
A hash threshold rather than "the first n%" keeps a document's split stable when the corpus grows
(a new Python version adds files; more rows are appended). A DatasetDict that already has a
`validation` split is used as it is.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

STDLIB = "python-stdlib"
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
             ".txt": "text"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
# Tests, vendored third-party packages and bytecode caches are not "the standard library's source".
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    """The documents of each split, and a JSON-able description of where they came from."""

    train: datasets.Dataset
    """Training documents, one `text` column, in input order."""
    validation: datasets.Dataset | None
    """Validation documents (None when `val_fraction` is 0 and the input has no such split)."""
    source: dict[str, Any] = field(default_factory=dict)
    """What was read, recorded in manifest.json (kind, files or directory, column, options)."""


def is_validation(key: str, val_fraction: float) -> bool:
    """Deterministic split by the first 8 bytes of sha256(key), read as a fraction of 2**64."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < val_fraction * 2**64


def stdlib_files(max_files: int | None = None) -> tuple[Path, list[str]]:
    """The stdlib root and its .py files (relative paths, sorted; the first `max_files`)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        rel = Path(dirpath).relative_to(root)
        files += [(rel / f).as_posix() for f in filenames
                  if f.endswith(".py") and not f.startswith("test_")]
    return root, sorted(files)[:max_files]


def _split(keys: list[str], val_fraction: float) -> tuple[list[int], list[int]]:
    val = [i for i, k in enumerate(keys) if is_validation(k, val_fraction)]
    val_set = set(val)
    return [i for i in range(len(keys)) if i not in val_set], val


def _load_stdlib(*, max_docs: int | None, val_fraction: float) -> Corpus:
    root, files = stdlib_files(max_docs)
    texts = []
    for rel in files:
        # Every stdlib source outside the test dirs is UTF-8 (PEP 3120); replace, never crash.
        texts.append((root / rel).read_text(encoding="utf-8", errors="replace"))
    train, val = _split(files, val_fraction)
    source = {"kind": STDLIB, "root": str(root), "python": sysconfig.get_python_version(),
              "files": len(files), "max_files": max_docs, "val_fraction": val_fraction}
    as_ds = lambda idx: datasets.Dataset.from_dict({"text": [texts[i] for i in idx]})  # noqa: E731
    return Corpus(as_ds(train), as_ds(val) if val else None, source)


def _expand(inputs: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in inputs:
        magic = glob.has_magic(pattern)
        matches = sorted(glob.glob(pattern, recursive=True)) if magic else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ValueError(f"input {pattern!r} matches no file: pass existing files or globs, "
                             f"a save_to_disk directory, or {STDLIB!r}.")
        for m in matches:
            if os.path.getsize(m) == 0:  # datasets fails on these with an empty message
                raise ValueError(f"input file {m} is empty: it holds no documents; remove it "
                                 "from the inputs.")
        files += matches
    return files


def _builder(path: str) -> str:
    ext = next((e for e in _COMPRESSED if path.endswith(e)), "")
    builder = _BUILDERS.get(os.path.splitext(path[: len(path) - len(ext)])[1].lower())
    if builder is None:
        raise ValueError(f"cannot tell the format of {path}: inputs must end in "
                         f"{', '.join(_BUILDERS)} (optionally {', '.join(_COMPRESSED)}).")
    return builder


def load_corpus(
    inputs: list[str],
    *,
    text_column: str = "text",
    max_docs: int | None = None,
    val_fraction: float = 0.05,
    txt_sample_by: str = "document",
    cache_dir: str | None = None,
) -> Corpus:
    """Read the input into train/validation splits (see the module docstring).

    `max_docs` keeps the first documents (stdlib: files) before splitting, for quick slices.
    `txt_sample_by` is datasets' `sample_by` for .txt files: "document" (a file is a document),
    "paragraph" or "line". `cache_dir` receives datasets' Arrow cache (prepare uses a temporary
    directory, so nothing is left in ~/.cache).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction {val_fraction} must be in [0, 1).")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"--max-docs {max_docs} must be at least 1 (or omitted).")
    if inputs == [STDLIB]:
        return _load_stdlib(max_docs=max_docs, val_fraction=val_fraction)
    if not inputs:
        raise ValueError(f"no input given: pass files, a save_to_disk directory, or {STDLIB!r}.")

    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        try:
            loaded = datasets.load_from_disk(inputs[0])
        except Exception as error:
            raise ValueError(f"{inputs[0]} is a directory but not a `save_to_disk` dataset "
                             f"({error}): pass files or a glob like {inputs[0]}/*.jsonl."
                             ) from error
        source = {"kind": "save_to_disk", "path": os.path.abspath(inputs[0])}
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{inputs[0]} has splits {list(loaded)} but no 'train' split.")
            train, validation = loaded["train"], loaded.get("validation")
        else:
            train, validation = loaded, None
    else:
        files = _expand(inputs)
        builders = {_builder(f) for f in files}
        if len(builders) > 1:
            raise ValueError(f"inputs mix formats ({', '.join(sorted(builders))}): prepare one "
                             "format at a time.")
        builder = builders.pop()
        kwargs = {"sample_by": txt_sample_by} if builder == "text" else {}
        try:
            train = datasets.load_dataset(builder, data_files=files, split="train",
                                          cache_dir=cache_dir, **kwargs)
        except Exception as error:  # datasets wraps parse errors in DatasetGenerationError
            cause = error
            while cause.__cause__ is not None:
                cause = cause.__cause__
            why = f"{error} ({type(cause).__name__}: {cause})" if cause is not error else error
            raise ValueError(f"cannot read {', '.join(files)} as {builder}: {why}. Check that "
                             "the files are valid and of the format their extension says."
                             ) from error
        validation = None
        source = {"kind": "files", "format": builder, "files": [os.path.abspath(f) for f in files]}

    for name, ds in (("train", train), ("validation", validation)):
        if ds is None:
            continue
        if text_column not in ds.column_names:
            raise ValueError(f"the {name} input has no column {text_column!r} (columns: "
                             f"{', '.join(ds.column_names)}): pass --text-column NAME.")
        dtype = getattr(ds.features[text_column], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise ValueError(f"column {text_column!r} holds {ds.features[text_column]}, not text: "
                             "pass the column with the documents' text as --text-column.")
    select = lambda ds: ds.select_columns([text_column]).rename_columns(  # noqa: E731
        {text_column: "text"} if text_column != "text" else {})
    train = select(train)
    if max_docs is not None:
        train = train.select(range(min(max_docs, len(train))))
    if validation is None:
        train_idx, val_idx = _split([str(i) for i in range(len(train))], val_fraction)
        if val_idx:
            train, validation = train.select(train_idx), train.select(val_idx)
    else:
        validation = select(validation)
    source.update(text_column=text_column, max_docs=max_docs, val_fraction=val_fraction)
    return Corpus(train, validation, source)
