"""Every config field answered with one line naming its dotted key, for each bad kind of
value it can be given; YAML errors name the file or override, the line and the column.

The table has a row for every leaf field of TrainConfig (a new field without a row fails
``test_every_field_has_a_row``). Each (field, bad value) case goes through tailkd-train's entry
point: rc 2, one stderr line naming the key, no traceback, nothing written. The rules
themselves live in the config's field types (pydantic validates them).
"""
from __future__ import annotations

import dataclasses
import typing

import pytest

from tailkd_dist.config import TrainConfig, load_config, parse_override

WRONG_TYPE = {"int": [[1], "three", 2.5], "float": ["abc", [1.0]], "bool": ["maybe", 2], "str": [[1], {"a": 1}]}
NON_FINITE = [float("inf"), float("-inf"), float("nan"), "inf", ".nan"]

# key -> extra bad values beyond the wrong types of its type (None: type errors only)
TABLE: dict[str, list] = {
    "output_dir": ["@FILE"],
    "seed": [-1, 2**32], "models.teacher.init_seed": [-1], "models.student.init_seed": [2**40],
    "models.teacher.path": ["@MISSING", "@EMPTYDIR", "@FILE"], "models.teacher.config": [{"hidden_size": 8}],
    "models.teacher.tokenizer": None,
    "models.student.path": ["@MISSING", "@EMPTYDIR"], "models.student.config": [{}],
    "models.student.tokenizer": None, "models.teacher.cache": ["s3://bucket/cache"], "models.student.cache": ["/a/cache"],
    "models.teacher.cache_remote": ["s3://bucket/cache"], "models.student.cache_remote": ["/a/cache"],
    "models.dtype": ["fp16", "float32"], "models.attention": ["flash", "kernels-community/x"],
    "models.freeze_embeddings": None,
    "data.path": [""], "data.remote": None, "data.train_split": None, "data.eval_split": None,
    "data.micro_batch_size": [0, -2], "data.num_workers": [-1], "data.shuffle_seed": [-5],
    "loss.divergence": ["kl", ""], "loss.k": [0, -1], "loss.beta": [0, -1.0] + NON_FINITE,
    "loss.temperature": [0, -2.0] + NON_FINITE, "loss.ce_weight": [-0.1] + NON_FINITE,
    "loss.kd_weight": [-1] + NON_FINITE, "loss.jsd_beta": [0, 1, 1.5] + NON_FINITE,
    "loss.beta_scope": ["batch"], "loss.loss_group_size": [-1], "loss.chunk_size": [-1, -1024],
    "loss.row_passes": ["triton", "", True],
    "loss.hidden_weight": [-1.0] + NON_FINITE, "loss.hidden_layer_map": [[0, -2], [0, "x"], [1.5], "0,1", 3, [True]],
    "optim.lr": [0, -1e-4] + NON_FINITE, "optim.weight_decay": [-0.1] + NON_FINITE,
    "optim.betas": [[0.9], [0.9, 1.0], [-0.1, 0.9], [0.9, "inf"], 0.9],
    "optim.eps": [0, -1e-8] + NON_FINITE, "optim.warmup_steps": [-1], "optim.max_steps": [0],
    "optim.min_lr_ratio": [-0.1, 1.5] + NON_FINITE, "optim.grad_clip": [-1.0] + NON_FINITE,
    "optim.grad_accum": [0],
    "engine.kind": ["zero", "FSDP"], "engine.ds_config": None, "engine.teacher_ds_config": None,
    "engine.sharded_load": None, "engine.dist_timeout_s": [0, -5] + NON_FINITE,
    "engine.activation_checkpointing": None,
    "checkpoint.every_steps": [0], "checkpoint.keep": [0], "checkpoint.resume": None,
    "checkpoint.export_hf_at_end": None,
    "logging.every_steps": [0], "logging.tensorboard": None, "logging.progress_bar": None,
    "eval.every_steps": [-1], "eval.max_batches": [0], "eval.ece_bins": [0, -3],
}


def _leaves(cls=TrainConfig, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def _kind(tp) -> str | None:
    if typing.get_origin(tp) is typing.Literal:  # a mode: a name out of a list
        return "str"
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(args[0])


def _cases():
    out = []
    for key, tp in _leaves():
        kind = _kind(tp)
        for v in WRONG_TYPE.get(kind, []):
            if kind == "str" and key in ("models.teacher.path", "models.student.path"):
                continue  # checked with the path cases
            out.append(pytest.param(key, v, id=f"{key}={v!r}"))
        for v in TABLE.get(key) or []:
            out.append(pytest.param(key, v, id=f"{key}={v!r}"))
    return out


def _base(tmp_path) -> dict:
    tiny = {"model_type": "llama", "vocab_size": 64, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    return {"output_dir": str(tmp_path / "run"), "data": {"path": str(tmp_path / "data")},
            "models": {"teacher": {"config": tiny}, "student": {"config": dict(tiny)}}}


def _set(raw: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    if key.startswith("models.") and key.endswith(".path"):  # exactly one of path / config
        node.pop("config", None)


def test_every_field_has_a_row():
    keys = {k for k, _ in _leaves()}
    assert keys == set(TABLE), f"no row for {sorted(keys - set(TABLE))}; stale rows {sorted(set(TABLE) - keys)}"


def test_the_base_config_is_valid(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base(tmp_path)))
    load_config(path)


@pytest.mark.parametrize("key,value", _cases())
def test_bad_value_names_its_key(tmp_path, capsys, key, value):
    """Through tailkd-train's entry point (in this process: 300 launches would take minutes):
    rc 2, one line on stderr naming the key, no traceback, no output directory."""
    import yaml

    from tailkd_dist.train import main

    special = {"@FILE": tmp_path / "a_file", "@MISSING": tmp_path / "absent", "@EMPTYDIR": tmp_path / "empty"}
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "empty").mkdir()
    if isinstance(value, str) and value in special:
        value = str(special[value])
    raw = _base(tmp_path)
    _set(raw, key, value)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    rc = main([str(path)])
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith("tailkd-train: error: ") and err.count("\n") == 1, err
    assert f"'{key}'" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def _load_ds(path):
    from tailkd_dist.engines.ds_config import load_ds_config

    return load_ds_config(str(path), {})


@pytest.mark.parametrize("name,text,where", [
    ("c.yaml", "loss:\n  beta: [1\n  k: 3\n", "line 3, column 4"),
    ("c.yaml", "loss: {beta: 2\n", "line 2, column 1"),
    ("c.yaml", "a: b: c\n", "line 1, column 5"),
    ("c.yaml", "\tloss: 1\n", "line 1, column 1"),
    ("ds.json", '{"zero_optimization": {"stage": 3,}}', "line 1, column 35"),
    ("ds.json", '{\n  "train_batch_size": auto\n}', "line 2, column 23"),
    ("ds.json", "[1, 2]", "JSON object"),
])
def test_bad_file_names_the_file_line_and_column(tmp_path, name, text, where):
    """The config YAML (load_config) and a DeepSpeed JSON (engine.ds_config)."""
    path = tmp_path / name
    path.write_text(text)
    _refused(load_config if name.endswith(".yaml") else _load_ds, path, where)


def _refused(load, path, fragment):
    """``load(path)`` raises one ValueError naming the file and ``fragment``."""
    with pytest.raises(ValueError) as info:
        load(path)
    assert str(path) in str(info.value) and fragment in str(info.value), info.value


@pytest.mark.parametrize("item,fragment", [
    ("loss.beta=[1", "override 'loss.beta=[1'"),
    ("loss.beta={a: ", "override 'loss.beta={a: '"),
    ("=3", "no key"),
    ("loss.beta", "dotted.key=value"),
])
def test_bad_override_names_it(item, fragment):
    with pytest.raises(ValueError) as info:
        parse_override(item)
    assert fragment in str(info.value), info.value


def test_unreadable_config_files(tmp_path):
    for name, content, fragment in (("dir", None, "is a directory"), ("bin.yaml", b"\xff\xfe\x00bad", "UTF-8"),
                                    ("list.yaml", b"- 1\n- 2\n", "mapping")):
        path = tmp_path / name
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        _refused(load_config, path, fragment)


def test_corrupt_validation_shard_is_refused_before_training(data, tmp_path):
    """A damaged shard of the split read only for evaluation: one line naming it at start, rc 2,
    no training step (it used to fail with an IndexError after the whole run)."""
    import shutil
    import subprocess

    from trainer_utils import REPO, command, env, write_config

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    shard = sorted((copy / "validation").glob("shard.*.mds"))[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(raw))
    cfg = write_config(tmp_path / "c.yaml", copy, tmp_path / "run", optim__max_steps=2)
    out = subprocess.run(command(cfg), env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("tailkd-train: error:")]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert str(shard) in lines[0] and "xxh64" in lines[0], lines
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("tool", ["train", "preflight"])
def test_overrides_may_follow_the_options(tmp_path, capsys, tool):
    """`tailkd-train CONFIG --engine fsdp2 loss.beta=0`: the override is read (and its error
    reported), not refused as an unrecognised argument."""
    import importlib

    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base(tmp_path)))
    main = importlib.import_module(f"tailkd_dist.{tool}").main
    extra = ["--world-size", "1"] if tool == "preflight" else []
    rc = main([str(path), "--engine", "fsdp2", *extra, "loss.beta=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "'loss.beta' = 0 must be > 0" in err and "unrecognized" not in err, err


# ------------------------------------------------------------------------------------------
# Damaged input files: the shards' manifest and index, a model directory
# ------------------------------------------------------------------------------------------
def _edit_json(path, change):
    import json

    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _truncate(path, keep):
    raw = path.read_bytes()
    path.write_bytes(raw[: keep(len(raw))])


DAMAGE = {  # name -> (what is damaged, how, a fragment the one line must hold)
    "manifest not JSON": ("data", lambda d, m: (d / "manifest.json").write_text("{bad"), "not valid JSON"),
    "manifest a list": ("data", lambda d, m: (d / "manifest.json").write_text("[1, 2]"), "a JSON list"),
    "manifest binary": ("data", lambda d, m: (d / "manifest.json").write_bytes(b"\xff\xfe\x00"), "not UTF-8"),
    "manifest seq_len a string": ("data", lambda d, m: _edit_json(d / "manifest.json", lambda x: {**x, "seq_len": "abc"}),
                                  "'seq_len' = 'abc'"),
    "manifest splits missing": ("data", lambda d, m: _edit_json(d / "manifest.json", lambda x: {
        k: v for k, v in x.items() if k != "splits"}), "'splits' = None"),
    "manifest rows negative": ("data", lambda d, m: _edit_json(d / "manifest.json", lambda x: {
        **x, "splits": {**x["splits"], "train": {**x["splits"]["train"], "rows": -4}}}), "'splits.train.rows' = -4"),
    "train index not JSON": ("data", lambda d, m: (d / "train" / "index.json").write_text("{bad"), "train/index.json"),
    "validation index no shards": ("data", lambda d, m: (d / "validation" / "index.json").write_text('{"version": 2}'),
                                   "validation/index.json is not a shard index"),
    "model config not JSON": ("model", lambda d, m: (m / "config.json").write_text("{bad"), "config.json is not valid JSON"),
    "model config without model_type": ("model", lambda d, m: _edit_json(m / "config.json", lambda x: {
        k: v for k, v in x.items() if k != "model_type"}), "names no model_type"),
    "weights header cut": ("model", lambda d, m: _truncate(m / "model.safetensors", lambda n: 1000),
                           "model.safetensors is not a safetensors file, or is truncated"),
    "weights data cut": ("model", lambda d, m: _truncate(m / "model.safetensors", lambda n: n - 100),
                         "model.safetensors is truncated"),
    "weights zeroed": ("model", lambda d, m: (m / "model.safetensors").write_bytes(bytes(5000)),
                       "damaged safetensors header"),
    "weights missing": ("model", lambda d, m: (m / "model.safetensors").unlink(), "has no weights"),
    "model_type unknown": ("model", lambda d, m: _edit_json(m / "config.json", lambda x: {**x, "model_type": "lama"}),
                           "model_type 'lama' is not an architecture transformers"),
    "tokenizer.json cut": ("data", lambda d, m: _truncate(d / "tokenizer" / "tokenizer.json", lambda n: n // 2),
                           "tokenizer.json is not valid JSON"),
    "tokenizer files gone": ("data", lambda d, m: [f.unlink() for f in (d / "tokenizer").iterdir()],
                             "holds no tokenizer files"),
    "tokenizer a file": ("data", lambda d, m: (__import__("shutil").rmtree(d / "tokenizer"),
                                               (d / "tokenizer").write_text("x")), "is not a directory"),
    "weights shard missing": ("model", lambda d, m: (
        (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors"),
        (m / "model.safetensors.index.json").write_text(
            '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')),
        "model-00002-of-00002.safetensors is missing"),
}


@pytest.fixture(scope="module")
def saved_student(tmp_path_factory):
    import torch

    from tailkd_dist.config import ModelSpec
    from tailkd_dist.models import build_model
    from trainer_utils import STUDENT

    path = tmp_path_factory.mktemp("model") / "student"
    build_model(ModelSpec(config={**STUDENT, "vocab_size": 512}, init_seed=2), dtype=torch.float32,
                attention="sdpa").save_pretrained(path)
    return path


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_input_file_is_one_line_naming_it(data, saved_student, tmp_path, capsys, name):
    """Each damaged file answered by tailkd-preflight with rc 2 and one line naming the file
    (several of these were tracebacks, or passed the preflight and failed at load)."""
    import shutil

    from tailkd_dist.preflight import main
    from trainer_utils import write_config

    kind, damage, fragment = DAMAGE[name]
    copy, model = tmp_path / "data", tmp_path / "student"
    shutil.copytree(data, copy)
    shutil.copytree(saved_student, model)
    damage(copy, model)
    spec = {"models__student": {"path": str(model), "tokenizer": str(copy / "tokenizer")}} if kind == "model" else {}
    cfg = write_config(tmp_path / "c.yaml", copy, tmp_path / "run", engine__kind="fsdp2", **spec)
    rc = main([str(cfg), "--world-size", "1"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("tailkd-preflight: error:")]
    assert rc == 2 and len(lines) == 1, err[-3000:]
    assert fragment in lines[0] and str(copy if kind == "data" else model) in lines[0], lines[0]
    assert "Traceback" not in err


def test_damaged_weights_stop_the_trainer_before_loading(data, saved_student, tmp_path):
    """Through tailkd-train: a truncated weights file is one line at start (it was a
    SafetensorError traceback from inside the model loader)."""
    import shutil
    import subprocess

    from trainer_utils import REPO, command, env, write_config

    model = tmp_path / "student"
    shutil.copytree(saved_student, model)
    _truncate(model / "model.safetensors", lambda n: n // 2)
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", optim__max_steps=2,
                       models__student={"path": str(model), "tokenizer": str(data / "tokenizer")})
    out = subprocess.run(command(cfg), env=env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("tailkd-train: error:")]
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert f"{model / 'model.safetensors'} is truncated" in lines[0], lines
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("layer_map,record,fragment", [
    ([0], None, "'loss.hidden_layer_map' has 1 entries; the student has 2 layers"),
    ([0, 2], None, "teacher layer 2 does not exist (the teacher has 2"),
    (None, "{bad", "tailkd_derivation.json is not valid JSON"),
    (None, '{"layer_map": "0,1"}', "tailkd_derivation.json holds no layer_map"),
    (None, '{"layer_map": [0, 1, 1]}', "maps 3 layers but the student has 2"),
])
def test_hidden_layer_map_checked_at_start(data, saved_student, tmp_path, capsys, layer_map, record, fragment):
    """The hidden-state term's layer map, given or recorded by the derivation, fits both models:
    checked by the preflight (it was found only once the models were built)."""
    import shutil

    from tailkd_dist.preflight import main
    from trainer_utils import write_config

    model = tmp_path / "student"
    shutil.copytree(saved_student, model)
    if record is not None:
        (model / "tailkd_derivation.json").write_text(record)
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", engine__kind="fsdp2", loss__hidden_weight=1.0,
                       loss__hidden_layer_map=layer_map,
                       models__student={"path": str(model), "tokenizer": str(data / "tokenizer")})
    rc = main([str(cfg), "--world-size", "1"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("tailkd-preflight: error:")]
    assert rc == 2 and len(lines) == 1 and fragment in lines[0], err[-3000:]
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("environ,attention,fragment", [
    ({"SLURM_JOB_GPUS": "0,1"}, "sdpa", "SLURM gave this job GPUs (SLURM_JOB_GPUS=0,1) but torch sees none"),
    ({"SLURM_GPUS_ON_NODE": "4"}, "sdpa", "SLURM gave this job GPUs (SLURM_GPUS_ON_NODE=4)"),
    ({"DS_ACCELERATOR": "cuda"}, "sdpa", "DS_ACCELERATOR=cuda asks DeepSpeed for a GPU but torch sees none"),
    ({}, "flash_attention_2", "models.attention = flash_attention_2 runs only on CUDA GPUs"),
    ({"SLURM_GPUS_ON_NODE": "0", "SLURM_JOB_GPUS": ""}, "sdpa", None),  # no GPU given: a CPU run, fine
    # the deepspeed launcher sets CUDA_VISIBLE_DEVICES on CPU nodes too: no GPU asked for
    ({"CUDA_VISIBLE_DEVICES": "0,1", "DS_ACCELERATOR": "cpu"}, "sdpa", None),
])
def test_device_the_job_asks_for_and_this_node_lacks(tmp_path, environ, attention, fragment):
    import yaml

    from tailkd_dist.preflight import device_problems

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**_base(tmp_path), "models": {**_base(tmp_path)["models"], "attention": attention}}))
    problems = device_problems(load_config(path), environ=environ, cuda_available=False)
    assert problems == [] if fragment is None else (len(problems) == 1 and fragment in problems[0]), problems


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a node where torch sees no GPU")
def test_a_gpu_job_on_a_node_without_one_stops_at_start(tmp_path):
    """Through the CLI on this CPU machine, told it has GPUs: one line, rc 2, nothing written
    (it trained on the CPU, silently)."""
    import subprocess

    import yaml

    from trainer_utils import REPO, command, env

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_base(tmp_path)))
    out = subprocess.run(command(path), env={**env(), "SLURM_STEP_GPUS": "0"}, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("tailkd-train: error:")]
    assert out.returncode == 2 and len(lines) == 1 and "SLURM gave this job GPUs (SLURM_STEP_GPUS=0)" in lines[0], \
        out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------
# What the DeepSpeed JSONs may say: the run config owns the batch, the clipping, the dtype and
# the optimizer's settings; everything else is DeepSpeed's
# ------------------------------------------------------------------------------------------
DS_BAD = [  # (student JSON, teacher JSON or None for the shipped one, a fragment of the one line)
    ({"zero_optimization": {"stage": 7}}, None, "'engine.ds_config' = {s}: zero_optimization.stage must be 1, 2 or 3"),
    ({"zero_optimization": [2]}, None, "zero_optimization.stage must be 1, 2 or 3"),
    ({"zero_optimization": {"stage": True}}, None, "zero_optimization.stage must be 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 5}, None,
     "train_micro_batch_size_per_gpu = 5, but the run config makes it 2 (data.micro_batch_size)"),
    ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}, None,
     "gradient_accumulation_steps = 4, but the run config makes it 1 (optim.grad_accum)"),
    ({"zero_optimization": {"stage": 2}, "train_batch_size": 16}, None, "train_batch_size = 16, but the run config makes it 2"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}, None, "gradient_clipping = 1.0, but the run config makes it 0.0"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, None, "bf16.enabled = true, but the run config makes it false"),
    ({"zero_optimization": {"stage": 2}, "bf16": True}, None, "'bf16' must be a JSON object"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, None, "fp16 is not supported"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, None,
     "optimizer.params.lr = 0.1, but the run config makes it 0.003 (optim.lr)"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, None,
     "no value to fill 'zero_optimization.reduce_bucket_size: auto'"),
    ({"zero_optimization": {"stage": 2}}, {"zero_optimization": {"stage": 2}},
     "'engine.teacher_ds_config' = {t}: the teacher engine must be ZeRO stage 3 without an optimizer"),
    ({"zero_optimization": {"stage": 2}}, {"zero_optimization": {"stage": 3}, "train_batch_size": 3},
     "'engine.teacher_ds_config' = {t}: train_batch_size = 3, but the run config makes it 2"),
]


@pytest.mark.parametrize("student,teacher,fragment", DS_BAD, ids=[f"ds{i}" for i in range(len(DS_BAD))])
def test_deepspeed_json_that_contradicts_the_run_config(data, tmp_path, capsys, student, teacher, fragment):
    """Through tailkd-train's entry point: rc 2, one line naming the key and the file, nothing
    written (these were DeepSpeed assertion tracebacks, or trained with the JSON's batch while
    the config said another)."""
    import json

    from tailkd_dist.train import main
    from trainer_utils import REPO, write_config

    s, t = tmp_path / "student_ds.json", tmp_path / "teacher_ds.json"
    s.write_text(json.dumps(student))
    t.write_text(json.dumps(teacher)) if teacher is not None else None
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run", engine__ds_config=str(s),
                       engine__teacher_ds_config=str(t if teacher is not None else REPO / "ds_configs/teacher_zero3.json"))
    rc = main([str(cfg)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("tailkd-train: error:")]
    assert rc == 2 and len(lines) == 1 and err.count("\n") == 1, err[-3000:]
    assert fragment.format(s=s, t=t) in lines[0], lines[0]
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_deepspeed_json_keys_left_out_or_repeated_are_the_run_configs():
    """Left out or "auto": filled from the run config; repeated with the same value: kept.
    The expected numbers are written out from the config below, not computed by the code."""
    from types import SimpleNamespace

    import torch

    from tailkd_dist.engines.ds_config import _settle, auto_values

    cfg = SimpleNamespace(data=SimpleNamespace(micro_batch_size=3),
                          optim=SimpleNamespace(grad_accum=2, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1))
    values = auto_values(cfg, world_size=4, dtype=torch.float32)
    left_out = _settle({"zero_optimization": {"stage": 2}}, values, where="w")
    assert left_out == {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 3,
                        "gradient_accumulation_steps": 2, "train_batch_size": 24, "gradient_clipping": 0.0,
                        "bf16": {"enabled": False}}
    repeated = {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 3, "train_batch_size": 24.0,
                "bf16": {"enabled": False}, "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.99]}}}
    settled = _settle(repeated, values, where="w")
    assert settled["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.1}
    assert settled["train_batch_size"] == 24.0 and settled["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize("eval_split,every_steps,fragment", [
    ("heldout", 0, "data.eval_split = 'heldout' is not in the shards' manifest (the shards' splits: train)"),
    ("validation", 2, "eval.every_steps = 2 asks for evaluations but the shards have no 'validation' split"),
    ("validation", 0, None),  # data prepared without a validation split: trains, says it will not evaluate
])
def test_an_evaluation_split_the_shards_lack(data, tmp_path, capsys, eval_split, every_steps, fragment):
    """An evaluation split that is not there is refused at start when it was asked for (the run
    trained and skipped every evaluation in silence)."""
    import shutil

    from tailkd_dist.preflight import main
    from trainer_utils import write_config

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    _edit_json(copy / "manifest.json", lambda x: {**x, "splits": {"train": x["splits"]["train"]}})
    cfg = write_config(tmp_path / "c.yaml", copy, tmp_path / "run", data__eval_split=eval_split,
                       eval__every_steps=every_steps)
    rc = main([str(cfg), "--world-size", "1"])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("tailkd-preflight: error:")]
    if fragment is None:
        assert rc == 0 and not lines and "no 'validation' split in the shards: the run will not evaluate" in out, out
    else:
        assert rc == 2 and len(lines) == 1 and fragment in lines[0], err


def test_every_command_says_an_error_in_one_line(capsys):
    """A library's message with newlines (transformers' config validators) or a page of text
    (its list of ~400 model types) still ends as one line, written at once."""
    from tailkd_dist.user_error import MAX_CHARS, say_error

    say_error("tailkd-x", "Class validation error:\n    ValueError: hidden size  (32)\n\tnot a multiple")
    say_error("tailkd-x", "types: " + ", ".join(["model"] * 2000))
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "tailkd-x: error: Class validation error: ValueError: hidden size (32) not a multiple"
    assert len(err) == 2 and err[1].endswith(" ... ") and len(err[1]) == len("tailkd-x: error: ") + MAX_CHARS


@pytest.mark.parametrize("module,prog", [
    ("tailkd_dist.train", "tailkd-train"), ("tailkd_dist.preflight", "tailkd-preflight"),
    ("tailkd_dist.derive", "tailkd-derive-student"), ("tailkd_dist.data.prepare", "tailkd-prepare-data"),
    ("tailkd_dist.export", "tailkd-export-hf"), ("tailkd_dist.demo", "tailkd-demo"),
    ("tailkd_dist.cache_teacher", "tailkd-cache-teacher"),
])
def test_a_command_line_mistake_is_one_line(capsys, module, prog):
    """argparse printed the whole usage before its error: a screenful per rank under a launcher."""
    import importlib

    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).main(["--no-such-option"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: ") and ("--no-such-option" in err or "required" in err), err
    assert err.rstrip().endswith(f"(see {prog} --help)"), err


@pytest.mark.parametrize("module,prog,argv,flag,fragment", [
    ("tailkd_dist.demo", "tailkd-demo", ["--nproc", "0"], "--nproc", "0 must be at least 1"),
    ("tailkd_dist.demo", "tailkd-demo", ["--nproc", "-1"], "--nproc", "-1 must be at least 1"),
    ("tailkd_dist.demo", "tailkd-demo", ["--teacher-steps", "0"], "--teacher-steps", "0 must be at least 1"),
    ("tailkd_dist.demo", "tailkd-demo", ["--student-steps", "-3"], "--student-steps", "-3 must be at least 1"),
    ("tailkd_dist.demo", "tailkd-demo", ["--nproc", "two"], "--nproc", "'two' is not a whole number"),
    ("tailkd_dist.preflight", "tailkd-preflight", ["c.yaml", "--world-size", "0"], "--world-size", "0 must be"),
    ("tailkd_dist.preflight", "tailkd-preflight", ["c.yaml", "--world-size", "2", "--gpus-per-node", "0"],
     "--gpus-per-node", "0 must be at least 1"),
    ("tailkd_dist.preflight", "tailkd-preflight", ["c.yaml", "--world-size", "2", "--device-memory-gib", "-1"],
     "--device-memory-gib", "-1 must be a number above 0"),
    ("tailkd_dist.preflight", "tailkd-preflight", ["c.yaml", "--world-size", "2", "--host-memory-gib", "nan"],
     "--host-memory-gib", "nan must be a number above 0"),
    ("tailkd_dist.cache_teacher", "tailkd-cache-teacher", ["c.yaml", "--piece-rows", "0"], "--piece-rows", "0 must"),
    ("tailkd_dist.derive", "tailkd-derive-student", ["t", "-o", "s", "--every", "0"], "--every", "0 must be at least 1"),
    ("tailkd_dist.derive", "tailkd-derive-student", ["t", "-o", "s", "--seed", "-1"], "--seed", "-1 must be at least 0"),
    ("tailkd_dist.data.prepare", "tailkd-prepare-data", ["in", "-o", "d", "--train-tokenizer", "5"],
     "--train-tokenizer", "5 must be at least 258"),
    ("tailkd_dist.data.prepare", "tailkd-prepare-data", ["in", "-o", "d", "--train-tokenizer", "300", "--seq-len", "0"],
     "--seq-len", "0 must be at least 1"),
])
def test_a_count_of_zero_or_less_is_refused_when_the_command_line_is_read(
        capsys, tmp_path, monkeypatch, module, prog, argv, flag, fragment):
    """A 0 was taken as "the default" (tailkd-demo --nproc 0 ran the full demo on 2 ranks,
    --teacher-steps 0 the default steps; tailkd-preflight --gpus-per-node 0 the visible GPUs)
    and a negative count failed minutes later as a derived config value the user never wrote
    (--nproc -1: "data.micro_batch_size = -4", after the data was prepared). Now one line
    naming the flag, rc 2, before anything is read or written."""
    import importlib

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: argument {flag}: {fragment}"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("loss", [
    {"ce_weight": 0, "kd_weight": 0},
    {"ce_weight": 0, "divergence": "none"},  # CE alone, at weight 0
    {"ce_weight": 0.0, "kd_weight": 0.0, "hidden_weight": 0.0, "divergence": "jsd"},
])
def test_a_loss_whose_every_term_has_weight_0_is_refused(tmp_path, capsys, loss):
    """It trained: models loaded, steps run, checkpoints and an export written, nothing learnt."""
    import yaml

    from tailkd_dist.train import main

    raw = _base(tmp_path)
    raw["loss"] = loss
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    rc = main([str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "give every term of the loss weight 0" in err, err
    assert "'loss.ce_weight' = 0" in err and not (tmp_path / "run").exists(), err


@pytest.mark.parametrize("loss", [{"ce_weight": 0}, {"kd_weight": 0}, {"ce_weight": 0, "kd_weight": 0, "hidden_weight": 1.0}])
def test_a_loss_with_one_weighted_term_is_accepted(tmp_path, loss):
    import yaml

    raw = _base(tmp_path)
    raw["loss"] = loss
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).loss.ce_weight == loss.get("ce_weight", 1.0)
