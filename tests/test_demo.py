"""The main job (tailkd-demo) and the reproduction script at tiny sizes (configs/demo_tiny.yaml):
every stage runs end to end, the table holds finite numbers, the teacher is cached and reused."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_utils import REPO, env


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Prepared tiny data and the tiny teacher, shared by the tests of this module."""
    return tmp_path_factory.mktemp("demo_cache")


def _run(cmd, timeout=420):
    out = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"exit {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.mark.slow
def test_demo_tiny_two_ranks(cache, tmp_path):
    out = tmp_path / "demo"
    res = _run([sys.executable, "-m", "tailkd_dist.demo", "--tiny", "--nproc", "2", "--engine", "deepspeed",
                "--out", str(out), "--cache-dir", str(cache)])
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [r["model"].split()[0] for r in rows] == ["teacher", "student", "student"]
    for r in rows:
        for k in ("nll", "ppl", "ece", "tps") + (("top1",) if r is not rows[0] else ()):
            assert r[k] is not None and math.isfinite(r[k]), (r["model"], k, r[k])
        assert 0 < r["nll"] < 20 and r["tps"] > 0
    assert rows[0]["top1"] is None and all(0 <= r["top1"] <= 1 for r in rows[1:])
    assert not results["teacher_cached"] and results["nproc"] == 2
    # The printed table: a header and one line per model, numbers where numbers belong.
    table = res.stdout[res.stdout.index("model "):].splitlines()
    assert "held-out NLL" in table[0] and table[2].startswith("teacher") and "TAD" in table[3] and "KL" in table[4]
    for line in table[2:5]:
        nums = [x for x in line.split()[-6:] if x != "-"]  # NLL, ppl, agreement, ECE, tok/s
        assert len(nums) >= 5 and all(math.isfinite(float(x.replace(",", ""))) for x in nums), line
    assert (out / "curves.png").stat().st_size > 10_000
    for run in ("tad", "kl", "teacher"):
        assert any((out / "runs" / run / "tb").glob("events.out.tfevents.*")), run
    for run in ("tad", "kl"):
        assert (out / "runs" / run / "hf_student" / "config.json").exists()
        assert (out / "configs" / f"{run}.yaml").exists()
    # The same teacher settings give the same cache slot, found without training.
    from tailkd_dist import demo

    data = Path(results["data"])
    stage, slot, _ = demo.teacher_stage(cache_dir=cache, data=data, data_key=data.name.rsplit("-", 1)[1], nproc=1,
                                        engine="deepspeed", eval_rows=8,
                                        overrides=demo.load_overlay(demo.CONFIG_DIR / "demo_tiny.yaml")["teacher"])
    assert stage is None and str(slot) == results["teacher_dir"]


@pytest.mark.slow
def test_reproduce_one_tiny_configuration(cache, tmp_path):
    md = tmp_path / "REPRODUCTION.md"
    res = _run([sys.executable, "tools/reproduce.py", "--tiny", "--seeds", "1", "--betas", "2", "--ks", "10",
                "--out", str(tmp_path / "out"), "--cache-dir", str(cache), "--md", str(md)])
    text = md.read_text()
    assert "status: **complete**" in text, res.stdout[-4000:] + res.stderr[-4000:]
    for name in ("none-s1", "forward_kl-s1", "tad-k10-b2-s1"):
        r = json.loads((tmp_path / "out" / "runs" / name / "result.json").read_text())
        assert math.isfinite(r["eval"]["student_nll"]) and math.isfinite(r["eval"]["full_ece"])
        assert f"| {name} | " in text
    main = next(line for line in text.splitlines() if line.startswith("| TAD (k=10, beta=2) |"))
    assert "nan" not in main.lower() and "(n=1)" in main
    for png in ("main.png", "beta_sweep.png", "k_sweep.png", "curves.png"):
        assert (tmp_path / "reproduction" / png).stat().st_size > 5_000, png
    # --report-only rebuilds the same report from the per-run results.
    md.unlink()
    _run([sys.executable, "tools/reproduce.py", "--out", str(tmp_path / "out"), "--md", str(md), "--report-only"])
    assert "status: **complete**" in md.read_text()
