#!/usr/bin/env python
"""Preflight a tailkd-train config before submitting; same as the `tailkd-preflight` console script.

    python tools/preflight.py CONFIG.yaml --world-size 16 --gpus-per-node 8
    python tools/preflight.py CONFIG.yaml loss.loss_group_size=8 --world-size 64 --device-memory-gib 80

Checks vocabularies (teacher, student, shards), the layout (world size vs loss group and the
engine's settings), a per-rank memory estimate against the device's memory, and the data.
Exit 0 on OK, 2 with one `tailkd-preflight: error: ...` line per problem. See
tailkd_dist/preflight.py for the memory model.
"""
import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tailkd_dist.preflight import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
