"""Helpers for the trainer's end-to-end tests: prepared data, tiny configs, launches."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dist_harness import free_port  # noqa: F401  (one definition for every test module)

REPO = Path(__file__).resolve().parents[1]

TEACHER = dict(model_type="llama", vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
STUDENT = dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def prepare_data(out: Path, *, seq_len: int = 32, docs: int = 40) -> Path:
    """A slice of the python-stdlib corpus with a trained 512-token BPE (the real prepare tool)."""
    if not (out / "manifest.json").exists():
        subprocess.run(
            [sys.executable, "-m", "tailkd_dist.data.prepare", "python-stdlib", "-o", str(out),
             "--seq-len", str(seq_len), "--train-tokenizer", "512", "--max-docs", str(docs),
             "--val-fraction", "0.2", "--no-progress"],
            check=True, capture_output=True, text=True, cwd=REPO,
        )
    return out


def write_config(path: Path, data: Path, out: Path, **overrides) -> Path:
    cfg = {
        "output_dir": str(out),
        "seed": 7,
        "models": {
            "teacher": {"config": TEACHER, "tokenizer": str(data / "tokenizer"), "init_seed": 1},
            "student": {"config": STUDENT, "tokenizer": str(data / "tokenizer"), "init_seed": 2},
        },
        "data": {"path": str(data), "micro_batch_size": 2},
        "loss": {"divergence": "tad", "k": 10, "beta": 2.0, "chunk_size": 40},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "max_steps": 3, "grad_accum": 1},
        "engine": {"kind": "deepspeed", "ds_config": str(REPO / "ds_configs/zero2.json"),
                   "teacher_ds_config": str(REPO / "ds_configs/teacher_zero3.json"), "dist_timeout_s": 120},
        "checkpoint": {"every_steps": 100},
        "logging": {"progress_bar": False},
        "eval": {"max_batches": 2},
    }
    cfg = copy.deepcopy(cfg)  # overrides must never reach the shared TEACHER / STUDENT dicts
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def close_by_step(a: dict, b: dict, rel: float, what: str) -> None:
    """Two {step: value} series agree step by step within ``rel`` (relative to ``b``)."""
    assert sorted(a) == sorted(b), (what, sorted(a), sorted(b))
    for s in a:
        assert abs(a[s] - b[s]) <= rel * abs(b[s]), f"{what}: step {s}: {a[s]!r} vs {b[s]!r}"


def env() -> dict:
    e = dict(os.environ)
    e["DS_ACCELERATOR"] = "cpu"
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def command(config: Path, *, launcher: str = "python", nproc: int = 1, extra=()) -> list[str]:
    if launcher == "python":
        return [sys.executable, "-m", "tailkd_dist.train", str(config), *extra]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), "-m", "tailkd_dist.train", str(config), *extra]
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()),
                "--module", "tailkd_dist.train", str(config), *extra]
    raise ValueError(launcher)


def run(config: Path, *, launcher="python", nproc=1, extra=(), timeout=300, check=True):
    out = subprocess.run(command(config, launcher=launcher, nproc=nproc, extra=extra), env=env(), cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"trainer failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


def step_records(out_dir: Path) -> list[dict]:
    """metrics.jsonl's training-step records (evaluations have records of their own)."""
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss/total" in r]


def losses(out_dir: Path) -> dict[int, float]:
    """Per-step total loss from metrics.jsonl; a step recorded twice is an error (a resumed run
    drops the records of the steps it runs again)."""
    recs = step_records(out_dir)
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"metrics.jsonl records a step twice: {steps}"
    return {r["step"]: r["loss/total"] for r in recs}


def grad_norms(out_dir: Path) -> dict[int, float]:
    """Per-step global gradient norm before clipping (the whole student: body and head) from
    metrics.jsonl: comparing it checks the gradients' scale, which AdamW's updates, and so the
    losses, barely show."""
    return {r["step"]: r["optim/grad_norm"] for r in step_records(out_dir)}


def wait_for_step(out_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    path = out_dir / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if path.exists() and any(json.loads(x)["step"] >= step for x in path.read_text().splitlines() if x):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def kill_one_worker(launcher_proc: subprocess.Popen) -> int:
    """SIGKILL one training worker (a child of the launcher), as a node failure would."""
    import psutil

    children = [c for c in psutil.Process(launcher_proc.pid).children(recursive=True)
                if "tailkd_dist.train" in " ".join(c.cmdline())]
    assert children, "no training worker found"
    victim = children[-1]
    os.kill(victim.pid, signal.SIGKILL)
    return victim.pid


def cleanup_shm() -> None:
    """The deepspeed launcher leaves a 66 MiB /dev/shm buffer per rank (environment.md): remove
    those no process maps (a run still going, in a test beside this one, keeps its own)."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(ln.split()[-1] for ln in maps.read_text().splitlines() if "deepspeed_allreduce_buffer_" in ln)
        except OSError:  # the process ended, or is not ours to read
            pass
    for f in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        if str(f) in mapped:
            continue
        try:
            f.unlink()
        except OSError:
            pass


def export_check(config: str) -> None:
    """In one process: train, export, reload with HF and compare logits with the live engine's.
    Run via ``python -c`` so the test process never initialises DeepSpeed itself."""
    import torch
    from transformers import AutoModelForCausalLM

    from tailkd_dist.config import load_config
    from tailkd_dist.step import _to
    from tailkd_dist.train import _eval_batches, make_loaders, train

    cfg = load_config(config)
    res = train(cfg)
    adapter = res["adapter"]
    _, eval_cfg = make_loaders(cfg, tok_dir=str(Path(cfg.data.path) / "tokenizer"), vocab=512)
    batch = _to(_eval_batches(eval_cfg, 1)[0], "cpu")
    adapter.eval()
    with torch.no_grad():
        h = adapter.student_hidden(batch)
        live = h @ adapter.student_head.weight.t()
        hf = AutoModelForCausalLM.from_pretrained(os.path.join(cfg.output_dir, "hf_student"))
        hf.eval()
        # use_cache=False as in training: without a KV cache HF reads document boundaries from
        # the restarting position ids and masks attention per document.
        exported = hf(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        rel = ((exported - live).norm() / live.norm()).item()
        gen = hf.generate(batch["input_ids"][:1, :8], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert gen.shape[1] == 13, gen.shape
    assert rel <= 1e-6, f"exported logits differ from the engine's: relative {rel:.2e}"
    print(f"EXPORT_OK rel={rel:.2e}")
