"""What the loader and the teacher cache fetch through streaming, and how a StreamingDataset is
started so that jobs starting together on one node do not collide.

streaming registers each dataset under a small integer prefix in /dev/shm. Every rank of a job
lists /dev/shm to find the first free prefix, the node's local leader creates it, and the other
local ranks then open it and check it is their job's. Two jobs starting on one node at the same
moment can interleave those steps: the leader of one takes the prefix the other's ranks chose,
and they fail ("shared memory registered does not match local leader", or FileExistsError on a
leader). So each node's local leader holds an exclusive lock on the /dev/shm directory while its
job starts a dataset, and the job's other ranks start only once it holds it: one job's
registration is complete before the next job's ranks look for a free prefix. Nothing is created
for the lock, so nothing is left behind; a lock held longer than ``LOCK_WAIT_S`` (a stuck job,
or two jobs sharing several nodes in opposite order) is given up with a warning rather than
waited on forever.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch.distributed as dist

from tailkd_dist.data.streaming_compat import CloudDownloader, StreamingDataset

log = logging.getLogger("tailkd_dist")
LOCK_DIR = "/dev/shm"
LOCK_WAIT_S = 60.0


# The package streaming needs per storage scheme (its cloud SDKs are optional dependencies).
_SDKS = {"s3": "boto3", "gs": "google-cloud-storage", "oci": "oci", "azure": "azure-storage-blob",
         "azure-dl": "azure-storage-file-datalake", "dbfs": "databricks-sdk", "hf": "huggingface_hub"}


def _missing_sdk(remote: str, error: ImportError) -> str:
    scheme = remote.split("://", 1)[0] if "://" in remote else ""
    package = _SDKS.get(scheme) or (error.name or "").split(".")[0] or "its SDK"
    return (f"reading {scheme}:// needs the Python package {package}, which is not installed ({error}): "
            f"pip install {package}")


def fetch_file(remote: str, name: str, local: str | os.PathLike, *, timeout: float, written_by: str) -> Path:
    """``remote``/``name`` (s3://..., gs://..., a directory: whatever streaming reaches) into
    ``local``/``name``, published whole; ValueError naming the source when it cannot be fetched."""
    path = Path(local) / name
    source = f"{remote.rstrip('/')}/{name}"
    tmp = path.with_name(f"{path.name}.{os.getpid()}")  # ranks may fetch it at the same time
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.unlink(missing_ok=True)
        CloudDownloader.direct_download(source, str(tmp), timeout)
    except Exception as error:
        tmp.unlink(missing_ok=True)
        # A missing SDK is not a question of the directory: say what to install.
        why = (f": {_missing_sdk(remote, error)}" if isinstance(error, ImportError) else
               f" ({error}): is {remote} a directory written by {written_by}?")
        raise ValueError(f"cannot fetch {source}{why}") from error
    tmp.replace(path)
    return path


@contextlib.contextmanager
def _node_lock():
    """Held by the node's local leader (LOCAL_RANK 0) around a dataset's start; every rank of
    the job waits until it holds it (the module says why)."""
    import fcntl

    fd = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and os.path.isdir(LOCK_DIR):
        fd = os.open(LOCK_DIR, os.O_RDONLY)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("another job has held the lock on %s for %.0f s while starting its data: "
                                "starting without it", LOCK_DIR, LOCK_WAIT_S)
                    os.close(fd)
                    fd = None
                    break
                time.sleep(0.05)
    try:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # no rank lists /dev/shm before its leader holds the lock
        yield
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has checked its registration before the next job looks
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def init_streaming(*, dataset: StreamingDataset | None = None, **kwargs) -> StreamingDataset:
    """``StreamingDataset(**kwargs)``, or its ``__init__`` on ``dataset`` (a subclass's instance),
    under the node lock."""
    with _node_lock():
        if dataset is None:
            return StreamingDataset(**kwargs)
        StreamingDataset.__init__(dataset, **kwargs)
        return dataset
