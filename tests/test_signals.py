"""Signals through the tailkd-train CLI, with real signals: inside the step loop the first
SIGTERM / SIGUSR1 / SIGINT finishes the step, saves and says where; anywhere else, or a second
one, ends the process at once (the kernel's default action: nothing can swallow or delay it).

The run is held in a phase by the trainer's fault injection (TAILKD_TEST_PAUSE=<phase>[:s]:
it says "tailkd-test: pause <phase>" and sleeps there), so the signal lands in that phase.
"""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from trainer_utils import REPO, command, env, write_config

pytestmark = pytest.mark.usefixtures("clean_shm")


def _launch(cfg, tmp_path, pause):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen(command(cfg), env={**env(), "TAILKD_TEST_PAUSE": pause}, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=f, text=True)
    return proc, err


def _wait_for(proc, err, text, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in err.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {text!r}:\n{err.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {text!r} within {timeout} s:\n{err.read_text()[-3000:]}")


def _ends_within(proc, seconds):
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the run did not end within {seconds} s of the signal") from None


@pytest.mark.parametrize("phase,sig", [
    ("startup", signal.SIGTERM),
    ("eval", signal.SIGTERM),
    ("export", signal.SIGINT),
    ("export", signal.SIGUSR1),
])
def test_a_signal_outside_the_step_loop_ends_the_run_at_once(data, tmp_path, phase, sig):
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=2)
    proc, err = _launch(cfg, tmp_path, phase)  # the pause is 60 s: a swallowed signal sleeps on
    _wait_for(proc, err, f"tailkd-test: pause {phase}")
    t0 = time.monotonic()
    proc.send_signal(sig)
    rc = _ends_within(proc, 15)
    assert rc == -sig, (rc, err.read_text()[-3000:])
    assert time.monotonic() - t0 < 15
    assert "Traceback" not in err.read_text()
    assert not (tmp_path / "run" / "hf_student").exists()


def test_first_signal_in_the_step_loop_saves_and_says_where(data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=5)
    proc, err = _launch(cfg, tmp_path, "loop:3")  # inside the first step
    _wait_for(proc, err, "tailkd-test: pause loop")
    proc.send_signal(signal.SIGTERM)
    rc = _ends_within(proc, 120)
    text = err.read_text()
    assert rc == 0, text[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    lines = [ln for ln in text.splitlines() if ln.startswith("tailkd-train:")]
    assert lines == [f"tailkd-train: stopped by SIGTERM after step 1: checkpoint saved in {ckpt}; "
                     "run the same command again to resume"], text[-3000:]
    assert (ckpt / "COMPLETE").exists()
    assert not (tmp_path / "run" / "hf_student").exists()  # a stopped run exports nothing


def test_second_signal_in_the_step_loop_ends_the_run_at_once(data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=5)
    proc, err = _launch(cfg, tmp_path, "loop:60")
    _wait_for(proc, err, "tailkd-test: pause loop")
    proc.send_signal(signal.SIGTERM)  # the first: a stop request, the step goes on
    time.sleep(2)
    assert proc.poll() is None, err.read_text()[-3000:]
    proc.send_signal(signal.SIGINT)  # the second (Ctrl-C): now
    rc = _ends_within(proc, 15)
    assert rc == -signal.SIGINT, (rc, err.read_text()[-3000:])
    assert "Traceback" not in err.read_text()
