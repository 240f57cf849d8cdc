"""Run a function in N local processes (gloo on CPU) for tests: results back, errors loud, no hangs.

    from dist_harness import run_distributed

    def _worker(rank, world_size, scale):          # module level: the child imports it by name
        t = torch.tensor([float(rank) * scale])
        torch.distributed.all_reduce(t)
        return t.item()

    def test_sum():
        assert run_distributed(_worker, 4, args=(2.0,)) == [12.0] * 4

* Processes come from a ``forkserver`` that has already imported torch, so after the first
  launch of a test session a process starts in well under a second instead of paying the
  2-3 s torch import each time. Still: run MANY cases inside one launch.
* ``init="filestore"`` (default): the harness initialises the default process group with a
  ``FileStore`` in a private temporary directory (no port races) before calling ``fn``, and
  sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
  to matching values. ``init="env"``: only those variables are set (with a free TCP port), as
  torchrun would; ``fn`` initialises (e.g. ``Topology.build``). ``init=None``: neither.
* Hard timeout: if the ranks are not all done after ``timeout_s``, every child is killed and
  :class:`DistributedTimeout` is raised with each rank's Python stack (faulthandler dumps it a
  moment before the kill) — a hang fails the test instead of hanging CI. Collectives of the
  harness's process group time out a bit earlier (``0.75 * timeout_s``).
* An exception on any rank raises :class:`DistributedError` in the parent with the rank and the
  child's traceback (every failed rank, earliest first); once one rank has failed, the others
  get ``grace_s`` seconds to finish or fail and are then killed. With
  ``return_exceptions=True`` a raising rank returns a :class:`RankError` instead (to check that
  every rank raised the same error).
* Results: whatever ``fn`` returns, per rank, saved with ``torch.save`` (tensors are fine; keep
  them small) and returned as a list indexed by rank.
* Each child runs with ``torch.set_num_threads(threads)`` (default 1: CI has few cores).
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = [
    "DistributedError",
    "DistributedTimeout",
    "DistJob",
    "RankError",
    "free_port",
    "launch",
    "run_distributed",
]

# Imported once by the forkserver, so every child starts with them (a module that fails to import
# is skipped there and simply imported by the child, with the child's error if it fails again).
_PRELOAD = ["torch", "torch.distributed", "tailkd_dist.parallel", "tailkd_dist.losses"]
_preload_set = False


class DistributedError(AssertionError):
    """One or more ranks failed (exception, crash, or no result)."""


class DistributedTimeout(DistributedError):
    """The ranks did not finish within the harness timeout; they were killed."""


@dataclass(frozen=True)
class RankError:
    """What a rank raised, returned instead of a result when ``return_exceptions=True``."""

    rank: int
    type_name: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.type_name}: {self.message}"


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _context(start_method: str) -> multiprocessing.context.BaseContext:
    global _preload_set
    if start_method == "forkserver" and not _preload_set:
        # Effective only before the session's forkserver starts; harmless afterwards.
        multiprocessing.set_forkserver_preload(_PRELOAD)
        _preload_set = True
    return multiprocessing.get_context(start_method)


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def _child_main(
    rank: int,
    world_size: int,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    workdir: str,
    init: str | None,
    backend: str,
    env_vars: dict[str, str | None],
    deadline: float,
    return_exceptions: bool,
    threads: int,
) -> None:
    for key, value in env_vars.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    work = Path(workdir)
    timeout_s = deadline - time.time()
    stack_file = open(work / f"stack{rank}.txt", "w")  # noqa: SIM115 - lives until exit
    # Dump every thread's stack shortly before the parent's hard kill.
    faulthandler.dump_traceback_later(max(0.5, timeout_s - 1.5), file=stack_file)

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    ok = False
    try:
        if init == "filestore":
            store = dist.FileStore(str(work / "store"), world_size)
            dist.init_process_group(
                backend,
                store=store,
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=max(1.0, 0.75 * timeout_s)),
            )
        result = fn(rank, world_size, *args, **kwargs)
        ok = True
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        tb = traceback.format_exc()
        _write_atomic(
            work / f"error{rank}.txt",
            lambda p: Path(p).write_text(f"{time.time():.6f}\n{tb}"),
        )
        if not return_exceptions:
            faulthandler.cancel_dump_traceback_later()
            sys.stderr.write(f"[rank {rank}] {tb}")
            sys.stderr.flush()
            os._exit(1)
        result = RankError(rank, type(exc).__name__, str(exc), tb)
    _write_atomic(work / f"result{rank}.pt", lambda p: torch.save(result, p))
    faulthandler.cancel_dump_traceback_later()
    if dist.is_initialized():
        try:
            if ok:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the result is saved; a failed peer is reported by it
            pass


class DistJob:
    """A launched group of ranks; :meth:`join` waits and returns the per-rank results."""

    def __init__(
        self,
        fn: Callable[..., Any],
        world_size: int,
        *,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        timeout_s: float = 120.0,
        init: str | None = "filestore",
        backend: str = "gloo",
        return_exceptions: bool = False,
        env: dict[str, str] | None = None,
        threads: int = 1,
        grace_s: float = 5.0,
        start_method: str = "forkserver",
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if init not in ("filestore", "env", None):
            raise ValueError(f"init must be 'filestore', 'env' or None, got {init!r}")
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self.grace_s = float(grace_s)
        self.return_exceptions = return_exceptions
        self._tmp = tempfile.TemporaryDirectory(prefix="dist_harness_")
        self.workdir = Path(self._tmp.name)
        port = free_port() if init == "env" else 29500
        base_env: dict[str, str | None] = {
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
        }
        if init is not None:
            # Do not inherit a launcher's variables from the parent.
            for k in ("TORCHELASTIC_RUN_ID", "LOCAL_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
                base_env[k] = None
        ctx = _context(start_method)
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self._start = time.monotonic()
        wall_deadline = time.time() + self.timeout_s
        for rank in range(world_size):
            env_vars = dict(base_env)
            if init is None:
                env_vars = {"GLOO_SOCKET_IFNAME": base_env["GLOO_SOCKET_IFNAME"]}
            else:
                env_vars.update(RANK=str(rank), LOCAL_RANK=str(rank))
            env_vars.update(env or {})
            p = ctx.Process(
                target=_child_main,
                args=(
                    rank,
                    world_size,
                    fn,
                    tuple(args),
                    dict(kwargs or {}),
                    str(self.workdir),
                    init,
                    backend,
                    env_vars,
                    wall_deadline,
                    return_exceptions,
                    threads,
                ),
                name=f"dist_harness-rank{rank}",
                daemon=True,
            )
            p.start()
            self.processes.append(p)

    # ------------------------------------------------------------------ waiting
    def _wait(self) -> bool:
        """Wait until every child exited; False on the hard timeout (children then killed)."""
        deadline = self._start + self.timeout_s
        failed_at: float | None = None
        while True:
            alive = [p for p in self.processes if p.exitcode is None]
            if not alive:
                return True
            if failed_at is None and any(
                p.exitcode not in (None, 0) for p in self.processes
            ):
                failed_at = time.monotonic()
            now = time.monotonic()
            limit = deadline if failed_at is None else min(deadline, failed_at + self.grace_s)
            if now >= limit:
                self._kill(alive)
                return failed_at is not None and now < deadline
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=limit - now)

    def _kill(self, procs: Sequence[multiprocessing.process.BaseProcess]) -> None:
        for p in procs:
            if p.exitcode is None:
                p.kill()
        for p in procs:
            p.join(timeout=10)

    def _read(self, name: str) -> str:
        try:
            return (self.workdir / name).read_text()
        except OSError:
            return ""

    # ------------------------------------------------------------------ results
    def join(self) -> list[Any]:
        """Wait for every rank and return their results (index = rank).

        Raises:
            DistributedTimeout: not done within ``timeout_s`` (stacks of the ranks attached).
            DistributedError: a rank raised (unless ``return_exceptions``), crashed, or
                returned nothing.
        """
        try:
            finished = self._wait()
            elapsed = time.monotonic() - self._start
            import torch

            results: list[Any] = []
            problems: list[tuple[float, str]] = []
            for rank, p in enumerate(self.processes):
                path = self.workdir / f"result{rank}.pt"
                if path.exists():
                    results.append(torch.load(path, weights_only=False))
                    continue
                results.append(None)
                err = self._read(f"error{rank}.txt")
                if err:
                    stamp, _, tb = err.partition("\n")
                    problems.append((float(stamp), f"rank {rank} raised:\n{tb}"))
                else:
                    stack = self._read(f"stack{rank}.txt").strip()
                    what = (
                        f"rank {rank} exit code {p.exitcode}"
                        + (" (killed by the harness)" if p.exitcode is not None and p.exitcode < 0 else "")
                        + (f"; its stack before the kill:\n{stack}" if stack else "; no traceback")
                    )
                    problems.append((float("inf"), what))
            if not finished:
                stacks = "\n".join(problems_text for _, problems_text in problems)
                raise DistributedTimeout(
                    f"{self.world_size} ranks did not finish within {self.timeout_s:.0f} s "
                    f"and were killed:\n{stacks}"
                )
            if problems:
                problems.sort(key=lambda x: x[0])
                raise DistributedError(
                    f"{len(problems)} of {self.world_size} ranks failed after {elapsed:.1f} s "
                    "(earliest first):\n" + "\n".join(text for _, text in problems)
                )
            return results
        finally:
            self._kill(self.processes)
            self._tmp.cleanup()


def launch(fn: Callable[..., Any], world_size: int, **options: Any) -> DistJob:
    """Start ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; see
    :func:`run_distributed` for the options. Call :meth:`DistJob.join` for the results."""
    return DistJob(fn, world_size, **options)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    timeout_s: float = 120.0,
    init: str | None = "filestore",
    backend: str = "gloo",
    return_exceptions: bool = False,
    env: dict[str, str] | None = None,
    threads: int = 1,
    grace_s: float = 5.0,
    start_method: str = "forkserver",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` fresh processes.

    Args:
        fn: a module-level function (the child imports it by module and name).
        world_size: number of ranks.
        args, kwargs: extra arguments (picklable).
        timeout_s: hard limit for the whole run; then every rank is killed and
            :class:`DistributedTimeout` raised with their stacks.
        init: ``"filestore"`` (process group ready when ``fn`` starts), ``"env"`` (torchrun-like
            variables only, with a free port), or ``None``.
        backend: backend for ``init="filestore"``.
        return_exceptions: a raising rank returns a :class:`RankError` instead of failing the run.
        env: extra environment variables for the children (applied last).
        threads: ``torch.set_num_threads`` in each child.
        grace_s: after a rank failed, how long the others may take before they are killed.
        start_method: ``"forkserver"`` (fast: torch preloaded) or ``"spawn"``.

    Returns:
        The ranks' return values, index = rank.
    """
    return DistJob(
        fn,
        world_size,
        args=args,
        kwargs=kwargs,
        timeout_s=timeout_s,
        init=init,
        backend=backend,
        return_exceptions=return_exceptions,
        env=env,
        threads=threads,
        grace_s=grace_s,
        start_method=start_method,
    ).join()
