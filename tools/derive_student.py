#!/usr/bin/env python
"""Derive a student HF model from its teacher; same as the `tailkd-derive-student` console script.

    python tools/derive_student.py TEACHER_DIR -o STUDENT_DIR                  # every 2nd layer
    python tools/derive_student.py TEACHER_DIR -o STUDENT_DIR --every 3 --intermediate-size 4096
    python tools/derive_student.py TEACHER_DIR -o STUDENT_DIR --layers 0,2,4 --hidden-size 1024

See tailkd_dist/derive.py for what is copied, truncated or random, and `--help` for every option.
"""
import sys
from pathlib import Path

# Runs from a checkout whether or not the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tailkd_dist.derive import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
