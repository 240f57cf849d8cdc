"""The DeepSpeed JSONs a run names (``engine.ds_config``, ``engine.teacher_ds_config``): where
they are read from, and what in them the run config decides. Read by the DeepSpeed engine and
by the preflight through the same functions, so each rule is written once.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch


# The run config decides these; a DeepSpeed JSON may leave them out or write "auto" (both are
# filled), or repeat the same value. Another value would train something other than the run
# config says (DeepSpeed's batch, its own clipping on top of the trainer's, another dtype), so it
# is refused, naming the run-config key it must come from.
OWNED = {
    "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "optim.grad_accum",
    "train_batch_size": "data.micro_batch_size x optim.grad_accum x the world size",
    "gradient_clipping": "0: the trainer clips by optim.grad_clip over the body and the head together",
    "bf16.enabled": "models.dtype on this device",
    "optimizer.params.lr": "optim.lr", "optimizer.params.betas": "optim.betas",
    "optimizer.params.eps": "optim.eps", "optimizer.params.weight_decay": "optim.weight_decay",
}


def _same(given, value) -> bool:
    if isinstance(value, bool) or isinstance(given, bool):
        return given is value
    if isinstance(value, list):
        return isinstance(given, list) and len(given) == len(value) and all(map(_same, given, value))
    return isinstance(given, (int, float)) and float(given) == float(value)


def _settle(raw: dict, values: dict, *, where: str) -> dict:
    """``raw`` with the run config's entries in place (module comment above): absent or "auto"
    filled from ``values``, an equal value kept, another refused; any other "auto" refused."""
    out = copy.deepcopy(raw)
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        if parents[:1] == ["optimizer"] and "optimizer" not in out:
            continue  # the trainer's own AdamW: nothing of DeepSpeed's to fill
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{where}: '{part}' must be a JSON object (found {node!r})")
        given = node.get(leaf, "auto")
        if given == "auto":
            node[leaf] = value
        elif not _same(given, value):
            raise ValueError(f"{where}: {dotted} = {json.dumps(given)}, but the run config makes it "
                             f"{json.dumps(value)} ({OWNED.get(dotted, 'the run config')}): write \"auto\" or "
                             "remove the key")
    if isinstance(out.get("fp16"), dict) and out["fp16"].get("enabled") not in (False, "auto", None):
        raise ValueError(f"{where}: fp16 is not supported (loss scaling is not wired into the trainer's step): "
                         "remove the fp16 section; models.dtype takes auto, fp32 or bf16")

    def walk(node, path):
        for key, val in node.items():
            if isinstance(val, dict):
                walk(val, f"{path}{key}.")
            elif val == "auto":
                raise ValueError(f"{where}: no value to fill '{path}{key}: auto' (the run config fills "
                                 f"only {', '.join(OWNED)})")

    walk(out, "")
    return out


SHIPPED = Path(__file__).resolve().parents[1] / "ds_configs"
"""The DeepSpeed configs that ship with the package (``ds_configs/`` of the checkout)."""


def resolve_ds_config(path: str) -> str:
    """Where a DeepSpeed config named in the run config is read: the path as given (relative:
    from the current directory); failing that, ``ds_configs/NAME`` (or a bare ``NAME``) names
    the copy shipped with the package, so the defaults work from any directory."""
    if os.path.isfile(path) or os.path.isabs(path):
        return path
    parts = Path(path).parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "ds_configs"):
        shipped = SHIPPED / parts[-1]
        if shipped.is_file():
            return str(shipped)
    return path


def load_ds_config(path: str, values: dict, *, key: str = "engine.ds_config") -> dict:
    """The DeepSpeed JSON named by run-config ``key``, with the run config's entries settled
    (``_settle``); ValueError in one line naming the key and the file otherwise."""
    given, path = path, resolve_ds_config(path)
    if not os.path.isfile(path):
        shipped = ", ".join(sorted(p.name for p in SHIPPED.glob("*.json")))
        raise ValueError(f"config key '{key}': {given} does not exist "
                         f"(relative paths are read from the current directory {os.getcwd()}; "
                         f"ds_configs/NAME names a config shipped with the package: {shipped})")
    where = f"config key '{key}' = {given}"
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: DeepSpeed config {path} is not valid JSON: {e.msg} at line {e.lineno}, "
                         f"column {e.colno}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where}: DeepSpeed config {path} is not a UTF-8 text file") from None
    except OSError as e:
        raise ValueError(f"{where}: DeepSpeed config {path} cannot be read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: DeepSpeed config {path} must hold a JSON object at the top level")
    return _settle(raw, values, where=where)


def auto_values(cfg, *, world_size: int, dtype: torch.dtype) -> dict:
    """What fills the "auto" entries of the DeepSpeed JSONs (also read by the preflight)."""
    o = cfg.optim
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": cfg.data.micro_batch_size * o.grad_accum * world_size,
        "gradient_clipping": 0.0,  # the step sets the clip from the global norm (docs/engines.md)
        "bf16.enabled": dtype == torch.bfloat16,
        "optimizer.params.lr": o.lr, "optimizer.params.betas": list(o.betas),
        "optimizer.params.eps": o.eps, "optimizer.params.weight_decay": o.weight_decay,
    }


def student_ds_config(cfg, *, world_size: int, dtype: torch.dtype) -> dict:
    """The student engine's DeepSpeed config, checked: ZeRO stage 1, 2 or 3."""
    s_cfg = load_ds_config(cfg.engine.ds_config, auto_values(cfg, world_size=world_size, dtype=dtype))
    zero = s_cfg.get("zero_optimization")
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"config key 'engine.ds_config' = {cfg.engine.ds_config}: zero_optimization.stage must be "
                         f"1, 2 or 3 (got {stage})")
    return s_cfg


def teacher_ds_config(cfg, *, world_size: int, dtype: torch.dtype) -> dict:
    """The teacher engine's DeepSpeed config, checked: ZeRO-3, no optimizer."""
    t_cfg = load_ds_config(cfg.engine.teacher_ds_config, auto_values(cfg, world_size=world_size, dtype=dtype),
                           key="engine.teacher_ds_config")
    zero = t_cfg.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") != 3 or "optimizer" in t_cfg:
        raise ValueError(f"config key 'engine.teacher_ds_config' = {cfg.engine.teacher_ds_config}: the teacher "
                         "engine must be ZeRO stage 3 without an optimizer (inference only)")
    return t_cfg
