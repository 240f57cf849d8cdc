"""The teacher cache's format: per row of the token shards, the teacher's final hidden state at
every position (the input of its lm_head, logit scale folded in), plus the teacher's lm_head
once. docs/teacher-cache.md explains why a hidden state and not top-k log-probabilities.

Layout (``models.teacher.cache``, written by ``tailkd-cache-teacher``)::

    manifest.json              {"teacher_cache": {...}}: kind, d, dtype, seq_len, rows per split,
                               the teacher's config, what the cache was made from; written last
    teacher_head.safetensors   "weight" [V, d] (+ "bias" [V]) of the teacher's lm_head
    <split>/index.json         streaming's index over the pieces (merged once every piece is done)
    <split>/NNNNNN/            piece NNNNNN: rows [N * piece_rows, (N + 1) * piece_rows) of the
                               split, an MDS dataset of its own: "tokens" and "teacher_hidden"

Row i of a split of the cache belongs to row i of the same split of the token shards. The
trainer's loader still streams (and shuffles, and resumes) the token shards; each sample it
reads fetches its cache row by index and checks that the tokens agree. The order therefore does
not depend on how the cache is cut into shards, whose rows are a thousand times larger.
``teacher_hidden`` is a flat ndarray of seq_len x d values in the dtype the online teacher hands
the loss ("float32", or "bfloat16" stored as its 16-bit pattern in uint16, which MDS lacks).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tailkd_dist.data import MANIFEST
from tailkd_dist.staging import read_json

KIND = "hidden"
HEAD_FILE = "teacher_head.safetensors"
COLUMN = "teacher_hidden"
DTYPES = {"float32": (torch.float32, "float32"), "bfloat16": (torch.bfloat16, "uint16")}
"""cache dtype -> (torch dtype the loss receives, the MDS ndarray type that stores it)"""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


_VOLATILE = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures",
             "_attn_implementation_autoset", "_attn_implementation")


def stable_config(config: dict) -> dict:
    """A model config without what a re-save, a version or the loading changes: what the
    cache records and what identifies a teacher."""
    return {k: v for k, v in config.items() if k not in _VOLATILE}


def cache_dtype(dtype: torch.dtype) -> str:
    """The name a cache records for the dtype of its hidden states ("float32", "bfloat16")."""
    return str(dtype).removeprefix("torch.")


def teacher_identity(spec) -> dict:
    """What identifies a teacher (a ``ModelSpec`` with ``path`` or ``config``): its config
    (without what a re-save or a version changes) and a fingerprint of its weights. For a
    directory, the fingerprint covers every weight file's size and 1 MiB read at 16 evenly
    spaced places (the safetensors header first: names, shapes, dtypes, byte ranges), so a 70B
    checkpoint is identified in a second and another training's weights (same shapes) differ
    almost surely; for a config built with random weights, the config and its init seed."""
    if spec.path is None:
        config = dict(spec.config)
    else:
        config = read_json(Path(spec.path) / "config.json", fix="copy or save the teacher again")
    config = stable_config(config)
    if spec.path is None:
        weights = _json_sha256({"config": config, "init_seed": spec.init_seed})
    else:
        h = hashlib.sha256()
        files = sorted(p for p in Path(spec.path).iterdir()
                       if p.suffix in (".safetensors", ".bin") and p.is_file())
        for p in files:
            size = p.stat().st_size
            h.update(f"{p.name}:{size}".encode())
            with open(p, "rb") as f:
                for i in range(16):
                    f.seek(size * i // 16)
                    h.update(f.read(1 << 20))
        weights = h.hexdigest()
    return {"config_sha256": _json_sha256(config), "weights_fingerprint": weights,
            "model_type": config.get("model_type"), "source": spec.path or "models.teacher.config"}


def read_cache_manifest(cache: str | os.PathLike, *, remote: str | None = None, timeout: float = 60.0) -> dict:
    """The cache's manifest (the token manifest + its "teacher_cache" section), fetched from
    ``remote`` into ``cache`` first when given; ValueError in one line when the directory is not
    a complete cache."""
    if remote is not None:
        from tailkd_dist.data.remote import fetch_file

        fetch_file(remote, MANIFEST, cache, timeout=timeout, written_by="tailkd-cache-teacher (and complete)")
    path = Path(cache) / MANIFEST
    if not path.is_file():
        what = "does not exist" if not Path(cache).exists() else "holds no manifest.json"
        raise ValueError(f"teacher cache {cache} {what}: write it with tailkd-cache-teacher (manifest.json "
                         "is written last, so an unfinished cache has none; run the command again to finish it)")
    manifest = read_json(path, fix="write the cache again with tailkd-cache-teacher")
    section = manifest.get("teacher_cache") if isinstance(manifest, dict) else None
    if not isinstance(section, dict) or section.get("kind") != KIND:
        raise ValueError(f"{path} is not a teacher cache's manifest (no 'teacher_cache' section of kind "
                         f"{KIND!r}): is {cache} token shards? Name those in data.path")
    need = {"d": int, "seq_len": int, "dtype": str, "splits": dict, "config": dict, "teacher": dict,
            "tokens_manifest_sha256": str}
    bad = [k for k, tp in need.items() if not isinstance(section.get(k), tp)]
    if bad or section["dtype"] not in DTYPES:
        raise ValueError(f"{path} is damaged (teacher_cache.{(bad or ['dtype'])[0]}): write the cache again")
    return manifest


def check_cache_matches(manifest: dict, *, cache: str, data_manifest_path: str | os.PathLike | None,
                        teacher: dict | None, dtype: str | None) -> None:
    """The cache was made from the run's token shards and teacher, in the dtype the run's
    teacher would hand the loss: else one ValueError naming both sides."""
    section = manifest["teacher_cache"]
    if data_manifest_path is not None:
        mine = file_sha256(data_manifest_path)
        if section["tokens_manifest_sha256"] != mine:
            raise ValueError(f"teacher cache {cache} was made from other token shards (their manifest sha256 "
                             f"{section['tokens_manifest_sha256'][:16]}…, from {section.get('tokens_path')}) than "
                             f"data.path's ({mine[:16]}…, {data_manifest_path}): write the cache from these "
                             "shards, or point data.path at the ones it was made from")
    if teacher is not None:
        for key, what in (("config_sha256", "config"), ("weights_fingerprint", "weights")):
            if section["teacher"][key] != teacher[key]:
                raise ValueError(f"teacher cache {cache} was made from another teacher (its {what}: "
                                 f"{section['teacher'][key][:16]}… from {section['teacher']['source']}; "
                                 f"models.teacher: {teacher[key][:16]}… from {teacher['source']}): write the "
                                 "cache with this teacher, or train from the cache alone (drop models.teacher's "
                                 "path/config)")
    if dtype is not None and section["dtype"] != dtype:
        raise ValueError(f"teacher cache {cache} holds {section['dtype']} hidden states but this run's teacher "
                         f"would hand the loss {dtype} (models.dtype on this device): write the cache on a "
                         "device like this run's, or set models.dtype to match")


def load_head(cache: str | os.PathLike, *, remote: str | None = None, sha256: str | None = None,
              timeout: float = 600.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's lm_head (weight [V, d], bias [V] or None) stored in the cache; from
    ``remote`` unless ``cache`` already holds the file of that ``sha256`` (the manifest's)."""
    from safetensors.torch import load_file

    path = Path(cache) / HEAD_FILE
    have = file_sha256(path) if sha256 is not None and path.is_file() else None
    if remote is not None and (have is None or have != sha256):
        from tailkd_dist.data.remote import fetch_file

        fetch_file(remote, HEAD_FILE, cache, timeout=timeout, written_by="tailkd-cache-teacher (and complete)")
        have = file_sha256(path) if sha256 is not None else None
    if not path.is_file():
        raise ValueError(f"teacher cache {cache} has no {HEAD_FILE}: write the cache again")
    if sha256 is not None and have != sha256:
        raise ValueError(f"teacher cache {remote or cache}: {HEAD_FILE} is not the head its manifest names "
                         "(sha256 differs): a damaged or partial copy; copy or write the cache again")
    tensors = load_file(str(path))
    return tensors["weight"], tensors.get("bias")


def hidden_of(row: dict, *, seq_len: int, d: int, dtype: str) -> torch.Tensor:
    """The [seq_len, d] teacher hidden states of one MDS row, in the loss's dtype."""
    flat = np.ascontiguousarray(row[COLUMN])
    t = torch.from_numpy(flat)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.reshape(seq_len, d)


def to_column(hidden: torch.Tensor, dtype: str) -> np.ndarray:
    """[seq_len, d] hidden states -> the flat array the MDS column stores."""
    t = hidden.detach().to("cpu").contiguous()
    if dtype == "bfloat16":
        t = t.to(torch.bfloat16).view(torch.uint16)
    else:
        t = t.to(torch.float32)
    return t.reshape(-1).numpy()


class MDSRows:
    """Random access to the rows of one split of an MDS dataset by global index (streaming's
    MDS readers; no StreamingDataset: no shared memory, no process group). Local files only."""

    def __init__(self, data: Path, split: str):
        from tailkd_dist.data.streaming_compat import streaming

        index = json.loads((data / split / "index.json").read_text())
        self.readers = [streaming.base.format.reader_from_json(str(data), split, info) for info in index["shards"]]
        self.starts = [0]
        for r in self.readers:
            self.starts.append(self.starts[-1] + r.samples)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict:
        s = bisect.bisect_right(self.starts, i) - 1
        return self.readers[s].get_item(i - self.starts[s])
