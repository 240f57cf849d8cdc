"""What mosaicml-streaming leaves on a node, and removing only what no live job can still use.

Each StreamingDataset registers a numbered prefix on its node: shared-memory objects
``/dev/shm/NNNNNN_{locals,barrier,...}`` and two file locks ``$TMPDIR/NNNNNN_{barrier,cache}_filelock``.
A run that ends normally unlinks the shared memory but never the locks (two files per run,
and the next run's prefix scan walks past every one of them); a killed run (SIGKILL, OOM, a
node that is reclaimed) leaves all of it (its locks keep a later run from registering there).

streaming's own ``clean_stale_shared_memory()`` unlinks every prefix on the node, including
those of a job that is running beside this one. Here a prefix is removed only when all of
its files belong to this user, none is younger than ``min_age_s`` (a run that is creating
them right now), and no process maps or holds open any of them (the live test: a running
dataset keeps its shared memory mapped, in each rank and each loader worker).
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tailkd_dist.data.streaming_compat import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN

SHM_DIR = Path("/dev/shm")
# streaming's names: f"{prefix:06}_{name}"
_SHM_NAME = re.compile(rf"^(\d{{6}})_({'|'.join(map(re.escape, SHM_TO_CLEAN))})$")
_LOCK_NAME = re.compile(rf"^(\d{{6}})_({re.escape(BARRIER_FILELOCK)}|{re.escape(CACHE_FILELOCK)})$")


def _prefixes(tmp: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = defaultdict(list)
    for folder, pattern in ((SHM_DIR, _SHM_NAME), (tmp, _LOCK_NAME)):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if m := pattern.match(name):
                found[m.group(1)].append(folder / name)
    return found


def _in_use() -> set[str]:
    """Every path some process this user can see maps (``/proc/PID/maps``) or holds open."""
    used: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    if "/" in line:
                        used.add(line[line.index("/"):].rstrip("\n").removesuffix(" (deleted)"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                used.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:  # gone meanwhile, or another user's process (whose files are not ours)
            continue
    return used


def remove_dead_streaming_state(*, min_age_s: float = 60.0, tmp: str | None = None) -> list[Path]:
    """Remove the streaming prefixes on this node that no live process uses; returns the files
    removed. Safe beside other jobs (see the module docstring)."""
    if not SHM_DIR.is_dir():
        return []
    prefixes = _prefixes(Path(tmp or tempfile.gettempdir()))
    if not prefixes:
        return []
    used, uid, now = _in_use(), os.getuid(), time.time()
    removed: list[Path] = []
    for files in prefixes.values():
        try:
            stats = [f.lstat() for f in files]
        except OSError:
            continue
        if any(s.st_uid != uid or now - s.st_mtime < min_age_s for s in stats):
            continue
        if any(str(f) in used for f in files):
            continue
        for f in files:
            try:
                f.unlink()
                removed.append(f)
            except OSError:
                pass
    return removed
