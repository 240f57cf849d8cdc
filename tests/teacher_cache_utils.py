"""The teacher-cache tests' config and commands (tests/test_teacher_cache.py, the SLURM test)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from trainer_utils import REPO, STUDENT, TEACHER, cleanup_shm, env, free_port
from trainer_utils import write_config as _write_config

VOCAB = 515  # uneven vocabulary shards over a loss group of 2
ENGINES = {"deepspeed": dict(engine__kind="deepspeed", engine__ds_config=str(REPO / "ds_configs/zero3.json")),
           "fsdp2": dict(engine__kind="fsdp2")}


def config(path: Path, data: Path, out: Path, *, engine: str = "fsdp2", cache: Path | None = None,
           online: bool = True, **overrides) -> Path:
    """The run (or the cache) config: teacher and student built from HF configs."""
    tok = str(data / "tokenizer")
    teacher = {"config": {**TEACHER, "vocab_size": VOCAB}, "tokenizer": tok, "init_seed": 1} if online else {}
    if cache is not None:
        teacher["cache"] = str(cache)
    base = dict(models__teacher=teacher,
                models__student={"config": {**STUDENT, "vocab_size": VOCAB}, "tokenizer": tok, "init_seed": 2},
                optim__max_steps=3, optim__grad_clip=0.3, checkpoint__export_hf_at_end=True, eval__max_batches=1)
    return _write_config(path, data, out, **{**base, **ENGINES[engine], **overrides})


def cache_command(cfg: Path, *, nproc: int = 1, extra=()) -> list[str]:
    module = ["-m", "tailkd_dist.cache_teacher", str(cfg), "--piece-rows", "16", "--no-progress", *extra]
    if nproc == 1:
        return [sys.executable, *module]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), *module]


def write(cfg: Path, *, nproc: int = 1, check: bool = True, **kw):
    try:
        out = subprocess.run(cache_command(cfg, nproc=nproc), env={**env(), **kw}, cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    finally:
        cleanup_shm()
    if check:
        assert out.returncode == 0, out.stderr[-4000:]
    return out


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root``: relative path -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
