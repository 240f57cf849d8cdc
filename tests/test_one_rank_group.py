"""The one-rank process group of a one-process run: every collective torch.distributed,
DeviceMesh, functional collectives, FSDP2 and DCP call gives what gloo gives at world size 1.

Each case runs once on the one-rank group and once on gloo (world size 1, over an in-memory
store: the reference), in a fresh process each (a process has one default group), with the
same inputs; the results are compared exactly.
"""
from __future__ import annotations

import json
import subprocess
import sys

from trainer_utils import REPO, env

_SCRIPT = r"""
import json, sys, tempfile
import torch, torch.distributed as dist
backend = sys.argv[1]
if backend == "gloo":
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
else:
    from tailkd_dist.parallel.single import init_single_process_group
    init_single_process_group()
    assert dist.get_backend() == "tailkd_one_rank"
torch.manual_seed(0)
x = torch.randn(6, 5)
out = {}
t = x.clone(); dist.all_reduce(t); out["all_reduce"] = t
t = x.clone(); dist.all_reduce(t, op=dist.ReduceOp.MAX); out["all_reduce_max"] = t
t = x.clone(); dist.broadcast(t, src=0); out["broadcast"] = t
t = x.clone(); dist.reduce(t, dst=0); out["reduce"] = t
o = torch.zeros(6, 5); dist.all_gather_into_tensor(o, x); out["all_gather_into_tensor"] = o
o = torch.zeros(30); dist.all_gather_into_tensor(o, x.reshape(-1)); out["all_gather_flat"] = o
l = [torch.zeros(6, 5)]; dist.all_gather(l, x); out["all_gather"] = l[0]
o = torch.zeros(6, 5); dist.reduce_scatter_tensor(o, x); out["reduce_scatter_tensor"] = o
o = torch.zeros(6, 5); dist.reduce_scatter(o, [x.clone()]); out["reduce_scatter"] = o
o = torch.zeros(6, 5); dist.all_to_all_single(o, x); out["all_to_all_single"] = o
g = [torch.zeros(6, 5)]; dist.gather(x, g, dst=0); out["gather"] = g[0]
o = torch.zeros(6, 5); dist.scatter(o, [x.clone()], src=0); out["scatter"] = o
objs = [None]; dist.all_gather_object(objs, {"k": [1, 2]}); assert objs == [{"k": [1, 2]}]
objs = [{"k": 3}]; dist.broadcast_object_list(objs, src=0); assert objs == [{"k": 3}]
dist.barrier()
w = dist.all_reduce(x.clone(), async_op=True); w.wait()
sub = dist.new_group([0]); t = x.clone(); dist.all_reduce(t, group=sub); out["new_group"] = t
import torch.distributed._functional_collectives as fc
out["funcol_all_gather"] = fc.all_gather_tensor(x, 0, dist.group.WORLD).wait()
out["funcol_all_reduce"] = fc.all_reduce(x, "sum", dist.group.WORLD).wait()
out["funcol_reduce_scatter"] = fc.reduce_scatter_tensor(x, "sum", 0, dist.group.WORLD).wait()
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
mesh = init_device_mesh("cpu", (1,))
model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
for layer in (model[0], model[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
model(x).pow(2).sum().backward()
for i, p in enumerate(model.parameters()):
    out[f"fsdp_grad_{i}"] = p.grad.full_tensor()
import torch.distributed.checkpoint as dcp
d = tempfile.mkdtemp()
dcp.save({"m": model.state_dict()}, checkpoint_id=d)
with torch.no_grad():
    for p in model.parameters():
        p.zero_()
state = {"m": model.state_dict()}
dcp.load(state, checkpoint_id=d)
model.load_state_dict(state["m"])
out["dcp_roundtrip"] = model(x)
json.dump({k: v.detach().reshape(-1).tolist() for k, v in out.items()}, sys.stdout)
"""


def _run(backend: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, backend], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_collective_matches_gloo_at_world_size_one():
    ours, gloo = _run("tailkd_one_rank"), _run("gloo")
    assert sorted(ours) == sorted(gloo)
    for name in gloo:
        assert ours[name] == gloo[name], name


def test_refused_where_the_launcher_says_there_are_more_ranks():
    """A job of 2 whose group was never built must not quietly train as 2 separate jobs of 1."""
    done = subprocess.run([sys.executable, "-c", "from tailkd_dist.parallel.single import init_single_process_group; "
                           "init_single_process_group()"], env={**env(), "WORLD_SIZE": "2"}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "WORLD_SIZE=2" in done.stderr, done.stderr[-2000:]
