"""Nothing a user owns is lost: end-to-end through the CLIs (tailkd-train, tailkd-export-hf), one
CPU process, in temporary directories; what must survive is compared byte for byte.

Disk-full cases write into a small tmpfs mounted in a private mount namespace (``unshare -m``),
so the mount disappears with the command and never outlives a test."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainer_utils import REPO, STUDENT, command, env, run, write_config

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.usefixtures("clean_shm")


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (directories are implied)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(out: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error:"), last
    for n in needles:
        assert n in last, (n, last)
    return last


def export(run_dir, out_dir, *extra, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "tailkd-export-hf"), str(run_dir), str(out_dir), *extra], env=env(),
                          cwd=cwd or REPO, capture_output=True, text=True, timeout=300)


def export_here(capsys, monkeypatch, run_dir, out_dir, *extra, cwd=None) -> subprocess.CompletedProcess:
    """tailkd-export-hf's entry point in this process (a launch costs seconds of imports; the
    console script itself is run by `export`): the same exit status and stderr."""
    from tailkd_dist.export import main

    capsys.readouterr()
    with monkeypatch.context() as m:
        m.chdir(cwd or REPO)
        rc = main([str(run_dir), str(out_dir), *extra])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["tailkd-export-hf"], rc, out, err)


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory):
    """A finished run: checkpoints at steps 2 and 4 (latest 4), metrics, TensorBoard, hf_student."""
    d = tmp_path_factory.mktemp("base")
    cfg = write_config(d / "c.yaml", data, d / "run", optim__max_steps=4, checkpoint__every_steps=2)
    run(cfg)
    return d / "run"


@pytest.fixture
def run_copy(base_run, tmp_path):
    """A private copy of the finished run, and a config pointing at it."""
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst, symlinks=True)
    cfg = yaml.safe_load((base_run / "config.yaml").read_text())
    cfg["output_dir"] = str(dst)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return dst, path


# --------------------------------------------------------------------------- 1. export


def test_export_replaces_only_its_own_output(run_copy, tmp_path, capsys, monkeypatch):
    run_dir, _ = run_copy
    before = snapshot(run_dir)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's file")
    (tmp_path / "afile").write_text("x")
    cases = {
        "the run directory itself": (run_dir, "is the run directory"),
        "a directory containing it": (tmp_path, "contains the run directory"),
        "inside it": (run_dir / "checkpoints", "lies inside the run directory"),
        "inside it, new": (run_dir / "exports" / "new", "lies inside the run directory"),
        "an unrelated directory": (foreign, "not an output of"),
        "a file": (tmp_path / "afile", "not a directory"),
    }
    for i, (what, (out, needle)) in enumerate(cases.items()):
        res = export(run_dir, out) if i == 0 else export_here(capsys, monkeypatch, run_dir, out)
        one_error_line(res, "tailkd-export-hf", needle)
    # relative spellings of the run directory are the same directory
    one_error_line(export_here(capsys, monkeypatch, "run", ".", cwd=tmp_path), "tailkd-export-hf",
                   "contains the run directory")
    assert snapshot(run_dir) == before
    assert (foreign / "notes.txt").read_text() == "a user's file" and (tmp_path / "afile").read_text() == "x"
    assert not (run_dir / "exports").exists()

    out = tmp_path / "export"
    assert export(run_dir, out).returncode == 0
    marker = json.loads((out / "tailkd_export.json").read_text())
    assert marker["tag"] == "step_00000004" and marker["step"] == 4
    first = snapshot(out)
    assert "model.safetensors" in first
    res = export_here(capsys, monkeypatch, run_dir, out, "--tag", "step_00000002")  # an earlier export is replaced
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((out / "tailkd_export.json").read_text())["tag"] == "step_00000002"
    assert snapshot(out)["model.safetensors"] != first["model.safetensors"]
    assert snapshot(run_dir) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_export_of_a_missing_checkpoint_or_run_is_one_line(run_copy, tmp_path):
    run_dir, _ = run_copy
    one_error_line(export(tmp_path / "nope", tmp_path / "o"), "tailkd-export-hf", "holds no checkpoints/")
    one_error_line(export(run_dir, tmp_path / "o", "--tag", "step_00000099"), "tailkd-export-hf",
                   "not a complete checkpoint", "step_00000002, step_00000004")
    assert not (tmp_path / "o").exists()


def test_trainer_refuses_a_foreign_output_dir_and_end_export_target(data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own config\n")
    cfg = write_config(tmp_path / "c.yaml", data, mine)
    one_error_line(run(cfg, check=False, timeout=120), "tailkd-train", "not a tailkd-train run directory")
    assert snapshot(mine) == {"config.yaml": hashlib.sha256(b"my own config\n").hexdigest()}
    # a run directory whose hf_student is not an export (a user's model put there)
    out = tmp_path / "run"
    (out / "hf_student").mkdir(parents=True)
    (out / "tailkd_run.json").write_text("{}")
    (out / "hf_student" / "weights.bin").write_bytes(b"123")
    cfg = write_config(tmp_path / "d.yaml", data, out)
    one_error_line(run(cfg, check=False, timeout=120), "tailkd-train", "end-of-run export", "hf_student", "move it away")
    assert (out / "hf_student" / "weights.bin").read_bytes() == b"123"


# --------------------------------------------------------------------------- 2. pruning, fresh runs


def test_fresh_run_into_a_run_directory_is_refused(run_copy):
    run_dir, cfg = run_copy
    before = snapshot(run_dir)
    out = run(cfg, check=False, timeout=120, extra=["checkpoint.resume=false", "optim.max_steps=2"])
    one_error_line(out, "tailkd-train", "already holds checkpoints", "step_00000004", "checkpoint.resume=true")
    assert snapshot(run_dir) == before


def test_pruning_keeps_another_runs_checkpoints(run_copy, base_run, tmp_path):
    """A directory that holds another run's higher-numbered checkpoint (copied in): resuming this
    run with keep=1 prunes only this run's own checkpoints, by step, and 'latest' stays valid."""
    run_dir, cfg = run_copy
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002")
    other = tmp_path / "other"
    shutil.copytree(base_run / "checkpoints" / "step_00000004", other)
    state = json.loads((other / "trainer_state.json").read_text())
    state["run_id"] = "another-run"
    (other / "trainer_state.json").write_text(json.dumps(state))
    shutil.move(other, ckpts / "step_00000040")
    foreign = snapshot(ckpts / "step_00000040")
    out = run(cfg, extra=["optim.max_steps=6", "checkpoint.keep=1", "checkpoint.export_hf_at_end=false"])
    assert "resumed from step_00000002" in out.stderr
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000006", "step_00000040"]
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert snapshot(ckpts / "step_00000040") == foreign


# --------------------------------------------------------------------------- 3. replace, fall back


def test_finished_run_started_again_rewrites_nothing(run_copy):
    run_dir, cfg = run_copy
    before = snapshot(run_dir / "checkpoints")
    inode = (run_dir / "checkpoints" / "step_00000004").stat().st_ino
    out = run(cfg, extra=["checkpoint.export_hf_at_end=false"])
    assert "resumed from step_00000004" in out.stderr
    assert snapshot(run_dir / "checkpoints") == before
    assert (run_dir / "checkpoints" / "step_00000004").stat().st_ino == inode  # not deleted and re-made


def test_kill_while_resaving_a_complete_step_keeps_it(run_copy):
    """latest names step 2 though step 4 is complete (a kill between COMPLETE and 'latest'): the
    resumed run saves step 4 again; a SIGKILL in the middle of that save leaves the complete
    step 4 as it was, and the next start resumes and finishes."""
    run_dir, cfg = run_copy
    ckpts = run_dir / "checkpoints"
    (ckpts / "latest").write_text("step_00000002")
    step4 = snapshot(ckpts / "step_00000004")
    e = {**env(), "TAILKD_TEST_SAVE_DELAY_S": "60"}
    proc = subprocess.Popen(command(cfg, extra=["checkpoint.export_hf_at_end=false"]), env=e, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (ckpts / "step_00000004.partial" / "extra_rank0.pt").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < 240, "the re-save of step 4 never started"
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert snapshot(ckpts / "step_00000004") == step4
    out = run(cfg, extra=["optim.max_steps=6", "checkpoint.export_hf_at_end=false"])
    assert "resumed from step_00000002" in out.stderr
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert not list(ckpts.glob("*.partial")) and not list(ckpts.glob("*.replaced"))


@pytest.mark.parametrize("damage", ["missing", "dangling"])
def test_bad_latest_falls_back_to_newest_complete(run_copy, damage):
    run_dir, cfg = run_copy
    ckpts = run_dir / "checkpoints"
    if damage == "missing":
        (ckpts / "latest").unlink()
    else:
        (ckpts / "latest").write_text("step_00000005")
        (ckpts / "step_00000005").mkdir()  # a half-written checkpoint, no COMPLETE
    step2 = snapshot(ckpts / "step_00000002")
    out = run(cfg, extra=["optim.max_steps=6", "checkpoint.export_hf_at_end=false"])
    notes = [line for line in out.stderr.splitlines() if "using the newest complete checkpoint" in line]
    assert len(notes) == 1 and "step_00000004" in notes[0], out.stderr[-3000:]
    assert "resumed from step_00000004" in out.stderr
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert not (ckpts / "step_00000002").exists() or snapshot(ckpts / "step_00000002") == step2


def test_recover_moves_a_replaced_checkpoint_back(tmp_path):
    """A kill between the two renames of a re-save leaves step_X.replaced and no step_X."""
    from tailkd_dist import checkpoint

    r = tmp_path / "checkpoints"
    (r / "step_00000004.replaced").mkdir(parents=True)
    (r / "step_00000004.replaced" / "COMPLETE").write_text("")
    (r / "step_00000004.replaced" / "w.pt").write_bytes(b"w")
    (r / "latest").write_text("step_00000004")
    checkpoint.recover(str(r))
    assert (r / "step_00000004" / "w.pt").read_bytes() == b"w" and not (r / "step_00000004.replaced").exists()
    assert checkpoint.resolve_latest(str(r)) == ("step_00000004", None)


# --------------------------------------------------------------------------- 4. resume checks


REFUSED = {
    "beta": (["loss.beta=5"], "loss.beta: 2.0 -> 5.0"),
    "divergence": (["loss.divergence=forward_kl"], "loss.divergence"),
    "k": (["loss.k=5"], "loss.k: 10 -> 5"),
    "lr": (["optim.lr=0.1"], "optim.lr"),
    "seed": (["seed=8"], "seed: 7 -> 8"),
    # an HF config is compared whole but the line names the keys inside it that differ
    "teacher": (["models.teacher.config.hidden_size=64"], "models.teacher.config.hidden_size: 48 -> 64)"),
    "student_size": (["models.student.config.num_hidden_layers=3", "models.student.config.rope_theta=5000"],
                     "models.student.config.num_hidden_layers: 2 -> 3; models.student.config.rope_theta: null -> 5000"),
    "engine": (["engine.ds_config=ds_configs/zero3.json"], "engine.ds_config"),
}


def test_resume_refuses_another_configuration(run_copy, monkeypatch):
    """The first case through tailkd-train (rc 2, one line); the others through the trainer's
    own resume decision in this process (find_resume, what every rank runs before building
    anything), with the same line."""
    from types import SimpleNamespace

    from tailkd_dist.config import load_config
    from tailkd_dist.train import find_resume

    run_dir, cfg = run_copy
    before = snapshot(run_dir)
    monkeypatch.chdir(REPO)  # where `run` launches the trainer: relative paths read alike
    for i, (name, (overrides, needle)) in enumerate(REFUSED.items()):
        if i == 0:
            out = run(cfg, check=False, timeout=120, extra=[*overrides, "optim.max_steps=6"])
            line = one_error_line(out, "tailkd-train", "step_00000004", needle, "start a new run")
        else:
            with pytest.raises(ValueError) as info:
                find_resume(load_config(cfg, [*overrides, "optim.max_steps=6"]), SimpleNamespace(rank=0, world_size=1))
            line = str(info.value)
            assert "\n" not in line and all(n in line for n in ("step_00000004", needle, "start a new run")), line
        assert "optim.max_steps" not in line.split("(keys that may change")[0], (name, line)
    assert snapshot(run_dir) == before


def test_resume_allows_and_logs_the_documented_changes(run_copy):
    run_dir, cfg = run_copy
    out = run(cfg, extra=["optim.max_steps=5", "logging.every_steps=2", "checkpoint.keep=3", "eval.max_batches=1",
                          "checkpoint.export_hf_at_end=false"])
    assert "resumed from step_00000004" in out.stderr
    line = next(x for x in out.stderr.splitlines() if "changed keys (allowed)" in x)
    for k in ("optim.max_steps: 4 -> 5", "logging.every_steps: 1 -> 2", "checkpoint.keep: 2 -> 3"):
        assert k in line, line
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000005"


def test_resume_with_another_world_size_is_one_line_per_rank(run_copy):
    run_dir, cfg = run_copy
    before = snapshot(run_dir)
    out = run(cfg, launcher="torchrun", nproc=2, check=False, timeout=180, extra=["optim.max_steps=6"])
    assert out.returncode != 0
    lines = [x for x in out.stderr.splitlines() if x.startswith("tailkd-train: error:")]
    assert len(lines) == 2 and all("written by 1 ranks and this job has 2" in x for x in lines), out.stderr[-3000:]
    assert snapshot(run_dir) == before


def test_resume_refuses_changed_model_files(data, tmp_path):
    """Same config, same path, but the student directory now holds a wider model."""
    import torch

    from tailkd_dist.config import ModelSpec
    from tailkd_dist.models import build_model

    sdir = tmp_path / "student"
    build_model(ModelSpec(config=STUDENT, init_seed=2), dtype=torch.float32, attention="sdpa").save_pretrained(sdir)
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=2,
                       checkpoint__export_hf_at_end=False,
                       models__student={"path": str(sdir), "tokenizer": str(data / "tokenizer")})
    run(cfg)
    before = snapshot(tmp_path / "run")
    shutil.rmtree(sdir)
    build_model(ModelSpec(config={**STUDENT, "hidden_size": 48}, init_seed=2), dtype=torch.float32,
                attention="sdpa").save_pretrained(sdir)
    out = run(cfg, check=False, timeout=120, extra=["optim.max_steps=4"])
    one_error_line(out, "tailkd-train", "student.hidden_size: 32 -> 48")
    assert snapshot(tmp_path / "run") == before


# --------------------------------------------------------------------------- 5. disk full


def in_small_tmpfs(mount: Path, size_kib: int, script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``script`` (bash) with a ``size_kib`` tmpfs at ``mount`` in a private mount namespace."""
    mount.mkdir(parents=True, exist_ok=True)
    inner = f"mount -t tmpfs -o size={size_kib}k tailkd-test {mount} && {script}"
    return subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", inner], env=env(), cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("nproc,size_kib", [(1, 1200), (2, 1600)])
def test_disk_full_during_a_checkpoint_save(data, tmp_path, nproc, size_kib):
    """The first checkpoint fits the small file system, the second does not: one line on every
    rank naming the device and the path, a non-zero exit, the first checkpoint byte for byte
    as it was, no partial checkpoint left."""
    mnt = tmp_path / "mnt"
    cfg = write_config(tmp_path / "c.yaml", data, mnt / "run", optim__max_steps=2, checkpoint__export_hf_at_end=False,
                       logging__tensorboard=False)
    train = " ".join(command(cfg, launcher="python" if nproc == 1 else "torchrun", nproc=nproc))
    script = (f"{train} > {tmp_path}/1.out 2>&1; echo $? > {tmp_path}/1.rc; cp -a {mnt}/run {tmp_path}/before; "
              f"{train} optim.max_steps=4 > {tmp_path}/2.out 2> {tmp_path}/2.err; echo $? > {tmp_path}/2.rc; "
              f"cp -a {mnt}/run {tmp_path}/after")
    res = in_small_tmpfs(mnt, size_kib, script, REPO)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "1.rc").read_text().strip() == "0", (tmp_path / "1.out").read_text()[-3000:]
    err = (tmp_path / "2.err").read_text()
    assert (tmp_path / "2.rc").read_text().strip() == ("2" if nproc == 1 else "1"), err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("tailkd-train: error:")]
    assert len(lines) == nproc, err[-3000:]
    for line in lines:
        assert "checkpoint step_00000004" in line and "no space left on device" in line, line
        assert "step_00000002 is intact" in line, line
    if nproc == 1:
        assert "Traceback" not in err and err.strip().splitlines()[-1] == lines[0], err[-3000:]
    ck_before, ck_after = tmp_path / "before/checkpoints", tmp_path / "after/checkpoints"
    assert snapshot(ck_after / "step_00000002") == snapshot(ck_before / "step_00000002")
    assert (ck_after / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in ck_after.iterdir() if p.is_dir()) == ["step_00000002"]


def test_disk_full_while_writing_the_first_checkpoint(data, tmp_path):
    """No earlier checkpoint to size the save by: the write itself fails (torch reports only a
    short write); still one line, and no partial checkpoint left."""
    mnt = tmp_path / "mnt"
    cfg = write_config(tmp_path / "c.yaml", data, mnt / "run", optim__max_steps=2, checkpoint__export_hf_at_end=False,
                       logging__tensorboard=False)
    script = (f"{' '.join(command(cfg))} > {tmp_path}/1.out 2> {tmp_path}/1.err; echo $? > {tmp_path}/1.rc; "
              f"cp -a {mnt}/run {tmp_path}/after")
    res = in_small_tmpfs(mnt, 500, script, REPO)
    assert res.returncode == 0, res.stderr
    err = (tmp_path / "1.err").read_text()
    assert (tmp_path / "1.rc").read_text().strip() == "2" and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("tailkd-train: error: checkpoint step_00000002") and "no space left on device" in last, last
    assert "no earlier checkpoint exists" in last, last
    assert not [p for p in (tmp_path / "after/checkpoints").iterdir() if p.is_dir()]


def test_disk_full_during_an_export(run_copy, tmp_path):
    run_dir, _ = run_copy
    before = snapshot(run_dir)
    mnt = tmp_path / "mnt"
    exp = f"{BIN / 'tailkd-export-hf'} {run_dir} {mnt}/student"
    script = (f"{exp} > {tmp_path}/1.out 2>&1; echo $? > {tmp_path}/1.rc; cp -a {mnt} {tmp_path}/before; "
              f"{exp} --tag step_00000002 > {tmp_path}/2.out 2> {tmp_path}/2.err; echo $? > {tmp_path}/2.rc; "
              f"cp -a {mnt} {tmp_path}/after")
    res = in_small_tmpfs(mnt, 400, script, REPO)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "1.rc").read_text().strip() == "0", (tmp_path / "1.out").read_text()[-3000:]
    assert (tmp_path / "2.rc").read_text().strip() == "2", (tmp_path / "2.err").read_text()[-3000:]
    err = (tmp_path / "2.err").read_text()
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("tailkd-export-hf: error: no space left on device"), err[-3000:]
    assert snapshot(tmp_path / "after") == snapshot(tmp_path / "before")  # the earlier export, no staging left
    assert snapshot(run_dir) == before


# --------------------------------------------------------------------------- 6. no unpickling


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_crafted_extra_file_is_not_unpickled(run_copy, tmp_path):
    import torch

    run_dir, cfg = run_copy
    ran = tmp_path / "code_ran"
    extra = run_dir / "checkpoints" / "step_00000004" / "extra_rank0.pt"
    state = torch.load(extra, weights_only=True)  # what tailkd_dist writes loads without unpickling
    state["rng"]["payload"] = _Payload(str(ran))
    torch.save(state, extra)
    one_error_line(export(run_dir, tmp_path / "out"), "tailkd-export-hf", "refusing to unpickle", str(extra))
    one_error_line(run(cfg, check=False, timeout=120, extra=["optim.max_steps=6"]), "tailkd-train",
                   "refusing to unpickle")
    assert not ran.exists()
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the demo's outputs


@pytest.mark.parametrize("prog", ["demo", "reproduce"])
def test_demo_and_study_refuse_a_foreign_out_dir(tmp_path, prog):
    mine = tmp_path / "mine"
    (mine / "runs" / "tad").mkdir(parents=True)
    (mine / "runs" / "tad" / "notes.txt").write_text("a user's file")
    cmd = ([sys.executable, "-m", "tailkd_dist.demo", "--tiny", "--nproc", "1"] if prog == "demo"
           else [sys.executable, "tools/reproduce.py", "--tiny", "--seeds", "1"])
    out = subprocess.run([*cmd, "--out", str(mine), "--cache-dir", str(tmp_path / "cache")], env=env(), cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "error:" in last and "not an output of tailkd-demo" in last and "--out" in last, last
    assert snapshot(mine) == {"runs/tad/notes.txt": hashlib.sha256(b"a user's file").hexdigest()}
    assert not (tmp_path / "cache").exists()  # refused before any work


@pytest.mark.parametrize("where", ["read_only", "under_a_file"])
def test_unwritable_output_dir_is_refused_before_loading(data, tmp_path, where):
    """An output_dir that cannot be created (a read-only file system, a file in its path): one
    line naming it at start (the preflight, before any model is built), rc 2."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if where == "read_only":
        out, needle = mnt / "run", "is read-only or not writable"
    else:
        (tmp_path / "afile").write_text("x")
        out, needle = tmp_path / "afile" / "run", "is a file, not a directory"
    cfg = write_config(tmp_path / "c.yaml", data, out, optim__max_steps=2)
    train = " ".join(command(cfg))
    script = f"mount -t tmpfs -o ro,size=64k tailkd-test {mnt} && {train}"
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script], env=env(),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("tailkd-train: error:")]
    assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], res.stderr[-3000:]
    assert "output_dir" in lines[0] and "Traceback" not in res.stderr
