"""End-to-end tests of tailkd-train (CPU, gloo): tiny Llama teacher/student built from HF
configs, data from the real prepare tool (python-stdlib slice). The scenarios both engines must
pass against one process (layouts, collectives, export, directories, SIGKILL + resume) are in
tests/test_engine_scenarios.py."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest

from trainer_utils import REPO, close_by_step, command, env, losses, run, write_config

REL = 1e-5  # float32; ranks sum in a different order than one process


pytestmark = pytest.mark.usefixtures("clean_shm")


@pytest.mark.slow
def test_loss_goes_down_on_stdlib_shards(data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=30, optim__lr=1e-2,
                       optim__warmup_steps=3, checkpoint__export_hf_at_end=False, data__micro_batch_size=4)
    run(cfg)
    ls = losses(tmp_path / "run")
    first = sum(ls[s] for s in (1, 2, 3)) / 3
    last = sum(ls[s] for s in (28, 29, 30)) / 3
    assert all(math.isfinite(v) for v in ls.values())
    assert last < first - 0.3, (first, last)  # ln(512) = 6.24 at the start


@pytest.mark.slow
def test_kill_during_checkpoint_save_resumes_previous(data, tmp_path):
    out_dir = tmp_path / "run"
    first = write_config(tmp_path / "a.yaml", data, out_dir, optim__max_steps=2, checkpoint__export_hf_at_end=False)
    run(first)
    assert (out_dir / "checkpoints/latest").read_text().strip() == "step_00000002"
    cfg = write_config(tmp_path / "b.yaml", data, out_dir, optim__max_steps=6, checkpoint__every_steps=2,
                       checkpoint__export_hf_at_end=False)
    e = env()
    e["TAILKD_TEST_SAVE_DELAY_S"] = "60"
    proc = subprocess.Popen(command(cfg), env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = out_dir / "checkpoints/step_00000004.partial"  # renamed to step_00000004 once COMPLETE
    t0 = time.time()
    while not (partial / "extra_rank0.pt").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < 240, "the save of step 4 never started"
        time.sleep(0.2)
    proc.kill()  # SIGKILL in the middle of the save
    proc.wait()
    assert not (partial / "COMPLETE").exists() and not (out_dir / "checkpoints/step_00000004").exists()
    assert (out_dir / "checkpoints/latest").read_text().strip() == "step_00000002"
    out = run(cfg)
    assert "resumed from step_00000002" in out.stderr + out.stdout
    assert (out_dir / "checkpoints/latest").read_text().strip() == "step_00000006"
    assert (out_dir / "checkpoints/step_00000004/COMPLETE").exists()  # re-saved, complete this time
    assert not partial.exists()  # the killed save's leftovers are gone


@pytest.mark.slow
def test_tensorboard_tags_and_hf_export(data, tmp_path):
    # logged at steps 2 and 3 (the last): only they compute the loss's statistics
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=3, eval__every_steps=2,
                       logging__every_steps=2)
    out = subprocess.run([sys.executable, "-c", f"import trainer_utils; trainer_utils.export_check({str(cfg)!r})"],
                         env={**env(), "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])},
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "EXPORT_OK" in out.stdout, out.stderr[-4000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run/tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    wanted = {
        "loss/total", "loss/ce", "loss/kl", "loss/d1", "loss/at_d2", "loss/tad",
        "tail/teacher_mass_aT_mean", "tail/teacher_mass_aT_std", "tail/student_mass_aS_mean",
        "tail/student_mass_aS_std", "tail/beta_x_mean", "tail/topk_coverage", "entropy/teacher",
        "entropy/student", "agreement/top1", "optim/lr", "optim/grad_norm", "perf/tokens_per_s",
        "time/teacher_forward_s", "time/student_forward_s", "time/loss_s", "time/student_backward_s",
        "time/optimizer_s", "perf/peak_rss_gib",
        "eval/student_nll", "eval/student_ppl", "eval/teacher_nll", "eval/top1_agreement", "eval/kl",
        "eval/full_ece",
    }
    assert wanted <= tags, sorted(wanted - tags)
    for tag in wanted:
        values = [e.value for e in acc.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), tag
    assert [e.step for e in acc.Scalars("loss/total")] == [2, 3]
    # metrics.jsonl: every step's losses; the statistics of the logged steps only, never NaN
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    rec = {r["step"]: r for r in records if "loss/total" in r}
    assert [r["step"] for r in records if "loss/total" in r] == [1, 2, 3]
    # evaluations at step 2 (eval.every_steps) and at the end, once each, in records of their own
    evals = [r for r in records if "eval/student_nll" in r]
    assert [r["step"] for r in evals] == [2, 3], records
    assert {t for t in wanted if t.startswith("eval/")} <= set(evals[0]), evals[0]
    for step in (2, 3):
        assert out.stdout.count(f"eval at step {step}: student_nll ") == 1, out.stdout[-3000:]
    assert all(math.isfinite(v) for r in rec.values() for v in r.values() if isinstance(v, float))
    assert {"loss/total", "loss/ce", "loss/tad", "optim/lr"} <= set(rec[1])
    assert not {"loss/kl", "tail/teacher_mass_aT_mean", "entropy/teacher", "agreement/top1"} & set(rec[1])
    for step in (2, 3):
        assert {t for t in wanted if not t.startswith("eval/")} <= set(rec[step]), step


BAD = {
    "unknown_key": ({"loss__bogus": 1}, "unknown config key 'loss.bogus'"),
    "k_ge_vocab": ({"loss__k": 512}, "loss.k"),
    "beta_le_0": ({"loss__beta": 0.0}, "loss.beta"),
    "missing_model_dir": ({"models__teacher": {"path": "/nonexistent/teacher"}}, "models.teacher.path"),
    # more rows per micro-batch than the split has: every epoch empty (this used to spin forever)
    "empty_epoch": ({"data__micro_batch_size": 100000}, "data.micro_batch_size = 100000 rows but split 'train'"),
    # rows longer than the student's position table (it used to be a warning, then an error or
    # silent training past the table at step 1)
    "position_table": ({"models__student__config__max_position_embeddings": 16},
                       "the shards' rows have 32 positions but the student's position table has 16"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_configs_exit_with_one_clear_line(data, tmp_path, capsys, monkeypatch, case):
    """One case through the tailkd-train process; the others through its entry point in this
    process (every one of them stops before the process group or a model exists)."""
    from tailkd_dist.train import main

    overrides, needle = BAD[case]
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", **overrides)
    if case == "empty_epoch":
        out = run(cfg, check=False, timeout=120)
        rc, err = out.returncode, out.stderr
    else:
        monkeypatch.chdir(REPO)
        rc, (_, err) = main([str(cfg)]), capsys.readouterr()
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("tailkd-train: error:") and needle in last, last
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing written


def test_world_size_not_divisible_by_loss_group(data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", loss__loss_group_size=2)
    e = {**env(), "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "3",
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    out = subprocess.run(command(cfg), env=e, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("tailkd-train: error:") and "3" in last and "2" in last, last


def test_evals_where_users_look_and_resume_records_each_step_once(data, tmp_path):
    """CE-only training (no teacher): each evaluation on the console and in metrics.jsonl with
    the student's numbers only (no 'teacher' numbers that would be the student's own); the last
    step's evaluation runs once when it is also a periodic one; a run resumed from an earlier
    checkpoint drops the records of the steps it runs again."""
    kw = dict(optim__max_steps=4, eval__every_steps=2, eval__max_batches=2, checkpoint__every_steps=2,
              checkpoint__export_hf_at_end=False, loss__divergence="none", models__teacher={},
              engine__kind="fsdp2")
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", **kw)
    out = run(cfg)
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4], records
    assert set(evals[0]) == {"step", "eval/student_nll", "eval/student_ppl", "eval/full_ece", "eval/tokens"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("eval at step")]
    assert [ln.split(":")[0] for ln in lines] == ["eval at step 2", "eval at step 4"], out.stdout[-3000:]
    assert "teacher" not in " ".join(lines)
    # Resume from step 2 as if the run had stopped after step 4 without its checkpoint: the
    # records of steps 3 and 4 go, and the re-run writes them once.
    before = losses(tmp_path / "run")
    ck = tmp_path / "run/checkpoints"
    for d in ck.glob("step_00000004"):
        shutil.rmtree(d)
    (ck / "latest").write_text("step_00000002\n")
    out = run(cfg)
    assert "2 record(s) after step 2 dropped" in out.stderr or "3 record(s) after step 2 dropped" in out.stderr, \
        out.stderr[-3000:]
    after = losses(tmp_path / "run")  # asserts each step recorded once
    assert sorted(after) == [1, 2, 3, 4]
    close_by_step(after, before, 1e-6, "resumed from step 2")
    evals = [r["step"] for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines())
             if "eval/student_nll" in r]
    assert evals == [2, 4], evals
