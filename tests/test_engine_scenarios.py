"""The scenarios every engine must pass, written once and run for each (DeepSpeed ZeRO and
FSDP2; CPU, gloo, 2 ranks; a vocabulary of 515 rows, so the vocabulary shards are uneven:
258 + 257 rows; gradient clipping low enough to act on every step, so the global norm over body
and head shards is exercised):

* two ranks with a vocabulary-parallel loss over both equal one process, loss and gradient
  norm at every step, and so do the other layouts of each engine (loss group 1, ZeRO-2 by the
  deepspeed launcher, HSDP with activation checkpointing);
* no collective of a training step carries a row of either lm_head (a spy on every c10d and
  functional collective, with positive controls);
* the exported HF student loads, generates, equals the one-process model, and the offline
  export of the last checkpoint is the live export bit for bit;
* models given as directories are loaded sharded (never whole on every rank) and train alike;
* a rank SIGKILLed while its checkpoint is written, then the same command again, gives the
  losses of an uninterrupted run.

Run as a script (``torchrun ... tests/test_engine_scenarios.py CONFIG SPY_DIR``) this file is the
launcher of the spied runs: tailkd-train with every collective of every training step watched.
"""
from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_utils import (REPO, STUDENT, TEACHER, cleanup_shm, close_by_step, command, env, free_port, grad_norms,
                           kill_one_worker, losses, run, wait_for_step)
from trainer_utils import write_config as _write_config

pytestmark = pytest.mark.usefixtures("clean_shm")

REL = 1e-5  # float32; ranks sum in a different order than one process
ENGINES = {
    "deepspeed": dict(engine__kind="deepspeed", engine__ds_config=str(REPO / "ds_configs/zero3.json")),
    "fsdp2": dict(engine__kind="fsdp2"),
}
VOCAB = 515  # not divisible by 2: uneven vocabulary shards


def engine_config(path: Path, data: Path, out: Path, *, engine: str, tied: bool = False, **overrides) -> Path:
    """2 ranks x micro-batch 2 x 2 accumulated = 8 rows per step, a loss group of both ranks.
    tied=True: a student with tied input/output embeddings, which the engines untie (the head
    becomes its own rows, trained separately)."""
    tok = str(data / "tokenizer")
    base = dict(
        models__teacher={"config": {**TEACHER, "vocab_size": VOCAB}, "tokenizer": tok, "init_seed": 1},
        models__student={"config": {**STUDENT, "vocab_size": VOCAB, "tie_word_embeddings": tied},
                         "tokenizer": tok, "init_seed": 2},
        loss__loss_group_size=2, optim__max_steps=4, optim__grad_accum=2, optim__grad_clip=0.3,
        checkpoint__every_steps=2, checkpoint__export_hf_at_end=False, eval__max_batches=1,
    )
    return _write_config(path, data, out, **{**base, **ENGINES[engine], **overrides})


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """The reference: one process, 4 accumulated micro-batches of 2 rows = the 2-rank runs'
    global batch (the streaming order does not depend on the number of ranks). Trained,
    exported and checked by trainer_utils.export_check: the export's logits equal the live
    engine's."""
    import os

    tmp = tmp_path_factory.mktemp("single")
    cfg = engine_config(tmp / "c.yaml", data, tmp / "run", engine="fsdp2", loss__loss_group_size=1,
                        optim__grad_accum=4, checkpoint__export_hf_at_end=True)
    out = subprocess.run([sys.executable, "-c", f"import trainer_utils; trainer_utils.export_check({str(cfg)!r})"],
                         env={**env(), "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])},
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "EXPORT_OK" in out.stdout, out.stderr[-4000:]
    return tmp / "run"


@pytest.fixture(scope="module", params=sorted(ENGINES))
def spied(request, data, tmp_path_factory):
    """2 ranks, the engine sharding over both and the loss split over both, every training
    step spied, HF export at the end."""
    engine = request.param
    tmp = tmp_path_factory.mktemp(f"spied_{engine}")
    cfg = engine_config(tmp / "c.yaml", data, tmp / "run", engine=engine, checkpoint__export_hf_at_end=True)
    spy = tmp / "spy"
    spy.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), __file__, str(cfg), str(spy)]
    try:
        out = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        cleanup_shm()
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return engine, tmp / "run"


@pytest.mark.slow
def test_two_ranks_equal_one_process(spied, single):
    engine, run_dir = spied
    expected = losses(single)
    assert len(expected) == 4 and expected[1] > 0
    close_by_step(losses(run_dir), expected, REL, f"{engine} over 2 ranks vs one process")
    close_by_step(grad_norms(run_dir), grad_norms(single), REL, f"{engine} gradient norms vs one process")


@pytest.mark.slow
def test_lm_head_rows_never_travel(spied):
    engine, run_dir = spied
    reports = [json.loads((run_dir.parent / "spy" / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, rep in enumerate(reports):
        assert rep["steps"] == 4, rep
        # The spy saw the step's traffic (the engine's gathers and reductions, the loss's
        # exchanges) ...
        assert any("allgather" in k or "all_gather" in k for k in rep["ops"]), rep["ops"]
        assert any("reduce" in k for k in rep["ops"]), rep["ops"]
        # ... and none of it carried a row of either lm_head shard,
        assert rep["hits"] == [], (engine, rank, rep["hits"][:5])
        # while it does catch a gather of the head (by c10d; by DTensor under FSDP2).
        assert all(rep["control"].values()) and len(rep["control"]) == {"deepspeed": 1, "fsdp2": 2}[engine], rep
        assert rep["local_rows"] == [258, 257][rank]  # uneven shards: the first V % 2 ranks one more


@pytest.mark.slow
def test_hf_export_loads_generates_and_equals_the_checkpoint(spied, single, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tailkd_dist.export import export_checkpoint

    engine, run_dir = spied
    hf = AutoModelForCausalLM.from_pretrained(run_dir / "hf_student").eval()
    one = AutoModelForCausalLM.from_pretrained(single / "hf_student").eval()
    assert hf.config.vocab_size == VOCAB and not hf.config.tie_word_embeddings
    ids = torch.randint(2, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(input_ids=ids).logits, one(input_ids=ids).logits
        gen = hf.generate(ids[:1, :8], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 13)
    # Gathered from 2 ranks' shards = the model one process trained (whose export is checked
    # against its live engine).
    assert ((a - b).norm() / b.norm()).item() <= REL, engine
    # The last checkpoint, consolidated offline in one process, is the same model, bit for bit.
    out = export_checkpoint(str(run_dir), str(tmp_path / "offline"))
    x, y = load_file(Path(out) / "model.safetensors"), load_file(run_dir / "hf_student/model.safetensors")
    assert sorted(x) == sorted(y)
    for k in x:
        assert torch.equal(x[k], y[k]), (engine, k)


# (engine, layout) -> (overrides, launcher): the other ways each engine lays out 2 ranks
LAYOUTS = {
    ("deepspeed", "zero2_lg1_deepspeed_launcher"): (
        dict(loss__loss_group_size=1, engine__ds_config=str(REPO / "ds_configs/zero2.json")), "deepspeed"),
    ("deepspeed", "zero3_lg1"): (dict(loss__loss_group_size=1), "torchrun"),
    # HSDP: replicate over "dp" = 2, shard over "loss" = 1 (the head gradient is a Partial sum
    # over the replicas), with activation checkpointing
    ("fsdp2", "hsdp_ac"): (dict(loss__loss_group_size=1, engine__activation_checkpointing=True), "torchrun"),
}


@pytest.mark.slow
@pytest.mark.parametrize("engine,layout", sorted(LAYOUTS))
def test_other_layouts_equal_one_process(data, single, tmp_path, engine, layout):
    overrides, launcher = LAYOUTS[engine, layout]
    cfg = engine_config(tmp_path / "c.yaml", data, tmp_path / "run", engine=engine, **overrides)
    run(cfg, launcher=launcher, nproc=2)
    close_by_step(losses(tmp_path / "run"), losses(single), REL, f"{engine} {layout}")
    close_by_step(grad_norms(tmp_path / "run"), grad_norms(single), REL, f"{engine} {layout} gradient norms")


@pytest.mark.slow
def test_a_tied_student_trains_alike_on_both_engines(data, single, tmp_path):
    """Both engines untie a tied student the same way (FSDP2 as HSDP with activation
    checkpointing, DeepSpeed ZeRO-3 with the loss over both ranks)."""
    for engine, kw in (("fsdp2", dict(loss__loss_group_size=1, engine__activation_checkpointing=True)),
                       ("deepspeed", {})):
        cfg = engine_config(tmp_path / f"{engine}.yaml", data, tmp_path / engine, engine=engine, tied=True, **kw)
        run(cfg, launcher="torchrun", nproc=2)
    ds, fs = losses(tmp_path / "deepspeed"), losses(tmp_path / "fsdp2")
    assert len(ds) == 4 and all(abs(ds[s] - losses(single)[s]) > 1e-6 for s in ds)  # tying changed the model
    close_by_step(fs, ds, REL, "tied student: fsdp2 HSDP vs deepspeed zero3")
    close_by_step(grad_norms(tmp_path / "fsdp2"), grad_norms(tmp_path / "deepspeed"), REL, "tied: gradient norms")


# engine -> runs of models given as directories: (name, overrides, lines each run must print)
DIRECTORY_RUNS = {
    "deepspeed": [("zero3", {}, [r"{role} \S+ loaded into ZeRO-3 partitions: (\d+) of its (\d+) parameters"])],
    "fsdp2": [
        ("fsdp", dict(loss__chunk_size=0), [
            r"{role} \S+ read by rank 0 only", r"loss row passes: eager on cpu",
            # loss.chunk_size 0 (auto) on a CPU: 128 MiB per [chunk, V/G] buffer -> the 4096 cap here
            r"loss chunks: 4096 positions \(loss.chunk_size 0 = auto: derived for cpu"]),
        # the row passes compiled (the default on CUDA), said at start and after the step that compiled
        ("hsdp_ac", dict(loss__loss_group_size=1, engine__activation_checkpointing=True, loss__row_passes="compiled"),
         [r"{role} \S+ read by rank 0 only", r"loss row passes: compiled as asked",
          r"loss chunks: 40 positions \(loss.chunk_size\)",
          r"loss row passes: \d+ graph\(s\) compiled so far, [\d.]+ s in all \(at step 1\)"]),
    ],
}


@pytest.mark.parametrize("engine", sorted(DIRECTORY_RUNS))
def test_model_directories_load_sharded(data, single, tmp_path, engine):
    """engine.sharded_load: teacher and student read from directories are never whole on every
    rank (DeepSpeed: straight into ZeRO-3 partitions, each rank about half of each model;
    FSDP2: read by rank 0, the other rank builds on the meta device and receives its shards),
    and the runs' losses and exports equal the one-process run on the same weights."""
    import torch
    from safetensors.torch import load_file

    from tailkd_dist.config import ModelSpec
    from tailkd_dist.models import build_model

    specs = {}
    for role, config, seed in (("teacher", TEACHER, 1), ("student", STUDENT, 2)):
        spec = ModelSpec(config={**config, "vocab_size": VOCAB}, init_seed=seed)
        build_model(spec, dtype=torch.float32, attention="sdpa").save_pretrained(tmp_path / role)
        specs[f"models__{role}"] = {"path": str(tmp_path / role), "tokenizer": str(data / "tokenizer")}
    want = load_file(single / "hf_student" / "model.safetensors")
    for name, overrides, lines in DIRECTORY_RUNS[engine]:
        cfg = engine_config(tmp_path / f"{name}.yaml", data, tmp_path / name, engine=engine, **specs,
                            checkpoint__export_hf_at_end=True, **overrides)
        out = run(cfg, launcher="torchrun", nproc=2)
        for pattern in lines:
            for role in ("teacher", "student") if "{role}" in pattern else (None,):
                m = re.search(pattern.format(role=role), out.stderr)
                assert m, (engine, name, pattern, out.stderr[-3000:])
                if m.groups():  # a ZeRO-3 partition: about half of the model, never all of it
                    mine, total = int(m[1]), int(m[2])
                    assert total > 0 and mine <= total / 2 + 64, (role, mine, total)  # + per-tensor padding
        close_by_step(losses(tmp_path / name), losses(single), REL, f"{engine} {name}: models from directories")
        got = load_file(tmp_path / name / "hf_student" / "model.safetensors")
        assert sorted(got) == sorted(want)
        for key, w in want.items():
            assert (got[key] - w).norm() <= 1e-4 * w.norm(), (engine, name, key)


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sigkill_a_rank_then_resume_is_exact(data, tmp_path, engine):
    full = engine_config(tmp_path / "full.yaml", data, tmp_path / "full", engine=engine)
    run(full, launcher="torchrun", nproc=2)
    cfg = engine_config(tmp_path / "c.yaml", data, tmp_path / "run", engine=engine)
    # Saves take 3 s, so the kill below lands after step 3 and before step 4's checkpoint is
    # complete whatever the machine's speed: the resume must start from step 2.
    proc = subprocess.Popen(command(cfg, launcher="torchrun", nproc=2), env={**env(), "TAILKD_TEST_SAVE_DELAY_S": "3"},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(tmp_path / "run", 3, proc)
        kill_one_worker(proc)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert not (ckpts / "step_00000004/COMPLETE").exists()
    out = run(cfg, launcher="torchrun", nproc=2)
    assert "resumed from step_00000002" in out.stderr + out.stdout
    # Weights, optimizer states, head shards, RNG, loader position and counters are restored
    # and gloo reduces in a fixed order, so the re-run steps should be bitwise equal; 1e-6
    # leaves room for BLAS thread scheduling, far below any real divergence. losses() also
    # checks that metrics.jsonl holds each step once (the resumed run dropped the records of
    # the steps after its checkpoint, and re-ran them).
    close_by_step(losses(tmp_path / "run"), losses(tmp_path / "full"), 1e-6, f"{engine} resumed")
    assert (ckpts / "latest").read_text().strip() == "step_00000004"


# ----------------------------------------------------------------------------------------------
# The spied launch (run by torchrun in the `spied` fixture)
# ----------------------------------------------------------------------------------------------
def _contains_row(buf, row) -> bool:
    """Whether ``row`` (1-D) occurs as a contiguous run of the flattened ``buf``."""

    if buf.dtype != row.dtype or buf.numel() < row.numel() or row.numel() == 0:
        return False
    flat = buf.detach().reshape(-1).cpu()
    return bool((flat.unfold(0, row.numel(), 1) == row.cpu()).all(1).any())


def _sent(func, args, kwargs) -> list:
    """The arguments of a collective whose contents this rank SENDS. Output and receive buffers
    are skipped: they are freshly allocated (torch.empty) and may hold stale bytes of anything,
    and whatever arrives in them was checked as the sender's input on the sending rank."""
    name = func._schema.name.split("::")[-1]
    if name in ("recv_", "wait_tensor", "barrier"):
        return []
    out = []
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if arg.name.startswith("output"):
            continue
        if name == "broadcast_" and arg.name == "tensors" and args[2] != _my_rank(args[1]):
            continue  # a receive buffer on non-root ranks
        out.append(value)
    return out


def _my_rank(pg) -> int:
    try:
        return pg.rank()
    except Exception:  # noqa: BLE001 - unknown: treat as root (check the tensors)
        return -1


def _make_spy(rows_fn):
    """A dispatch mode that sees every collective (c10d ops from torch.distributed / FSDP,
    functional collectives from DTensor) and records those whose tensors hold a head row."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import torch

    class _HeadSpy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()
            self.hits = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
                name = str(func)
                self.ops[name] += 1
                rows = rows_fn()
                for t in tree_leaves(_sent(func, args, kwargs)):
                    if isinstance(t, torch.Tensor):
                        for which, row in rows.items():
                            if _contains_row(t, row):
                                self.hits.append([name, which, list(t.shape)])
            return func(*args, **kwargs)

    return _HeadSpy


def _spied_main(config: str, spy_dir: str) -> int:
    import torch
    import torch.distributed as dist

    import tailkd_dist.train as T

    state = {"steps": 0, "ops": collections.Counter(), "hits": []}
    real_step = T.train_step

    def rows_of(adapter):
        def rows():
            out = {}
            for role in ("student", "teacher"):  # this rank's rows, as the step reads them
                w = getattr(adapter, f"{role}_head").weight.detach()
                out[f"{role}_first"], out[f"{role}_last"] = w[0].clone(), w[-1].clone()
            return out
        return rows

    def spied_step(adapter, micro, **kw):
        state["adapter"] = adapter
        spy = _make_spy(rows_of(adapter))()
        with spy:
            res = real_step(adapter, micro, **kw)
        state["steps"] += 1
        state["ops"].update(spy.ops)
        state["hits"] += spy.hits
        return res

    T.train_step = spied_step
    rc = T.main([config])
    adapter = state["adapter"]
    # Positive controls: the spy catches the head travelling, by c10d (and by DTensor under FSDP2).
    local = adapter.student_head.weight.detach().clone()
    control = {}
    head = getattr(adapter, "student_lm_head", None)
    if head is not None:  # FSDP2: the head is a DTensor
        spy = _make_spy(rows_of(adapter))()
        with spy:
            head.weight.full_tensor()
        control["full_tensor"] = bool(spy.hits)
    spy = _make_spy(rows_of(adapter))()
    with spy:
        rows_max = -(-VOCAB // 2)
        out = torch.empty((2 * rows_max, local.shape[1]), dtype=local.dtype)
        padded = torch.zeros((rows_max, local.shape[1]), dtype=local.dtype)
        padded[: local.shape[0]] = local
        dist.all_gather_into_tensor(out, padded)
    control["c10d"] = bool(spy.hits)
    report = {"steps": state["steps"], "ops": dict(state["ops"]), "hits": state["hits"], "control": control,
              "local_rows": local.shape[0]}
    Path(spy_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    return rc


if __name__ == "__main__":
    sys.exit(_spied_main(sys.argv[1], sys.argv[2]))
