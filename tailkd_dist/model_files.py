"""The files of a Hugging Face model directory, checked on disk before anything is loaded.

A damaged directory (a truncated download, a copy that stopped, an edited config) otherwise
fails minutes later, inside a library, with a traceback that does not name the file. These
checks read only small parts: config.json, the weight index, and each safetensors file's
header (8 bytes of length, then a JSON table of tensors with their byte ranges), which is
enough to tell a truncated file from a whole one without reading the weights. Pickled
``pytorch_model.bin`` weights are never opened here (they are not ours to unpickle).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from tailkd_dist.staging import read_json

CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLED, PICKLED_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_MAX_HEADER = 100 << 20  # safetensors' own limit on the header's size


def check_safetensors(path: Path) -> None:
    """A whole safetensors file: a readable header whose tensors all lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"{path} is not a safetensors file, or is truncated ({size} bytes): "
                                 "copy or save the model again")
            header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} has a damaged safetensors header: copy or save the model again") from None
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a damaged safetensors header: copy or save the model again")
    ends = [t.get("data_offsets", [0, 0])[1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise ValueError(f"{path} is truncated: {size} bytes, its header describes {need}: copy or save the "
                         "model again")


def check_model_type(model_type: object, *, where: str) -> None:
    """ValueError unless ``model_type`` names an architecture this transformers builds (its own
    error lists all ~400 known types in one message, and comes only once the model is loaded)."""
    import transformers
    from transformers import CONFIG_MAPPING

    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{where} names no model_type: not a Hugging Face model config")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{where}: model_type {model_type!r} is not an architecture transformers "
                         f"{transformers.__version__} knows: a typo, or a model that needs a newer transformers "
                         "(remote code is never run)")


def check_model_dir(path: str | os.PathLike) -> None:
    """ValueError (one line, naming the file) unless ``path`` holds a readable config.json with
    a model_type and complete weights: one safetensors file, or the shards its index names (each
    checked), or pickled weights (present, not opened)."""
    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"{d}: no such directory (models are never downloaded: point at a local checkpoint)")
    if not (d / CONFIG).is_file():
        raise ValueError(f"{d} has no {CONFIG}: not a Hugging Face model directory (save one with save_pretrained)")
    config = read_json(d / CONFIG, fix="copy or save the model again")
    check_model_type(config.get("model_type") if isinstance(config, dict) else None, where=str(d / CONFIG))
    if (d / SAFETENSORS).is_file():
        check_safetensors(d / SAFETENSORS)
    elif (d / SAFETENSORS_INDEX).is_file():
        index = read_json(d / SAFETENSORS_INDEX, fix="copy the model again")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{d / SAFETENSORS_INDEX} has no weight_map: the file is damaged")
        for shard in sorted(set(map(str, weight_map.values()))):
            if not (d / shard).is_file():
                raise ValueError(f"{d / shard} is missing (named by {SAFETENSORS_INDEX}): copy the model again")
            check_safetensors(d / shard)
    elif not ((d / PICKLED).is_file() or (d / PICKLED_INDEX).is_file()):
        raise ValueError(f"{d} has no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {PICKLED} or "
                         f"{PICKLED_INDEX}): copy the model again or save it with save_pretrained")


def check_tokenizer_dir(path: str | os.PathLike) -> None:
    """ValueError unless ``path`` is a directory holding an HF tokenizer's files (those that are
    JSON must parse): a tokenizer the config names is never silently skipped, and a damaged one
    is found before training, not at the export after it."""
    from tailkd_dist.data.tokenizer import TOKENIZER_FILES

    d = Path(path)
    if not d.is_dir():
        what = "is not a directory" if d.exists() else ": no such directory"
        raise ValueError(f"{d}{' ' * d.exists()}{what} (give a directory written by tokenizer.save_pretrained)")
    present = [n for n in TOKENIZER_FILES if (d / n).is_file()]
    if not present:
        raise ValueError(f"{d} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}): give a "
                         "directory written by tokenizer.save_pretrained")
    for name in present:
        if name.endswith(".json"):
            read_json(d / name, fix="save the tokenizer again")

