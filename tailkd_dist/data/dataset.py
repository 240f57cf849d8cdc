"""Loader over the shards of `tailkd-prepare-data`, built on `streaming.StreamingDataset`.

Each sample (int64 tensors of [seq_len], from a row of seq_len + 1 tokens):
- `input_ids` = tokens[:-1];
- `labels` = tokens[1:], and -100 where position i has no target: the next token is padding
  or belongs to another document. EOS carries the id of the document it closes, so the token
  before EOS has EOS as its target (the model learns to end documents), while the EOS position
  itself, whose next token starts a new document, has none;
- `doc_ids` = the document id of every input position (-1 for padding), for per-document losses
  and per-document attention masks;
- `position_ids` = 0, 1, ... restarting at every document start and at the start of the row (a
  document continued from the previous row is a new segment, since attention cannot reach it);
- `sample_idx` = the row's global index (scalar), for logging and exactly-once checks.

Distributed: streaming decides which samples a rank reads from the environment variables RANK,
WORLD_SIZE and LOCAL_WORLD_SIZE (torchrun sets them; under `srun`, set them from SLURM_PROCID,
SLURM_NTASKS and the tasks per node first), not from torch.distributed. `PackedTokenDataset`
checks that they agree with an initialised process group, so ranks never silently read the same
data. With `replication=k`, each group of k consecutive ranks (a tensor/sequence-parallel group)
reads the same samples. When
the number of rows is not divisible by the number of ranks, streaming repeats a few rows (fewer
than the number of ranks) so that all ranks take the same number of steps.

Resume: `loader.state_dict()` (StreamingDataLoader's: epoch, sample_in_epoch, shuffle seed,
canonical nodes; a few integers) is what a checkpoint stores; `loader.load_state_dict(state)`
before iterating continues with exactly the samples not yet seen, on the same or a different
number of ranks (streaming's elastic deterministic order).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from tailkd_dist.data import FORMAT, MANIFEST
from tailkd_dist.data.streaming_compat import (
    StreamingDataLoader,
    StreamingDataset,
    get_hash,
)
from tailkd_dist.data.remote import fetch_file, init_streaming
from tailkd_dist.data.streaming_residue import remove_dead_streaming_state
from tailkd_dist.data.tokenizer import tokenizer_sha256 as hash_tokenizer_files
from tailkd_dist.staging import read_json

IGNORE_INDEX = -100


@dataclass(kw_only=True)
class LoaderConfig:
    """Where the shards are, how to batch and shuffle them, and what they must fit."""

    local: str
    """Shard directory (no `remote`), or the local cache (with `remote`); one per running job."""
    remote: str | None = None
    """Where the shards live when not local: s3://..., gs://..., or another directory."""
    split: str = "train"
    """Split subdirectory to read (train or validation)."""
    batch_size: int = 8
    """Samples per batch on each rank."""
    shuffle: bool = True
    """Deterministic shuffle (streaming's py1e); the order depends only on `seed` and the epoch."""
    seed: int = 9176
    """Shuffle seed."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    drop_last: bool = False
    """Drop a rank's last, smaller batch of the epoch."""
    validate_hash: str | None = "xxh64"
    """Hash checked on every shard streaming downloads from `remote` (as written by prepare)."""
    local_check: str = "hash"
    """Shards already on local disk: "hash" (size and hash), "size" (cheap; catches truncation)
    or "off". streaming itself never re-checks local files, so this is the only check they get."""
    tokenizer_dir: str | None = None
    """The model's tokenizer directory: refuse shards tokenised with another tokenizer."""
    tokenizer_sha256: str | None = None
    """Or the expected sha256 of the tokenizer files directly (as in manifest.json)."""
    model_vocab_size: int | None = None
    """The model's vocabulary size: refuse shards whose tokenizer has more ids."""
    num_canonical_nodes: int | None = None
    """streaming's canonical nodes (default: physical nodes of the first run; kept on resume)."""
    replication: int | None = None
    """Consecutive ranks that read the same samples (the tensor-parallel group size), or None."""
    download_timeout: float = 60.0
    """Seconds allowed per shard download from `remote`."""
    teacher_cache: str | None = None
    """A teacher cache of these shards (local directory): each sample also gets its row's
    ``teacher_hidden`` [seq_len, d] (data/teacher_cache.py)."""
    teacher_cache_remote: str | None = None
    """Where the teacher cache lives when not local: its files are fetched into `teacher_cache`."""


def read_manifest(
    *, local: str, remote: str | None = None, timeout: float = 60.0
) -> dict[str, Any]:
    """manifest.json of a prepared dataset (fetched from `remote` into `local` when given)."""
    path = Path(local) / MANIFEST
    if remote is not None:
        fetch_file(remote, MANIFEST, local, timeout=timeout, written_by="tailkd-prepare-data")
    if not path.is_file():
        raise ValueError(f"{path} does not exist: {local} was not written by tailkd-prepare-data, "
                         "or its preparation did not finish (manifest.json is written last).")
    manifest = read_json(path, fix="prepare the data again")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}"
        raise ValueError(f"{path} describes format {found!r}, this loader reads "
                         f"{FORMAT!r}: prepare the data again with this version.")
    _check_manifest_fields(manifest, path)
    return manifest


def _is_count(x: Any, *, positive: bool = False) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= (1 if positive else 0)


def _check_manifest_fields(manifest: dict, path: Path) -> None:
    """The fields this package reads, with their types: an edited or damaged manifest is named
    here instead of failing later inside the loader."""
    tok, splits = manifest.get("tokenizer"), manifest.get("splits")
    checks = [
        ("seq_len", manifest.get("seq_len"), _is_count(manifest.get("seq_len"), positive=True), "a positive integer"),
        ("tokenizer", tok, isinstance(tok, dict), "a mapping"),
        ("splits", splits, isinstance(splits, dict) and bool(splits), "a mapping of split names"),
    ]
    if isinstance(tok, dict):
        checks += [
            ("tokenizer.sha256", tok.get("sha256"), isinstance(tok.get("sha256"), str), "a string"),
            ("tokenizer.name", tok.get("name"), isinstance(tok.get("name"), str), "a string"),
            ("tokenizer.vocab_size", tok.get("vocab_size"), _is_count(tok.get("vocab_size"), positive=True),
             "a positive integer"),
        ]
    if isinstance(splits, dict):
        for name, split in splits.items():
            rows = split.get("rows") if isinstance(split, dict) else None
            checks.append((f"splits.{name}.rows", rows, _is_count(rows), "an integer >= 0"))
    for key, value, ok, want in checks:
        if not ok:
            raise ValueError(f"{path}: field {key!r} = {value!r} is not {want}: the manifest is damaged "
                             "or was edited; prepare the data again.")


def read_index(index_path: Path, *, fix: str = "prepare the data again") -> list[dict]:
    """The shard list of a split's index.json (streaming's format), each with its ``raw_data``
    basename and byte size; damage -> one ValueError naming the file."""
    index = read_json(index_path, fix=fix)
    shards = index.get("shards") if isinstance(index, dict) else None
    ok = isinstance(shards, list) and all(
        isinstance(sh, dict) and isinstance(sh.get("raw_data"), dict)
        and isinstance(sh["raw_data"].get("basename"), str) and _is_count(sh["raw_data"].get("bytes"))
        for sh in shards)
    if not ok:
        raise ValueError(f"{index_path} is not a shard index (a 'shards' list, each with raw_data basename and "
                         f"bytes): the file is damaged; {fix}.")
    return shards


def check_compat(
    manifest: dict[str, Any],
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    tokenizer_sha256: str | None = None,
    model_vocab_size: int | None = None,
) -> None:
    """Refuse (ValueError) shards that do not fit the model: other tokenizer, or too many ids."""
    tok = manifest["tokenizer"]
    expected = tokenizer_sha256 or (hash_tokenizer_files(tokenizer_dir) if tokenizer_dir else None)
    if expected is not None and tok["sha256"] != expected:
        mine = f"the tokenizer in {tokenizer_dir}" if tokenizer_dir else "the expected tokenizer"
        raise ValueError(
            f"the shards were tokenised with {tok['name']!r} (files sha256 "
            f"{tok['sha256'][:16]}…), but {mine} has sha256 {expected[:16]}…: token ids would "
            "mean other tokens. Prepare the data again with --tokenizer set to the model's "
            "tokenizer directory.")
    if model_vocab_size is not None and tok["vocab_size"] > model_vocab_size:
        raise ValueError(
            f"the shards' tokenizer has {tok['vocab_size']} ids but the model's vocabulary has "
            f"{model_vocab_size}: ids >= {model_vocab_size} would index past the embedding. "
            "Use a model with a large enough vocabulary, or prepare the data with its tokenizer.")


def _check_world_env() -> None:
    """streaming reads the world from the environment; make sure it matches torch.distributed."""
    if "LOCAL_WORLD_SIZE" not in os.environ and "LOCAL_SIZE" in os.environ:
        os.environ["LOCAL_WORLD_SIZE"] = os.environ["LOCAL_SIZE"]  # the deepspeed launcher's name
    # streaming's defaults when a variable is unset: rank 0 of 1, one rank per node.
    env = {k: os.environ.get(k, d) for k, d in
           (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", None))}
    if dist.is_available() and dist.is_initialized():
        actual = {"RANK": str(dist.get_rank()), "WORLD_SIZE": str(dist.get_world_size())}
        if any(env[k] != v for k, v in actual.items()):
            raise ValueError(
                f"torch.distributed runs rank {actual['RANK']} of {actual['WORLD_SIZE']}, but the "
                f"environment says RANK={env['RANK']} WORLD_SIZE={env['WORLD_SIZE']}: streaming "
                "assigns samples by the environment, so set RANK, WORLD_SIZE and "
                "LOCAL_WORLD_SIZE (torchrun does) before building the loader.")
    if int(env["WORLD_SIZE"]) > 1 and env["LOCAL_WORLD_SIZE"] is None:
        raise ValueError("WORLD_SIZE > 1 but LOCAL_WORLD_SIZE (ranks per node) is not set: "
                         "streaming needs it to coordinate the ranks of a node; torchrun sets it.")


def check_local_shards(split_dir: Path, *, remote: str | None, mode: str, algo: str | None) -> None:
    """Report a missing (no remote), truncated or (mode "hash") corrupt local shard by name.

    streaming checks hashes only when it downloads a shard from `remote`; files already on local
    disk (all of them without a remote) are trusted, so this is the only check they get.
    """
    index_path = split_dir / "index.json"
    if not index_path.is_file():
        if remote is None:
            raise ValueError(f"{index_path} is missing: {split_dir} holds no prepared shards.")
        return  # nothing cached yet: streaming fetches the index and checks what it downloads
    fix = "delete it from the cache so it is fetched again" if remote else "prepare the data again"
    for shard in read_index(index_path, fix=fix):
        raw = shard["raw_data"]
        path = split_dir / raw["basename"]
        if not path.is_file():
            if remote is None:
                raise ValueError(f"shard {path} is missing (listed in {index_path}): restore it "
                                 "or prepare the data again.")
            continue  # streaming downloads (and hash-checks) it when it is needed
        if mode == "off":
            continue
        if path.stat().st_size != raw["bytes"]:
            raise ValueError(f"shard {path} is truncated or damaged: {path.stat().st_size} bytes, "
                             f"{index_path} says {raw['bytes']}; {fix}.")
        if mode == "hash" and algo in raw.get("hashes", {}):
            if get_hash(algo, path.read_bytes()) != raw["hashes"][algo]:
                raise ValueError(f"shard {path} fails its {algo} check (corrupt); {fix}.")


def _sample(tokens: np.ndarray, doc_ids: np.ndarray) -> dict[str, torch.Tensor]:
    tokens, doc_ids = tokens.astype(np.int64), doc_ids.astype(np.int64)
    d_in, d_next = doc_ids[:-1], doc_ids[1:]
    labels = np.where((d_in == d_next) & (d_in >= 0), tokens[1:], IGNORE_INDEX)
    index = np.arange(len(d_in))
    starts = np.r_[True, d_in[1:] != d_in[:-1]]
    position_ids = index - np.maximum.accumulate(np.where(starts, index, 0))
    arrays = {"input_ids": tokens[:-1], "labels": labels, "doc_ids": d_in,
              "position_ids": position_ids}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


class PackedTokenDataset(StreamingDataset):
    """StreamingDataset over one split of prepared shards, yielding samples (see the module)."""

    def __init__(self, *, config: LoaderConfig) -> None:
        if config.local_check not in ("hash", "size", "off"):
            raise ValueError(f"local_check={config.local_check!r}: use 'hash', 'size' or 'off'.")
        _check_world_env()
        # What earlier runs on this node left (a killed run: everything; any run: its locks).
        remove_dead_streaming_state()
        self.config = config
        self.manifest = read_manifest(local=config.local, remote=config.remote,
                                      timeout=config.download_timeout)
        check_compat(self.manifest, tokenizer_dir=config.tokenizer_dir,
                     tokenizer_sha256=config.tokenizer_sha256,
                     model_vocab_size=config.model_vocab_size)
        splits = self.manifest["splits"]
        if config.split not in splits:
            raise ValueError(f"{config.remote or config.local} has no split {config.split!r} "
                             f"(it has {', '.join(splits)}).")
        if not splits[config.split]["rows"]:  # prepare refuses this; guard against edited data
            raise ValueError(f"split {config.split!r} of {config.remote or config.local} is empty.")
        self.seq_len: int = self.manifest["seq_len"]
        # A teacher cache (data/teacher_cache.py): each sample also gets its row's hidden states.
        self.teacher_cache: dict | None = None
        if config.teacher_cache is not None:
            from tailkd_dist.data.teacher_cache import read_cache_manifest

            self.teacher_cache = read_cache_manifest(config.teacher_cache, remote=config.teacher_cache_remote,
                                                     timeout=config.download_timeout)["teacher_cache"]
            rows = self.teacher_cache["splits"].get(config.split, {}).get("rows")
            if rows != splits[config.split]["rows"]:
                raise ValueError(f"teacher cache {config.teacher_cache_remote or config.teacher_cache} holds {rows} "
                                 f"rows of split {config.split!r}, the token shards {splits[config.split]['rows']}: "
                                 "it was made from other shards")
            self._cache_rows = None  # a local cache: opened on first use, in the process that reads
            if config.teacher_cache_remote is not None:
                # streaming fetches (and hash-checks) each shard of the cache when a row of it
                # is first read; random access by row index, so no shuffle of its own.
                self._cache_rows = init_streaming(
                    remote=config.teacher_cache_remote, local=config.teacher_cache, split=config.split,
                    shuffle=False, batch_size=config.batch_size, validate_hash=config.validate_hash,
                    download_timeout=config.download_timeout, num_canonical_nodes=config.num_canonical_nodes,
                    replication=config.replication)
        self._shard_error: Exception | None = None
        # Before streaming allocates shared memory, so a bad shard fails cleanly and early.
        check_local_shards(Path(config.local, config.split), remote=config.remote,
                           mode=config.local_check, algo=config.validate_hash)
        init_streaming(
            remote=config.remote, local=config.local, split=config.split,
            batch_size=config.batch_size, shuffle=config.shuffle, shuffle_seed=config.seed,
            validate_hash=config.validate_hash, download_timeout=config.download_timeout,
            num_canonical_nodes=config.num_canonical_nodes, replication=config.replication, dataset=self)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        # streaming downloads in a background thread; when that thread fails, its iterator just
        # stops (a silently short epoch). Record the failure, with the shard's name, and raise it
        # from __iter__ instead.
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as error:
            name = self.shards[shard_id].file_pairs[0][0].basename
            where = f"{self.config.remote or self.config.local}/{self.config.split}/{name}"
            self._shard_error = ValueError(f"shard {where} cannot be read ({error}): restore or "
                                           "re-create it (prepare the data again).")
            raise self._shard_error from error

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        yield from super().__iter__()
        if self._shard_error is not None:
            raise self._shard_error

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        row = super().__getitem__(idx)
        sample = {**_sample(row["tokens"], row["doc_ids"]), "sample_idx": torch.tensor(idx)}
        if self.teacher_cache is not None:
            from tailkd_dist.data.teacher_cache import MDSRows, hidden_of

            if self._cache_rows is None:
                self._cache_rows = MDSRows(Path(self.config.teacher_cache), self.config.split)
            cached = self._cache_rows[idx]
            if not np.array_equal(cached["tokens"], row["tokens"]):
                where = self.config.teacher_cache_remote or self.config.teacher_cache
                raise ValueError(f"teacher cache {where}: row {idx} of split {self.config.split!r} "
                                 "holds other tokens than the token shards' row: the cache was made from other shards")
            c = self.teacher_cache
            sample["teacher_hidden"] = hidden_of(cached, seq_len=self.seq_len, d=c["d"], dtype=c["dtype"])
        return sample


def make_loader(config: LoaderConfig) -> StreamingDataLoader:
    """A StreamingDataLoader over `PackedTokenDataset(config)`; the dataset is `loader.dataset`.

    Checkpoint `loader.state_dict()`; to resume, call `loader.load_state_dict(state)` on a new
    loader before iterating it.
    """
    dataset = PackedTokenDataset(config=config)
    return StreamingDataLoader(dataset, batch_size=config.batch_size,
                               num_workers=config.num_workers, drop_last=config.drop_last,
                               persistent_workers=config.num_workers > 0)
