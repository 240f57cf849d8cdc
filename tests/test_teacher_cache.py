"""The teacher cache (tailkd-cache-teacher, models.teacher.cache): exact, resumable, refused
when it does not belong to the run.

A small slice of the python-stdlib shards (169 rows of 32 tokens), a cache of it written in
pieces of 16 rows; training from the cache must give the online teacher's per-step losses and
the same exported student (fp32: the hidden states are the very numbers the online teacher
computes, so equality is demanded to 1e-6).
"""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tailkd_dist.data.teacher_cache import HEAD_FILE
from teacher_cache_utils import ENGINES, VOCAB, cache_command, config, tree, write
from trainer_utils import REPO, TEACHER, close_by_step, env, losses, run

pytestmark = pytest.mark.usefixtures("clean_shm")


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_two_ranks_write_the_same_cache(small, cache1, tmp_path, engine):
    """Two ranks, the teacher sharded over both (ZeRO-3 inference / FSDP2), each writing its
    own pieces: the same files, byte for byte, as one process."""
    cfg = config(tmp_path / "c.yaml", small, tmp_path / "unused", engine=engine, cache=tmp_path / "cache")
    write(cfg, nproc=2)
    assert tree(tmp_path / "cache") == tree(cache1)
    manifest = json.loads((cache1 / "manifest.json").read_text())["teacher_cache"]
    assert manifest["splits"] == {"train": {"rows": 124}, "validation": {"rows": 45}}
    assert (manifest["d"], manifest["dtype"], manifest["seq_len"]) == (48, "float32", 32)
    # 32 positions x 48 values x 4 bytes per row, beside its 33 tokens x 4 bytes
    assert sum(p.stat().st_size for p in cache1.rglob("*.mds")) >= 169 * (32 * 48 * 4 + 33 * 4)


@pytest.mark.slow
@pytest.mark.parametrize("engine,group", [("deepspeed", 1), ("deepspeed", 2), ("fsdp2", 1), ("fsdp2", 2)])
def test_training_from_the_cache_equals_the_online_teacher(small, cache1, tmp_path, engine, group):
    """Per-step losses and the exported student, 2 ranks; the cached run never builds the
    teacher (given by the cache alone here: what it was made from is in its manifest)."""
    from safetensors.torch import load_file

    kw = dict(engine=engine, loss__loss_group_size=group)
    online = config(tmp_path / "online.yaml", small, tmp_path / "online", **kw)
    cached = config(tmp_path / "cached.yaml", small, tmp_path / "cached", cache=cache1, online=False, **kw)
    run(online, launcher="torchrun", nproc=2)
    out = run(cached, launcher="torchrun", nproc=2)
    assert f"teacher: read from the cache {cache1}" in out.stderr, out.stderr[-3000:]
    close_by_step(losses(tmp_path / "cached"), losses(tmp_path / "online"), 1e-6, f"{engine} group {group}")
    if (engine, group) == ("fsdp2", 2):
        # The same cache as a remote (streaming reaches a directory as it reaches s3://):
        # fetched into an empty local directory as it is read, the same numbers.
        local = tmp_path / "fetched"
        remote = config(tmp_path / "remote.yaml", small, tmp_path / "remote", online=False,
                        models__teacher={"cache": str(local), "cache_remote": str(cache1)}, **kw)
        out = run(remote, launcher="torchrun", nproc=2)
        assert f"teacher: read from the cache {cache1}" in out.stderr, out.stderr[-3000:]
        assert losses(tmp_path / "remote") == losses(tmp_path / "cached")
        assert tree(local / "train") and (local / HEAD_FILE).read_bytes() == (cache1 / HEAD_FILE).read_bytes()
        fetched = {p for p in tree(local) if p.endswith(".mds")}
        assert fetched and fetched <= set(tree(cache1)), fetched
    a = load_file(tmp_path / "cached" / "hf_student" / "model.safetensors")
    b = load_file(tmp_path / "online" / "hf_student" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k] - b[k]).norm() <= 1e-6 * b[k].norm(), k


@contextlib.contextmanager
def _paused_writer(cfg: Path, tmp: Path, *pieces: str, nproc: int = 1) -> Iterator[subprocess.Popen]:
    """The writer (``nproc`` ranks), each rank paused once after its first piece, yielded once
    the pieces ``pieces`` (split/NNNNNN) are on disk; ``tmp``/release ends the pauses. Killed on
    the way out if still running (a failed assertion leaves no writer behind)."""
    release = tmp / "release"
    release.unlink(missing_ok=True)
    proc = subprocess.Popen(cache_command(cfg, nproc=nproc), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**env(), "TAILKD_TEST_PAUSE": "cache_piece:120",
                                            "TAILKD_TEST_RELEASE": str(release)})
    try:
        t0 = time.time()
        while not all((tmp / "cache" / p).is_dir() for p in pieces):
            assert proc.poll() is None and time.time() - t0 < 120, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        time.sleep(0.5)  # inside the pause after those pieces
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _finish(proc: subprocess.Popen, tmp: Path, *, timeout: float, prefix: str = "tailkd-cache-teacher:"):
    """End the pauses and wait for the launcher: (its stderr, the lines starting with ``prefix``)."""
    (tmp / "release").touch()
    _, err = proc.communicate(timeout=timeout)
    return err, [ln for ln in err.splitlines() if ln.startswith(prefix)]


def _writers(proc) -> list:
    """The launcher's two writer processes (psutil handles)."""
    import psutil

    workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
               if "tailkd_dist.cache_teacher" in " ".join(c.cmdline())]
    assert len(workers) == 2, workers
    return workers


def test_killed_or_stopped_writer_then_rerun_gives_the_same_bytes(small, cache1, tmp_path):
    """SIGKILL once a piece is done (a stale unfinished piece beside it); SIGTERM in the next
    run (it finishes its piece, says where it stopped, exits 0); the same command again
    finishes the cache: the files equal an uninterrupted cache's, byte for byte."""
    cfg = config(tmp_path / "c.yaml", small, tmp_path / "unused", cache=tmp_path / "cache")
    with _paused_writer(cfg, tmp_path, "train/000000") as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    stale = tmp_path / "cache" / "train" / "000003.partial"
    stale.mkdir()
    (stale / "shard.00000.mds").write_bytes(b"half a piece")

    with _paused_writer(cfg, tmp_path, "train/000001") as proc:  # the run goes on after piece 0
        proc.send_signal(signal.SIGTERM)
        err, lines = _finish(proc, tmp_path, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert lines == [f"tailkd-cache-teacher: stopped by SIGTERM with 2 of 11 pieces written in {tmp_path / 'cache'}: "
                     "run the same command again to finish the cache"], err[-3000:]
    assert not (tmp_path / "cache" / "manifest.json").exists() and not (tmp_path / "cache" / "train" / "000002").exists()

    write(cfg)
    assert tree(tmp_path / "cache") == tree(cache1)
    again = write(cfg)  # complete: nothing to do, nothing changed
    assert "already a complete cache" in again.stdout and tree(tmp_path / "cache") == tree(cache1)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_round(small, tmp_path):
    """SIGTERM to one of two writers: both finish the round, agree, and stop (rc 0, one line,
    no rank left waiting in a collective); the rerun finishes the cache."""
    cfg = config(tmp_path / "c.yaml", small, tmp_path / "unused", cache=tmp_path / "cache")
    with _paused_writer(cfg, tmp_path, "train/000000", "train/000001", nproc=2) as proc:
        _writers(proc)[-1].send_signal(signal.SIGTERM)
        time.sleep(0.5)
        err, lines = _finish(proc, tmp_path, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and "with 2 of 11 pieces written" in lines[0], err[-3000:]
    assert not (tmp_path / "cache" / "manifest.json").exists()
    write(cfg, nproc=2)
    assert (tmp_path / "cache" / "manifest.json").is_file()


def test_a_hung_rank_is_named_by_the_writer_that_waited_for_it(small, tmp_path):
    """One of two writers stops answering (SIGSTOP: a hung rank, which the launcher does not
    notice): the other gives up on its collective within engine.dist_timeout_s and names the
    missing rank in one line (the trainer's liveness report), rather than a traceback or a hang."""
    cfg = config(tmp_path / "c.yaml", small, tmp_path / "unused", cache=tmp_path / "cache", engine__dist_timeout_s=10)
    with _paused_writer(cfg, tmp_path, "train/000000", "train/000001", nproc=2) as proc:
        survivor, hung = _writers(proc)
        hung.send_signal(signal.SIGSTOP)
        (tmp_path / "release").touch()
        survivor.wait(timeout=90)
        hung.kill()  # (the launcher's SIGTERM waits for a stopped process to continue)
        err, lines = _finish(proc, tmp_path, timeout=60, prefix="tailkd-cache-teacher: error: rank")
    assert proc.returncode != 0 and len(lines) == 1, err[-3000:]
    assert "gave up on a collective" in lines[0] and "waiting for rank" in lines[0], lines[0]


@pytest.mark.parametrize("case", ["other shards", "other teacher", "other dtype", "damaged manifest"])
def test_a_cache_that_is_not_this_runs_is_refused(small, data, cache1, tmp_path, capsys, case):
    """One line naming both sides, rc 2, nothing written."""
    import shutil

    from tailkd_dist.train import main

    cache, kw, fragment = cache1, {}, None
    if case == "other shards":
        args, fragment = (data,), "was made from other token shards"
    else:
        args = (small,)
    if case == "other teacher":
        kw, fragment = dict(models__teacher={"config": {**TEACHER, "vocab_size": VOCAB}, "init_seed": 9,
                                             "cache": str(cache1)}), "was made from another teacher (its weights"
    if case == "other dtype":  # DeepSpeed holds the teacher in models.dtype, also on a CPU
        kw, fragment = dict(engine="deepspeed", models__dtype="bf16"), "holds float32 hidden states but this run"
    if case == "damaged manifest":
        cache = tmp_path / "damaged"
        shutil.copytree(cache1, cache)
        m = json.loads((cache / "manifest.json").read_text())
        del m["teacher_cache"]["d"]
        (cache / "manifest.json").write_text(json.dumps(m))
        fragment = "manifest.json is damaged (teacher_cache.d)"
    cfg = config(tmp_path / "c.yaml", *args, tmp_path / "run", cache=cache, **kw)
    rc = main([str(cfg)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("tailkd-train: error:")]
    assert rc == 2 and len(lines) == 1 and fragment in lines[0], err[-3000:]
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["foreign directory", "other source", "a file", "no token shards"])
def test_the_writer_never_touches_what_it_did_not_write(small, cache1, tmp_path, case):
    """One line, rc 2, and the file system as it was: no cache directory is even created for
    a mistake found at start."""
    target = tmp_path / "cache"
    data = small
    if case == "no token shards":  # a directory with the tokenizer but no shards
        import shutil

        data = tmp_path / "not_prepared"
        shutil.copytree(small / "tokenizer", data / "tokenizer")
        fragment = "manifest.json does not exist"
    elif case == "foreign directory":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        fragment = "is a directory this command did not write"
    elif case == "a file":
        target.write_text("mine")
        fragment = "is a file"
    else:  # a complete cache of another teacher
        import shutil

        shutil.copytree(cache1, target)
        fragment = "is a complete cache of another source"
    cfg = config(tmp_path / "c.yaml", data, tmp_path / "unused", cache=target,
                 models__teacher={"config": {**TEACHER, "vocab_size": VOCAB}, "init_seed": 5, "cache": str(target)})
    before = tree(tmp_path)
    out = write(cfg, check=False)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("tailkd-cache-teacher: error:")]
    assert out.returncode == 2 and len(lines) == 1 and fragment in lines[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and tree(tmp_path) == before
    assert target.exists() == (case != "no token shards")


def test_a_remote_head_that_is_not_the_manifests_is_refused(cache1, tmp_path):
    """A damaged or partial copy of the head on the remote: one line, not a wrong teacher."""
    import shutil

    from tailkd_dist.data.teacher_cache import load_head, read_cache_manifest

    remote = tmp_path / "remote"
    shutil.copytree(cache1, remote)
    section = read_cache_manifest(tmp_path / "local", remote=str(remote))["teacher_cache"]
    weight, _ = load_head(tmp_path / "local", remote=str(remote), sha256=section["head_sha256"])
    assert weight.shape == (VOCAB, 48)
    head = bytearray((remote / HEAD_FILE).read_bytes())
    head[-4:] = b"\0\0\0\0"
    (remote / HEAD_FILE).write_bytes(bytes(head))
    (tmp_path / "local" / HEAD_FILE).write_bytes(b"stale")  # not the manifest's: fetched again
    with pytest.raises(ValueError, match="is not the head its manifest names"):
        load_head(tmp_path / "local", remote=str(remote), sha256=section["head_sha256"])
    with pytest.raises(ValueError, match="cannot fetch .*manifest.json"):
        read_cache_manifest(tmp_path / "local2", remote=str(tmp_path / "nowhere"))


def test_what_needs_the_online_teacher_says_so(small, cache1, tmp_path, capsys):
    from tailkd_dist.train import main

    cfg = config(tmp_path / "c.yaml", small, tmp_path / "run", cache=cache1, online=False, loss__hidden_weight=1.0)
    rc = main([str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and "needs the teacher's intermediate layers" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
