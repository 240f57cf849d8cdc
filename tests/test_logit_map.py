"""What the fused loss computes is what the model computes: logits = c * lm_head(final hidden
state), c found by probing the model's own forward (``models.hidden_scale``), anything else
refused in one line.

Checked against the real models: a tiny random model of each family is built on the CPU and its
own ``model(ids).logits`` compared with c * lm_head(body(ids)); and end to end, a trainer run
on Granite models (logits divided by ``logits_scaling``) gives the first-step losses of a run on
Llama models with the same weights and the division moved into their lm_head rows.
"""
from __future__ import annotations

import pytest
import torch

from tailkd_dist import models
from trainer_utils import STUDENT, TEACHER, losses, run, write_config

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)

# family: (extra config, the factor the family's own code applies, written out here)
SCALED = {
    "llama": ({}, 1.0),
    "granite": ({"logits_scaling": 8.0}, 1 / 8.0),  # logits / logits_scaling
    "cohere": ({"logit_scale": 0.0625}, 0.0625),  # logits * logit_scale
    "hyperclovax": ({"logits_scaling": 0.5}, 0.5),  # logits * logits_scaling (the same name, the other way)
    "falcon_h1": ({"lm_head_multiplier": 0.25, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
                   "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_chunk_size": 8}, 0.25),  # its own name for it
    "minicpm3": ({"dim_model_base": 8, "num_key_value_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                  "qk_rope_head_dim": 8, "v_head_dim": 8}, 8 / 32),  # hidden / (hidden_size / dim_model_base)
}


def _config(model_type: str, **extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**SMALL, **extra})


@pytest.mark.parametrize("family", list(SCALED))
def test_the_probed_factor_is_the_models_own(family):
    from transformers import AutoModelForCausalLM

    extra, expected = SCALED[family]
    config = _config(family, **extra)
    c = models.hidden_scale(config, role="student")
    assert c == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        own = model(input_ids=ids).logits
        hidden = models.body_of(model)(input_ids=ids).last_hidden_state
        fused_view = models.lm_head_of(model)(c * hidden)
    torch.testing.assert_close(fused_view, own, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, extra, fragment", [
    ("gemma2", {"head_dim": 8}, "applies final_logit_softcapping=30.0 to its logits"),
    ("recurrent_gemma", {}, "applies logits_soft_cap=30.0 to its logits"),
    ("bert", {"is_decoder": True}, "has parameters between its base model and its lm_head (cls.predictions"),
])
def test_a_map_the_fused_loss_cannot_reproduce_is_refused(family, extra, fragment):
    with pytest.raises(ValueError) as info:
        models.hidden_scale(_config(family, **extra), role="teacher")
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_soft_cap_under_a_name_not_known_is_found_by_the_probe(monkeypatch):
    """Without the table of soft-cap names the probe still sees the tanh."""
    monkeypatch.setattr(models, "_SOFTCAPS", ())
    with pytest.raises(ValueError, match=r"maps lm_head\(hidden\) to its logits non-linearly"):
        models.hidden_scale(_config("gemma2", head_dim=8, final_logit_softcapping=30.0), role="teacher")


def test_the_trainer_folds_the_factor_granite_equals_llama_with_scaled_rows(data, tmp_path):
    """Granite with its other multipliers neutral is Llama with logits / logits_scaling. A run on
    Granite teacher and student (scaling 2 and 4) and a run on Llama models holding the same
    weights with the lm_head rows divided by 2 and 4 see the same logits: the same first-step
    losses (CE, divergence, total). Folding the factor the wrong way, or not at all, changes them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dirs = {}
    for role, base, seed, scaling in (("teacher", TEACHER, 1, 2.0), ("student", STUDENT, 2, 4.0)):
        shape = {k: v for k, v in base.items() if k != "model_type"}
        head_dim = base["hidden_size"] // base["num_attention_heads"]
        granite = AutoConfig.for_model("granite", **shape, logits_scaling=scaling, embedding_multiplier=1.0,
                                       residual_multiplier=1.0, attention_multiplier=head_dim ** -0.5,
                                       tie_word_embeddings=False)
        torch.manual_seed(seed)
        g = AutoModelForCausalLM.from_config(granite)
        llama = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **shape, tie_word_embeddings=False))
        state = g.state_dict()
        state["lm_head.weight"] = state["lm_head.weight"] / scaling
        llama.load_state_dict(state)
        for name, m in (("granite", g), ("llama", llama)):
            dirs[name, role] = tmp_path / f"{name}-{role}"
            m.save_pretrained(dirs[name, role])
    out = {}
    for name in ("granite", "llama"):
        cfg = write_config(tmp_path / f"{name}.yaml", data, tmp_path / name, optim__max_steps=1,
                           checkpoint__export_hf_at_end=False,
                           models__teacher={"path": str(dirs[name, "teacher"]), "tokenizer": str(data / "tokenizer")},
                           models__student={"path": str(dirs[name, "student"]), "tokenizer": str(data / "tokenizer")})
        r = run(cfg)
        if name == "granite":
            assert "its logits are 0.5 x lm_head(hidden)" in r.stderr and "its logits are 0.25 x" in r.stderr
        out[name] = losses(tmp_path / name)
    assert out["granite"][1] == pytest.approx(out["llama"][1], rel=1e-5), out
