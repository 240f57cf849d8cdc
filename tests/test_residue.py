"""What a run leaves behind: nothing in /dev/shm or the temp dir, however it ends.

DeepSpeed's CPU shared-memory all-reduce (ranks started by the ``deepspeed`` launcher) makes a
66 MiB /dev/shm file per rank and never removes it; the trainer unlinks each rank's own as soon
as every rank has mapped it, so neither a finished run nor a killed one (SIGKILL: no exit
handler runs) leaves one. prepare-data's staging directory and datasets cache go on SIGTERM
(it unwinds), and what a killed one left is removed by the next run on the host. Checked by
listing /dev/shm, the output's parent and the temp dir.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer_utils import REPO, env, free_port, write_config

pytestmark = pytest.mark.usefixtures("clean_shm")


def _buffers(port: int) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def _launch(cfg: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(
            ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module", "tailkd_dist.train", str(cfg)],
            env=env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )


def test_deepspeed_launcher_run_leaves_no_shm_buffer(data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=2,
                       checkpoint__export_hf_at_end=False)
    port = free_port()
    proc = _launch(cfg, port, tmp_path / "log.txt")
    assert proc.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-4000:]
    assert _buffers(port) == []


def test_killed_deepspeed_launcher_run_leaves_no_shm_buffer(data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=200,
                       checkpoint__export_hf_at_end=False)
    port = free_port()
    proc = _launch(cfg, port, tmp_path / "log.txt")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-4000:]
        assert time.monotonic() < deadline, "no training step within 240 s"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks: no exit handler runs
    proc.wait(timeout=30)
    time.sleep(1)
    assert _buffers(port) == []


# ------------------------------------------------------------------------------ prepare-data
def _big_jsonl(path: Path, lines: int = 40000) -> Path:
    words = ["alpha", "beta", "gamma", "delta", "tail", "teacher", "student", "token", "shard", "rank"]
    with open(path, "w") as f:
        for i in range(lines):
            text = " ".join(words[(i * 7 + j * 3) % len(words)] + str((i + j) % 97) for j in range(40))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def _prepare_cmd(src: Path, out: Path, tok: Path) -> list[str]:
    return [sys.executable, "-m", "tailkd_dist.data.prepare", str(src), "-o", str(out), "--tokenizer", str(tok),
            "--val-fraction", "0", "--no-progress"]


def _leftovers(out: Path, tmp: Path) -> list[str]:
    return sorted([p.name for p in out.parent.glob(f".{out.name}.partial-*")]
                  + [p.name for p in tmp.glob("tailkd-prepare-cache-*")])


def _start_and_catch_staging(src, out, tok, tmp, log):
    """Start prepare-data and return once its staging directory exists (it is then tokenising)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(_prepare_cmd(src, out, tok), env={**env(), "TMPDIR": str(tmp)}, cwd=REPO,
                                stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(f".{out.name}.partial-*")):
        assert proc.poll() is None, f"prepare ended before it was caught:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


def test_prepare_sigterm_removes_its_staging_and_cache(data, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    src, out = _big_jsonl(tmp_path / "in.jsonl"), tmp_path / "out"
    proc = _start_and_catch_staging(src, out, data / "tokenizer", tmp, tmp_path / "log.txt")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    log = (tmp_path / "log.txt").read_text()
    assert "tailkd-prepare-data: stopped by SIGTERM" in log and "Traceback" not in log, log[-2000:]
    assert _leftovers(out, tmp) == [] and not out.exists()


def test_prepare_removes_what_a_killed_prepare_left(data, tmp_path):
    from tailkd_dist.staging import _host

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    src, out = _big_jsonl(tmp_path / "in.jsonl"), tmp_path / "out"
    proc = _start_and_catch_staging(src, out, data / "tokenizer", tmp, tmp_path / "log.txt")
    proc.kill()  # SIGKILL: nothing of the run's own clean-up runs
    proc.wait(timeout=30)
    left = _leftovers(out, tmp)
    assert any(".partial-" in n for n in left) and any("cache" in n for n in left), left
    # What the next run must leave alone: a live process's cache, another host's, a user's file
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        keep = [tmp / f"tailkd-prepare-cache-{_host()}-{sleeper.pid}-live",
                tmp / f"tailkd-prepare-cache-otherhost-{proc.pid}-remote", tmp / "tailkd-prepare-cache-notes"]
        for k in keep:
            k.mkdir()
        small = tmp_path / "small.jsonl"
        small.write_text("".join(json.dumps({"text": f"doc {i} alpha beta"}) + "\n" for i in range(50)))
        done = subprocess.run(_prepare_cmd(small, out, data / "tokenizer"), env={**env(), "TMPDIR": str(tmp)},
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert _leftovers(out, tmp) == sorted(k.name for k in keep)
        assert (out / "manifest.json").exists()
    finally:
        sleeper.kill()
