"""The paper's student setup end to end: derive a student from a teacher, distil it with frozen
embeddings and the hidden-state cosine term; the term agrees across engines and layouts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from trainer_utils import REPO, TEACHER, close_by_step, env, grad_norms, losses, run, step_records, write_config


pytestmark = pytest.mark.usefixtures("clean_shm")


@pytest.mark.slow
def test_derive_then_distil_with_frozen_embeddings_and_hidden_term(data, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    cfg = dict(TEACHER, num_hidden_layers=4)
    torch.manual_seed(0)
    model_type = cfg.pop("model_type")
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)).save_pretrained(teacher_dir)
    AutoTokenizer.from_pretrained(data / "tokenizer").save_pretrained(teacher_dir)
    subprocess.run([sys.executable, "-m", "tailkd_dist.derive", str(teacher_dir), "-o", str(student_dir),
                    "--every", "2", "--hidden-size", "24", "--intermediate-size", "64"],
                   check=True, env=env(), cwd=REPO, capture_output=True, text=True)
    layer_map = json.loads((student_dir / "tailkd_derivation.json").read_text())["layer_map"]
    initial = load_file(student_dir / "model.safetensors")

    c = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=3,
                     models__teacher={"path": str(teacher_dir)}, models__student={"path": str(student_dir)},
                     models__freeze_embeddings=True, loss__hidden_weight=1.0,
                     engine__ds_config=str(REPO / "ds_configs/zero3.json"))
    run(c)
    rec = step_records(tmp_path / "run")
    assert rec and all(0 < r["loss/hidden_cos"] < 2 for r in rec), rec
    extra = torch.load(tmp_path / "run/checkpoints/step_00000003/extra_rank0.pt", weights_only=False)
    assert len(extra["aux"]) == len(layer_map)  # one projection (48 <- 24 wide) per mapped layer
    final = load_file(tmp_path / "run/hf_student/model.safetensors")
    assert set(final) == set(initial)  # the HF student: the derived architecture, no projection
    assert torch.equal(final["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
    changed = [k for k in initial if k != "model.embed_tokens.weight" and not torch.equal(final[k], initial[k])]
    assert "model.layers.0.mlp.up_proj.weight" in changed and "lm_head.weight" in changed


@pytest.mark.slow
def test_hidden_term_agrees_across_layouts(data, tmp_path):
    kw = dict(loss__hidden_weight=1.0, checkpoint__export_hf_at_end=False)  # widths 32 vs 48
    single = write_config(tmp_path / "s.yaml", data, tmp_path / "single", data__micro_batch_size=4, **kw)
    run(single)
    ref = losses(tmp_path / "single")
    cases = {
        "zero3_lg2": dict(loss__loss_group_size=2, engine__ds_config=str(REPO / "ds_configs/zero3.json")),
        "fsdp2": dict(engine__kind="fsdp2"),
    }
    for name, extra in cases.items():
        cfg = write_config(tmp_path / f"{name}.yaml", data, tmp_path / name, **kw, **extra)
        run(cfg, launcher="torchrun", nproc=2)
        close_by_step(losses(tmp_path / name), ref, 1e-5, f"{name} loss")
        # the gradients' scale too (the projection's included), which AdamW hides in the losses
        close_by_step(grad_norms(tmp_path / name), grad_norms(tmp_path / "single"), 1e-5, f"{name} grad norm")
