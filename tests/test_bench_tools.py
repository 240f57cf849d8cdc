"""The benchmark scripts that run the trainer's own machinery (the training step, the model
loading under ZeRO-3 partitions) still run: at tiny sizes, to completion, printing their table.
(A config rule or a step signature that changed broke both once, unnoticed: no test ran them.)
The numbers at these sizes mean nothing; BENCHMARKS.md keeps the real runs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from trainer_utils import REPO, env


@pytest.mark.slow
@pytest.mark.parametrize("tool, args, header", [
    ("bench_train.py", ["--seq-len", "32", "--batch", "2", "--steps", "3"], "| plain HF-style loop"),
    ("bench_load.py", ["--layers", "2", "--hidden", "64", "--vocab", "1000", "--ranks", "2"], "| zero_init, fp32 partitions"),
    ("bench_cache.py", ["--scale", "2", "--steps", "4", "--docs", "4", "--seq-len", "32", "--vocab", "1024"],
     "| training step"),
    ("bench_loss.py", ["--interleave", "--n", "64", "--d", "16", "--vocab", "1031", "--chunks", "16", "32"], "| chunk"),
])
def test_benchmark_runs_at_tiny_size(tool, args, header, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "tools" / tool), *args], env={**env(), "TMPDIR": str(tmp_path)},
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert header in done.stdout, done.stdout[-3000:]
