"""The standard Hugging Face calls on an exported student: ``model.generate(**tokenizer(prompt,
return_tensors="pt"))`` and ``pipeline("text-generation", model=EXPORT_DIR)``, with a tokenizer
that returns token_type_ids (which a causal LM does not take)."""
from __future__ import annotations

import json
import shutil

import torch

from tailkd_dist.config import ModelSpec
from tailkd_dist.export import save_tokenizer
from tailkd_dist.models import build_model
from trainer_utils import STUDENT


def test_exported_tokenizer_feeds_generate_and_pipeline(data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    # A tokenizer whose files say it returns token_type_ids (as BERT-style configs do).
    src = tmp_path / "tok"
    shutil.copytree(data / "tokenizer", src)
    conf = json.loads((src / "tokenizer_config.json").read_text())
    conf["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    (src / "tokenizer_config.json").write_text(json.dumps(conf))
    assert "token_type_ids" in AutoTokenizer.from_pretrained(src)("def f(): pass")

    out = tmp_path / "export"
    build_model(ModelSpec(config={**STUDENT, "vocab_size": 512}, init_seed=3), dtype=torch.float32,
                attention="sdpa").save_pretrained(out)
    save_tokenizer(src, out)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    enc = tok("def main():", return_tensors="pt")
    assert "token_type_ids" not in enc
    gen = model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert gen.shape == (1, enc["input_ids"].shape[1] + 4)
    text = pipeline("text-generation", model=str(out))("def main():", max_new_tokens=4, do_sample=False)
    assert text[0]["generated_text"].startswith("def main():")
