"""How a training run answers SIGTERM, SIGUSR1 and SIGINT (Ctrl-C).

SLURM sends SIGTERM (or, with ``--signal=B:USR1@T``, SIGUSR1) before a time limit or a
preemption; a user presses Ctrl-C. Inside the step loop the first of them asks for a clean
stop: the current step finishes, the ranks agree on the step, the checkpoint is saved and the
run ends with one line saying where. Everywhere else (startup, model loading, the final save,
eval, export) and for a second signal inside the loop, the signal ends the process at once
with the kernel's default action, which no blocking call (a collective, a read, a sleep) can
delay and no handler can swallow.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """``with StopSignals() as stop:`` around a run: default actions everywhere (end at once),
    ``with stop.step_loop():`` around the step loop: the first signal is a stop request."""

    def __init__(self):
        self.signal: int | None = None
        self._saved: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._saved[sig] = signal.signal(sig, signal.SIG_DFL)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def step_loop(self):
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._first)
        try:
            yield self
        finally:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)

    def _first(self, signum, frame) -> None:
        self.signal = signum
        # A second signal must not wait for the step to end: back to the default action.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)

    @property
    def name(self) -> str:
        # (A rank that got no signal itself stops because another rank got one.)
        return signal.Signals(self.signal).name if self.signal is not None else "a signal to another rank"

    def requested(self, topo) -> bool:
        import torch

        # Ranks may receive the signal at slightly different times: agree (MAX) so every rank
        # saves at the same step.
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=topo.device)
        world = topo.group("world")
        if world is not None:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=world)
        return bool(flag.item())


_unwinding: int | None = None  # the signal an unwind_on_signals handler received, if any


@contextlib.contextmanager
def unwind_on_signals(prog: str):
    """``with unwind_on_signals(prog):`` around a tool that builds its output in a staging
    directory (prepare-data, derive-student): SIGTERM and SIGINT unwind the stack, so the
    staging and cache directories are removed on the way out; one line instead of a
    traceback, exit status 128 + signal. The previous handlers come back afterwards.

    Python runs a handler between any two bytecodes of the main thread, including inside a
    ``__del__`` or a weakref callback, where the interpreter prints and drops the exception
    it raises. So the signal is also remembered: ``raise_if_stopping()`` (called before an
    output is published, and per batch of work) and the block's end raise it again."""
    global _unwinding

    def _unwind(signum, frame):
        global _unwinding
        if _unwinding is None:
            sys.stderr.write(f"{prog}: stopped by {signal.Signals(signum).name}\n")
            sys.stderr.flush()
            _unwinding = signum
        raise SystemExit(128 + signum)

    def _quiet(unraisable):  # the dropped SystemExit: its one line was written already
        if not (isinstance(unraisable.exc_value, SystemExit) and _unwinding is not None):
            hook(unraisable)

    saved = {sig: signal.signal(sig, _unwind) for sig in (signal.SIGTERM, signal.SIGINT)}
    hook, sys.unraisablehook = sys.unraisablehook, _quiet
    try:
        yield
        raise_if_stopping()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        sys.unraisablehook = hook
        _unwinding = None


def raise_if_stopping() -> None:
    """Raise the SystemExit of a stop signal that arrived where its exception was dropped."""
    if _unwinding is not None:
        raise SystemExit(128 + _unwinding)


_paused: set[str] = set()


def fault_pause(phase: str) -> None:
    """Fault injection for the signal tests: ``TAILKD_TEST_PAUSE=<phase>[:seconds]`` makes the
    run say ``tailkd-test: pause <phase>`` on stderr and sleep there once (default 60 s), so a
    test can send a real signal while the run is in that phase, or look at the process; the
    pause ends early once the file named by ``TAILKD_TEST_RELEASE`` exists."""
    name, _, seconds = os.environ.get("TAILKD_TEST_PAUSE", "").partition(":")
    if name != phase or phase in _paused:
        return
    _paused.add(phase)
    sys.stderr.write(f"tailkd-test: pause {phase}\n")
    sys.stderr.flush()
    deadline = time.monotonic() + float(seconds or 60)
    release = os.environ.get("TAILKD_TEST_RELEASE")
    while time.monotonic() < deadline and not (release and os.path.exists(release)):
        time.sleep(0.1)
