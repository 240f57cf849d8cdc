"""The DeepSpeed configs ship with the package: the defaults (``ds_configs/zero3.json`` ...) are
found from any directory, a file of that name in the current directory wins, and a missing one
is named with the rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tailkd_dist.engines.ds_config import SHIPPED, load_ds_config, resolve_ds_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_live_in_the_package_and_the_checkout_links_them():
    assert SHIPPED == REPO / "tailkd_dist" / "ds_configs"
    assert {p.name for p in SHIPPED.glob("*.json")} >= {"zero3.json", "teacher_zero3.json", "zero2.json"}
    assert (REPO / "ds_configs").resolve() == SHIPPED


def test_resolution_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_ds_config("ds_configs/zero3.json") == str(SHIPPED / "zero3.json")
    assert resolve_ds_config("zero3.json") == str(SHIPPED / "zero3.json")
    assert resolve_ds_config("other/zero3.json") == "other/zero3.json"  # only the shipped names' forms
    # a file of that name in the current directory is the one read
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3.json").write_text('{"zero_optimization": {"stage": 1}}')
    assert load_ds_config("ds_configs/zero3.json", {}) == {"zero_optimization": {"stage": 1}}
    with pytest.raises(ValueError) as info:
        load_ds_config("ds_configs/zero9.json", {})
    msg = str(info.value)
    assert "ds_configs/zero9.json does not exist" in msg and str(tmp_path) in msg and "zero3.json" in msg, msg


def test_preflight_from_outside_the_checkout_finds_the_default_configs(data, tmp_path):
    """The user's case: the default engine.ds_config / teacher_ds_config, run from another
    directory (they were refused: 'does not exist')."""
    sys.path.insert(0, str(REPO / "tests"))
    from trainer_utils import env, write_config

    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run")
    raw = json.loads(json.dumps(__import__("yaml").safe_load(cfg.read_text())))
    raw["engine"].pop("ds_config")
    raw["engine"].pop("teacher_ds_config")
    cfg.write_text(__import__("yaml").safe_dump(raw))
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = subprocess.run([sys.executable, "-m", "tailkd_dist.preflight", str(cfg), "--world-size", "1"],
                         cwd=work, env={**env(), "PYTHONPATH": os.pathsep.join([str(REPO)])},
                         capture_output=True, text=True, timeout=300)
    assert "does not exist" not in out.stderr and out.returncode == 0, out.stderr[-3000:]
