"""Topology: launcher environments (torchrun, deepspeed, SLURM), degree validation, and the
process groups of a real 4-process gloo job."""
from __future__ import annotations

import os
import stat
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dist_harness import free_port, run_distributed
from tailkd_dist.parallel import (
    DistEnv,
    Topology,
    expand_hostlist,
    slurm_default_port,
    validate_degrees,
)


# ------------------------------------------------------------------------------------------
# Environment parsing
# ------------------------------------------------------------------------------------------
def test_torchrun_environment():
    environ = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "abc",
        "GROUP_RANK": "1",
    }
    assert DistEnv.from_environ(environ) == DistEnv(
        rank=5,
        world_size=8,
        local_rank=1,
        local_world_size=4,
        master_addr="10.0.0.7",
        master_port=29400,
        launcher="torchrun",
    )


def test_deepspeed_launcher_environment():
    # deepspeed/launcher/launch.py sets LOCAL_SIZE (not LOCAL_WORLD_SIZE) and CROSS_RANK/SIZE.
    environ = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_SIZE": "2",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "MASTER_ADDR": "node01",
        "MASTER_PORT": "29500",
    }
    env = DistEnv.from_environ(environ)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("node01", 29500, "deepspeed")


def test_env_without_local_variables_assumes_one_node():
    env = DistEnv.from_environ({"RANK": "2", "WORLD_SIZE": "3"})
    assert (env.local_rank, env.local_world_size, env.launcher) == (2, 3, "torchrun")
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 29500)


def _slurm(**extra: str) -> dict[str, str]:
    environ = {
        "SLURM_PROCID": "4",
        "SLURM_NTASKS": "7",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "3(x2),1",
        "SLURM_NODELIST": "gpu-a[007-008],gpu-b3",
        "SLURM_JOB_ID": "4242421",
    }
    environ.update(extra)
    return environ


def test_slurm_environment_compressed_nodelist():
    env = DistEnv.from_environ(_slurm(), use_scontrol=False)
    assert env == DistEnv(
        rank=4,
        world_size=7,
        local_rank=1,
        local_world_size=3,  # node 1 of "3(x2),1"
        master_addr="gpu-a007",  # first host, zero padding kept
        master_port=slurm_default_port(4242421),
        launcher="slurm",
    )
    assert env.master_port == 15000 + 4242421 % 10000
    # The last node of "3(x2),1" runs one task.
    last = DistEnv.from_environ(
        _slurm(SLURM_PROCID="6", SLURM_LOCALID="0", SLURM_NODEID="2"), use_scontrol=False
    )
    assert (last.rank, last.local_rank, last.local_world_size) == (6, 0, 1)


def test_slurm_ntasks_per_node_master_overrides_and_step_nodelist():
    env = DistEnv.from_environ(
        _slurm(
            SLURM_NTASKS_PER_NODE="4",
            SLURM_STEP_NODELIST="n[12-13]",
            MASTER_PORT="23456",
        ),
        use_scontrol=False,
    )
    assert (env.local_world_size, env.master_addr, env.master_port) == (4, "n12", 23456)
    env = DistEnv.from_environ(_slurm(MASTER_ADDR="10.1.2.3"), use_scontrol=False)
    assert env.master_addr == "10.1.2.3"


def _fake_scontrol(tmp_path, body: str) -> str:
    script = tmp_path / "scontrol"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path) + os.pathsep + os.environ.get("PATH", "")


def test_slurm_master_from_scontrol_and_fallback(tmp_path, monkeypatch):
    # scontrol present: its first line is the master.
    monkeypatch.setenv(
        "PATH",
        _fake_scontrol(
            tmp_path, 'test "$1 $2" = "show hostnames" || exit 3\necho resolved-by-scontrol\necho x'
        ),
    )
    assert DistEnv.from_environ(_slurm()).master_addr == "resolved-by-scontrol"
    # scontrol failing: fall back to the parser.
    (tmp_path / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    assert DistEnv.from_environ(_slurm()).master_addr == "gpu-a007"


def test_torchrun_inside_srun_reads_torchrun():
    environ = _slurm(RANK="2", WORLD_SIZE="8", LOCAL_RANK="2", LOCAL_WORLD_SIZE="4",
                     MASTER_ADDR="gpu-a007", MASTER_PORT="29500", TORCHELASTIC_RUN_ID="x")
    env = DistEnv.from_environ(environ, use_scontrol=False)
    assert (env.launcher, env.rank, env.world_size, env.local_world_size) == ("torchrun", 2, 8, 4)


def test_no_launcher_is_single_process():
    assert DistEnv.from_environ({"PATH": "/bin"}) == DistEnv.single()
    assert DistEnv.single().world_size == 1 and DistEnv.single().launcher == "single"


@pytest.mark.parametrize(
    "environ, needle",
    [
        ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 is outside"),
        ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' is not an integer"),
        ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
         "local rank 2 is outside"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2(y3)",
          "SLURM_NODELIST": "a1"}, "SLURM_TASKS_PER_NODE"),
    ],
)
def test_inconsistent_environment_is_rejected(environ, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        DistEnv.from_environ(environ, use_scontrol=False)


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("node01", ["node01"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("node[8-10],login", ["node8", "node9", "node10", "login"]),
        ("a[1-2]b[08-09]", ["a1b08", "a1b09", "a2b08", "a2b09"]),
        ("gpu-a[007-008],gpu-b3", ["gpu-a007", "gpu-a008", "gpu-b3"]),
        ("x[099-101]", ["x099", "x100", "x101"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node01-03]", "node[a-b]", "node[5-3]", ""])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


# ------------------------------------------------------------------------------------------
# Degrees
# ------------------------------------------------------------------------------------------
def _env(world: int, rank: int = 0) -> DistEnv:
    return DistEnv(rank=rank, world_size=world, local_rank=0, local_world_size=1,
                   master_addr="127.0.0.1", master_port=29500, launcher="torchrun")


def test_degree_error_names_every_factor():
    with pytest.raises(ValueError) as info:
        Topology.build(loss_group_size=4, env=_env(6, rank=1))
    msg = str(info.value)
    for part in ("world size = 6", "loss group size = 4", "6 / 4 = 1.5",
                 "one of 1, 2, 3, 6", "multiple of 4", "e.g. 8"):
        assert part in msg, (part, msg)
    assert not dist.is_initialized()  # validation happens before any process group exists

    with pytest.raises(ValueError, match=r"world size = 2, loss group size = 4.*2 / 4 = 0\.5"):
        validate_degrees(world_size=2, loss_group_size=4)
    with pytest.raises(ValueError, match="loss group size must be >= 1"):
        validate_degrees(world_size=2, loss_group_size=0)
    assert validate_degrees(world_size=8, loss_group_size=2) == 4
    assert validate_degrees(world_size=3, loss_group_size=3) == 1


def test_single_topology_needs_no_process_group():
    for topo in (Topology.single(), Topology.build(loss_group_size=1, env=DistEnv.single())):
        assert not dist.is_initialized()
        assert (topo.rank, topo.world_size, topo.dp_rank, topo.dp_size) == (0, 1, 0, 1)
        assert (topo.loss_rank, topo.loss_size, topo.mesh) == (0, 1, None)
        assert topo.device == (torch.device("cuda", 0) if torch.cuda.is_available()
                               else torch.device("cpu"))
        for name in ("loss", "dp", "world"):
            assert topo.group(name) is None
        assert topo.group_ranks("loss") == [0]
        with pytest.raises(KeyError, match="unknown group 'tp'"):
            topo.group("tp")
        topo.destroy()
        topo.destroy()
    with pytest.raises(ValueError, match="loss group size = 2"):
        Topology.build(loss_group_size=2, env=DistEnv.single())


# ------------------------------------------------------------------------------------------
# A real job: 4 gloo processes
# ------------------------------------------------------------------------------------------
def _group_report(topo: Topology) -> dict:
    """Members, collective sums and timeouts of each named group."""
    out: dict = {
        "rank": topo.rank,
        "dp_rank": topo.dp_rank,
        "dp_size": topo.dp_size,
        "loss_rank": topo.loss_rank,
        "loss_size": topo.loss_size,
        "device": str(topo.device),
    }
    for name in ("loss", "dp", "world"):
        g = topo.group(name)
        t = torch.tensor([float(dist.get_rank())], dtype=torch.float64)
        dist.all_reduce(t, group=g)
        backend = g._get_backend(torch.device("cpu"))
        out[name] = {
            "members": dist.get_process_group_ranks(g),
            "group_ranks": topo.group_ranks(name),
            "sum": t.item(),
            "group_rank": dist.get_rank(g),
            "timeout": getattr(getattr(backend, "options", None), "_timeout", None),
        }
    mesh = topo.mesh
    out["mesh_local"] = (mesh.get_local_rank("dp"), mesh.get_local_rank("loss"))
    out["mesh"] = mesh.mesh.tolist()
    return out


def _topology_worker(rank: int, world_size: int) -> dict:
    # The harness set torchrun's variables (init="env"): Topology.build initialises the group.
    assert not dist.is_initialized()
    topo = Topology.build(loss_group_size=2, timeout_s=45)
    assert topo.owns_process_group and topo.env.launcher == "torchrun"
    report = {2: _group_report(topo)}
    # A second layout over the same (now existing) process group.
    for size in (4, 1):
        other = Topology.build(loss_group_size=size, timeout_s=45)
        assert not other.owns_process_group
        report[size] = _group_report(other)
        other.destroy()  # not the owner: the process group survives
    assert dist.is_initialized()
    topo.destroy()
    assert not dist.is_initialized()
    return report


def test_four_process_groups():
    reports = run_distributed(_topology_worker, 4, init="env", timeout_s=90)
    loss_members = {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
    dp_members = {0: [0, 2], 1: [1, 3], 2: [0, 2], 3: [1, 3]}
    for rank, rep in enumerate(reports):
        r = rep[2]
        assert (r["rank"], r["dp_rank"], r["dp_size"]) == (rank, rank // 2, 2)
        assert (r["loss_rank"], r["loss_size"], r["device"]) == (rank % 2, 2, "cpu")
        assert r["mesh"] == [[0, 1], [2, 3]]
        assert r["mesh_local"] == (rank // 2, rank % 2)
        assert r["loss"]["members"] == r["loss"]["group_ranks"] == loss_members[rank]
        assert r["dp"]["members"] == r["dp"]["group_ranks"] == dp_members[rank]
        assert r["world"]["members"] == r["world"]["group_ranks"] == [0, 1, 2, 3]
        assert r["loss"]["sum"] == sum(loss_members[rank])  # 1 or 5
        assert r["dp"]["sum"] == sum(dp_members[rank])  # 2 or 4
        assert r["world"]["sum"] == 6
        assert (r["loss"]["group_rank"], r["dp"]["group_rank"]) == (rank % 2, rank // 2)
        for name in ("loss", "dp"):
            if r[name]["timeout"] is not None:  # private attribute; checked where it exists
                assert r[name]["timeout"] == timedelta(seconds=45)
        # loss group of the whole world, and no sharding (dp = world)
        r4, r1 = rep[4], rep[1]
        assert (r4["dp_size"], r4["loss_rank"], r4["loss"]["members"]) == (1, rank, [0, 1, 2, 3])
        assert r4["dp"]["members"] == [rank] and r4["loss"]["sum"] == 6
        assert (r1["dp_size"], r1["dp_rank"], r1["loss"]["members"]) == (4, rank, [rank])
        assert r1["dp"]["members"] == [0, 1, 2, 3] and r1["dp"]["sum"] == 6


def _slurm_worker(rank: int, world_size: int, port: int) -> tuple[str, int, list[int], float]:
    # As srun would set it (no RANK/WORLD_SIZE): Topology.build takes the tcp:// path.
    environ = {
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": str(world_size),
        "SLURM_LOCALID": str(rank),
        "SLURM_TASKS_PER_NODE": str(world_size),
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "127.0.0.[1-1]",
        "SLURM_JOB_ID": "77",
        "MASTER_PORT": str(port),
    }
    env = DistEnv.from_environ(environ, use_scontrol=False)
    topo = Topology.build(loss_group_size=2, env=env, timeout_s=45)
    t = torch.ones(1)
    dist.all_reduce(t, group=topo.group("loss"))
    members = dist.get_process_group_ranks(topo.group("dp"))
    out = (env.master_addr, topo.dp_rank, members, t.item())
    topo.destroy()
    return out


def test_slurm_job_initialises_over_tcp():
    port = free_port()
    res = run_distributed(_slurm_worker, 2, args=(port,), init=None, timeout_s=90)
    assert res == [("127.0.0.1", 0, [0], 2.0), ("127.0.0.1", 0, [1], 2.0)]
