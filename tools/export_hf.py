"""Export a training run's student as an HF checkpoint: python tools/export_hf.py RUN_DIR OUT_DIR [--tag TAG]"""
import sys

from tailkd_dist.export import main

if __name__ == "__main__":
    sys.exit(main())
