"""Measurement helpers shared by the benchmark scripts in tools/ (not part of the package).

Peak memory: on CUDA, the allocator's peak (torch.cuda.max_memory_allocated) above what was
allocated before the measured call; on CPU, the process's peak resident set (ru_maxrss)
above the resident set just before the call. VmHWM / ru_maxrss is a high-water mark for the whole
process, so every CPU measurement runs in a fresh subprocess (``run_isolated``) whose inputs
are allocated without temporaries; where Linux lets a process reset it, it is reset just
before the measured call.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS, where Linux allows it
    (writing 5 to /proc/self/clear_refs): a warm-up call (e.g. one that compiles) may then
    run before the measured one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(fn, *, device: torch.device) -> tuple[float, int]:
    """Run fn() once: (seconds, peak extra bytes above the state before the call).

    Seconds are wall time on CUDA and this process's CPU time on CPU: the CPU machines are
    shared, and CPU time (all threads) is what other jobs on the cores do not inflate."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - before
    _reset_peak_rss()
    before = _rss_bytes()
    if _peak_rss_bytes() > before + (64 << 20):
        raise RuntimeError("the process's RSS peaked before the measured call: measure in a fresh process")
    t0 = time.process_time()
    fn()
    return time.process_time() - t0, max(0, _peak_rss_bytes() - before)


def run_isolated(script: str, args: list[str], *, timeout: float = 1800) -> dict:
    """Run ``python script args`` and parse the JSON object it prints on its last line."""
    out = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), no GPU")


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (what BENCHMARKS.md keeps)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"
