"""Atomic checkpoints, automatic resume, and the rules that keep a user's runs apart.

Layout of a run directory (``output_dir``):

    tailkd_run.json             marks a tailkd-train run directory (written at the first start)
    config.yaml, metrics.jsonl, tb/, hf_student/
    checkpoints/
        step_00000050/          one checkpoint: the engine's files, extra_rank<r>.pt per rank
                                (head shard + optimizer, RNG: tensors and plain values only),
                                trainer_state.json (step, loader position, run id, layout),
                                config.yaml, and COMPLETE, written last
        latest                  the tag of the newest COMPLETE checkpoint (written by rename)

A save is written whole under ``step_X.partial`` and renamed to ``step_X`` only once every rank
has finished and COMPLETE is in it, so a complete checkpoint is never deleted or changed before
its replacement is complete. Re-saving an existing step moves the old one to
``step_X.replaced`` for the instant between two renames; a start after a kill in that instant
moves it back. Pruning deletes only complete checkpoints of the same run (its run id), oldest
step first, and leftovers of killed saves (``*.partial``).

Which runs a directory may hold: one. A fresh start (``checkpoint.resume: false``, or nothing to
resume) into a directory holding complete checkpoints is refused; a resume compares the
checkpoint's configuration, layout and model shapes with the job's and refuses any difference
outside :data:`MAY_CHANGE_ON_RESUME`.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import time
import uuid

import torch
import torch.distributed as dist
import yaml

from tailkd_dist.config import TrainConfig, dump_yaml, to_dict
from tailkd_dist.staging import check_creatable_dir, describe_write_error, free_bytes, no_space, write_atomic

log = logging.getLogger("tailkd_dist")

COMPLETE = "COMPLETE"
RUN_MARKER = "tailkd_run.json"
PARTIAL = ".partial"
REPLACED = ".replaced"
_TAG = re.compile(r"^step_(\d+)$")

MAY_CHANGE_ON_RESUME = (
    "output_dir", "optim.max_steps", "checkpoint.", "logging.", "eval.", "engine.dist_timeout_s",
    "engine.sharded_load", "engine.activation_checkpointing", "data.num_workers", "loss.chunk_size",
)
"""Config keys (a trailing dot: a whole section) that may differ between a checkpoint and the job
resuming it: how long, how often, how loud, how it is loaded and chunked. Each change is logged.
Every other key (models, data, loss, optimizer, seed, engine layout) must be equal."""

MODEL_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads")


class CheckpointError(ValueError):
    """A checkpoint cannot be written, found or resumed; the message says why and what to do."""


# --------------------------------------------------------------------------- where things are


def root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def complete_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint under ``ckpt_root``, by step (not by name)."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = _TAG.match(name)
        if m and is_complete(os.path.join(ckpt_root, name)):
            found.append((int(m[1]), name))
    return sorted(found)


def resolve_latest(ckpt_root: str) -> tuple[str | None, str | None]:
    """(tag to resume, a one-line note or None). ``latest`` when it names a complete
    checkpoint; otherwise the newest complete one, with a note saying so."""
    complete = complete_checkpoints(ckpt_root)
    latest = os.path.join(ckpt_root, "latest")
    named = None
    if os.path.isfile(latest):
        with open(latest) as f:
            named = f.read().strip()
        if any(tag == named for _, tag in complete):
            return named, None
    if not complete:
        return None, None
    newest = complete[-1][1]
    why = "is missing" if named is None else f"names {named!r}, which is not a complete checkpoint"
    return newest, f"{latest} {why}: using the newest complete checkpoint, {newest}"


def recover(ckpt_root: str) -> None:
    """Rank 0 at start: undo a save killed between its two renames (``step_X.replaced`` back
    to ``step_X`` when that is missing; otherwise the replaced copy is obsolete)."""
    if not os.path.isdir(ckpt_root):
        return
    for name in os.listdir(ckpt_root):
        if not name.endswith(REPLACED):
            continue
        aside, final = os.path.join(ckpt_root, name), os.path.join(ckpt_root, name[: -len(REPLACED)])
        if not is_complete(final) and is_complete(aside):
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.rename(aside, final)
            log.warning("moved %s back to %s (a save was killed while replacing it)", aside, final)
        elif is_complete(final):
            shutil.rmtree(aside)


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}): the checkpoint is damaged") from None


def load_extra(path: str) -> dict:
    """A per-rank extra file, read without running code from it: only tensors and plain values
    (``weights_only``), which is all tailkd_dist writes there."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values: refusing to unpickle it (a "
            "checkpoint file from elsewhere can run code). Resume or export only checkpoints written "
            "by tailkd_dist itself") from None


# --------------------------------------------------------------------------- before a run starts


def check_output_dir(cfg: TrainConfig) -> None:
    """Every rank, before anything is built: the output directory is new, empty or a run
    directory; a fresh start never lands among another run's checkpoints."""
    out = cfg.output_dir
    # Also here: train() may be given a TrainConfig that load_config never validated.
    check_creatable_dir(out, key="output_dir")
    if os.path.isdir(out) and os.listdir(out):
        if not (os.path.isfile(os.path.join(out, RUN_MARKER)) or os.path.isdir(root(out))):
            raise ValueError(f"config key 'output_dir' = {out!r} is a directory that is not empty and not a "
                             f"tailkd-train run directory (no {RUN_MARKER}): choose a new or empty output_dir")
        complete = complete_checkpoints(root(out))
        if complete and not cfg.checkpoint.resume:
            raise ValueError(f"output_dir {out!r} already holds checkpoints of a run (newest {complete[-1][1]}); "
                             "checkpoint.resume=false would start a second run among them: choose a new "
                             "output_dir, or set checkpoint.resume=true to continue that run")


def start_run_dir(cfg: TrainConfig, *, fresh: bool) -> None:
    """Rank 0, once every rank has passed :func:`check_output_dir`: mark the run directory; on a
    fresh start keep an earlier (checkpoint-less) attempt's metrics beside, not mixed in."""
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    marker = os.path.join(out, RUN_MARKER)
    if not os.path.isfile(marker):
        write_atomic(marker, json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    metrics = os.path.join(out, "metrics.jsonl")
    if fresh and os.path.exists(metrics):
        aside = os.path.join(out, f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        os.rename(metrics, aside)
        log.warning("a fresh run: the earlier metrics.jsonl (a run that saved no checkpoint) is kept as %s", aside)
    dump_yaml(cfg, os.path.join(out, "config.yaml"))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k).endswith(".config"):  # an HF config dict is one value
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_resume(cfg: TrainConfig, *, ckpt_path: str, state: dict, world_size: int) -> None:
    """Every rank, before the models are built: refuse to resume a checkpoint written by another
    configuration (outside :data:`MAY_CHANGE_ON_RESUME`) or another world size; log the
    allowed changes."""
    tag = os.path.basename(ckpt_path)
    try:
        with open(os.path.join(ckpt_path, "config.yaml")) as f:
            stored = _flat(yaml.safe_load(f))
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{ckpt_path}/config.yaml cannot be read ({e}): the checkpoint is damaged") from None
    now = _flat(to_dict(cfg))
    differ = sorted(k for k in stored.keys() | now.keys() if stored.get(k) != now.get(k))
    allowed = [k for k in differ if any(k == p or (p.endswith(".") and k.startswith(p)) for p in MAY_CHANGE_ON_RESUME)]
    refused = [k for k in differ if k not in allowed]
    if refused:
        raise CheckpointError(
            f"{tag} in {os.path.dirname(ckpt_path)} was written with another configuration "
            f"({_changes(refused, stored, now)}): resume with the checkpoint's values, or start a new run in "
            f"another output_dir (keys that may change on resume: {', '.join(MAY_CHANGE_ON_RESUME)})")
    if state.get("world_size") not in (None, world_size):
        raise CheckpointError(
            f"{tag} was written by {state['world_size']} ranks and this job has {world_size}: resume with "
            f"{state['world_size']} ranks (engine checkpoints are not resharded), or export the student "
            "(tailkd-export-hf) and start a new run from it")
    if allowed and (not dist.is_initialized() or dist.get_rank() == 0):
        log.info("resuming %s with changed keys (allowed): %s", tag, _changes(allowed, stored, now, limit=None))


def model_shapes(**models) -> dict:
    """The size-defining HF config values of each model (recorded with each checkpoint)."""
    return {role: {k: getattr(m.config, k) for k in MODEL_SHAPE_KEYS if hasattr(m.config, k)}
            for role, m in models.items() if m is not None}


def check_model_shapes(state: dict, shapes: dict, *, tag: str) -> None:
    if state.get("model_shapes") is None:  # a checkpoint of an older version: nothing to compare
        return
    stored, now = _flat(state["model_shapes"]), _flat(shapes)
    differ = sorted(k for k in stored.keys() | now.keys() if stored.get(k) != now.get(k))
    if differ:
        raise CheckpointError(f"{tag} was written for other models ({_changes(differ, stored, now)}): the model "
                              "files changed since; resume with the same models, or start a new run in another "
                              "output_dir")


def _differences(key: str, old, new):
    """(key, old, new) for each difference, nested dicts (an HF config) opened down to the keys
    that differ: two shortened dicts that start alike say nothing."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(old.keys() | new.keys(), key=str):
            if old.get(k) != new.get(k):
                yield from _differences(f"{key}.{k}", old.get(k), new.get(k))
    else:
        yield key, old, new


def _changes(keys: list[str], old: dict, new: dict, *, limit: int | None = 6) -> str:
    """``key: old -> new; ...`` for the first ``limit`` differences, values shortened."""
    def short(v) -> str:
        text = json.dumps(v)
        return text if len(text) <= 60 else text[:57] + "..."

    diffs = [d for k in keys for d in _differences(k, old.get(k), new.get(k))]
    shown = "; ".join(f"{k}: {short(o)} -> {short(n)}" for k, o, n in diffs[:limit])
    return shown + (f" (and {len(diffs) - limit} more)" if limit is not None and len(diffs) > limit else "")


def new_run_id() -> str:
    return uuid.uuid4().hex


# --------------------------------------------------------------------------- save


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _all_ok(failure: BaseException | None, adapter) -> bool:
    """Whether every rank got through this part of the save (one small all-reduce: a rank
    that failed must not leave the others waiting at the next barrier)."""
    if not dist.is_initialized():
        return failure is None
    flag = torch.tensor([0 if failure is not None else 1], dtype=torch.int32, device=adapter.topo.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(adapter, cfg: TrainConfig, *, step: int, trainer_state: dict, hidden=None) -> str:
    """Every rank calls this. Returns the tag. Raises :class:`CheckpointError` on every rank
    when any rank fails to write (disk full, permissions), with the previous checkpoint intact.
    ``hidden``: the hidden-state term, whose projection is kept in each rank's extra state."""
    r = root(cfg.output_dir)
    tag = tag_of(step)
    staging = tag + PARTIAL
    where = os.path.join(r, staging)
    rank = adapter.topo.rank
    previous, _ = resolve_latest(r)
    failure = what = None
    try:
        if rank == 0:
            os.makedirs(r, exist_ok=True)
            shutil.rmtree(where, ignore_errors=True)  # a killed save of this step
        _check_space(r, previous)
    except OSError as e:
        failure, what = e, describe_write_error(e)
    if _all_ok(failure, adapter):
        try:
            adapter.save(r, staging)
            os.makedirs(where, exist_ok=True)
            extra = {**adapter.extra_state(), **(hidden.state_dict() if hidden is not None else {})}
            torch.save(extra, os.path.join(where, f"extra_rank{rank}.pt"))
            # Fault injection for the crash-during-save tests: a window before COMPLETE.
            delay = float(os.environ.get("TAILKD_TEST_SAVE_DELAY_S", "0"))
            if delay:
                time.sleep(delay)
        except Exception as e:  # noqa: BLE001  (every rank must learn of it, or the others hang)
            failure, what = e, describe_write_error(e, where)  # before the partial files are removed
    if _all_ok(failure, adapter) and rank == 0:
        try:
            _commit(r, tag, cfg=cfg, trainer_state=trainer_state)
        except Exception as e:  # noqa: BLE001
            failure, what = e, describe_write_error(e, where if os.path.isdir(where) else r)
    if not _all_ok(failure, adapter):
        # Judged before the partial files go (removing them frees the space again).
        the_disk = failure is None or isinstance(failure, OSError) or no_space(failure, where)
        if rank == 0:
            shutil.rmtree(where, ignore_errors=True)
        if not the_disk:
            raise failure  # not the disk: a defect, with its traceback
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint {tag} in {r} was not saved: {what or 'another rank failed to write its part'}; "
                              f"{kept}")
    return tag


def _check_space(r: str, previous: str | None) -> None:
    """OSError(ENOSPC) when the file system of ``r`` (as this rank sees it) has less room than
    the previous checkpoint took. Checked before the engine's save, whose collectives would
    leave the ranks waiting on each other if one of them failed half-way through writing."""
    if previous is None:
        return
    prev = os.path.join(r, previous)
    need = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(prev) for f in files)
    free = free_bytes(r)
    if free < need:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                      f"{r}: {need / 2**20:.1f} MiB needed (the size of {previous}), {free / 2**20:.1f} MiB free")


def _commit(r: str, tag: str, *, cfg: TrainConfig, trainer_state: dict) -> None:
    """Rank 0: finish ``tag.partial`` and put it in place; only then delete what it replaces."""
    staged, final = os.path.join(r, tag + PARTIAL), os.path.join(r, tag)
    write_atomic(os.path.join(staged, "trainer_state.json"), json.dumps(trainer_state, indent=1))
    dump_yaml(cfg, os.path.join(staged, "config.yaml"))
    write_atomic(os.path.join(staged, COMPLETE), "")
    aside = None
    if os.path.isdir(final):  # the same step saved again (a finished run started again, a re-run)
        aside = final + REPLACED
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(staged, final)
    write_atomic(os.path.join(r, "latest"), tag)
    _fsync_dir(r)
    if aside:
        shutil.rmtree(aside)
    _prune(r, keep=cfg.checkpoint.keep, current=tag, run_id=trainer_state["run_id"])


def _prune(r: str, *, keep: int, current: str, run_id: str) -> None:
    """Delete this run's complete checkpoints beyond the newest ``keep`` (by step) and killed
    saves' leftovers; never another run's checkpoint, never ``current``."""
    for name in os.listdir(r):
        if name.endswith(PARTIAL):
            shutil.rmtree(os.path.join(r, name), ignore_errors=True)
    mine = [tag for _, tag in complete_checkpoints(r)
            if _run_id(os.path.join(r, tag)) == run_id]
    for tag in mine[:-keep]:
        if tag != current:
            shutil.rmtree(os.path.join(r, tag), ignore_errors=True)


def _run_id(path: str) -> str | None:
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- load


def load(adapter, cfg: TrainConfig, tag: str, hidden=None) -> dict:
    """Restore engine, head shard, optimizer and RNG; returns the trainer state."""
    r = root(cfg.output_dir)
    path = os.path.join(r, tag)
    extra = os.path.join(path, f"extra_rank{adapter.topo.rank}.pt")
    if not os.path.isfile(extra):
        raise CheckpointError(
            f"{extra} is missing: checkpoint {tag} was written by a job with a different world size "
            f"or loss group; resume with the same layout, or export it and start a new run")
    adapter.load(r, tag)
    extra = load_extra(extra)
    adapter.load_extra_state(extra)
    if hidden is not None:
        hidden.load_state_dict(extra)
    return read_json(os.path.join(path, "trainer_state.json"))
