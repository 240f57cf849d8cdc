"""Benchmark: tailkd_dist training step vs a plain HF-style KD loop (issue "The trainer on
DeepSpeed"), and TAD vs forward-KL step time inside tailkd_dist.

    python tools/bench_train.py                    # V=32768, seq 128, micro-batch 4, 12 steps
    python tools/bench_train.py --vocab 65536 --steps 8

Same models (Llama-style teacher and student built from HF configs), same data (python-stdlib
shards from the prepare tool, read by the same loader in the same order), same batch and
optimizer (AdamW, fp32), one process. The plain loop materialises full [tokens, V] logits for
teacher and student and takes autograd through log_softmax + KL + CE; tailkd_dist runs its
trainer (DeepSpeed ZeRO-2 engine, vocabulary-sharded head, fused chunked loss).

Each variant runs in its own fresh process: peak memory is that process's peak RSS (ru_maxrss)
minus its RSS just before the first step; tokens/s and step time are medians over the steps
after the first two. Time is the process's CPU time (the machine is shared; CPU time is what
other jobs do not inflate), with --threads intra-op threads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def model_configs(vocab: int):
    teacher = dict(model_type="llama", vocab_size=vocab, hidden_size=384, intermediate_size=1024,
                   num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512)
    student = dict(model_type="llama", vocab_size=vocab, hidden_size=256, intermediate_size=688,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return teacher, student


def write_config(path: Path, *, data: Path, out: Path, vocab: int, divergence: str, args,
                 engine: str = "deepspeed", ds_config: str = "zero2.json") -> Path:
    import yaml

    teacher, student = model_configs(vocab)
    cfg = {
        "output_dir": str(out), "seed": 1,
        "models": {"teacher": {"config": teacher, "tokenizer": str(data / "tokenizer"), "init_seed": 1},
                   "student": {"config": student, "tokenizer": str(data / "tokenizer"), "init_seed": 2}},
        "data": {"path": str(data), "micro_batch_size": args.batch},
        "loss": {"divergence": divergence, "k": 10, "beta": 2.0},
        "optim": {"lr": 1e-4, "warmup_steps": 1, "max_steps": args.steps, "grad_clip": 1.0},
        "engine": {"kind": engine, "ds_config": str(REPO / "ds_configs" / ds_config),
                   "teacher_ds_config": str(REPO / "ds_configs/teacher_zero3.json")},
        "checkpoint": {"every_steps": 10**6, "export_hf_at_end": False, "keep": 1, "resume": False},
        "logging": {"progress_bar": False, "tensorboard": False},
        "eval": {"max_batches": 1},  # one final batch, after the timed steps
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------- the plain loop


def plain_loop(args) -> dict:
    """What a user writes with HF models and autograd: full logits, KL + CE, AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM

    from tailkd_dist.data.dataset import LoaderConfig, make_loader

    torch.manual_seed(1)
    tc, sc = model_configs(args.vocab)
    build = lambda c, seed: (torch.manual_seed(seed), AutoModelForCausalLM.from_config(  # noqa: E731
        AutoConfig.for_model(**{k: v for k, v in c.items()}), attn_implementation="sdpa"))[1]
    teacher, student = build(dict(tc), 1).eval(), build(dict(sc), 2)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.1)
    loader = make_loader(LoaderConfig(local=args.data, split="train", batch_size=args.batch, shuffle=True,
                                      seed=9176, drop_last=True))
    it = iter(loader)
    times, tokens, rss0 = [], 0, None
    for step in range(args.steps):
        b = next(it)
        if rss0 is None:
            rss0 = benchutil._rss_bytes()
        t0 = time.process_time()
        with torch.no_grad():
            t_logits = teacher(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        s_logits = student(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        mask = b["labels"] != -100
        log_q = F.log_softmax(s_logits, -1)
        log_p = F.log_softmax(t_logits, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        ce = F.cross_entropy(s_logits.transpose(1, 2), b["labels"], ignore_index=-100, reduction="none")
        loss = ((kl + ce) * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - t0)
        tokens = b["input_ids"].numel()
    steady = times[2:] or times
    return {"step_s": statistics.median(steady), "tokens_per_s": tokens / statistics.median(steady),
            "peak_extra": benchutil._peak_rss_bytes() - rss0}


def tailkd(args) -> dict:
    """The trainer itself, in this process; memory above the RSS before its first step."""
    import tailkd_dist.step as step_mod
    from tailkd_dist.config import load_config
    from tailkd_dist.train import train

    marks = {}
    original = step_mod.train_step

    def timed_step(adapter, micro, **kw):
        if "rss0" not in marks:
            marks["rss0"] = benchutil._rss_bytes()
        t0 = time.process_time()
        out = original(adapter, micro, **kw)
        marks.setdefault("cpu", []).append(time.process_time() - t0)
        marks["peak"] = benchutil._peak_rss_bytes()  # the steps only, not the final save/eval
        return out

    import tailkd_dist.train as train_mod

    train_mod.train_step = timed_step
    train(load_config(args.config))
    steady = marks["cpu"][2:]
    tokens = args.batch * json.loads(Path(args.data, "manifest.json").read_text())["seq_len"]
    return {"step_s": statistics.median(steady), "tokens_per_s": tokens / statistics.median(steady),
            "peak_extra": marks["peak"] - marks["rss0"], "peak_total": marks["peak"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32768, help="model vocabulary (>= the tokenizer's)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--engines", action="store_true", help="also TAD under ZeRO-3 and FSDP2 (1 process each)")
    ap.add_argument("--one", choices=["plain", "tailkd"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(plain_loop(args) if args.one == "plain" else tailkd(args)))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_train_"))
    data = work / "data"
    if not (data / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "tailkd_dist.data.prepare", "python-stdlib", "-o", str(data),
                        "--seq-len", str(args.seq_len), "--train-tokenizer", "8192", "--max-docs", "150",
                        "--no-progress"], check=True, cwd=REPO)
    me = os.path.abspath(__file__)
    common = ["--vocab", str(args.vocab), "--batch", str(args.batch), "--steps", str(args.steps), "--data", str(data),
              "--threads", str(args.threads)]
    rows = {}
    rows["plain HF-style loop (full logits, autograd KL + CE)"] = benchutil.run_isolated(me, ["--one", "plain"] + common)
    for div in ("forward_kl", "tad"):
        cfg = write_config(work / f"{div}.yaml", data=data, out=work / f"run_{div}", vocab=args.vocab,
                           divergence=div, args=args)
        rows[f"tailkd_dist ({div}, ZeRO-2, fused loss)"] = benchutil.run_isolated(
            me, ["--one", "tailkd", "--config", str(cfg)] + common)
    if args.engines:
        # FSDP2 vs DeepSpeed ZeRO-3 (issue 6): same models, data and batch, side by side.
        for engine, ds in (("deepspeed", "zero3.json"), ("fsdp2", "zero3.json")):
            name = "ZeRO-3" if engine == "deepspeed" else "FSDP2"
            cfg = write_config(work / f"tad_{engine}.yaml", data=data, out=work / f"run_tad_{engine}",
                               vocab=args.vocab, divergence="tad", args=args, engine=engine, ds_config=ds)
            rows[f"tailkd_dist (tad, {name}, fused loss)"] = benchutil.run_isolated(
                me, ["--one", "tailkd", "--config", str(cfg)] + common)
    plain = rows["plain HF-style loop (full logits, autograd KL + CE)"]
    kl = rows["tailkd_dist (forward_kl, ZeRO-2, fused loss)"]
    tad = rows["tailkd_dist (tad, ZeRO-2, fused loss)"]
    print(f"V={args.vocab}, seq {args.seq_len}, micro-batch {args.batch}, {args.steps} steps, fp32, 1 process, "
          f"CPU time with {args.threads} thread(s); "
          f"{benchutil.machine()}")
    print(benchutil.table(
        ["variant", "step CPU s", "tokens per CPU s", "peak extra MiB", "tokens/s vs plain", "memory vs plain"],
        [[name, f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}", benchutil.mib(r["peak_extra"]),
          f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x", f"{r['peak_extra'] / plain['peak_extra']:.2f}x"]
         for name, r in rows.items()]))
    checks = [
        ("peak memory of tailkd_dist (KL) <= 0.5x the plain loop", kl["peak_extra"] / plain["peak_extra"], 0.5, "<="),
        ("tokens/s of tailkd_dist (KL) >= 1.2x the plain loop", kl["tokens_per_s"] / plain["tokens_per_s"], 1.2, ">="),
        ("TAD step <= 1.10x KL step inside tailkd_dist", tad["step_s"] / kl["step_s"], 1.10, "<="),
    ]
    for what, value, target, op in checks:
        ok = value <= target if op == "<=" else value >= target
        print(f"{'PASS' if ok else 'MISS'}: {what}: {value:.2f}")


if __name__ == "__main__":
    main()
