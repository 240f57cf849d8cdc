"""Every family `tailkd-derive-student` supports, end to end as a user runs it: a tiny teacher of
that family -> derive a narrower, shallower student -> distil it (TAD, two steps) -> export ->
`from_pretrained` -> `generate(**tokenizer(prompt, return_tensors="pt"))`.

The exported student must be the derived architecture (same model_type, the positional encoding
kept: Llama 3's rope scaling, Gemma 3's two RoPE bases), trained (its weights moved) and must
generate from the standard HF call.
"""
from __future__ import annotations

import json

import pytest
import torch

from tailkd_dist.derive import SUPPORTED, main as derive_main
from trainer_utils import run, step_records, write_config

# Per family: the teacher's config beyond the shared widths (hidden 48, 4 layers, 4 heads, 2 KV
# heads, vocab 512 = the data's tokenizer), and the derivation's width flags.
BASE = dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": ({}, ["--hidden-size", "24", "--num-heads", "2"]),
    "llama3": ({"model_type": "llama",
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
               ["--hidden-size", "24", "--num-heads", "4"]),  # head_dim 12 -> 6
    "qwen2": ({"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2,
               "tie_word_embeddings": True}, ["--hidden-size", "24"]),
    "qwen3": ({"head_dim": 16, "tie_word_embeddings": True},
              ["--hidden-size", "24", "--num-heads", "2", "--head-dim", "8"]),
    "mistral": ({"sliding_window": None}, ["--hidden-size", "24"]),
    "phi": ({"partial_rotary_factor": 0.5, "qk_layernorm": True, "num_key_value_heads": 4},
            ["--hidden-size", "24"]),
    "phi3": ({"sliding_window": None, "pad_token_id": 0}, ["--hidden-size", "24"]),
    "gemma2": ({"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                "final_logit_softcapping": None, "tie_word_embeddings": True},
               ["--hidden-size", "24", "--num-heads", "2", "--head-dim", "8"]),
    "gemma3_text": ({"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                     "layer_types": ["sliding_attention", "full_attention"] * 2,
                     "tie_word_embeddings": True},
                    ["--hidden-size", "24", "--num-heads", "2", "--head-dim", "8"]),
}

pytestmark = pytest.mark.slow


def test_every_supported_family_is_covered():
    assert {FAMILIES[f][0].get("model_type", f) for f in FAMILIES} == set(SUPPORTED)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_derive_distil_export_generate(family, data, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    extra, flags = FAMILIES[family]
    cfg = {**BASE, **extra}
    model_type = cfg.pop("model_type", family)
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    teacher.save_pretrained(teacher_dir)
    AutoTokenizer.from_pretrained(data / "tokenizer").save_pretrained(teacher_dir)

    assert derive_main([str(teacher_dir), "-o", str(student_dir), "--every", "2",
                        "--intermediate-size", "64", *flags]) == 0
    assert json.loads((student_dir / "tailkd_derivation.json").read_text())["layer_map"] == [0, 3]
    initial = load_file(student_dir / "model.safetensors")

    c = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=2,
                     models__teacher={"path": str(teacher_dir)},
                     models__student={"path": str(student_dir)}, eval__max_batches=1,
                     engine__kind="fsdp2")
    run(c)
    assert [r["step"] for r in step_records(tmp_path / "run")] == [1, 2]

    export = tmp_path / "run" / "hf_student"
    final = load_file(export / "model.safetensors")
    student_cfg = AutoConfig.from_pretrained(student_dir)
    # a tied student's head is trained as its own rows and exported untied (documented)
    untied = {"lm_head.weight"} if student_cfg.tie_word_embeddings else set()
    assert set(final) == set(initial) | untied
    assert any(not torch.equal(final[k], initial[k]) for k in initial)  # trained
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert model.config.model_type == model_type
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 24
    assert model.config.tie_word_embeddings is False
    assert model.config.rope_parameters == student_cfg.rope_parameters == teacher.config.rope_parameters
    tok = AutoTokenizer.from_pretrained(export)
    enc = tok("def main():", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, enc["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, :enc["input_ids"].shape[1]], enc["input_ids"])
