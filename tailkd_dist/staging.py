"""Write a directory all at once: build it in a staging sibling, then rename it into place.

A tool killed half-way (prepare-data, derive-student) leaves at most a hidden ``.<name>.partial-*``
sibling, never a half-written output; an existing output is replaced only once the new one
is complete. Its name carries the host and the process id (``owned_tempdir``), so the next
run removes what a dead process of this host left, and nothing any live process still uses.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from tailkd_dist.signals import raise_if_stopping


def read_json(path: str | os.PathLike, *, fix: str):
    """A small JSON file (a manifest, an index, a model config); damage -> one ValueError naming
    the file and ``fix``."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}): the file is damaged; {fix}.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the file is damaged; {fix}.") from None
    except OSError as error:
        raise ValueError(f"{path} cannot be read ({error.strerror or error}): {fix}.") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _host() -> str:
    # The name must stay one path component and must not contain the "-" that separates fields.
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small file whole or not at all: a temporary sibling, fsync, rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_creatable_dir(path: str | os.PathLike, *, key: str) -> None:
    """ValueError (naming the config ``key``) unless ``path`` is a directory or can be made one
    by this user: not a file, no file on its way, the nearest existing directory writable."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"config key '{key}' = {str(path)!r} is a file, not a directory: choose a directory")
    base = os.path.abspath(path)
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise ValueError(f"config key '{key}' = {str(path)!r} cannot be created: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"config key '{key}' = {str(path)!r} cannot be written: {base} is read-only or not "
                         f"writable by this user; choose another {key}")


def owned_tempdir(prefix: str, *, dir: str | os.PathLike | None = None) -> Path:
    """mkdtemp named ``<prefix><host>-<pid>-<random>``, after removing the directories with
    that prefix that a process of this host left when it died (killed, or the machine lost
    power): those are this tool's leftovers and nobody's data. A live process's directory,
    or another host's (a shared file system), is never touched."""
    parent = Path(dir if dir is not None else tempfile.gettempdir())
    host = _host()
    for old in parent.glob(f"{glob.escape(prefix)}{host}-*-*"):
        pid = old.name[len(prefix) + len(host) + 1:].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{host}-{os.getpid()}-", dir=parent))


def check_replaceable(out: Path, *, overwrite: bool, marker: str, producer: str,
                      keep_apart: list[tuple[str, str | os.PathLike]] = (),
                      option: str = "--output") -> Path:
    """ValueError unless ``out`` may be written: absent, empty, or (with ``overwrite``) an
    earlier output of ``producer``, recognised by its ``marker`` file. Never deletes a
    directory some other tool or person made. ``keep_apart`` names the command's inputs
    (``[("the run directory", path)]``): ``out`` may neither be one of them, nor contain one,
    nor lie inside one, since replacing it would delete (or its staging would nest in) what
    the command reads."""
    out = Path(out)
    resolved = Path(os.path.realpath(out))
    for what, path in keep_apart:
        other = Path(os.path.realpath(path))
        if resolved == other or other.is_relative_to(resolved) or resolved.is_relative_to(other):
            relation = ("is" if resolved == other else "contains" if other.is_relative_to(resolved)
                        else "lies inside")
            raise ValueError(f"{option} {out} {relation} {what} {path}: refusing to write there. "
                             f"Choose another {option}, outside it.")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} exists and is not a directory: choose another {option}.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{option} directory {out} is not empty: pass --overwrite to replace "
                             f"it, or choose another {option}.")
        if not (out / marker).is_file():
            raise ValueError(f"{option} {out} is not an output of {producer} (no {marker}); "
                             f"refusing to replace it. Choose another {option}.")
    return out


def no_space(e: BaseException, path: str | os.PathLike) -> bool:
    """Whether a failed write into ``path`` ran out of space: the errno, the message of a
    library that wraps it (safetensors), or, for writers that report only a short write
    (torch's zip writer: "unexpected pos"), a file system left with under 1 MiB free. Ask
    before the partial output is removed, which frees the space again."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    if "No space left on device" in str(e):
        return True
    try:
        return free_bytes(path) < 1 << 20
    except OSError:
        return False


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes this process may still write on the file system of ``path`` (root may use the
    blocks reserved for it)."""
    st = os.statvfs(path)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def describe_write_error(e: BaseException, where: str | os.PathLike | None = None) -> str:
    """One line for a failed write: disk full first (whatever library reported it, judged at
    ``where`` while the partial output still exists), else the OS's reason and the file."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or where is not None and no_space(e, where):
        return f"no space left on device ({getattr(e, 'filename', None) or where})"
    if isinstance(e, OSError):
        return f"{e.strerror or e} ({e.filename})" if e.filename else str(e)
    return f"{type(e).__name__}: {e}"


def disk_full_error(path: str | os.PathLike) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@contextlib.contextmanager
def staged_dir(out: Path):
    """``with staged_dir(out) as staging:`` fill ``staging``; on success it becomes ``out``
    (replacing an existing ``out``), on any error it is removed and ``out`` is untouched. A
    write that ran out of space surfaces as OSError(ENOSPC) whatever library made it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = owned_tempdir(f".{out.name}.partial-", dir=out.parent)
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should be like any mkdir
    try:
        yield staging
        raise_if_stopping()  # a stop that arrived while the output was built: never publish it
        if out.exists():  # swap, then delete the old output
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "x")
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except Exception as e:
        full = not (isinstance(e, OSError) and e.errno == errno.ENOSPC) and no_space(e, staging)
        shutil.rmtree(staging, ignore_errors=True)
        if full:
            raise disk_full_error(out) from e
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
