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


# ------------------------------------------------------------------------------ streaming's state
_HOLD = r"""
import sys, time
from tailkd_dist.data.dataset import LoaderConfig, make_loader
remote = dict(remote=sys.argv[3], local=sys.argv[1]) if len(sys.argv) > 3 else dict(local=sys.argv[1])
loader = make_loader(LoaderConfig(**remote, split="train", batch_size=2, shuffle=False))
next(iter(loader))
print(f"{loader.dataset._shm_prefix_int:06}", flush=True)
if sys.argv[2] == "hold":
    time.sleep(600)
"""


def _streaming_files() -> set[Path]:
    import tempfile

    from tailkd_dist.data.streaming_residue import SHM_DIR, _LOCK_NAME, _SHM_NAME

    tmp = Path(tempfile.gettempdir())
    return ({SHM_DIR / n for n in os.listdir(SHM_DIR) if _SHM_NAME.match(n)}
            | {tmp / n for n in os.listdir(tmp) if _LOCK_NAME.match(n)})


def _dataset_process(data: Path, mode: str, *remote: Path) -> tuple[subprocess.Popen, set[Path]]:
    """A process reading the data with streaming (from ``remote`` into ``data`` when given);
    returns it and the files of its prefix."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(data), mode, *map(str, remote)], env=env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    prefix = proc.stdout.readline().strip()
    assert prefix.isdigit(), proc.stderr.read()[-3000:]
    return proc, {p for p in _streaming_files() if p.name.startswith(prefix + "_")}


def _age(paths, seconds: float = 3600) -> None:
    for p in paths:
        t = time.time() - seconds
        os.utime(p, (t, t))


def test_streaming_state_of_a_killed_run_is_removed_by_the_next_and_nothing_live(data, tmp_path):
    """A killed dataset leaves shared memory and locks; the next one removes them, and leaves
    alone a live dataset's, another user's, and files younger than a minute. Both read a
    remote into the same local directory, as a resumed run does."""
    import tempfile

    cache = tmp_path / "cache"
    dead, dead_files = _dataset_process(cache, "hold", data)
    assert any(p.parent == Path("/dev/shm") for p in dead_files), dead_files
    os.killpg(dead.pid, signal.SIGKILL)  # with its loader workers: nothing of streaming's exit runs
    dead.wait(timeout=30)
    time.sleep(0.5)
    assert all(p.exists() for p in dead_files)
    live, live_files = _dataset_process(data, "hold")
    assert live_files and not live_files & dead_files
    other = [Path("/dev/shm/999990_locals"), Path(tempfile.gettempdir()) / "999990_barrier_filelock"]
    young = [Path("/dev/shm/999991_locals")]
    try:
        for p in other + young:
            p.write_bytes(b"\0" * 8)
        for p in other:
            os.chown(p, 65534, 65534)  # another user's job on the node
        _age(dead_files | live_files | set(other))
        assert all(p.exists() for p in dead_files | live_files)
        nxt, _ = _dataset_process(cache, "exit", data)
        assert nxt.wait(timeout=60) == 0, nxt.stderr.read()[-3000:]
        # gone (the next run may have taken the freed prefix: its files are new, not aged)
        assert [p for p in dead_files if p.exists() and time.time() - p.stat().st_mtime > 600] == []
        assert all(p.exists() for p in live_files | set(other) | set(young))
    finally:
        os.killpg(live.pid, signal.SIGKILL)
        live.wait(timeout=30)
        for p in [*other, *young, *live_files]:
            p.unlink(missing_ok=True)
