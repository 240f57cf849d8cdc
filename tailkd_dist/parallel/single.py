"""The private process group of a one-process run: no store, no transport, no port.

DeepSpeed and FSDP2 need a process group even alone. The usual ``env://`` rendezvous opens a
TCP store listening on every interface, unauthenticated, for a job that has no peer; gloo
then listens on a socket of its own for every group, and NCCL's bootstrap keeps a listening
socket on the first non-loopback interface for the communicator's life. With one rank every
collective is the identity (a sum, a gather or a scatter over one rank is a copy), so this
group is a ``torch.distributed`` backend of its own that does exactly that, registered for
every device type and used over an in-memory store: the run opens no socket at all.

It is a Python ``ProcessGroup``, the way torch's own threaded test backend is written: c10d
hands such a group the collectives by name (``allreduce``, ``all_gather_single``, ...), and
``new_group``, ``DeviceMesh``, functional collectives, FSDP2 and DCP resolve it like any other.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future

BACKEND = "tailkd_one_rank"


def _done(result) -> dist.Work:
    """A finished Work whose future holds ``result`` (on the tensors' devices: a future must
    list the devices of the tensors it carries)."""
    devices = sorted({t.device for t in _tensors(result) if t.device.type != "cpu"}, key=str)
    future = torch.futures.Future(devices=devices) if devices else torch.futures.Future()
    future.set_result(result)
    return _create_work_from_future(future)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _copy(out: torch.Tensor, inp: torch.Tensor) -> None:
    if out.data_ptr() != inp.data_ptr():
        out.copy_(inp.reshape(out.shape))


class OneRankGroup(dist.ProcessGroup):
    """Rank 0 of 1: every reduction leaves its tensors as they are, every gather and scatter
    copies its one input to its one output; nothing waits, nothing is sent."""

    def __init__(self) -> None:
        super().__init__(0, 1)
        self._name = self._desc = ""

    def getBackendName(self) -> str:
        return BACKEND

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1

    # c10d names the group after construction; a Python group keeps the name itself
    def _set_group_name(self, name: str) -> None:
        self._name = name

    @property
    def group_name(self) -> str:
        return self._name

    def _set_group_desc(self, desc: str) -> None:
        self._desc = desc

    @property
    def group_desc(self) -> str:
        return self._desc

    # ---- reductions over one rank: the identity
    def allreduce(self, tensors, opts=None):
        return _done(tensors)

    def allreduce_coalesced(self, tensors, opts=None):
        return _done(tensors)

    def reduce(self, tensors, opts=None):
        return _done(tensors)

    def broadcast(self, tensors, opts=None):
        return _done(tensors)

    def barrier(self, opts=None):
        return _done(None)

    # ---- gathers and scatters over one rank: a copy
    def allgather(self, outputs, inputs, opts=None):
        for out, inp in zip(outputs, inputs, strict=True):
            _copy(out[0], inp)
        return _done(outputs)

    def allgather_coalesced(self, outputs, inputs, opts=None):
        return self.allgather(outputs, inputs, opts)

    def all_gather_single(self, output, input, opts=None):
        _copy(output, input)
        return _done([output])

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        for out, inp in zip(outputs, inputs, strict=True):
            _copy(out, inp)
        return _done(outputs)

    def gather(self, outputs, inputs, opts=None):
        return self.allgather(outputs, inputs, opts)

    def reduce_scatter(self, outputs, inputs, opts=None):
        for out, inp in zip(outputs, inputs, strict=True):
            _copy(out, inp[0])
        return _done(outputs)

    def reduce_scatter_single(self, output, input, opts=None):
        _copy(output, input)
        return _done([output])

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        return self.all_gather_single_coalesced(outputs, inputs, opts)

    def scatter(self, outputs, inputs, opts=None):
        return self.reduce_scatter(outputs, inputs, opts)

    def alltoall(self, outputs, inputs, opts=None):
        return self.all_gather_single_coalesced(outputs, inputs, opts)

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        _copy(output, input)
        return _done([output])


def _create(store, rank: int, world_size: int, timeout) -> OneRankGroup:
    if world_size != 1:
        raise ValueError(f"the {BACKEND} backend serves one process; this group has {world_size}")
    return OneRankGroup()


def _register() -> None:
    if BACKEND not in dist.Backend.backend_list:
        devices = ["cpu"] + [d for d in ("cuda", "xpu") if getattr(torch, d).is_available()]
        dist.Backend.register_backend(BACKEND, _create, devices=devices)


def init_single_process_group() -> None:
    """World size 1: the default process group is a ``OneRankGroup`` over an in-memory store."""
    if dist.is_initialized():
        return
    launched = os.environ.get("WORLD_SIZE", "1")
    if launched != "1":
        raise RuntimeError(f"the launcher says WORLD_SIZE={launched}, but no process group was initialised: "
                           "build the job's group first (parallel.topology.Topology.build)")
    _register()
    dist.init_process_group(BACKEND, store=dist.HashStore(), rank=0, world_size=1)
