"""tools/gpu_check.py --dry-run: every part of the GPU check that does not need CUDA, on CPU at
small sizes, so that a defect findable here never costs GPU time."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainer_utils import REPO, env

pytestmark = pytest.mark.usefixtures("clean_shm")


@pytest.mark.slow
def test_gpu_check_dry_run(data, tmp_path):
    out = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--data", str(data), "--json",
                          str(tmp_path / "check.json"), "--work", str(tmp_path / "work")],
                         env=env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "check.json").read_text())
    assert res["dry_run"] and res["failures"] == []
    rows = {r["what"]: r for r in res["rows"]}
    for div in ("tad", "forward_kl", "reverse_kl", "jsd"):
        row = rows[f"fused {div} (naive autograd beside)"]
        assert row["agreement"] <= 1e-5 and row["seconds"] > 0 and row["result"] == "ok", row
    assert rows["TAD on a one-rank gloo group vs no group"]["agreement"] <= 1e-6
    for engine in ("deepspeed", "fsdp2"):
        train = next(r for w, r in rows.items() if w.startswith(f"{engine}: 3 steps"))
        assert "tokens/s" in train["result"] and train["seconds"] > 0, train
        assert rows[f"{engine}: resume from step 3, 2 more steps"]["result"] == "ok"
        assert rows[f"{engine}: HF export loaded back"]["result"].startswith("ok"), rows
    assert "| section | what |" in out.stdout  # the one table
