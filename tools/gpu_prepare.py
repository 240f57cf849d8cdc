"""Prepare, on the CPU machine, everything the GPU check needs that a GPU machine lacks.

    python tools/gpu_prepare.py            # fills .gpu/ (git-ignored), prints the command to run there

The lent GPU machines have Python 3.12, torch, transformers and most of the scientific stack,
but no deepspeed and no mosaicml-streaming, and they reach no package registry. This writes
into ``.gpu/``:

- ``wheels/``: Python 3.12 wheels of what is missing there, at the versions of
  ``requirements.lock`` (so the GPU runs the versions CI tests): mosaicml-streaming and its
  small runtime dependencies, deepspeed (an sdist on PyPI, so built here into a pure-Python
  wheel; its CUDA ops are compiled on first use, and the check uses none) and its pydantic,
  and tailkd_dist itself;
- ``data/``: a few MDS shards of 2048-token rows of the python-stdlib corpus, written by
  ``tailkd-prepare-data`` with a 512-token BPE, for the check's training runs;
- ``SIZE``: the folder's size, which must stay under the 64 MiB a device call carries.

It finishes by printing the one command line that installs the wheels on the GPU machine and
runs ``tools/gpu_check.py`` (carry ``.gpu`` with it).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20
MARKER = "MADE_BY"

# Missing on the GPU image (its package list: ../.library/device/KINDS.md at the time of writing)
# and needed at run time by the trainer: streaming's and deepspeed's own dependencies that the
# image does not already have. Versions come from requirements.lock.
BINARY = ["mosaicml-streaming", "zstd", "python-snappy", "cramjam", "brotli", "catalogue", "hjson",
          "pydantic", "pydantic-core", "annotated-types", "typing-inspection"]
NO_CP312_WHEEL = {"zstd": "1.5.6.2"}
"""Locked versions with no Python 3.12 wheel on PyPI: the nearest release that has one and is
not yanked (1.5.7.3 is, "not thread safe"). The shards are written uncompressed, so zstd is only
imported, never used, by the check."""
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64"]

INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
           ".gpu/wheels/*.whl && export PYTHONPATH=/tmp/site")


def locked_versions() -> dict[str, str]:
    out = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.lower().replace("_", "-")] = version
    return out


class Failed(Exception):
    pass


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO, **kw).returncode != 0:
        raise Failed(f"{cmd[2] if cmd[1] == '-m' else cmd[0]} {cmd[3] if len(cmd) > 3 else ''} failed (see above)")


def main(argv=None) -> int:
    try:
        return _main(argv)
    except Failed as e:
        print(f"gpu_prepare: error: {e}", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / ".gpu"), help="the folder to fill (default: .gpu)")
    ap.add_argument("--max-docs", type=int, default=120, help="python-stdlib documents for the data (default 120)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not (out / MARKER).is_file() and any(out.iterdir()):
        print(f"gpu_prepare: error: {out} exists and was not made by this script (no {MARKER}): choose "
              "another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("tools/gpu_prepare.py\n")
    wheels, data = out / "wheels", out / "data"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    pins = locked_versions()
    missing = [n for n in BINARY if n not in pins]
    if missing:
        print(f"gpu_prepare: error: not in requirements.lock: {', '.join(missing)}", file=sys.stderr)
        return 2
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
         "--implementation", "cp", *plat, "-d", str(wheels), *[f"{n}=={NO_CP312_WHEEL.get(n, pins[n])}" for n in BINARY]])
    # deepspeed is an sdist: build it here, without its ops (JIT-compiled where used).
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
         f"deepspeed=={pins['deepspeed']}"], env={**os.environ, "DS_BUILD_OPS": "0"})
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)])
    if not (data / "manifest.json").is_file():
        run([sys.executable, "-m", "tailkd_dist.data.prepare", "python-stdlib", "-o", str(data), "--seq-len", "2048",
             "--train-tokenizer", "512", "--max-docs", str(args.max_docs), "--val-fraction", "0.1", "--no-progress",
             "--overwrite"])
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    (out / "SIZE").write_text(f"{size}\n")
    for w in sorted(wheels.iterdir()):
        print(f"  {w.name}  {w.stat().st_size / 2**20:.2f} MiB")
    print(f"{out}: {size / 2**20:.1f} MiB (limit {LIMIT / 2**20:.0f} MiB)")
    if size > LIMIT:
        print(f"gpu_prepare: error: {out} is over the {LIMIT / 2**20:.0f} MiB a device call carries", file=sys.stderr)
        return 2
    print("\nOn the GPU machine (device tool: carry ['.gpu']), from the repository root:\n")
    print(f"  {INSTALL} && python3 tools/gpu_check.py --data .gpu/data --json $OUT/gpu_check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
