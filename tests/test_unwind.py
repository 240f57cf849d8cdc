"""A stop signal to prepare-data or derive-student is never lost, wherever it lands.

Python runs a signal handler between two bytecodes of the main thread, which may be inside a
``__del__``: the SystemExit it raises there is printed and dropped, and the tool would go on
to publish its output and exit 0. Here the signal is sent from inside a ``__del__`` (so it
lands exactly there, every time) while a staged output is being built.
"""
from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tailkd_dist.signals import unwind_on_signals
from tailkd_dist.staging import staged_dir
from trainer_utils import REPO, env


class _SignalOnCollect:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)


def _drop_a_signal_in_del():
    obj = _SignalOnCollect()
    del obj  # the handler runs inside __del__: its SystemExit is dropped there
    gc.collect()


def test_signal_dropped_in_del_still_stops_before_publishing(tmp_path, capfd):
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        with unwind_on_signals("tailkd-test-tool"):
            with staged_dir(out) as staging:
                (staging / "part").write_text("half")
                _drop_a_signal_in_del()
                (staging / "rest").write_text("the body went on")
    assert stopped.value.code == 128 + signal.SIGTERM
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert capfd.readouterr().err.count("tailkd-test-tool: stopped by SIGTERM") == 1
    assert signal.getsignal(signal.SIGTERM) is before


def test_signal_dropped_after_the_output_is_published_still_exits_nonzero(tmp_path, capfd):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        with unwind_on_signals("tailkd-test-tool"):
            with staged_dir(out) as staging:
                (staging / "done").write_text("all")
            _drop_a_signal_in_del()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert (out / "done").read_text() == "all"  # complete before the signal: kept


def test_a_later_run_in_the_same_process_is_not_stopped_by_an_old_signal(tmp_path):
    with pytest.raises(SystemExit):
        with unwind_on_signals("tailkd-test-tool"):
            _drop_a_signal_in_del()
    with unwind_on_signals("tailkd-test-tool"):
        with staged_dir(tmp_path / "out") as staging:
            (staging / "x").write_text("x")
    assert (tmp_path / "out" / "x").exists()


def test_the_dropped_signal_prints_one_line_and_no_traceback(tmp_path):
    script = f"""
import gc, os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_unwind import _drop_a_signal_in_del
from tailkd_dist.signals import unwind_on_signals
from tailkd_dist.staging import staged_dir
with unwind_on_signals("tailkd-test-tool"):
    with staged_dir({str(tmp_path / "out")!r}) as staging:
        _drop_a_signal_in_del()
print("went on")
"""
    done = subprocess.run([sys.executable, "-c", script], env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 128 + signal.SIGTERM
    assert done.stderr == "tailkd-test-tool: stopped by SIGTERM\n" and done.stdout == ""
    assert list(tmp_path.iterdir()) == []
