"""The scenarios every engine must pass, written once and run for each: a rank SIGKILLed in
the middle of a run (its checkpoint being written), then the same command again, gives the
losses of an uninterrupted run.

CPU, gloo, 2 ranks, a vocabulary-parallel loss over both (515 rows: uneven shards), DeepSpeed
ZeRO-3 or FSDP2 over both ranks.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from trainer_utils import REPO, STUDENT, TEACHER, close_by_step, command, env, kill_one_worker, losses, run, wait_for_step
from trainer_utils import write_config as _write_config

pytestmark = pytest.mark.usefixtures("clean_shm")

ENGINES = {
    "deepspeed": dict(engine__kind="deepspeed", engine__ds_config=str(REPO / "ds_configs/zero3.json")),
    "fsdp2": dict(engine__kind="fsdp2"),
}
VOCAB = 515  # not divisible by 2: uneven vocabulary shards


def engine_config(path: Path, data: Path, out: Path, *, engine: str, **overrides) -> Path:
    tok = str(data / "tokenizer")
    base = dict(
        models__teacher={"config": {**TEACHER, "vocab_size": VOCAB}, "tokenizer": tok, "init_seed": 1},
        models__student={"config": {**STUDENT, "vocab_size": VOCAB}, "tokenizer": tok, "init_seed": 2},
        loss__loss_group_size=2, optim__max_steps=4, optim__grad_accum=2, optim__grad_clip=0.3,
        checkpoint__every_steps=2, checkpoint__export_hf_at_end=False, eval__max_batches=1,
    )
    return _write_config(path, data, out, **{**base, **ENGINES[engine], **overrides})


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sigkill_a_rank_then_resume_is_exact(data, tmp_path, engine):
    full = engine_config(tmp_path / "full.yaml", data, tmp_path / "full", engine=engine)
    run(full, launcher="torchrun", nproc=2)
    cfg = engine_config(tmp_path / "c.yaml", data, tmp_path / "run", engine=engine)
    # Saves take 3 s, so the kill below lands after step 3 and before step 4's checkpoint is
    # complete whatever the machine's speed: the resume must start from step 2.
    proc = subprocess.Popen(command(cfg, launcher="torchrun", nproc=2), env={**env(), "TAILKD_TEST_SAVE_DELAY_S": "3"},
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(tmp_path / "run", 3, proc)
        kill_one_worker(proc)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    ckpts = tmp_path / "run/checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert not (ckpts / "step_00000004/COMPLETE").exists()
    out = run(cfg, launcher="torchrun", nproc=2)
    assert "resumed from step_00000002" in out.stderr + out.stdout
    # Weights, optimizer states, head shards, RNG, loader position and counters are restored
    # and gloo reduces in a fixed order, so the re-run steps should be bitwise equal; 1e-6
    # leaves room for BLAS thread scheduling, far below any real divergence. losses() also
    # checks that metrics.jsonl holds each step once (the resumed run dropped the records of
    # the steps after its checkpoint, and re-ran them).
    close_by_step(losses(tmp_path / "run"), losses(tmp_path / "full"), 1e-6, f"{engine} resumed")
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
