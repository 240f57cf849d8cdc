"""End-to-end tests of tailkd-train on FSDP2 (CPU, gloo, 2 ranks): per-step losses equal to one
process and to DeepSpeed ZeRO-3, the lm_head never all-gathered by the step, HF export (live
and from the DCP files). SIGKILL + resume: tests/test_engine_scenarios.py, for both engines.

The vocabulary has 515 rows, so FSDP2's chunked shards are uneven (258 + 257 rows) and the
fused loss takes them as they are. Gradient clipping is set low enough to act on every step,
so the global norm over the DTensor gradients (body and head shards) is exercised too.

Run as a script (``torchrun ... tests/test_train_fsdp2.py CONFIG SPY_DIR``) this file is the
launcher of the spied run: tailkd-train with every collective of every training step watched
for rows of the lm_heads (see ``_HeadSpy``).
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_utils import REPO, STUDENT, TEACHER, cleanup_shm, close_by_step, env, free_port, grad_norms, losses, run
from trainer_utils import write_config as _write_config

REL = 1e-5  # float32; ranks sum in a different order than one process
VOCAB = 515  # not divisible by 2: uneven FSDP2 shards


def write_config(path: Path, data: Path, out: Path, *, tied: bool = False, **overrides) -> Path:
    tok = str(data / "tokenizer")
    base = dict(
        models__teacher={"config": {**TEACHER, "vocab_size": VOCAB}, "tokenizer": tok, "init_seed": 1},
        # tied=True: tied input/output embeddings, which the engines untie (the head becomes
        # its own rows, trained separately).
        models__student={"config": {**STUDENT, "vocab_size": VOCAB, "tie_word_embeddings": tied},
                         "tokenizer": tok, "init_seed": 2},
        engine__kind="fsdp2", loss__loss_group_size=2, optim__max_steps=4, optim__grad_accum=2,
        optim__grad_clip=0.3, checkpoint__every_steps=2, checkpoint__export_hf_at_end=False,
        eval__max_batches=1,
    )
    return _write_config(path, data, out, **{**base, **overrides})


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """One process, 4 accumulated micro-batches of 2 rows = the 2-rank runs' global batch (the
    streaming order does not depend on the number of ranks). Trained, exported and checked by
    trainer_utils.export_check: the exported HF model's logits equal the live engine's."""
    tmp = tmp_path_factory.mktemp("single")
    cfg = write_config(tmp / "c.yaml", data, tmp / "run", loss__loss_group_size=1, optim__grad_accum=4,
                       checkpoint__export_hf_at_end=True)
    out = subprocess.run([sys.executable, "-c", f"import trainer_utils; trainer_utils.export_check({str(cfg)!r})"],
                         env={**env(), "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])},
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "EXPORT_OK" in out.stdout, out.stderr[-4000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def ref(data, tmp_path_factory):
    """2 ranks, FSDP over both (loss group = shard group = 2), every step spied, HF export."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp / "c.yaml", data, tmp / "run", checkpoint__export_hf_at_end=True)
    spy = tmp / "spy"
    spy.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), __file__, str(cfg), str(spy)]
    out = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return tmp / "run"


@pytest.mark.slow
def test_losses_match_single_process_and_zero3(data, single, ref, tmp_path):
    expected = losses(single)
    assert len(expected) == 4 and expected[1] > 0
    close_by_step(losses(ref), expected, REL, "fsdp2 over 2 ranks vs one process")
    close_by_step(grad_norms(ref), grad_norms(single), REL, "fsdp2 gradient norms vs one process")
    # FSDP2 as HSDP (replicate over "dp" = 2, shard over "loss" = 1: the head gradient is a
    # Partial sum over the replicas) with activation checkpointing, vs DeepSpeed ZeRO-3 with
    # a vocab-parallel loss over 2 ranks; both with a tied student, which the engines untie.
    # (The other runs keep the student untied: the collective spy of `ref` recognises the
    # head by its rows, which a tied student's input embedding shares before the first step.)
    hsdp = write_config(tmp_path / "hsdp.yaml", data, tmp_path / "hsdp", tied=True, loss__loss_group_size=1,
                        engine__activation_checkpointing=True)
    run(hsdp, launcher="torchrun", nproc=2)
    zero3 = write_config(tmp_path / "z3.yaml", data, tmp_path / "z3", tied=True, engine__kind="deepspeed",
                         engine__ds_config=str(REPO / "ds_configs/zero3.json"))
    try:
        run(zero3, launcher="torchrun", nproc=2)
    finally:
        cleanup_shm()
    z3 = losses(tmp_path / "z3")
    assert len(z3) == 4 and all(abs(z3[s] - expected[s]) > 1e-6 for s in z3)  # tying changed the model
    close_by_step(losses(tmp_path / "hsdp"), z3, REL, "fsdp2 HSDP + activation checkpointing vs deepspeed zero3")
    close_by_step(grad_norms(tmp_path / "hsdp"), grad_norms(tmp_path / "z3"), REL, "HSDP vs zero3 gradient norms")


def test_model_directories_load_on_rank0_and_shard_from_there(data, single, tmp_path):
    """engine.sharded_load under FSDP2: teacher and student given as directories are read by
    rank 0 only; the other rank builds them on the meta device and receives its shards (and
    the rotary buffers) from rank 0. Losses equal the one-process run on the same weights,
    with FSDP over both ranks and as HSDP with activation checkpointing (a 2-D mesh, wrapped
    blocks) and the loss's row passes compiled."""
    import torch

    from tailkd_dist.config import ModelSpec
    from tailkd_dist.models import build_model

    specs = {}
    for role, config, seed in (("teacher", TEACHER, 1), ("student", STUDENT, 2)):
        spec = ModelSpec(config={**config, "vocab_size": VOCAB}, init_seed=seed)
        build_model(spec, dtype=torch.float32, attention="sdpa").save_pretrained(tmp_path / role)
        specs[f"models__{role}"] = {"path": str(tmp_path / role), "tokenizer": str(data / "tokenizer")}
    expected = losses(single)
    # The HSDP run also compiles the loss's row passes (the default on CUDA; eager on CPUs),
    # and each run says which it uses.
    for name, kw, path in (
        ("fsdp", dict(loss__chunk_size=0), "loss row passes: eager on cpu"),
        ("hsdp_ac", dict(loss__loss_group_size=1, engine__activation_checkpointing=True,
                         loss__row_passes="compiled"), "loss row passes: compiled as asked"),
    ):
        cfg = write_config(tmp_path / f"{name}.yaml", data, tmp_path / name, **specs, **kw)
        out = run(cfg, launcher="torchrun", nproc=2)
        assert path in out.stderr, (name, out.stderr[-3000:])
        # loss.chunk_size 0 (auto) on a CPU: 128 MiB per [chunk, V/G] buffer -> the 4096 cap here
        chunks = ("loss chunks: 4096 positions (loss.chunk_size 0 = auto: derived for cpu" if name == "fsdp"
                  else "loss chunks: 40 positions (loss.chunk_size)")
        assert chunks in out.stderr, (name, out.stderr[-3000:])
        compiled_at_step_1 = re.search(r"loss row passes: (\d+) graph\(s\) compiled so far, [\d.]+ s in all \(at step 1\)",
                                       out.stderr)
        assert bool(compiled_at_step_1) == (name == "hsdp_ac"), (name, out.stderr[-3000:])
        for role in ("teacher", "student"):
            assert f"{role} {tmp_path / role} read by rank 0 only" in out.stderr, (role, out.stderr[-3000:])
        close_by_step(losses(tmp_path / name), expected, REL, f"{name}: directories read by rank 0 only")


@pytest.mark.slow
def test_lm_head_is_never_all_gathered(ref):
    spy = ref.parent / "spy"
    reports = [json.loads((spy / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, rep in enumerate(reports):
        assert rep["steps"] == 4, rep
        # The spy saw the step's traffic (FSDP's all-gathers and reduce-scatters, the loss's
        # gathers and all-reduces) ...
        ops = rep["ops"]
        assert any("allgather" in k or "all_gather" in k for k in ops), ops
        assert any("reduce_scatter" in k for k in ops), ops
        # ... and none of it carried a row of either lm_head shard,
        assert rep["hits"] == [], (rank, rep["hits"][:5])
        # while it does catch a gather of the head, as DTensor (full_tensor) or FSDP (c10d) does it.
        assert rep["control"]["full_tensor"] and rep["control"]["c10d"], (rank, rep["control"])
        assert rep["local_rows"] == [258, 257][rank]  # torch.chunk-style uneven shards


@pytest.mark.slow
def test_hf_export_loads_generates_and_matches(ref, single, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tailkd_dist.export import export_checkpoint

    hf = AutoModelForCausalLM.from_pretrained(ref / "hf_student").eval()
    one = AutoModelForCausalLM.from_pretrained(single / "hf_student").eval()
    assert hf.config.vocab_size == VOCAB and not hf.config.tie_word_embeddings
    ids = torch.randint(2, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(input_ids=ids).logits, one(input_ids=ids).logits
        gen = hf.generate(ids[:1, :8], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 13)
    # Gathered from 2 ranks' shards (body via full state dict, head via full_tensor) = the model
    # one process trained (the single run's export is checked against its live engine).
    assert ((a - b).norm() / b.norm()).item() <= REL
    # The DCP checkpoint of the last step, consolidated offline, is the same model, bit for bit.
    out = export_checkpoint(str(ref), str(tmp_path / "from_dcp"))
    x, y = load_file(Path(out) / "model.safetensors"), load_file(ref / "hf_student/model.safetensors")
    assert sorted(x) == sorted(y)
    for k in x:
        assert torch.equal(x[k], y[k]), k


# ----------------------------------------------------------------------------------------------
# The spied launch (run by torchrun in the `ref` fixture)
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
            for role in ("student", "teacher"):
                w = getattr(adapter, f"{role}_lm_head").weight.to_local().detach()
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
    # Positive controls: the spy catches the head travelling, by DTensor and by c10d.
    head = adapter.student_lm_head.weight
    spy = _make_spy(rows_of(adapter))()
    with spy:
        head.full_tensor()
    control = {"full_tensor": bool(spy.hits)}
    spy = _make_spy(rows_of(adapter))()
    with spy:
        local = head.to_local().detach().clone()
        rows_max = -(-VOCAB // 2)
        out = torch.empty((2 * rows_max, local.shape[1]), dtype=local.dtype)
        padded = torch.zeros((rows_max, local.shape[1]), dtype=local.dtype)
        padded[: local.shape[0]] = local
        dist.all_gather_into_tensor(out, padded)
    control["c10d"] = bool(spy.hits)
    report = {"steps": state["steps"], "ops": dict(state["ops"]), "hits": state["hits"], "control": control,
              "local_rows": head.to_local().shape[0]}
    Path(spy_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    return rc


if __name__ == "__main__":
    sys.exit(_spied_main(sys.argv[1], sys.argv[2]))
