"""Benchmark: the teacher cache (tailkd-cache-teacher, models.teacher.cache).

    python tools/bench_cache.py            # teacher ~6x the student, V=8192, seq 128, batch 4, 12 steps

Prints three tables:
1. bytes per token of a cache at real teachers' d (computed: d values in bf16 + the token) and
   at this benchmark's teacher (measured on disk: fp32 on a CPU);
2. cache writing: tokens/s of tailkd-cache-teacher (one process);
3. the training step with the online teacher vs from the cache: same student, data, batch and
   seed, each run in its own fresh process (tools/bench_train.py's timing: median CPU time per
   step after the first two, peak RSS of the process, which holds the teacher's weights online),
   side by side in one run, with the per-step losses checked equal first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402
import benchutil  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL = [("Llama-3.2-1B", 2048), ("Qwen2.5-7B", 3584), ("Llama-3.1-8B", 4096), ("Llama-3.1-70B", 8192)]


def model_configs(vocab: int, scale: int):
    teacher = dict(model_type="llama", vocab_size=vocab, hidden_size=128 * scale, intermediate_size=344 * scale,
                   num_hidden_layers=2 * scale, num_attention_heads=2 * scale, num_key_value_heads=2,
                   max_position_embeddings=512)
    student = dict(model_type="llama", vocab_size=vocab, hidden_size=256, intermediate_size=688,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return teacher, student


def params(c: dict) -> int:
    d, f, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
    return L * (2 * d * d + 2 * d * kv + 3 * d * f) + 2 * V * d


def write_config(path: Path, *, data: Path, out: Path, cache: Path | None, online: bool, args) -> Path:
    import yaml

    teacher, student = model_configs(args.vocab, args.scale)
    t = {"config": teacher, "tokenizer": str(data / "tokenizer"), "init_seed": 1} if online else {}
    if cache is not None:
        t["cache"] = str(cache)
    cfg = {
        "output_dir": str(out), "seed": 1,
        "models": {"teacher": t, "student": {"config": student, "tokenizer": str(data / "tokenizer"), "init_seed": 2}},
        "data": {"path": str(data), "micro_batch_size": args.batch},
        "loss": {"divergence": "tad", "k": 10, "beta": 2.0},
        "optim": {"lr": 1e-4, "warmup_steps": 1, "max_steps": args.steps, "grad_clip": 1.0},
        "engine": {"kind": "fsdp2"},
        "checkpoint": {"every_steps": 10**6, "export_hf_at_end": False, "keep": 1, "resume": False},
        "logging": {"progress_bar": False, "tensorboard": False},
        "eval": {"max_batches": 1},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run: Path) -> dict:
    return {r["step"]: r["loss/total"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss/total" in r}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--scale", type=int, default=4, help="teacher width/depth multiplier (student fixed)")
    ap.add_argument("--docs", type=int, default=4, help="documents of the python-stdlib slice")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_cache_"))
    data = work / "data"
    e = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if not (data / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "tailkd_dist.data.prepare", "python-stdlib", "-o", str(data),
                        "--seq-len", str(args.seq_len), "--train-tokenizer", str(min(args.vocab, 8192)),
                        "--max-docs", str(args.docs), "--val-fraction", "0.25", "--no-progress"], check=True, cwd=REPO, env=e)
    cache = work / "cache"
    cfg_write = write_config(work / "write.yaml", data=data, out=work / "unused", cache=cache, online=True, args=args)
    done = subprocess.run([sys.executable, "-m", "tailkd_dist.cache_teacher", str(cfg_write), "--no-progress",
                           "--piece-rows", "64"], cwd=REPO, env=e, capture_output=True, text=True, check=True)
    summary = [ln for ln in done.stdout.splitlines() if "bytes/token" in ln][-1]
    tps = float(summary.rsplit(" at ", 1)[1].split()[0])
    manifest = json.loads((cache / "manifest.json").read_text())["teacher_cache"]
    tokens = sum(s["rows"] for s in manifest["splits"].values()) * manifest["seq_len"]
    on_disk = sum(p.stat().st_size for p in cache.rglob("*.mds"))
    teacher, student = model_configs(args.vocab, args.scale)
    me = bench_train.__file__
    rows = {}
    for name, online in (("online teacher", True), ("teacher cache", False)):
        cfg = write_config(work / f"{name[:6]}.yaml", data=data, out=work / f"run_{name[:6]}",
                           cache=None if online else cache, online=online, args=args)
        rows[name] = benchutil.run_isolated(me, ["--one", "tailkd", "--config", str(cfg), "--data", str(data),
                                                 "--batch", str(args.batch), "--threads", str(args.threads)])
        rows[name]["losses"] = losses(work / f"run_{name[:6]}")
    a, b = rows["online teacher"]["losses"], rows["teacher cache"]["losses"]
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    print(f"{benchutil.machine()}; fp32, FSDP2, 1 process, CPU time with {args.threads} thread(s)")
    print(f"teacher {params(teacher) / 1e6:.1f}M parameters (d {teacher['hidden_size']}, {teacher['num_hidden_layers']} "
          f"layers), student {params(student) / 1e6:.1f}M (d {student['hidden_size']}, {student['num_hidden_layers']} "
          f"layers): {params(teacher) / params(student):.1f}x; V={args.vocab}, seq {args.seq_len}, micro-batch "
          f"{args.batch}, {args.steps} steps; per-step losses cache vs online: max relative difference {worst:.1e}")
    print(benchutil.table(["teacher", "d", "bytes/token", "per 1B tokens"],
                          [[n, str(d), f"{2 * d + 4:,} (bf16, computed)", f"{(2 * d + 4) / 1e3:.1f} TB"] for n, d in REAL]
                          + [["this benchmark's", str(manifest["d"]), f"{on_disk / tokens:,.0f} ({manifest['dtype']}, "
                              f"measured on disk)", f"{on_disk / tokens / 1e3:.1f} TB"]]))
    print(benchutil.table(["cache writing", "tokens", "tokens/s"], [["tailkd-cache-teacher, 1 process",
                                                                      f"{tokens:,}", f"{tps:,.0f}"]]))
    on, ca = rows["online teacher"], rows["teacher cache"]
    print(benchutil.table(
        ["training step", "step CPU s", "tokens per CPU s", "peak RSS MiB", "speed vs online", "memory vs online"],
        [[n, f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}", benchutil.mib(r["peak_total"]),
          f"{on['step_s'] / r['step_s']:.2f}x", f"{r['peak_total'] / on['peak_total']:.2f}x"] for n, r in rows.items()]))
    ok = on["step_s"] / ca["step_s"] >= 1.3
    print(f"{'PASS' if ok else 'MISS'}: cached step >= 1.3x faster than online (teacher "
          f"{params(teacher) / params(student):.1f}x the student): {on['step_s'] / ca['step_s']:.2f}x")


if __name__ == "__main__":
    main()
