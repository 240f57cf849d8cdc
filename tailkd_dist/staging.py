"""Write a directory all at once: build it in a staging sibling, then rename it into place.

A tool killed half-way (prepare-data, derive-student) leaves at most a hidden ``.<name>.partial-*``
sibling, never a half-written output; an existing output is replaced only once the new one
is complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def check_replaceable(out: Path, *, overwrite: bool, marker: str, producer: str) -> Path:
    """ValueError unless ``out`` may be written: absent, empty, or (with ``overwrite``) an
    earlier output of ``producer``, recognised by its ``marker`` file. Never deletes a
    directory some other tool or person made."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory: choose another --output.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"output directory {out} is not empty: pass --overwrite to replace "
                             "it, or choose another --output.")
        if not (out / marker).is_file():
            raise ValueError(f"--overwrite: {out} is not an output of {producer} (no {marker}); "
                             "refusing to delete it. Choose another --output.")
    return out


@contextlib.contextmanager
def staged_dir(out: Path):
    """``with staged_dir(out) as staging:`` fill ``staging``; on success it becomes ``out``
    (replacing an existing ``out``), on any error it is removed and ``out`` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should be like any mkdir
    try:
        yield staging
        if out.exists():  # swap, then delete the old output
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "x")
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
