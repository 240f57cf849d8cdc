"""The process topology of a tailkd_dist job: one object, built once from the launcher's environment.

A job of ``world_size`` ranks is laid out as a 2-D grid ``(dp, loss)`` (torchtitan style):

* ``loss`` (innermost): a *loss group* of ``loss_group_size`` consecutive ranks shares the
  vocabulary of the lm_heads (each rank owns a contiguous slice of the rows) and computes the
  vocabulary-sharded distillation loss together. Consecutive ranks are on the same node when
  the launcher numbers ranks node by node (torchrun, the ``deepspeed`` launcher and SLURM's
  block distribution all do), so the per-token all-reduces of the loss stay inside a node.
* ``dp`` (outermost): the data-parallel replicas; rank ``r`` has
  ``dp_rank = r // loss_group_size`` and ``loss_rank = r % loss_group_size``.

Usage::

    topo = Topology.build(loss_group_size=2)          # reads RANK/WORLD_SIZE/... or SLURM_*
    loss_sum, stats = fused_linear_distill(..., vocab_group=topo.group("loss"))
    torch.distributed.all_reduce(x, group=topo.group("dp"))
    ...
    topo.destroy()

Library code never reads a module-global group: it takes the group as an argument, and the
training script passes ``topology.group(name)``.

Supported launchers (:meth:`DistEnv.from_environ`):

* ``torchrun`` (and anything that follows its ``env://`` convention): ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``.
* the ``deepspeed`` launcher: the same, but ``LOCAL_SIZE`` instead of ``LOCAL_WORLD_SIZE``.
* SLURM's ``srun`` (one task per rank): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
  ``SLURM_NTASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE`` (+ ``SLURM_NODEID``), the node list
  (``SLURM_STEP_NODELIST``/``SLURM_NODELIST``/``SLURM_JOB_NODELIST``; the first host is the
  master, resolved with ``scontrol show hostnames`` when available, else by
  :func:`expand_hostlist`), and ``MASTER_PORT`` derived from ``SLURM_JOB_ID`` unless set.
  Inside an ``sbatch`` script, start the ranks with ``srun``: the batch script itself is a
  single process even though ``SLURM_NTASKS`` says otherwise.
* none of these: a single process (world size 1).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "LauncherName",
    "Topology",
    "GROUP_NAMES",
    "expand_hostlist",
    "validate_degrees",
    "slurm_default_port",
]

LauncherName = Literal["torchrun", "deepspeed", "slurm", "single"]

#: The names :meth:`Topology.group` accepts.
GROUP_NAMES: tuple[str, ...] = ("world", "dp", "loss")

_DEFAULT_MASTER_ADDR = "127.0.0.1"
_DEFAULT_MASTER_PORT = 29500
# SLURM jobs without MASTER_PORT get 15000 + (job id mod 10000): below the Linux ephemeral range
# (32768-60999), stable for all tasks of a job, and different for concurrent jobs on a node
# unless their ids are congruent modulo 10000.
_SLURM_PORT_BASE = 15000
_SLURM_PORT_SPAN = 10000


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------
def _get_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _split_top_level(text: str) -> list[str]:
    """Split ``text`` at commas that are not inside ``[...]``."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM host list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in SLURM host list {text!r}")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(body: str, hostlist: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]`` (zero padding kept)."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            continue
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()):
                raise ValueError(f"bad range {item!r} in SLURM host list {hostlist!r}")
            width = len(lo) if lo.startswith("0") else 0
            a, b = int(lo), int(hi)
            if b < a:
                raise ValueError(f"descending range {item!r} in SLURM host list {hostlist!r}")
            out.extend(str(v).zfill(width) for v in range(a, b + 1))
        else:
            if not item.isdigit():
                raise ValueError(f"bad index {item!r} in SLURM host list {hostlist!r}")
            out.append(item)
    return out


_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM compressed host list, as ``scontrol show hostnames`` does.

    ``"node[01-03,07],gpu5"`` -> ``["node01", "node02", "node03", "node07", "gpu5"]``.
    Several bracket groups in one name expand as a product
    (``"r[1-2]n[1-2]"`` -> ``["r1n1", "r1n2", "r2n1", "r2n2"]``); zero padding is kept.

    Raises:
        ValueError: the list is malformed (unbalanced brackets, a bad range) or empty.
    """
    hosts: list[str] = []
    for part in _split_top_level(hostlist):
        names = [""]
        pos = 0
        for m in _BRACKET.finditer(part):
            prefix = part[pos : m.start()]
            if "[" in prefix or "]" in prefix:
                raise ValueError(f"malformed SLURM host list {hostlist!r}")
            choices = _expand_range_list(m.group(1), hostlist)
            names = [n + prefix + c for n in names for c in choices]
            pos = m.end()
        tail = part[pos:]
        if "[" in tail or "]" in tail:
            raise ValueError(f"malformed SLURM host list {hostlist!r}")
        hosts.extend(n + tail for n in names)
    if not hosts:
        raise ValueError(f"empty SLURM host list {hostlist!r}")
    return hosts


def _first_host(nodelist: str, *, use_scontrol: bool) -> str:
    """The first host of a SLURM node list (``scontrol show hostnames`` if usable, else parsed)."""
    if use_scontrol and shutil.which("scontrol") is not None:
        try:
            proc = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            proc = None
        if proc is not None and proc.returncode == 0:
            for line in proc.stdout.splitlines():
                if line.strip():
                    return line.strip()
    return expand_hostlist(nodelist)[0]


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Entry ``node_id`` of ``SLURM_TASKS_PER_NODE`` (``"2(x3),1"`` = 2, 2, 2, 1)."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if m is None:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    if not 0 <= node_id < len(counts):
        raise ValueError(
            f"SLURM_NODEID={node_id} is outside SLURM_TASKS_PER_NODE={tasks_per_node!r} "
            f"({len(counts)} nodes)"
        )
    return counts[node_id]


def slurm_default_port(job_id: int) -> int:
    """The ``MASTER_PORT`` used for a SLURM job that does not set one: 15000 + job_id mod 10000."""
    return _SLURM_PORT_BASE + int(job_id) % _SLURM_PORT_SPAN


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as the launcher described it.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of processes in the job.
        local_rank: rank among the processes of this node (selects the GPU).
        local_world_size: number of processes on this node.
        master_addr: host of rank 0 (the rendezvous store).
        master_port: port of the rendezvous store.
        launcher: which convention the values came from.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: LauncherName

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, world size {self.world_size})")
        if self.local_world_size < 1:
            raise ValueError(f"local world size must be >= 1, got {self.local_world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"local rank {self.local_rank} is outside [0, local world size "
                f"{self.local_world_size})"
            )
        if self.local_world_size > self.world_size:
            raise ValueError(
                f"local world size {self.local_world_size} exceeds world size {self.world_size}"
            )
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master port {self.master_port} is not a TCP port")
        if self.launcher not in ("torchrun", "deepspeed", "slurm", "single"):
            raise ValueError(f"unknown launcher {self.launcher!r}")

    @classmethod
    def single(cls) -> DistEnv:
        """One process, no launcher."""
        return cls(
            rank=0,
            world_size=1,
            local_rank=0,
            local_world_size=1,
            master_addr=_DEFAULT_MASTER_ADDR,
            master_port=_DEFAULT_MASTER_PORT,
            launcher="single",
        )

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] = os.environ, *, use_scontrol: bool = True
    ) -> DistEnv:
        """Read the launcher's variables.

        Precedence: ``RANK``/``WORLD_SIZE`` (torchrun, or the ``deepspeed`` launcher when it set
        ``LOCAL_SIZE`` and not torchrun's ``TORCHELASTIC_RUN_ID``) win over SLURM's variables, so
        torchrun started by ``srun`` (one task per node) is read as torchrun. Then SLURM
        (``SLURM_PROCID`` + ``SLURM_NTASKS``). Otherwise a single process.

        Args:
            environ: the variables (default: this process's environment).
            use_scontrol: under SLURM, ask ``scontrol show hostnames`` for the first host of
                the node list when the command exists; ``False`` always uses
                :func:`expand_hostlist`. An explicit ``MASTER_ADDR`` wins over both.

        Raises:
            ValueError: a variable is not an integer, or the values are inconsistent
                (e.g. ``RANK >= WORLD_SIZE``).
        """
        if "RANK" in environ and "WORLD_SIZE" in environ:
            rank = _get_int(environ, "RANK")
            world_size = _get_int(environ, "WORLD_SIZE")
            if "LOCAL_WORLD_SIZE" in environ:
                local_world_size = _get_int(environ, "LOCAL_WORLD_SIZE")
            elif "LOCAL_SIZE" in environ:
                local_world_size = _get_int(environ, "LOCAL_SIZE")
            else:  # nothing says how many share the node: assume one node
                local_world_size = world_size
            local_rank = _get_int(environ, "LOCAL_RANK", rank % local_world_size)
            launcher: LauncherName = (
                "deepspeed"
                if "LOCAL_SIZE" in environ and "TORCHELASTIC_RUN_ID" not in environ
                else "torchrun"
            )
            return cls(
                rank=rank,
                world_size=world_size,
                local_rank=local_rank,
                local_world_size=local_world_size,
                master_addr=environ.get("MASTER_ADDR", _DEFAULT_MASTER_ADDR) or _DEFAULT_MASTER_ADDR,
                master_port=_get_int(environ, "MASTER_PORT", _DEFAULT_MASTER_PORT),
                launcher=launcher,
            )

        if "SLURM_PROCID" in environ and ("SLURM_NTASKS" in environ or "SLURM_NPROCS" in environ):
            rank = _get_int(environ, "SLURM_PROCID")
            world_size = _get_int(
                environ, "SLURM_NTASKS" if "SLURM_NTASKS" in environ else "SLURM_NPROCS"
            )
            local_rank = _get_int(environ, "SLURM_LOCALID", 0)
            if environ.get("SLURM_NTASKS_PER_NODE", "").strip().isdigit():
                local_world_size = _get_int(environ, "SLURM_NTASKS_PER_NODE")
            elif environ.get("SLURM_TASKS_PER_NODE", "").strip():
                local_world_size = _tasks_on_node(
                    environ["SLURM_TASKS_PER_NODE"], _get_int(environ, "SLURM_NODEID", 0)
                )
            else:
                local_world_size = world_size
            master_addr = environ.get("MASTER_ADDR", "").strip()
            if not master_addr:
                nodelist = next(
                    (
                        environ[k].strip()
                        for k in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
                        if environ.get(k, "").strip()
                    ),
                    None,
                )
                master_addr = (
                    _first_host(nodelist, use_scontrol=use_scontrol)
                    if nodelist
                    else _DEFAULT_MASTER_ADDR
                )
            if environ.get("MASTER_PORT", "").strip():
                master_port = _get_int(environ, "MASTER_PORT")
            elif environ.get("SLURM_JOB_ID", "").strip():
                master_port = slurm_default_port(_get_int(environ, "SLURM_JOB_ID"))
            else:
                master_port = _DEFAULT_MASTER_PORT
            return cls(
                rank=rank,
                world_size=world_size,
                local_rank=local_rank,
                local_world_size=local_world_size,
                master_addr=master_addr,
                master_port=master_port,
                launcher="slurm",
            )

        return cls.single()


# --------------------------------------------------------------------------------------------
# Degrees
# --------------------------------------------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_degrees(*, world_size: int, loss_group_size: int) -> int:
    """Check ``dp x loss_group_size == world_size`` and return the data-parallel degree ``dp``.

    Raises:
        ValueError: the message names the world size, the loss group size, the data-parallel
            degree the layout would need, and how to fix it.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be an integer >= 1, got {world_size!r}")
    if isinstance(loss_group_size, bool) or not isinstance(loss_group_size, int):
        raise ValueError(f"loss group size must be an integer, got {loss_group_size!r}")
    if loss_group_size < 1:
        raise ValueError(
            f"loss group size must be >= 1, got {loss_group_size} (world size {world_size}); "
            f"use 1 for no vocabulary sharding"
        )
    if world_size % loss_group_size == 0:
        return world_size // loss_group_size
    needed = world_size / loss_group_size
    next_world = math.ceil(world_size / loss_group_size) * loss_group_size
    raise ValueError(
        "cannot lay out the job as data-parallel replicas x loss group = world size: "
        f"world size = {world_size}, loss group size = {loss_group_size}, so the data-parallel "
        f"degree would have to be {world_size} / {loss_group_size} = {needed:.4g}, "
        f"which is not a whole number >= 1. "
        f"Fix: pass a loss group size that divides {world_size} "
        f"(one of {', '.join(map(str, _divisors(world_size)))}), "
        f"or launch a multiple of {loss_group_size} ranks (e.g. {next_world})."
    )


# --------------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------------
def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _device_type_for(backend: str) -> str:
    b = backend.lower()
    if "nccl" in b and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _cuda_index(local_rank: int) -> int:
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank < count:
        return local_rank
    raise ValueError(
        f"local rank {local_rank} has no GPU: this process sees {count} CUDA devices "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); launch at most "
        f"{count} ranks per node or make one device visible per rank"
    )


def _init_method_for(env: DistEnv) -> str:
    """``env://`` when this process's environment describes ``env`` (torchrun's agent store may
    already be listening on MASTER_PORT), else ``tcp://master_addr:master_port``."""
    e = os.environ
    if (
        e.get("RANK") == str(env.rank)
        and e.get("WORLD_SIZE") == str(env.world_size)
        and e.get("MASTER_ADDR") == env.master_addr
        and e.get("MASTER_PORT") == str(env.master_port)
    ):
        return "env://"
    host = env.master_addr
    if ":" in host and not host.startswith("["):  # IPv6 literal
        host = f"[{host}]"
    return f"tcp://{host}:{env.master_port}"


def _subgroup_override(backend: str, timeout: timedelta) -> dict[str, object] | None:
    """Per-dimension backend options carrying ``timeout`` (the mesh's subgroups otherwise get the
    backend's default timeout, 30 min for gloo)."""
    b = backend.lower()
    try:
        if b == "gloo":
            opts = dist.ProcessGroupGloo._Options()
        elif b == "nccl" and hasattr(dist, "ProcessGroupNCCL"):
            opts = dist.ProcessGroupNCCL.Options()
        else:
            return None
        opts._timeout = timeout
    except Exception:  # options object not available in this build: keep the defaults
        return None
    return {"dp": (b, opts), "loss": (b, opts)}


class Topology:
    """The job's layout ``(dp, loss)`` and its process groups, handed out by name.

    Build it once per process with :meth:`build` (or :meth:`single`), keep it, and pass
    ``topology.group("loss")`` / ``topology.group("dp")`` to the functions that communicate.

    With world size 1 no process group is needed or created: every :meth:`group` is ``None``
    (which is what the loss's ``vocab_group=None`` and ``torch.distributed`` collectives'
    ``group=None`` expect), and :attr:`mesh` is ``None``.
    """

    def __init__(
        self,
        *,
        env: DistEnv,
        dp_size: int,
        loss_size: int,
        device: torch.device,
        mesh: object | None,
        owns_process_group: bool,
    ) -> None:
        """Internal: use :meth:`build` or :meth:`single`."""
        if dp_size * loss_size != env.world_size:
            raise ValueError(
                f"dp size {dp_size} x loss size {loss_size} != world size {env.world_size}"
            )
        self._env = env
        self._dp_size = dp_size
        self._loss_size = loss_size
        self._device = device
        self._mesh = mesh
        self._owns_process_group = owns_process_group
        self._destroyed = False

    # ---------------------------------------------------------------- construction
    @classmethod
    def single(cls, *, device: torch.device | str | None = None) -> Topology:
        """A world of one process: no process group, every :meth:`group` is ``None``.

        Args:
            device: the compute device (default ``cuda:0`` when CUDA is available, else CPU).
        """
        if device is None:
            device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return cls(
            env=DistEnv.single(),
            dp_size=1,
            loss_size=1,
            device=torch.device(device),
            mesh=None,
            owns_process_group=False,
        )

    @classmethod
    def build(
        cls,
        *,
        loss_group_size: int,
        env: DistEnv | None = None,
        backend: str | None = None,
        timeout_s: float = 600.0,
    ) -> Topology:
        """Build the topology of this job (a collective: every rank must call it).

        Steps: read the environment (unless ``env`` is given), validate
        ``dp x loss_group_size == world_size``, initialise ``torch.distributed`` if it is not
        yet (``nccl`` when CUDA is available, else ``gloo``; on GPUs the CUDA device is set from
        ``local_rank`` first), and build the device mesh ``(dp, loss)`` with the loss dimension
        innermost. An existing default process group is reused (and then not destroyed by
        :meth:`destroy`); its rank and size must agree with ``env``.

        Args:
            loss_group_size: ranks per loss group (vocabulary shards); 1 = no sharding.
            env: where this process sits; default :meth:`DistEnv.from_environ`.
            backend: ``torch.distributed`` backend; default ``nccl`` on GPUs, ``gloo`` on CPU.
            timeout_s: timeout of every collective of the groups built here (process group
                initialisation included), so a mismatched collective fails instead of hanging.

        Raises:
            ValueError: the degrees do not multiply to the world size (see
                :func:`validate_degrees`), or an existing process group disagrees with ``env``.
        """
        env = DistEnv.from_environ() if env is None else env
        dp_size = validate_degrees(world_size=env.world_size, loss_group_size=loss_group_size)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        timeout = timedelta(seconds=timeout_s)

        if dist.is_available() and dist.is_initialized():
            pg_rank, pg_world = dist.get_rank(), dist.get_world_size()
            if (pg_rank, pg_world) != (env.rank, env.world_size):
                raise ValueError(
                    f"torch.distributed is already initialised with rank {pg_rank} of "
                    f"{pg_world}, but the environment ({env.launcher}) says rank {env.rank} of "
                    f"{env.world_size}; pass env=DistEnv(...) matching the process group"
                )
            backend_name = str(dist.get_backend())
            device_type = _device_type_for(backend_name)
            if device_type == "cuda":
                index = _cuda_index(env.local_rank)
                torch.cuda.set_device(index)
                device = torch.device("cuda", index)
            else:
                device = torch.device("cpu")
            owns = False
        else:
            if env.world_size == 1:
                topo = cls.single()
                topo._env = env
                return topo
            if not dist.is_available():
                raise RuntimeError("torch.distributed is not available in this torch build")
            backend_name = backend or _default_backend()
            device_type = _device_type_for(backend_name)
            init_kwargs: dict[str, object] = {}
            if device_type == "cuda":
                index = _cuda_index(env.local_rank)
                torch.cuda.set_device(index)
                device = torch.device("cuda", index)
                init_kwargs["device_id"] = device
            else:
                device = torch.device("cpu")
            dist.init_process_group(
                backend=backend_name,
                init_method=_init_method_for(env),
                rank=env.rank,
                world_size=env.world_size,
                timeout=timeout,
                **init_kwargs,
            )
            owns = True

        if env.world_size == 1:
            return cls(
                env=env, dp_size=1, loss_size=1, device=device, mesh=None, owns_process_group=owns
            )

        from torch.distributed.device_mesh import init_device_mesh

        override = _subgroup_override(backend_name, timeout)
        mesh = init_device_mesh(
            device_type,
            (dp_size, loss_group_size),
            mesh_dim_names=("dp", "loss"),
            **({"backend_override": override} if override is not None else {}),
        )
        return cls(
            env=env,
            dp_size=dp_size,
            loss_size=loss_group_size,
            device=device,
            mesh=mesh,
            owns_process_group=owns,
        )

    # ---------------------------------------------------------------- groups
    def group(self, name: str) -> dist.ProcessGroup | None:
        """The process group called ``name``: ``"loss"``, ``"dp"`` or ``"world"``.

        Returns ``None`` when the world has one process (no process group exists; ``None`` is
        also what ``torch.distributed`` collectives read as the default group).

        Raises:
            KeyError: unknown name.
            RuntimeError: the topology was destroyed.
        """
        if name not in GROUP_NAMES:
            raise KeyError(f"unknown group {name!r}; the topology has {', '.join(GROUP_NAMES)}")
        if self._destroyed:
            raise RuntimeError("this Topology was destroyed")
        if self._mesh is None:
            return None
        if name == "world":
            return dist.group.WORLD
        return self._mesh.get_group(name)  # type: ignore[attr-defined]

    def group_ranks(self, name: str) -> list[int]:
        """Global ranks of the members of this process's group ``name``, in group-rank order."""
        if name not in GROUP_NAMES:
            raise KeyError(f"unknown group {name!r}; the topology has {', '.join(GROUP_NAMES)}")
        if name == "world":
            return list(range(self.world_size))
        if name == "loss":
            start = self.dp_rank * self._loss_size
            return list(range(start, start + self._loss_size))
        return [d * self._loss_size + self.loss_rank for d in range(self._dp_size)]

    # ---------------------------------------------------------------- properties
    @property
    def env(self) -> DistEnv:
        """The launcher's description of this process."""
        return self._env

    @property
    def rank(self) -> int:
        """Global rank."""
        return self._env.rank

    @property
    def world_size(self) -> int:
        """Number of processes in the job."""
        return self._env.world_size

    @property
    def dp_rank(self) -> int:
        """Index of this process's data-parallel replica (= its loss group): ``rank // loss_size``."""
        return self._env.rank // self._loss_size

    @property
    def dp_size(self) -> int:
        """Number of data-parallel replicas."""
        return self._dp_size

    @property
    def loss_rank(self) -> int:
        """Rank inside the loss group (= which vocabulary shard it owns): ``rank % loss_size``."""
        return self._env.rank % self._loss_size

    @property
    def loss_size(self) -> int:
        """Ranks per loss group."""
        return self._loss_size

    @property
    def device(self) -> torch.device:
        """The compute device of this process (``cuda:<local index>`` on GPUs, else CPU)."""
        return self._device

    @property
    def mesh(self) -> object | None:
        """The ``DeviceMesh`` with dimensions ``("dp", "loss")``; ``None`` for one process."""
        return self._mesh

    @property
    def owns_process_group(self) -> bool:
        """Whether :meth:`build` initialised the default process group (and :meth:`destroy`
        tears it down)."""
        return self._owns_process_group

    # ---------------------------------------------------------------- teardown
    def destroy(self) -> None:
        """Release the groups. Destroys the default process group (and with it every subgroup)
        if :meth:`build` created it; a process group that existed before is left to its owner.
        Idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        self._mesh = None
        if self._owns_process_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def __repr__(self) -> str:
        return (
            f"Topology(rank={self.rank}, world_size={self.world_size}, dp={self.dp_rank}/"
            f"{self.dp_size}, loss={self.loss_rank}/{self.loss_size}, device={self.device}, "
            f"launcher={self._env.launcher!r})"
        )
