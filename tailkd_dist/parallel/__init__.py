"""Process topology and the vocabulary-parallel pieces of tailkd_dist.

:class:`Topology` is built once per process from the launcher's environment (torchrun, the
``deepspeed`` launcher, SLURM's ``srun``, or a single process) and hands out the ``"loss"``,
``"dp"`` and ``"world"`` process groups by name. Library functions take their group as an
argument; nothing in the package reads a module-global group.
"""
from .topology import (
    GROUP_NAMES,
    DistEnv,
    LauncherName,
    Topology,
    expand_hostlist,
    slurm_default_port,
    validate_degrees,
)

__all__ = [
    "GROUP_NAMES",
    "DistEnv",
    "LauncherName",
    "Topology",
    "expand_hostlist",
    "slurm_default_port",
    "validate_degrees",
]
