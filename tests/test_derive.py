"""tailkd-derive-student: students derived from tiny teachers of every supported family.

Teachers are built from HF configs (hidden 64, 4 layers, 4 heads, vocab 128), their weights
perturbed so that no tensor is at its init value (norms are not all ones, biases not zero), and
saved with a tiny word-level tokenizer. The expected student tensors are computed here by an
independent reference (plain index lists), not by the tool's own slicing code.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma3TextConfig,
                          LlamaConfig, MistralConfig, Phi3Config, PhiConfig,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen3Config)

from tailkd_dist.derive import DERIVATION, TOKENIZER_FILES, every_nth_layers, main

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, max_position_embeddings=64)
CONFIGS = {
    # GQA (2 query heads per KV head), untied
    "llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False),
    # q/k/v biases, tied embeddings, sliding window on the last 2 layers (layer_types)
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True,
                                 use_sliding_window=True, sliding_window=16, max_window_layers=2),
    "mistral": lambda: MistralConfig(**COMMON, num_key_value_heads=4, sliding_window=None),
    # biases everywhere, LayerNorms, partial rotary, per-head q/k layernorms, lm_head bias
    "phi": lambda: PhiConfig(**COMMON, num_key_value_heads=4, partial_rotary_factor=0.5,
                             qk_layernorm=True, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # fused qkv_proj and gate_up_proj
    "phi3": lambda: Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, sliding_window=None),
    # attention width 4 x 24 = 96 != hidden 64; four norms per layer; alternating layer_types
    "gemma2": lambda: Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=24,
                                   query_pre_attn_scalar=24, sliding_window=16,
                                   tie_word_embeddings=True),
    # Llama 3.1's rope scaling (scalars, so head_dim may shrink)
    "llama3": lambda: LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 16}),
    # per-head q/k RMSNorms; attention width 4 x 24 != hidden 64 (as Qwen3-0.6B: 16 x 128 != 1024)
    "qwen3": lambda: Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=24,
                                 tie_word_embeddings=True),
    # Gemma3's text model: q/k norms, four norms per layer, local/global layers with their own
    # RoPE bases
    "gemma3_text": lambda: Gemma3TextConfig(
        **COMMON, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"] * 2, tie_word_embeddings=True),
}
# Narrower students: hidden 32, FFN 64, teacher layers 1 and 2 (and head_dim 8 for Llama).
NARROW = {
    "llama": ["--hidden-size", "32", "--num-heads", "4"],  # head_dim 16 -> 8, 2 KV heads
    "qwen2": ["--hidden-size", "32"],  # 2 heads x 16, 1 KV head
    "mistral": ["--hidden-size", "32", "--num-kv-heads", "1"],
    "phi": ["--hidden-size", "32"],
    "phi3": ["--hidden-size", "32"],
    "gemma2": ["--hidden-size", "32", "--num-heads", "2", "--head-dim", "16"],
    "llama3": ["--hidden-size", "32", "--num-heads", "4"],  # head_dim 16 -> 8 under llama3 RoPE
    "qwen3": ["--hidden-size", "32", "--num-heads", "2", "--head-dim", "16"],
    "gemma3_text": ["--hidden-size", "32", "--num-heads", "2", "--head-dim", "16"],
}


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3,
             **{f"w{i}": i for i in range(4, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    tokenizer = _tokenizer()
    out = {}
    for i, (family, make) in enumerate(CONFIGS.items()):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_config(make()).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        out[family] = root / family
        model.save_pretrained(out[family])
        tokenizer.save_pretrained(out[family])
    return out


def _derive(teacher: Path, out: Path, *args: str) -> dict:
    assert main([str(teacher), "-o", str(out), *args]) == 0
    return json.loads((out / DERIVATION).read_text())


def _sizes(cfg) -> tuple[int, int, int, int]:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim


def _expected(name: str, teacher_sd: dict, tcfg, scfg, layer_map: list[int]):
    """(teacher tensor name, the slice the student tensor must equal), or None if random."""
    D, H, KV, hd = _sizes(tcfg)
    d, h, kv, sd = _sizes(scfg)
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        parts[2] = str(layer_map[int(parts[2])])
    source = ".".join(parts)
    w = teacher_sd[source]
    leaf = ".".join(parts[-2:])

    def heads(n, offset=0):  # rows of the first n heads, first sd entries of each
        return [offset + i * hd + r for i in range(n) for r in range(sd)]

    cols = list(range(d))
    if "mlp." in name:
        return None
    if leaf.split(".")[0] in ("q_proj", "k_proj", "v_proj", "qkv_proj"):
        module = leaf.split(".")[0]
        rows = {"q_proj": heads(h), "k_proj": heads(kv), "v_proj": heads(kv),
                "qkv_proj": heads(h) + heads(kv, H * hd) + heads(kv, (H + KV) * hd)}[module]
        return source, (w[rows][:, cols] if w.dim() == 2 else w[rows])
    if leaf in ("o_proj.weight", "dense.weight"):
        return source, w[:d][:, heads(h)]
    if leaf in ("q_layernorm.weight", "q_layernorm.bias", "k_layernorm.weight",
                "k_layernorm.bias", "q_norm.weight", "k_norm.weight"):
        return source, w[:sd]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return source, w[:, :d]
    if name == "lm_head.bias":
        return source, w
    assert w.dim() == 1 and ("norm" in name or leaf == "dense.bias"), name
    return source, w[:d]


def _check_student(teacher: Path, out: Path, record: dict, *, copy_mlp: bool = False):
    tmodel = AutoModelForCausalLM.from_pretrained(teacher).eval()
    smodel = AutoModelForCausalLM.from_pretrained(out).eval()
    tcfg, scfg = tmodel.config, smodel.config
    layer_map = record["layer_map"]
    assert scfg.model_type == tcfg.model_type and scfg.num_hidden_layers == len(layer_map)
    assert record["tie_word_embeddings"] == tcfg.tie_word_embeddings == scfg.tie_word_embeddings
    assert record["teacher"]["model_type"] == tcfg.model_type
    assert len(record["teacher"]["config_sha256"]) == 64
    # the teacher's positional encoding, kept (Llama 3's scaling, Gemma3's two RoPE bases)
    assert scfg.rope_parameters == tcfg.rope_parameters and scfg.rope_parameters
    if getattr(tcfg, "layer_types", None) is not None:
        assert scfg.layer_types == [tcfg.layer_types[j] for j in layer_map]
    tsd, ssd = tmodel.state_dict(), smodel.state_dict()
    assert set(record["tensors"]) == set(ssd)
    for name, value in ssd.items():
        entry = record["tensors"][name]
        if name == "lm_head.weight" and scfg.tie_word_embeddings:
            assert entry == {"init": "tied", "to": "model.embed_tokens.weight"}
            assert torch.equal(value, ssd["model.embed_tokens.weight"])
            continue
        expected = _expected(name, tsd, tcfg, scfg, layer_map)
        if expected is None and not copy_mlp:  # random: HF init, not the teacher's values
            assert entry["init"] == "random", name
            source = name.replace(f"layers.{name.split('.')[2]}.",
                                  f"layers.{layer_map[int(name.split('.')[2])]}.")
            teacher_value = tsd[source]
            overlap = tuple(slice(0, min(a, b)) for a, b in zip(value.shape, teacher_value.shape))
            assert not torch.equal(value[overlap], teacher_value[overlap]), name
            continue
        if expected is None:  # --copy-mlp
            source = name.replace(f"layers.{name.split('.')[2]}.",
                                  f"layers.{layer_map[int(name.split('.')[2])]}.")
            expected = source, tsd[source]
        source, want = expected
        assert entry["from"] == source, name
        assert entry["init"] == ("copied" if want.shape == tsd[source].shape else "truncated"), name
        assert value.shape == want.shape and torch.equal(value, want), name
    # the student runs and generates
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
    with torch.no_grad():
        logits = smodel(ids).logits
    assert logits.shape == (1, 7, VOCAB) and torch.isfinite(logits).all()
    generated = smodel.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3,
                                pad_token_id=0)
    assert generated.shape == (1, 10) and torch.equal(generated[:, :7], ids)
    # tokenizer files copied byte for byte, and they load
    names = [n for n in TOKENIZER_FILES if (teacher / n).is_file()]
    assert names and record["tokenizer_files"] == names
    for n in names:
        assert (out / n).read_bytes() == (teacher / n).read_bytes()
    assert len(AutoTokenizer.from_pretrained(out)) == VOCAB
    return tmodel, smodel


@pytest.mark.parametrize("family", list(CONFIGS))
def test_same_width_every_second_layer(family, teachers, tmp_path, capsys):
    record = _derive(teachers[family], tmp_path / "s")
    assert record["layer_map"] == [0, 3]  # 2 of 4 layers, first and last
    tmodel, smodel = _check_student(teachers[family], tmp_path / "s", record)
    inits = {n: e["init"] for n, e in record["tensors"].items()}
    assert "truncated" not in inits.values()
    assert {n for n, i in inits.items() if i == "random"} == {n for n in inits if ".mlp." in n}
    p = record["parameters"]
    assert p["total"] == sum(x.numel() for x in smodel.parameters())
    emb = VOCAB * 64
    assert p["trainable_if_embeddings_frozen"] == p["total"] - emb
    head = 0 if smodel.config.tie_word_embeddings else sum(
        x.numel() for x in smodel.lm_head.parameters())
    assert p["non_embedding"] == p["total"] - emb - head
    summary = capsys.readouterr().out
    assert "layers kept (student<-teacher): 0<-0 1<-3" in summary
    assert f"total {p['total']:,}" in summary and "mlp" in summary and "random" in summary


@pytest.mark.parametrize("family", list(CONFIGS))
def test_narrower_student_truncates_per_head(family, teachers, tmp_path):
    args = ["--layers", "1,2", "--intermediate-size", "64", *NARROW[family]]
    record = _derive(teachers[family], tmp_path / "s", *args)
    assert record["layer_map"] == [1, 2]
    _, smodel = _check_student(teachers[family], tmp_path / "s", record)
    assert smodel.config.hidden_size == 32 and smodel.config.intermediate_size == 64
    attention = [e for e in record["tensors"].values() if e.get("category") == "attention"]
    assert attention and all(e["init"] == "truncated" for e in attention)


def test_truncated_slices_index_by_index(teachers, tmp_path):
    """Llama, hidden 64 -> 32, 4 heads x 16 -> 4 heads x 8, 2 KV heads: element by element."""
    record = _derive(teachers["llama"], tmp_path / "s", "--layers", "2", *NARROW["llama"])
    tsd = AutoModelForCausalLM.from_pretrained(teachers["llama"]).state_dict()
    ssd = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    pair = lambda m: (tsd[f"model.layers.2.self_attn.{m}.weight"],  # noqa: E731
                      ssd[f"model.layers.0.self_attn.{m}.weight"])
    (tq, sq), (tk, sk), (to, so) = pair("q_proj"), pair("k_proj"), pair("o_proj")
    assert sq.shape == (4 * 8, 32) and sk.shape == (2 * 8, 32) and so.shape == (32, 4 * 8)
    for head in range(4):
        for r in range(8):
            for c in range(32):
                assert sq[head * 8 + r, c] == tq[head * 16 + r, c]
                assert so[c, head * 8 + r] == to[c, head * 16 + r]
                if head < 2:
                    assert sk[head * 8 + r, c] == tk[head * 16 + r, c]
    assert record["tensors"]["model.layers.0.self_attn.q_proj.weight"]["index"] == [
        {"heads": [[4, 16, 4, 8]]}, {"first": 32}]
    assert torch.equal(ssd["model.embed_tokens.weight"], tsd["model.embed_tokens.weight"][:, :32])
    assert torch.equal(ssd["model.norm.weight"], tsd["model.norm.weight"][:32])


@pytest.mark.parametrize("family", list(CONFIGS))
def test_all_layers_with_copy_mlp_reproduce_the_teacher(family, teachers, tmp_path):
    record = _derive(teachers[family], tmp_path / "s", "--every", "1", "--copy-mlp")
    assert record["layer_map"] == [0, 1, 2, 3]
    assert {e["init"] for e in record["tensors"].values()} <= {"copied", "tied"}
    tmodel, smodel = _check_student(teachers[family], tmp_path / "s", record, copy_mlp=True)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
    with torch.no_grad():
        assert torch.equal(smodel(ids).logits, tmodel(ids).logits)


def test_seed_decides_the_random_tensors(teachers, tmp_path):
    load = lambda p: AutoModelForCausalLM.from_pretrained(p).state_dict()  # noqa: E731
    _derive(teachers["qwen2"], tmp_path / "a", "--seed", "3")
    _derive(teachers["qwen2"], tmp_path / "b", "--seed", "3")
    _derive(teachers["qwen2"], tmp_path / "c", "--seed", "4")
    a, b, c = load(tmp_path / "a"), load(tmp_path / "b"), load(tmp_path / "c")
    assert all(torch.equal(a[n], b[n]) for n in a)
    mlp = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(a[mlp], c[mlp])
    assert torch.equal(a["model.layers.1.self_attn.q_proj.bias"],
                       c["model.layers.1.self_attn.q_proj.bias"])


def test_every_nth_layers():
    assert every_nth_layers(12, 2) == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice
    assert every_nth_layers(4, 2) == [0, 3]
    assert every_nth_layers(5, 1) == [0, 1, 2, 3, 4]
    assert every_nth_layers(4, 10) == [0]
    for layers, n, count in ((32, 2, 16), (36, 2, 18), (42, 3, 14), (7, 3, 3), (2, 2, 1)):
        kept = every_nth_layers(layers, n)
        assert len(kept) == count and kept[0] == 0
        assert count == 1 or kept[-1] == layers - 1
        assert all(b > a for a, b in zip(kept, kept[1:]))


@pytest.fixture(scope="module")
def other_teachers(tmp_path_factory) -> Path:
    from transformers import GPT2Config

    root = tmp_path_factory.mktemp("other")
    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB).save_pretrained(root / "gpt2")
    (root / "gemma3").mkdir()
    (root / "gemma3" / "config.json").write_text('{"model_type": "gemma3"}')
    (root / "unknown").mkdir()
    (root / "unknown" / "config.json").write_text('{"model_type": "frobnicator"}')
    Phi3Config(**COMMON, rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
               "long_factor": [1.0] * 8}, original_max_position_embeddings=32,
               pad_token_id=0).save_pretrained(root / "longrope")  # config only: refused before
    (root / "noconfig").mkdir()
    # a whole config and a weights file cut short (a copy that stopped)
    AutoModelForCausalLM.from_config(LlamaConfig(**COMMON, num_key_value_heads=2)).save_pretrained(root / "cut")
    weights = root / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    (root / "file").write_text("x")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("precious")
    return root


BAD = [
    ("missing-dir", "nope", [], "teacher directory .*nope does not exist"),
    ("no-config", "@noconfig", [], "has no config.json"),
    ("weights-cut", "@cut", [], r"cut/model\.safetensors is truncated: \d+ bytes, its header describes \d+"),
    ("gpt2", "@gpt2", [], "model_type 'gpt2' is not supported: .*llama, qwen2, qwen3, mistral, "
     "phi, phi3, gemma2, gemma3_text"),
    ("gemma3-multimodal", "@gemma3", [], "model_type 'gemma3' is the multimodal Gemma 3 .*"
     "text-only Gemma 3 checkpoint \\(model_type gemma3_text"),
    ("unknown-type", "@unknown", [], "model_type 'frobnicator' is not supported"),
    ("layer-range", "llama", ["--layers", "0,4"], "layer index 4 is out of range: the teacher "
     r"has 4 layers \(0..3\)"),
    ("layer-negative", "llama", ["--layers=-1"], "layer index -1 is out of range"),
    ("layer-order", "llama", ["--layers", "2,1"], "strictly increasing"),
    ("layer-garbage", "llama", ["--layers", "0,x"], "not a comma-separated list"),
    ("hidden-larger", "llama", ["--hidden-size", "128"], r"--hidden-size 128 is larger than the "
     r"teacher's \(64\)"),
    ("ffn-larger", "qwen2", ["--intermediate-size", "256"], "--intermediate-size 256 is larger"),
    ("heads-larger", "gemma2", ["--num-heads", "8"], r"--num-heads 8 is larger than the "
     r"teacher's \(4\)"),
    ("heads-not-dividing", "llama", ["--num-heads", "3"], "--num-heads 3 does not divide the "
     "hidden size 64"),
    ("head-dim-larger", "llama", ["--num-heads", "2"], r"head_dim \(hidden size 64 / 2 heads\) "
     r"32 is larger than the teacher's \(16\)"),
    ("hidden-not-multiple", "llama", ["--hidden-size", "40"], "hidden size 40 is not a multiple "
     "of head_dim 16"),
    ("kv-not-dividing", "mistral", ["--num-kv-heads", "3"], "--num-kv-heads 3 does not divide "
     "the 4 query heads"),
    ("kv-group", "llama", ["--num-heads", "1", "--hidden-size", "16"], "pass --num-kv-heads"),
    ("rotary-odd", "phi", ["--hidden-size", "40", "--num-heads", "4"], "head_dim 10 gives 5 "
     "rotary dimensions"),
    ("longrope-head-dim", "@longrope", ["--hidden-size", "32", "--num-heads", "4"],
     "per-dimension factors"),
    ("copy-mlp-narrow", "llama", ["--copy-mlp", "--intermediate-size", "64"], "--copy-mlp needs"),
    ("not-empty", "llama", ["-o", "@full"], "is not empty: pass --overwrite"),
    ("overwrite-foreign", "llama", ["-o", "@full", "--overwrite"], "is not an output of "
     "tailkd-derive-student"),
    ("output-is-file", "llama", ["-o", "@file"], "exists and is not a directory"),
]


def test_output_is_never_the_teacher_or_around_it(teachers, tmp_path, capsys):
    """--overwrite replaces only an earlier derivation, and never one the teacher lies in."""
    import hashlib
    import shutil

    def digest(d: Path) -> dict:
        return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in d.rglob("*") if f.is_file()}

    out = tmp_path / "derived"
    _derive(teachers["llama"], out, *NARROW["llama"])
    shutil.copytree(teachers["llama"], out / "teacher")
    before = digest(out)
    for teacher, args, message in (
        (out / "teacher", ["-o", str(out), "--overwrite"], "contains the teacher directory"),
        (teachers["llama"], ["-o", str(teachers["llama"]), "--overwrite"], "is the teacher directory"),
        (teachers["llama"], ["-o", str(teachers["llama"] / "student")], "lies inside the teacher directory"),
    ):
        assert main([str(teacher), *args, *NARROW["llama"]]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1, err
    assert digest(out) == before
    assert not (teachers["llama"] / "student").exists()


@pytest.mark.parametrize("case,teacher,args,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, teacher, args, message, teachers, other_teachers, tmp_path, capsys):
    import re

    def resolve(x: str) -> str:
        return str(other_teachers / x[1:]) if x.startswith("@") else x

    teacher_dir = (resolve(teacher) if teacher.startswith("@") else
                   str(teachers[teacher]) if teacher in teachers else str(tmp_path / teacher))
    args = [resolve(a) for a in args]
    out = tmp_path / "out"
    argv = [teacher_dir, *args] + ([] if "-o" in args else ["-o", str(out)])
    before = {p: p.stat().st_mtime_ns for p in other_teachers.rglob("*")}
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("tailkd-derive-student: error: "), err
    assert re.search(message, err), err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, no staging
    assert {p: p.stat().st_mtime_ns for p in other_teachers.rglob("*")} == before
    assert (other_teachers / "full" / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_previous_student(teachers, tmp_path):
    out = tmp_path / "s"
    _derive(teachers["llama"], out)
    assert main([str(teachers["llama"]), "-o", str(out)]) == 2  # not empty, no --overwrite
    record = _derive(teachers["llama"], out, "--overwrite", "--every", "1")
    assert record["layer_map"] == [0, 1, 2, 3]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no staging or old copies left


def test_tool_wrapper_exits_with_one_line(tmp_path):
    import subprocess
    import sys

    tool = Path(__file__).resolve().parents[1] / "tools" / "derive_student.py"
    run = subprocess.run([sys.executable, str(tool), str(tmp_path / "nope"), "-o",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        f"tailkd-derive-student: error: teacher directory {tmp_path / 'nope'} does not exist: "
        "pass a local HF model directory (config.json, weights, tokenizer)."]
    assert list(tmp_path.iterdir()) == []
