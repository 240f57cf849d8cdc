"""The SLURM batch scripts pass shellcheck (Debian's package; .ci/run installs it), and build no
shell code from the environment."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))


def test_shellcheck_passes():
    assert SCRIPTS, "no slurm/*.sbatch found"
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed (apt-get install shellcheck; .ci/run does it)"
    out = subprocess.run([shellcheck, "--severity=info", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:]


def test_no_environment_value_inside_a_double_quoted_command_string():
    """A `bash -c "..."` string that interpolates MASTER_ADDR & co. turns their values into code."""
    for script in SCRIPTS:
        text = script.read_text()
        for m in re.finditer(r'bash -c \\?\s*"([^"]*)"', text):
            assert "$" not in m.group(1).replace("\\$", ""), (script.name, m.group(0))
