#!/usr/bin/env python
"""Throughput of the data path: prepare (--num-proc 1 and 2) and the loader, on python-stdlib.

    python tools/bench_data.py [--max-files 300] [--seq-len 256] [--vocab 4096] [--batch-size 8]
                               [--repeat 3]

Prepare tokens/s = document tokens written / wall time of the whole run (read, tokenise, pack,
write shards), with a tokenizer trained once beforehand (its training is timed separately).
"CPU s" is the CPU time of the run, the tokeniser processes included: on a shared machine it
shows what the run cost when the wall time mostly shows what other jobs left over.
Loader tokens/s = input_ids tokens delivered / wall time of one shuffled epoch through
StreamingDataLoader on one rank (construction timed separately). The last column compares with
what a 2-core CPU trainer consumes for the demo models (about 1,100 tokens/s): the target is
at least 10x. Each row is the best of
`--repeat` runs, because the CPUs of the project's machines are shared with other jobs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tailkd_dist.data.dataset import LoaderConfig, make_loader  # noqa: E402
from tailkd_dist.data.prepare import PrepareConfig, prepare  # noqa: E402

TRAINER_TOKENS_PER_S = 1100.0


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-files", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest is shown")
    p.add_argument("--workdir", help="where to write the shards (default: a temporary directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=args.workdir) as work:
        work = Path(work)
        common = dict(inputs=["python-stdlib"], seq_len=args.seq_len, max_docs=args.max_files,
                      val_fraction=0.05, progress=False)
        start = time.perf_counter()
        prepare(PrepareConfig(output=str(work / "tok"), train_tokenizer=args.vocab, **common))
        train_s = time.perf_counter() - start
        rows = []
        for num_proc in (1, 2):
            best = (float("inf"), 0.0)
            for _ in range(args.repeat):
                start, cpu = time.perf_counter(), _cpu()
                manifest = prepare(PrepareConfig(
                    output=str(work / f"np{num_proc}"), tokenizer=str(work / "tok/tokenizer"),
                    num_proc=num_proc, overwrite=True, **common))
                best = min(best, (time.perf_counter() - start, _cpu() - cpu))
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            rows.append((f"prepare --num-proc {num_proc}", tokens, *best))
        best, init_s = (float("inf"), 0.0), float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            loader = make_loader(LoaderConfig(local=str(work / "np1"), batch_size=args.batch_size,
                                              shuffle=True))
            init_s = min(init_s, time.perf_counter() - start)
            start, cpu, tokens = time.perf_counter(), _cpu(), 0
            for batch in loader:
                tokens += batch["input_ids"].numel()
            best = min(best, (time.perf_counter() - start, _cpu() - cpu))
            del loader  # frees its shared memory, so the next one may use the same directory
        rows.append((f"loader (batch {args.batch_size}, 1 rank, 0 workers)", tokens, *best))

    print(f"\nbest of {args.repeat} runs; python-stdlib, first {args.max_files} files; "
          f"seq_len {args.seq_len}; BPE vocab {manifest['tokenizer']['vocab_size']}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"tokenizer training + first prepare: {train_s:.1f} s; loader construction "
          f"{init_s * 1000:.0f} ms\n")
    print(f"| {'what':<40} | {'tokens':>10} | {'seconds':>8} | {'CPU s':>6} | {'tokens/s':>10} "
          f"| {'x trainer':>9} |")
    print(f"|{'-' * 42}|{'-' * 11}:|{'-' * 9}:|{'-' * 7}:|{'-' * 11}:|{'-' * 10}:|")
    for what, tokens, seconds, cpu in rows:
        rate = tokens / seconds
        print(f"| {what:<40} | {tokens:>10,} | {seconds:>8.2f} | {cpu:>6.2f} | {rate:>10,.0f} | "
              f"{rate / TRAINER_TOKENS_PER_S:>9,.0f} |")


if __name__ == "__main__":
    main()
