"""The private process group of a one-process run.

DeepSpeed and FSDP2 need a process group even alone. The usual ``env://`` rendezvous would
open a TCP store listening on every interface, unauthenticated, for a job that has no peer;
this group uses an in-memory store instead, and puts gloo's device (which still listens, for
its own connections) on the loopback interface, so nothing of the run is reachable from
another machine.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def _loopback_interface() -> str | None:
    for _, name in socket.if_nameindex():
        if name == "lo":
            return name
    return None


def init_single_process_group(device: torch.device) -> None:
    """World size 1: the default process group over an in-memory store (no port opened)."""
    if dist.is_initialized():
        return
    if device.type != "cuda":
        lo = _loopback_interface()
        if lo is not None:
            # Read by every gloo group this process makes later, too (DeepSpeed, FSDP2 make some).
            os.environ["GLOO_SOCKET_IFNAME"] = lo
    extra = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1, **extra)
