#!/usr/bin/env python
"""Tokenise and pack a corpus into MDS shards; same as the `tailkd-prepare-data` console script.

    python tools/prepare_data.py python-stdlib -o data/stdlib --train-tokenizer 4096 --seq-len 256
    python tools/prepare_data.py 'corpus/*.jsonl' -o data/c --tokenizer TEACHER_DIR --num-proc 8

See tailkd_dist/data/prepare.py for the output layout and `--help` for every option.
"""
import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tailkd_dist.data.prepare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
