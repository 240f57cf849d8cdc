"""The student as an HF checkpoint (safetensors + config + tokenizer).

Used at the end of training (from the live engine) and by ``tools/export_hf.py`` (from a
checkpoint directory, in one process on CPU: DeepSpeed's zero_to_fp32 consolidates the body,
the head rows are concatenated from the per-rank extra files of data-parallel rank 0; for
FSDP2 the model entries of the DCP files are read, without a process group).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from tailkd_dist.staging import check_replaceable, staged_dir
from tailkd_dist.user_error import ArgumentParser, say_error

log = logging.getLogger("tailkd_dist")

EXPORT_MARKER = "tailkd_export.json"
"""Written into every export: only a directory holding it is ever replaced by a later export."""


def check_export_target(out_dir: str, *, run_dir: str | None, option: str = "OUT_DIR") -> None:
    """ValueError unless ``out_dir`` is absent, empty or an earlier export (its marker), and,
    given ``run_dir``, neither that run directory nor inside it nor around it."""
    check_replaceable(Path(out_dir), overwrite=True, marker=EXPORT_MARKER, producer="tailkd_dist's export",
                      keep_apart=[("the run directory", run_dir)] if run_dir else [], option=option)


def write_hf_student(*, hf_config, body_prefix: str, body_state: dict, head_weight: torch.Tensor,
                     head_bias: torch.Tensor | None, extra_rows: torch.Tensor | None, out_dir: str,
                     tokenizer_dir: str | None, provenance: dict | None = None) -> str:
    """Assemble an HF causal LM from the body's state dict and the full lm_head; save it.
    The caller has checked with :func:`check_export_target` that ``out_dir`` may be replaced."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config.__class__.from_dict(hf_config.to_dict())
    cfg.tie_word_embeddings = False  # the head was trained as its own rows (parallel/lm_head.py)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {f"{body_prefix}.{k}": v for k, v in body_state.items()}
    weight = head_weight.float().cpu()
    if extra_rows is not None and extra_rows.numel():
        weight = torch.cat([weight, extra_rows.float().cpu()])
    head = model.get_output_embeddings()
    state[_param_name(model, head.weight)] = weight
    if head_bias is not None:
        state[_param_name(model, head.bias)] = head_bias.float().cpu()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"export: state does not fit the HF model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    # Built in a hidden sibling and renamed into place: a failed export leaves no trace and
    # replaces nothing; the marker is what lets a later export replace this one.
    with staged_dir(Path(out_dir)) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer_dir:
            save_tokenizer(tokenizer_dir, staging)
        (staging / EXPORT_MARKER).write_text(json.dumps({"producer": "tailkd_dist", **(provenance or {})},
                                                        indent=1) + "\n")
    log.info("exported the student to %s", out_dir)
    return out_dir


def save_tokenizer(tokenizer_dir, out_dir) -> None:
    """The tokenizer beside an exported causal LM, returning only what the model takes: a
    tokenizer that also returns token_type_ids (BERT-style configs, some older tokenizer files)
    would make ``model.generate(**tokenizer(prompt, return_tensors="pt"))`` fail on the export."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if "token_type_ids" in tok.model_input_names:
        # Both: the attribute is what this object returns, init_kwargs what save_pretrained writes.
        names = [n for n in tok.model_input_names if n != "token_type_ids"]
        tok.model_input_names = names
        tok.init_kwargs["model_input_names"] = names
    tok.save_pretrained(out_dir)


def _param_name(model, param) -> str:
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is param:
            return name
    raise RuntimeError("lm_head parameter not found in the model")


def export_live(adapter, out_dir: str, *, tokenizer_dir: str | None) -> None:
    """From a running job (every rank calls; rank 0 writes)."""
    body = adapter.body_state_dict()
    weight, bias = adapter.full_student_head()
    if adapter.topo.rank == 0:
        write_hf_student(
            hf_config=adapter.student_config, body_prefix=adapter.body_prefix, body_state=body,
            head_weight=weight, head_bias=bias, extra_rows=adapter.student_extra_rows,
            out_dir=out_dir, tokenizer_dir=tokenizer_dir, provenance={"run_dir": os.path.dirname(os.path.abspath(out_dir))})


def export_checkpoint(run_dir: str, out_dir: str, *, tag: str | None = None) -> str:
    """From ``<run_dir>/checkpoints/<tag>`` (default: latest) in one CPU process. ``out_dir``
    may be absent, empty or an earlier export; never the run directory, inside or around it."""
    from transformers import AutoConfig

    from tailkd_dist import checkpoint
    from tailkd_dist.config import load_config

    ckpt_root = checkpoint.root(run_dir)
    if not os.path.isdir(ckpt_root):
        raise ValueError(f"RUN_DIR {run_dir} holds no checkpoints/: pass the output_dir of a tailkd-train run")
    check_export_target(out_dir, run_dir=run_dir)
    if tag is None:
        tag, note = checkpoint.resolve_latest(ckpt_root)
        if tag is None:
            raise ValueError(f"{ckpt_root} holds no complete checkpoint: nothing to export")
        if note:
            log.warning("%s", note)
    path = os.path.join(ckpt_root, tag)
    if not checkpoint.is_complete(path):
        raise ValueError(f"{path} is not a complete checkpoint (choose --tag among: "
                         f"{', '.join(t for _, t in checkpoint.complete_checkpoints(ckpt_root)) or 'none'})")
    cfg = load_config(os.path.join(path, "config.yaml"))
    meta = checkpoint.read_json(os.path.join(path, "trainer_state.json"))
    if cfg.engine.kind == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        body = get_fp32_state_dict_from_zero_checkpoint(ckpt_root, tag=tag)
        # Global ranks 0..P-1 form the loss group of data-parallel rank 0: together, every row.
        extras = [checkpoint.load_extra(os.path.join(path, f"extra_rank{r}.pt"))
                  for r in range(meta["loss_group_size"])]
        shards = [e["student_head"] for e in extras]
        weight = torch.cat([s["weight"] for s in shards])
        bias = torch.cat([s["bias"] for s in shards]) if "bias" in shards[0] and shards[0]["bias"] is not None else None
    else:  # fsdp2: body and head are DTensor shards in the DCP files, consolidated here
        from tailkd_dist.engines.fsdp2_engine import read_dcp_student

        body, weight, bias = read_dcp_student(path)
        extras = [checkpoint.load_extra(os.path.join(path, "extra_rank0.pt"))]
    spec = cfg.models.student
    if spec.path:
        hf_config = AutoConfig.from_pretrained(spec.path, local_files_only=True)
    else:
        c = dict(spec.config)
        hf_config = AutoConfig.for_model(c.pop("model_type"), **c)
    extra = extras[0].get("student_extra_rows")
    return write_hf_student(hf_config=hf_config, body_prefix=meta["body_prefix"], body_state=body,
                            head_weight=weight, head_bias=bias, extra_rows=extra, out_dir=out_dir,
                            tokenizer_dir=meta.get("tokenizer_dir"),
                            provenance={"run_dir": os.path.abspath(run_dir), "tag": tag, "step": meta.get("step")})


def main(argv=None) -> int:
    """tailkd-export-hf RUN_DIR OUT_DIR [--tag step_00000100]"""

    from tailkd_dist.staging import describe_write_error

    ap = ArgumentParser(prog="tailkd-export-hf", description="Write a checkpoint's student as an HF model.")
    ap.add_argument("run_dir", help="the training run's output_dir")
    ap.add_argument("out_dir", help="where to write the HF model: a new or empty directory, or an earlier export "
                                    "(replaced once the new one is complete); never inside the run directory")
    ap.add_argument("--tag", help="checkpoint tag (default: the latest complete one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="tailkd-export-hf: %(message)s")
    try:
        export_checkpoint(args.run_dir, args.out_dir, tag=args.tag)
    except ValueError as e:
        say_error("tailkd-export-hf", e)
        return 2
    except OSError as e:  # disk full, permissions: the staging directory is already gone
        say_error("tailkd-export-hf", f"{describe_write_error(e)}; {args.out_dir} was not written or changed, "
                  "and the run directory is untouched")
        return 2
    print(f"wrote {args.out_dir}")
    return 0
