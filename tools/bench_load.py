"""Benchmark: host memory per rank while a model directory loads, whole vs straight into ZeRO-3
partitions (``engine.sharded_load``, ``tailkd_dist.models.build_model(..., zero3_config=...)``).

    python tools/bench_load.py                      # a 160M-parameter Llama, 2 ranks
    python tools/bench_load.py --layers 4 --hidden 512

It builds a Llama-style model from a config, saves it with ``save_pretrained`` in fp32 in
shards of ``--shard-mb``, then starts ``--ranks`` fresh processes under torchrun for each mode.
Each rank records the peak of its private memory (RssAnon, sampled) above what it had before
loading, its peak RSS, and how many of the model's parameters it holds; rank 0 prints the
per-rank maxima as JSON. Private memory is what a node must have ``ranks_per_node`` times
over; the pages of a memory-mapped checkpoint are shared through the page cache.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class _AnonPeak:
    """Peak of RssAnon (private memory: what each rank really adds; file-backed pages of a
    memory-mapped checkpoint are shared by the ranks of a node through the page cache and
    are left out), sampled every 2 ms by a thread."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon") * 1024)
            self._stop.wait(0.002)

    def __enter__(self):
        self.before = _status_kib("RssAnon") * 1024
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon") * 1024)


def worker(model_dir: str, mode: str) -> None:
    import torch
    import torch.distributed as dist

    from tailkd_dist.config import ModelSpec
    from tailkd_dist.engines.deepspeed_engine import ensure_torch_distributed
    from tailkd_dist.models import build_model
    from tailkd_dist.parallel.topology import DistEnv, Topology

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM  # imported before zero.Init patches module construction

    assert AutoModelForCausalLM

    Topology.build(loss_group_size=1, env=DistEnv.from_environ(), timeout_s=600)  # the trainer's process group
    ensure_torch_distributed()
    world = dist.get_world_size()
    zero3, dtype = None, torch.float32  # "whole": what train.py does without engine.sharded_load
    if mode.startswith("zero_init"):
        bf16 = mode.endswith("bf16")
        dtype = torch.bfloat16 if bf16 else torch.float32
        zero3 = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3}, "bf16": {"enabled": bf16}}
    rss_before = _status_kib("VmRSS") * 1024
    with _AnonPeak() as anon:
        model = build_model(ModelSpec(path=model_dir), dtype=dtype, attention="sdpa", zero3_config=zero3)
    rss_peak = _status_kib("VmHWM") * 1024 - rss_before
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    row = torch.tensor([anon.peak - anon.before, rss_peak, held, total], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(world)]
    dist.all_gather(rows, row)
    if dist.get_rank() == 0:
        rows = torch.stack(rows)
        print(json.dumps({"anon_max": rows[:, 0].max().item(), "rss_max": rows[:, 1].max().item(),
                          "held_max": rows[:, 2].max().item(), "total": rows[0, 3].item()}))
    dist.destroy_process_group()


def run_mode(model_dir: str, mode: str, ranks: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(port), __file__, "--worker", model_dir, mode]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-4000:]}")
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--shard-mb", type=int, default=200, help="save_pretrained's max_shard_size")
    ap.add_argument("--ckpt-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    import torch

    import benchutil
    from tailkd_dist.config import ModelSpec
    from tailkd_dist.models import build_model

    config = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                  intermediate_size=int(2.75 * args.hidden), num_hidden_layers=args.layers,
                  num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 128),
                  max_position_embeddings=2048, tie_word_embeddings=False)
    modes = {"whole, fp32 (every rank loads it all)": "whole"}
    # The trainer's partitions have the compute dtype: bf16 on GPUs, fp32 on CPU (gloo aborts
    # on bf16 ZeRO-3 partitions here).
    if torch.cuda.is_available():
        modes["zero_init, bf16 partitions"] = "zero_init_bf16"
    else:
        modes["zero_init, fp32 partitions"] = "zero_init_fp32"
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        model = build_model(ModelSpec(config=config, init_seed=1), dtype=torch.float32, attention="sdpa")
        n_params = sum(p.numel() for p in model.parameters())
        # Hub checkpoints are mostly bf16; train.py loads a whole model in fp32.
        model.to(getattr(torch, args.ckpt_dtype)).save_pretrained(tmp, max_shard_size=f"{args.shard_mb}MB")
        del model
        largest = max(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        rows = {name: run_mode(tmp, mode, args.ranks) for name, mode in modes.items()}
    fp32 = 4 * n_params
    whole = rows["whole, fp32 (every rank loads it all)"]
    print(f"Llama d={args.hidden}, {args.layers} layers, V={args.vocab}: {n_params / 1e6:.1f}M parameters "
          f"({benchutil.mib(fp32)} MiB in fp32), saved in {args.ckpt_dtype} in shards of <= {args.shard_mb} MB "
          f"(largest {benchutil.mib(largest)} MiB); {args.ranks} ranks, torchrun, gloo; {benchutil.machine()}")
    print(benchutil.table(
        ["load", "parameters held per rank", "peak private MiB per rank", "vs whole",
         "peak RSS MiB per rank (incl. mapped file)"],
        [[name, f"{r['held_max'] / r['total']:.3f} of {r['total'] / 1e6:.1f}M", benchutil.mib(r["anon_max"]),
          f"{r['anon_max'] / whole['anon_max']:.2f}x", benchutil.mib(r["rss_max"])]
         for name, r in rows.items()]))


if __name__ == "__main__":
    main()
