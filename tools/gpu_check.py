"""The GPU check: the loss table and real training steps, in one command, well under 10 minutes.

    python tools/gpu_check.py --data .gpu/data --json gpu_check.json     # on a GPU machine
    python tools/gpu_check.py --dry-run --data DIR                        # the same on CPU, tiny

Prints one table (and writes it as JSON):

1. the environment (library versions, device);
2. the bf16 matmul ceiling, measured in this process: one [N, d] x [d, V] product;
3. fused TAD, forward KL, reverse KL and JSD, forward + backward, at N = 8192, d = 4096,
   V = 128256 (bf16 hidden states and heads, fp32 loss math): time, peak memory, the share of
   the matmul ceiling (the matmuls the loss needs at the ceiling's speed, divided by its time),
   and naive autograd on full logits beside each, with the two losses' and gradients' agreement;
4. the vocabulary-parallel path on a one-rank process group of the device's backend (NCCL on a
   GPU: its collectives and CUDA code path, not multi-GPU scaling) agreeing with the plain path;
5. real training runs of ``tailkd-train``: DeepSpeed ZeRO-3 student + ZeRO-3 teacher, then
   FSDP2, each ``--steps`` steps on tiny HF-config models (a 4-layer qwen3-shaped teacher, a
   2-layer student, V = 151936, rows of the data's length), then a resume from its checkpoint
   and an HF export loaded back; tokens/s, the step's time split and peak memory.

``--dry-run`` runs every part that does not need CUDA on the CPU at small sizes (fp32, gloo,
the tests' tiny llama models), so that a defect findable on CPU never costs GPU time; CI runs
it. Exit status 1 if a correctness check fails (agreement, resume, export); timings are
reported, never judged here.

The data is an MDS directory from ``tailkd-prepare-data`` (``tools/gpu_prepare.py`` writes one
with 2048-token rows into ``.gpu/data``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tailkd_dist.losses import cross_entropy, forward_kl, fused_linear_distill, jsd, reverse_kl, tad_divergence  # noqa: E402

DIVERGENCES = {"tad": (tad_divergence, 5), "forward_kl": (forward_kl, 4), "reverse_kl": (reverse_kl, 4),
               "jsd": (jsd, 4)}
"""Each divergence's dense reference and the [N, d] x [d, V]-sized matmuls its fused form needs
(student and teacher logits, the two gradient products; TAD's teacher pre-pass one more)."""

GPU_MODELS = {
    "teacher": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                    num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                    max_position_embeddings=4096, tie_word_embeddings=False),
    "student": dict(model_type="qwen3", vocab_size=151936, hidden_size=512, intermediate_size=1536,
                    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                    max_position_embeddings=4096, tie_word_embeddings=False),
}
DRY_MODELS = {
    "teacher": dict(model_type="llama", vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    "student": dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}


class Table:
    def __init__(self):
        self.rows: list[dict] = []
        self.failures: list[str] = []

    def add(self, section: str, what: str, **cols) -> None:
        row = {"section": section, "what": what, **cols}
        self.rows.append(row)
        cells = " ".join(f"{k}={_fmt(v)}" for k, v in cols.items())
        print(f"[{section}] {what}: {cells}", flush=True)

    def check(self, ok: bool, what: str) -> str:
        if not ok:
            self.failures.append(what)
        return "ok" if ok else "FAILED"

    def markdown(self) -> str:
        cols = ["seconds", "share_of_ceiling", "peak_gib", "vs_naive", "agreement", "result"]
        lines = ["| section | what | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for r in self.rows:
            lines.append(f"| {r['section']} | {r['what']} | " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
        return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, reps: int) -> tuple[float, float]:
    """(seconds per call after one warm-up call, peak extra GiB during the calls; NaN on CPU)."""
    fn()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(dev)
    seconds = (time.perf_counter() - t0) / reps
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev.type == "cuda" else float("nan")
    return seconds, peak


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- environment


def environment(dev) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
           "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    for name in ("deepspeed", "streaming", "huggingface_hub", "triton"):
        try:
            if name == "streaming":  # through the shim that keeps torchvision out (see there)
                importlib.import_module("tailkd_dist.data.streaming_compat")
            mod = importlib.import_module(name)
            env[name] = getattr(mod, "__version__", "?")
        except ImportError:
            env[name] = "missing"
    if dev.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["bf16"] = torch.cuda.is_bf16_supported()
    else:
        env["load_average"] = os.getloadavg()[0]
    return env


# --------------------------------------------------------------------------- losses


def loss_section(table: Table, dev, *, dry: bool) -> None:
    N, d, V = (256, 64, 1003) if dry else (8192, 4096, 128256)
    dtype = torch.float32 if dry else torch.bfloat16
    chunk = 64 if dry else None  # None: the loss's own default for the device (default_chunk_size)
    reps = 1 if dry else 3
    g = torch.Generator(device=dev).manual_seed(0)
    hs = torch.randn(N, d, device=dev, dtype=dtype, generator=g).requires_grad_()
    ht = torch.randn(N, d, device=dev, dtype=dtype, generator=g)
    ws = (torch.randn(V, d, device=dev, dtype=dtype, generator=g) * 0.02).requires_grad_()
    wt = torch.randn(V, d, device=dev, dtype=dtype, generator=g) * 0.03
    labels = torch.randint(0, V, (N,), device=dev, generator=g)
    labels[::7] = -100  # masked positions
    mm, _ = timed(lambda: hs.detach() @ ws.detach().t(), dev, reps=5)
    table.add("ceiling", f"{str(dtype).removeprefix('torch.')} matmul [{N},{d}]x[{d},{V}]", seconds=mm,
              result=f"{2 * N * d * V / mm / 1e12:.1f} TFLOP/s")
    for div, (dense, n_mm) in DIVERGENCES.items():
        def fused():
            hs.grad = ws.grad = None
            loss, _ = fused_linear_distill(hs, ws, ht, wt, labels, divergence=div, chunk_size=chunk)
            loss.backward()
            return loss

        def naive():
            hs.grad = ws.grad = None
            s = (hs @ ws.t()).float()
            with torch.no_grad():
                t = (ht @ wt.t()).float()
            valid = labels != -100
            loss = cross_entropy(s, labels).sum() + dense(s, t, mask=valid).sum()
            loss.backward()
            return loss

        t_f, peak_f = timed(fused, dev, reps)
        l_f, gh_f, gw_f = fused().detach(), hs.grad.clone(), ws.grad.clone()
        try:
            t_n, peak_n = timed(naive, dev, max(1, reps - 1))
            l_n = naive().detach()
            agree = max(rel(l_f, l_n), rel(gh_f, hs.grad), rel(gw_f, ws.grad))
            bound = 1e-5 if dtype == torch.float32 else 2e-2
            table.add("loss", f"fused {div} (naive autograd beside)", seconds=t_f, share_of_ceiling=n_mm * mm / t_f,
                      peak_gib=peak_f, vs_naive=f"naive {t_n / t_f:.2f}x the time, {peak_n / peak_f:.1f}x the memory"
                      if dev.type == "cuda" else f"naive {t_n / t_f:.2f}x the time", agreement=agree,
                      result=table.check(agree <= bound, f"fused {div} vs naive: {agree:.2e} > {bound}"))
        except torch.cuda.OutOfMemoryError:
            table.add("loss", f"fused {div}", seconds=t_f, share_of_ceiling=n_mm * mm / t_f, peak_gib=peak_f,
                      vs_naive="naive: out of memory", result="ok")
        hs.grad = ws.grad = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    vocab_parallel_section(table, dev, hs.detach()[: N // 4], ws.detach(), ht[: N // 4], wt, labels[: N // 4], chunk)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vocab_parallel_section(table: Table, dev, hs, ws, ht, wt, labels, chunk) -> None:
    backend = "nccl" if dev.type == "cuda" else "gloo"
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    kw = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend, rank=0, world_size=1, **kw)
    try:
        group = dist.new_group([0])
        results = []
        for vocab_group in (None, group):
            h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
            loss, _ = fused_linear_distill(h, w, ht, wt, labels, chunk_size=chunk, vocab_group=vocab_group)
            loss.backward()
            results.append((loss.detach(), h.grad, w.grad))
        agree = max(rel(a, b) for a, b in zip(results[1], results[0]))
        table.add("vocab-parallel", f"TAD on a one-rank {backend} group vs no group", agreement=agree,
                  result=table.check(agree <= 1e-6, f"vocab-parallel path differs: {agree:.2e}"))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- training


def _env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def _run(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    t0 = time.time()
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(cmd)}\n# exit {out.returncode} after {time.time() - t0:.0f} s\n{out.stdout}\n{out.stderr}")
    return out


def training_section(table: Table, dev, *, data: Path, work: Path, steps: int, dry: bool) -> None:
    tokenizer = str(data / "tokenizer")
    models = DRY_MODELS if dry else GPU_MODELS
    for engine in ("deepspeed", "fsdp2"):
        run_dir = work / f"run_{engine}"
        cfg = {
            "output_dir": str(run_dir), "seed": 7,
            "models": {role: {"config": models[role], "tokenizer": tokenizer, "init_seed": i + 1}
                       for i, role in enumerate(("teacher", "student"))} | {"dtype": "fp32" if dry else "bf16"},
            "data": {"path": str(data), "micro_batch_size": 2 if dry else 4},
            "loss": {"divergence": "tad", "k": 10, "beta": 2.0, "chunk_size": 64 if dry else 0},
            "optim": {"lr": 1e-3, "warmup_steps": 2, "max_steps": steps, "grad_accum": 1},
            "engine": {"kind": engine, "ds_config": str(REPO / "ds_configs/zero3.json"),
                       "teacher_ds_config": str(REPO / "ds_configs/teacher_zero3.json"), "dist_timeout_s": 300},
            "checkpoint": {"every_steps": steps, "export_hf_at_end": False},
            "logging": {"progress_bar": False, "every_steps": max(1, steps // 4)},
            "eval": {"max_batches": 1},
        }
        path = work / f"{engine}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        train = [sys.executable, "-m", "tailkd_dist.train", str(path)]
        out = _run(train, work / f"{engine}_train.log", timeout=300)
        if out.returncode != 0:
            table.add("train", f"{engine}: {steps} steps", result=table.check(False, f"{engine} training failed: "
                      f"{_last_line(out)} (log {work / f'{engine}_train.log'})"))
            continue
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        recs = [r for r in recs if "loss/total" in r]  # training steps (evaluations have records of their own)
        steady = recs[2:] or recs  # the first steps compile kernels and fill caches
        mean = lambda k: sum(r.get(k, float("nan")) for r in steady) / len(steady)  # noqa: E731
        split = ", ".join(f"{k.removeprefix('time/').removesuffix('_s')} {mean(k):.3f}"
                          for k in ("time/teacher_forward_s", "time/student_forward_s", "time/loss_s",
                                    "time/student_backward_s", "time/optimizer_s"))
        peak_key = "perf/peak_memory_gib" if dev.type == "cuda" else "perf/peak_rss_gib"
        table.add("train", f"{engine}: {steps} steps, {int(recs[-1]['perf/tokens_per_s'] * recs[-1]['perf/step_s'])} "
                  f"tokens/step", seconds=mean("perf/step_s"), peak_gib=max(r.get(peak_key, float('nan')) for r in recs),
                  result=f"{mean('perf/tokens_per_s'):,.0f} tokens/s; split (s): {split}; "
                         f"loss {recs[0]['loss/total']:.3f} -> {recs[-1]['loss/total']:.3f}")
        more = _run([*train, f"optim.max_steps={steps + 2}"], work / f"{engine}_resume.log", timeout=300)
        resumed = more.returncode == 0 and f"resumed from step_{steps:08d}" in more.stderr + more.stdout
        table.add("train", f"{engine}: resume from step {steps}, 2 more steps",
                  result=table.check(resumed, f"{engine} resume failed: {_last_line(more)}"))
        export = work / f"export_{engine}"
        exp = _run([sys.executable, str(REPO / "tools/export_hf.py"), str(run_dir), str(export)],
                   work / f"{engine}_export.log", timeout=300)
        ok, what = _load_export(export, dev) if exp.returncode == 0 else (False, _last_line(exp))
        table.check(ok, f"{engine} export: {what}")
        table.add("train", f"{engine}: HF export loaded back", result=what if ok else "FAILED: " + what)


def _load_export(path: Path, dev) -> tuple[bool, str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
    ids = torch.arange(16, device=dev)[None] % model.config.vocab_size
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    if not torch.isfinite(logits).all():
        return False, f"{size}, non-finite logits"
    return True, f"ok: {size}, finite logits"


def _last_line(out: subprocess.CompletedProcess) -> str:
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[-1][:300] if lines else f"exit {out.returncode}"


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, small sizes, fp32, gloo (what CI runs)")
    ap.add_argument("--data", help="MDS data directory (tailkd-prepare-data) for the training runs")
    ap.add_argument("--json", help="write the table here as JSON")
    ap.add_argument("--steps", type=int, default=None, help="training steps per engine (default 20; dry run 3)")
    ap.add_argument("--work", help="directory for the runs' outputs (default: a new temporary directory)")
    ap.add_argument("--skip-train", action="store_true", help="only the loss sections")
    args = ap.parse_args(argv)
    if args.dry_run:
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    else:
        dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
    if not args.skip_train and not (args.data and (Path(args.data) / "manifest.json").is_file()):
        print(f"gpu_check: error: --data {args.data!r} is not a prepared data directory (no manifest.json): "
              "run tools/gpu_prepare.py, or pass --skip-train", file=sys.stderr)
        return 2
    t0 = time.time()
    env = environment(dev)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    table = Table()
    loss_section(table, dev, dry=args.dry_run)
    if not args.skip_train:
        work = Path(args.work or tempfile.mkdtemp(prefix="tailkd-gpu-check-"))
        work.mkdir(parents=True, exist_ok=True)
        training_section(table, dev, data=Path(args.data).resolve(), work=work.resolve(),
                         steps=args.steps or (3 if args.dry_run else 20), dry=args.dry_run)
    wall = time.time() - t0
    print(f"\ntools/gpu_check.py{' --dry-run' if args.dry_run else ''}: {env['device']}, torch {env['torch']}, "
          f"transformers {env['transformers']}, deepspeed {env['deepspeed']}, {env['date']}, {wall:.0f} s\n")
    print(table.markdown(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": table.rows, "failures": table.failures,
                                               "wall_s": wall, "dry_run": args.dry_run}, indent=1))
    if table.failures:
        print("\nFAILED: " + "; ".join(table.failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
