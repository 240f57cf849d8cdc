"""A one-process run opens no port at all.

DeepSpeed and FSDP2 need a process group even alone; the trainer gives them a one-rank group
with no store server and no transport (gloo would listen on a socket per group, NCCL's
bootstrap on an outside interface). Checked by listing the listening sockets the process owns
(/proc: the kernel's socket tables and the process's file descriptors) while it is inside a
training step.
"""
from __future__ import annotations

import ipaddress
import os
import subprocess
import time

import pytest

from trainer_utils import REPO, command, env, write_config


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that ``pid`` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("tcp", 4), ("tcp6", 16)):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                addr_hex, port_hex = local.split(":")
                raw = bytes.fromhex(addr_hex)
                # /proc prints the address as 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                out.append((str(ipaddress.ip_address(raw)), int(port_hex, 16)))
    return out


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_single_process_run_listens_on_no_port(data, tmp_path, engine):
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=2, engine__kind=engine,
                       checkpoint__export_hf_at_end=False)
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen(command(cfg), env={**env(), "TAILKD_TEST_PAUSE": "loop:60",
                                                   "TAILKD_TEST_RELEASE": str(tmp_path / "release")},
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=f)
    try:
        deadline = time.monotonic() + 180
        while "tailkd-test: pause loop" not in err.read_text():
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert _listening(proc.pid) == []
        (tmp_path / "release").touch()  # the run goes on at once
        assert proc.wait(timeout=180) == 0, err.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_listing_sees_a_listening_socket():
    """The /proc reading finds a socket this process listens on (so an empty list means none)."""
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        found = _listening(os.getpid())
        assert ("0.0.0.0", port) in found, found
    with socket.socket() as s:  # a loopback-only one counts too
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert ("127.0.0.1", s.getsockname()[1]) in _listening(os.getpid())
