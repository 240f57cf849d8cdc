"""Atomic checkpoints and automatic resume.

Layout under ``<output_dir>/checkpoints``:

    step_00000050/          one checkpoint: the engine's files, extra_rank<r>.pt per rank
                            (head shard + optimizer, RNG), trainer_state.json, config.yaml,
                            and COMPLETE, written last, after every rank has finished
    latest                  the tag of the newest COMPLETE checkpoint (written by rename)

A save killed half-way leaves a directory without COMPLETE that ``latest`` never points to,
so the previous checkpoint is the one resumed; such leftovers are removed at the next save.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import torch
import torch.distributed as dist

from tailkd_dist.config import TrainConfig, dump_yaml

COMPLETE = "COMPLETE"


def _barrier(group=None):
    if dist.is_initialized():
        dist.barrier(group=group)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def root(cfg: TrainConfig) -> str:
    return os.path.join(cfg.output_dir, "checkpoints")


def latest_tag(cfg: TrainConfig) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    r = root(cfg)
    path = os.path.join(r, "latest")
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not os.path.isfile(os.path.join(r, tag, COMPLETE)):
        raise RuntimeError(f"{path} names {tag}, which is not a complete checkpoint: the checkpoint "
                           "directory was modified by hand; remove 'latest' to start over")
    return tag


def save(adapter, cfg: TrainConfig, *, step: int, trainer_state: dict) -> str:
    """Every rank calls this. Returns the tag."""
    r = root(cfg)
    tag = f"step_{step:08d}"
    path = os.path.join(r, tag)
    rank = adapter.topo.rank
    if rank == 0:
        os.makedirs(r, exist_ok=True)
        if os.path.isdir(path):  # a half-written save of the same step from a killed run
            shutil.rmtree(path)
    _barrier()
    adapter.save(r, tag)
    os.makedirs(path, exist_ok=True)
    torch.save(adapter.extra_state(), os.path.join(path, f"extra_rank{rank}.pt"))
    # Fault injection for the crash-during-save test: a window between the files and the marker.
    delay = float(os.environ.get("TAILKD_TEST_SAVE_DELAY_S", "0"))
    if delay:
        time.sleep(delay)
    _barrier()
    if rank == 0:
        _write_atomic(os.path.join(path, "trainer_state.json"), json.dumps(trainer_state, indent=1))
        dump_yaml(cfg, os.path.join(path, "config.yaml"))
        _write_atomic(os.path.join(path, COMPLETE), "")
        _write_atomic(os.path.join(r, "latest"), tag)
        _prune(r, keep=cfg.checkpoint.keep, current=tag)
    _barrier()
    return tag


def _prune(r: str, *, keep: int, current: str) -> None:
    tags = sorted(t for t in os.listdir(r) if t.startswith("step_"))
    complete = [t for t in tags if os.path.isfile(os.path.join(r, t, COMPLETE))]
    for t in tags:
        if t not in complete and t != current:
            shutil.rmtree(os.path.join(r, t), ignore_errors=True)  # a killed save's leftovers
    for t in complete[:-keep]:
        shutil.rmtree(os.path.join(r, t), ignore_errors=True)


def load(adapter, cfg: TrainConfig, tag: str) -> dict:
    """Restore engine, head shard, optimizer and RNG; returns the trainer state."""
    r = root(cfg)
    path = os.path.join(r, tag)
    extra = os.path.join(path, f"extra_rank{adapter.topo.rank}.pt")
    if not os.path.isfile(extra):
        raise RuntimeError(
            f"{extra} is missing: checkpoint {tag} was written by a job with a different world size "
            f"or loss group; resume with the same layout, or export it and start a new run"
        )
    adapter.load(r, tag)
    adapter.load_extra_state(torch.load(extra, map_location="cpu", weights_only=False))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)
