"""tailkd-demo: distil a small language model end to end on this machine, in minutes, offline.

    tailkd-demo                      # defaults: ~870 CPU-seconds, about 7-8 minutes on 2 idle
                                     # cores (teacher cached: about 3); a busy shared machine: 20+
    tailkd-demo --tiny               # CI size: about a minute
    tailkd-demo --nproc 1 --engine deepspeed --out runs/demo

Stages (each shows its progress):
  1. data     the running Python's standard-library sources (python-stdlib), a byte-level BPE
              trained on them (vocabulary 8192), packed into MDS shards (tailkd-prepare-data).
  2. teacher  a 7.3M-parameter Llama trained from scratch with the trainer itself (CE only, 200
              steps), cached and reused on later runs (keyed by a hash of its settings and data).
  3. TAD      a 2.5M-parameter student distilled with TAD (k=10, beta=2), 100 steps.
  4. KL       the same student (same seed, initial weights and batches) with forward KL.
  5. report   a table on held-out data (NLL, perplexity, top-1 agreement with the teacher,
              Full-ECE, training tokens/s), curves.png, and TensorBoard logs.

Training runs in a worker: ``torchrun --nproc_per_node N -m tailkd_dist.demo --worker PLAN``
(or one plain process with --nproc 1); every stage is an ordinary ``tailkd_dist.train.train``
call on a config written to <out>/configs/, so each stage can be rerun with ``tailkd-train``.
The configs come from configs/demo_teacher.yaml and configs/demo_student.yaml (sizes) and
configs/demo_tiny.yaml (the --tiny overlay). tools/reproduce.py builds on the same functions.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import yaml

from tailkd_dist import __version__
from tailkd_dist.user_error import ArgumentParser, say_error, whole_number

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
DEFAULT_PREPARE = {"seq_len": 256, "vocab": 8192, "max_docs": None, "val_fraction": 0.05}
DEFAULT_EVAL_ROWS = 128
LABELS = {"teacher": "teacher (CE only)", "tad": "student TAD (k={k}, beta={beta:g})",
          "forward_kl": "student forward KL", "none": "student CE only"}


# --------------------------------------------------------------------------- small helpers


def _say(msg: str) -> None:
    print(msg, flush=True)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tailkd_dist" / "demo"


def default_nproc() -> int:
    """2 ranks when the machine has (at least) 2 cores for this process, else 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return 2 if cores >= 2 else 1


def _digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def _get_dotted(raw: dict, dotted: str, default=None):
    node = raw
    for p in dotted.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` items (values parsed as YAML) -> {dotted key: value}."""
    from tailkd_dist.config import parse_override

    return dict(parse_override(x) for x in (items or []))


def load_overlay(path: str | os.PathLike | None) -> dict:
    """A size overlay (configs/demo_tiny.yaml's layout): prepare / eval_rows / teacher / student."""
    if path is None:
        return {}
    from tailkd_dist.config import read_yaml

    raw = read_yaml(path, what="size overlay") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"size overlay {path} must hold a mapping at the top level")
    unknown = set(raw) - {"prepare", "eval_rows", "teacher", "student"}
    if unknown:
        raise ValueError(f"{path}: unknown overlay section(s) {sorted(unknown)}")
    return raw


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


# --------------------------------------------------------------------------- stage 1: data


def prepare_data(cache_dir: Path, *, seq_len: int, vocab: int, max_docs: int | None,
                 val_fraction: float = 0.05, progress: bool = True) -> tuple[Path, str]:
    """The python-stdlib corpus with a trained BPE, prepared once per settings (and Python)."""
    key_obj = {"corpus": "python-stdlib", "python": sys.version.split()[0],
               "stdlib": sysconfig.get_paths()["stdlib"], "seq_len": seq_len, "vocab": vocab,
               "max_docs": max_docs, "val_fraction": val_fraction, "tailkd_dist": __version__}
    key = _digest(key_obj)
    out = cache_dir / "data" / f"stdlib-v{vocab}-s{seq_len}-{key}"
    if (out / "manifest.json").exists():
        m = json.loads((out / "manifest.json").read_text())
        if _still_valid(out, m):
            _say(f"  reusing prepared data {out} ({m['splits']['train']['tokens']:,} train tokens)")
            return out, key
        _say(f"  {out} was prepared by another version of tailkd_dist (format or tokenizer identity "
             "differs): preparing it again")
    from tailkd_dist.data.prepare import PrepareConfig, prepare

    t0 = time.time()
    prepare(PrepareConfig(inputs=["python-stdlib"], output=str(out), seq_len=seq_len,
                          train_tokenizer=vocab, max_docs=max_docs, val_fraction=val_fraction,
                          overwrite=True, progress=progress))
    _say(f"  prepared in {_fmt_s(time.time() - t0)}: {out}")
    return out, key


def _still_valid(out: Path, manifest: dict) -> bool:
    """Whether this version of the loader accepts shards prepared earlier (same format, and the
    tokenizer identity recorded in the manifest still computed the same way)."""
    from tailkd_dist.data import FORMAT
    from tailkd_dist.data.tokenizer import tokenizer_sha256

    try:
        return (manifest.get("format") == FORMAT
                and manifest["tokenizer"]["sha256"] == tokenizer_sha256(out / "tokenizer"))
    except (KeyError, ValueError, OSError):
        return False


# --------------------------------------------------------------------------- configs


def _resolve_repo_paths(raw: dict) -> None:
    from tailkd_dist.engines.ds_config import resolve_ds_config

    for key in ("ds_config", "teacher_ds_config"):
        p = _get_dotted(raw, f"engine.{key}")
        if p:
            _set_dotted(raw, f"engine.{key}", resolve_ds_config(p))


def build_config(template: str | os.PathLike, *, out_dir: Path, data: Path, nproc: int, engine: str,
                 eval_rows: int, overrides: dict[str, Any], teacher_path: Path | None = None) -> dict:
    """A resolved trainer config (a plain dict) from a demo template plus overrides."""
    with open(template) as f:
        raw = yaml.safe_load(f)
    for k, v in overrides.items():
        _set_dotted(raw, k, v)
    manifest = json.loads((data / "manifest.json").read_text())
    tok = str(data / "tokenizer")
    raw["output_dir"] = str(out_dir)
    raw["data"]["path"] = str(data)
    _set_dotted(raw, "models.student.tokenizer", tok)
    _set_dotted(raw, "models.student.config.vocab_size", manifest["tokenizer"]["vocab_size"])
    _set_dotted(raw, "models.student.config.max_position_embeddings",
                max(manifest["seq_len"], _get_dotted(raw, "models.student.config.max_position_embeddings", 0)))
    if teacher_path is not None:
        raw["models"]["teacher"] = {"path": str(teacher_path), "tokenizer": tok}
    # Same global batch whatever the number of ranks: divide the rows, accumulate the rest.
    rows = int(raw["data"]["micro_batch_size"]) * int(_get_dotted(raw, "optim.grad_accum", 1))
    if rows % nproc:
        raise ValueError(f"the global batch ({rows} rows) does not divide over --nproc {nproc}")
    per_rank = rows // nproc
    accum = 1
    while per_rank > 8 and per_rank % 2 == 0:  # keep micro-batches small on CPU
        per_rank //= 2
        accum *= 2
    raw["data"]["micro_batch_size"] = per_rank
    _set_dotted(raw, "optim.grad_accum", accum)
    _set_dotted(raw, "eval.max_batches", max(1, math.ceil(eval_rows / (per_rank * nproc))))
    _set_dotted(raw, "engine.kind", engine)
    _resolve_repo_paths(raw)
    return raw


def write_config(raw: dict, path: Path) -> Path:
    from tailkd_dist.config import load_config

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    if _get_dotted(raw, "models.teacher.path") is None or os.path.isdir(raw["models"]["teacher"]["path"]):
        load_config(path)  # validate now (a student's teacher may not exist yet)
    return path


def teacher_key(raw: dict, data_key: str, nproc: int) -> str:
    """What determines the teacher's weights: its model, loss, optimiser, seeds, global batch and
    the data; not where it is written, the engine, the number of ranks or logging."""
    rows = raw["data"]["micro_batch_size"] * raw["optim"].get("grad_accum", 1) * nproc
    keep = {k: raw.get(k) for k in ("seed", "models", "loss", "optim")}
    keep["models"] = {**keep["models"], "student": {k: v for k, v in keep["models"]["student"].items()
                                                    if k != "tokenizer"}}
    keep["optim"] = {k: v for k, v in keep["optim"].items() if k != "grad_accum"}
    return _digest({"train": keep, "global_rows": rows, "shuffle_seed": raw["data"].get("shuffle_seed"),
                    "data": data_key, "tailkd_dist": __version__})


# --------------------------------------------------------------------------- the worker


def _quiet_logs() -> None:
    import logging
    import warnings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "streaming", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def summarise_history(history: list[dict], skip: int = 1) -> dict:
    """Training throughput (global tokens/s over the steps after the first `skip`)."""
    steps = history[skip:] if len(history) > skip else history
    tokens = sum(h["perf/tokens_per_s"] * h["perf/step_s"] for h in steps)
    secs = sum(h["perf/step_s"] for h in steps)
    return {"tokens_per_s": tokens / max(secs, 1e-9), "train_seconds": sum(h["perf/step_s"] for h in history)}


def run_worker(plan_path: str) -> int:
    """Run the plan's stages in order (every rank of a torchrun job calls this)."""
    _quiet_logs()
    import torch.distributed as dist

    from tailkd_dist.config import load_config
    from tailkd_dist.train import train

    plan = json.loads(Path(plan_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    failures = 0

    def barrier():
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    stages = plan["stages"]
    for i, st in enumerate(stages):
        result_path = Path(st["result"])
        if result_path.exists():
            if rank == 0:
                _say(f"[{st['label']}] done already: {result_path}")
            continue
        if rank == 0:
            _say(f"\n[{st['label']}] {st['title']}  (config {st['config']})")
        t0 = time.time()
        try:
            cfg = load_config(st["config"])
            res = train(cfg)
        except FloatingPointError as e:  # a diverged run is a result, not a crash
            if world > 1 or not plan.get("continue_on_error"):
                raise
            failures += 1
            if rank == 0:
                _say(f"[{st['label']}] diverged: {e}")
                result_path.parent.mkdir(parents=True, exist_ok=True)
                result_path.write_text(json.dumps({"name": st["name"], "diverged": str(e),
                                                   "wall_s": time.time() - t0, **st.get("meta", {})}))
            continue
        except Exception as e:  # noqa: BLE001
            if world > 1 or not plan.get("continue_on_error"):
                raise
            failures += 1
            if rank == 0:
                import traceback

                traceback.print_exc()
                _say(f"[{st['label']}] FAILED: {type(e).__name__}: {e}")
            continue
        wall = time.time() - t0
        if res.get("stopped_by") is not None:  # SIGTERM/SIGUSR1: the trainer saved; stop here
            if rank == 0:
                _say(f"[{st['label']}] stopped by signal {res['stopped_by']}; later stages not run")
            return 3
        barrier()
        if rank == 0:
            out = {"name": st["name"], "eval": res["eval"], "steps": res["step"], "wall_s": wall,
                   "world_size": world, "config": st["config"], **summarise_history(res["history"]),
                   "history": [{k: h.get(k) for k in ("step", "loss/total", "loss/ce", "loss/kl", "agreement/top1",
                                                        "tail/teacher_mass_aT_mean", "perf/tokens_per_s")}
                               for h in res["history"]],
                   **st.get("meta", {})}
            final = st.get("finalize_teacher")
            if final:  # move the teacher into its cache slot atomically
                run_dir = Path(cfg.output_dir)
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                dest = Path(final)
                out["student_params"] = count_params(run_dir / "hf_student")
                out["config"] = str(dest / "config.yaml")
                (run_dir / "teacher.json").write_text(json.dumps(out, indent=1))
                if (dest / "teacher.json").exists():  # another run cached the same teacher first
                    shutil.rmtree(run_dir)
                else:
                    shutil.rmtree(dest, ignore_errors=True)
                    run_dir.rename(dest)
            else:
                out["student_params"] = count_params(Path(cfg.output_dir) / "hf_student", cfg.models.student.config)
                if st.get("drop_checkpoints", True):  # the HF export is what is kept
                    shutil.rmtree(Path(cfg.output_dir) / "checkpoints", ignore_errors=True)
            result_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = result_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(out, indent=1))
            tmp.replace(result_path)
            e = res["eval"] or {}
            _say(f"[{st['label']}] finished in {_fmt_s(wall)}: held-out NLL {e.get('student_nll', float('nan')):.4f}"
                 f", top-1 agreement {e.get('top1_agreement', float('nan')):.3f}, "
                 f"{out['tokens_per_s']:,.0f} tokens/s")
        del res
        gc.collect()
        barrier()
    if failures and rank == 0:
        _say(f"{failures} stage(s) failed or diverged")
    return 0


def count_params(hf_dir: str | os.PathLike, model_config: dict | None = None) -> int | None:
    """Parameters of an exported HF model, from its safetensors headers (nothing is loaded), or
    of an HF config dict (built on the meta device) when there is no export."""
    from safetensors import safe_open

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        if model_config is None:
            return None
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        c = dict(model_config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c))
        return sum(p.numel() for p in model.parameters())
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return n


def launch_worker(plan: dict, plan_path: Path, *, nproc: int, log_path: Path | None = None,
                  threads: int | None = None) -> int:
    """Run the worker as 1 plain process or `nproc` torchrun ranks; its output streams through
    (and is also appended to log_path when given). Returns its exit status."""
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(plan, indent=1))
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    elif "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    if (REPO / "tailkd_dist").is_dir():  # run from a checkout without installing
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "tailkd_dist.demo", "--worker", str(plan_path)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "tailkd_dist.demo", "--worker", str(plan_path)]
    if log_path is None:
        return subprocess.call(cmd, env=env)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        return proc.wait()


OUT_MARKER = "tailkd_demo.json"
"""Written into the demo's (and the reproduction study's) --out: only such a directory has its
run subdirectories replaced by a later invocation."""


def claim_out_dir(out: Path, *, prog: str) -> None:
    """ValueError unless ``out`` is absent, empty or an earlier output of the demo or the study
    (its marker; one made before the marker existed is recognised by its plan.json and runs/);
    then mark it."""
    from tailkd_dist.staging import check_replaceable

    legacy = (out / "plan.json").is_file() and (out / "runs").is_dir() and not (out / OUT_MARKER).exists()
    if not legacy:
        check_replaceable(out, overwrite=True, marker=OUT_MARKER, producer="tailkd-demo or tools/reproduce.py",
                          option="--out")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / OUT_MARKER).exists():
        (out / OUT_MARKER).write_text(json.dumps({"producer": prog}) + "\n")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


# --------------------------------------------------------------------------- the teacher


def teacher_stage(*, cache_dir: Path, data: Path, data_key: str, nproc: int, engine: str, eval_rows: int,
                  overrides: dict, retrain: bool = False) -> tuple[dict | None, Path, Path]:
    """(stage to run or None when cached, cached teacher dir, resolved config path)."""
    raw = build_config(CONFIG_DIR / "demo_teacher.yaml", out_dir=Path("/nonexistent"), data=data, nproc=nproc,
                       engine=engine, eval_rows=eval_rows, overrides=overrides)
    key = teacher_key(raw, data_key, nproc)
    slot = cache_dir / "teachers" / f"teacher-{key}"
    if retrain and slot.exists():
        shutil.rmtree(slot)
    if (slot / "teacher.json").exists() and (slot / "hf_student" / "config.json").exists():
        return None, slot, slot / "config.yaml"
    from tailkd_dist.staging import owned_tempdir

    # Named by host and pid: a killed demo's half-trained teacher is removed by the next run.
    (cache_dir / "teachers").mkdir(parents=True, exist_ok=True)
    work = owned_tempdir(f".teacher-{key}.partial-", dir=cache_dir / "teachers")
    raw["output_dir"] = str(work)
    cfg_path = write_config(raw, cache_dir / "teachers" / f"teacher-{key}.yaml")
    stage = {"name": "teacher", "label": "teacher", "config": str(cfg_path),
             "title": f"training the teacher from scratch (CE only, {raw['optim']['max_steps']} steps); "
                      f"cached as {slot}",
             "result": str(cache_dir / "teachers" / f"teacher-{key}.result.json"), "finalize_teacher": str(slot),
             "meta": {"kind": "teacher", "key": key}}
    Path(stage["result"]).unlink(missing_ok=True)
    return stage, slot, cfg_path


def teacher_record(slot: Path) -> dict:
    rec = json.loads((slot / "teacher.json").read_text())
    rec["cached_dir"] = str(slot)
    return rec


def student_stage(name: str, *, out: Path, data: Path, teacher_dir: Path, nproc: int, engine: str,
                  eval_rows: int, overrides: dict, label: str, title: str, meta: dict | None = None) -> dict:
    run_dir = out / "runs" / name
    raw = build_config(CONFIG_DIR / "demo_student.yaml", out_dir=run_dir, data=data, nproc=nproc, engine=engine,
                       eval_rows=eval_rows, overrides=overrides, teacher_path=teacher_dir / "hf_student")
    if "eval.every_steps" not in overrides:  # 2 held-out points during training + the final one
        raw["eval"]["every_steps"] = max(1, raw["optim"]["max_steps"] // 3 + 1)
    cfg_path = write_config(raw, out / "configs" / f"{name}.yaml")
    return {"name": name, "label": label, "title": title, "config": str(cfg_path),
            "result": str(run_dir / "result.json"),
            "meta": {"kind": "student", "divergence": raw["loss"]["divergence"], "k": raw["loss"]["k"],
                     "beta": raw["loss"]["beta"], "seed": raw["seed"], "run_dir": str(run_dir), **(meta or {})}}


# --------------------------------------------------------------------------- report


def read_tb_scalars(tb_dir: Path, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags if t in have}


def table_rows(teacher: dict, students: list[dict]) -> list[dict]:
    """One row per model: held-out NLL, perplexity, top-1 agreement, Full-ECE, tokens/s."""
    rows = []
    te = teacher.get("eval") or {}
    t_nll = next((s["eval"]["teacher_nll"] for s in students if s.get("eval")), te.get("student_nll"))
    rows.append({"model": LABELS["teacher"], "params": teacher.get("student_params"), "nll": t_nll,
                 "ppl": math.exp(min(t_nll, 50.0)) if t_nll is not None else None, "top1": None,
                 "ece": te.get("full_ece"), "tps": teacher.get("tokens_per_s"), "steps": teacher.get("steps")})
    for s in students:
        e = s.get("eval") or {}
        rows.append({"model": LABELS[s["divergence"]].format(k=s["k"], beta=s["beta"]),
                     "params": s.get("student_params"), "nll": e.get("student_nll"), "ppl": e.get("student_ppl"),
                     "top1": e.get("top1_agreement"), "ece": e.get("full_ece"), "tps": s.get("tokens_per_s"),
                     "steps": s.get("steps")})
    return rows


def format_table(rows: list[dict], *, markdown: bool = False) -> str:
    head = ["model", "params", "steps", "held-out NLL", "perplexity", "top-1 agree", "Full-ECE %", "train tok/s"]

    def cells(r):
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        return [r["model"], f(r["params"] and r["params"] / 1e6, ".2f") + ("M" if r["params"] else ""),
                f(r["steps"], "d"), f(r["nll"], ".4f"), f(r["ppl"], ".2f"), f(r["top1"], ".4f"),
                f(r["ece"] and 100 * r["ece"], ".3f"), f(r["tps"], ",.0f")]

    body = [cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    fmt = lambda cs: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in body])


def plot_curves(students: list[dict], teacher: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    t_nll = next((s["eval"]["teacher_nll"] for s in students if s.get("eval")), None)
    for s in students:
        lab = LABELS[s["divergence"]].format(k=s["k"], beta=s["beta"])
        h = [x for x in s.get("history", []) if x.get("loss/ce") is not None]
        if h:
            xs = [x["step"] for x in h]
            ys, ema = [], None
            for x in h:
                ema = x["loss/ce"] if ema is None else 0.9 * ema + 0.1 * x["loss/ce"]
                ys.append(ema)
            axes[0].plot(xs, ys, label=lab)
        tb = read_tb_scalars(Path(s["run_dir"]) / "tb", ["eval/student_nll", "eval/top1_agreement", "eval/full_ece"])
        if "eval/student_nll" in tb:
            axes[1].plot(*zip(*tb["eval/student_nll"]), marker="o", label=lab)
        if "eval/top1_agreement" in tb:
            axes[2].plot(*zip(*tb["eval/top1_agreement"]), marker="o", label=lab)
        if "eval/full_ece" in tb:
            axes[3].plot([x for x, _ in tb["eval/full_ece"]], [100 * y for _, y in tb["eval/full_ece"]],
                         marker="o", label=lab)
    if t_nll is not None:
        axes[1].axhline(t_nll, color="k", ls="--", lw=1, label="teacher")
    axes[0].set(title="training CE (EMA 0.9)", xlabel="step", ylabel="nats/token")
    axes[1].set(title="held-out NLL", xlabel="step", ylabel="nats/token")
    axes[2].set(title="held-out top-1 agreement with the teacher", xlabel="step")
    axes[3].set(title="held-out Full-ECE (%)", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="tailkd-demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tailkd-demo-out", help="output directory (default: ./tailkd-demo-out)")
    ap.add_argument("--cache-dir", default=None,
                    help=f"prepared data and trained teachers (default: {default_cache_dir()})")
    ap.add_argument("--nproc", type=whole_number(), default=None,
                    help="ranks (torchrun subprocesses); default 2 when the machine has 2+ cores, else 1")
    ap.add_argument("--engine", choices=["deepspeed", "fsdp2"], default="deepspeed", help="sharding engine")
    ap.add_argument("--tiny", action="store_true", help="CI size (configs/demo_tiny.yaml): a minute or two")
    ap.add_argument("--overlay", default=None, help="another size overlay in demo_tiny.yaml's layout")
    ap.add_argument("--teacher-steps", type=whole_number(), help="teacher training steps (default: demo_teacher.yaml)")
    ap.add_argument("--student-steps", type=whole_number(), help="student steps, TAD and KL alike (default: demo_student.yaml)")
    ap.add_argument("--seed", type=whole_number(0), default=1234, help="students' seed (initial weights and batch order)")
    ap.add_argument("--teacher-set", action="append", metavar="KEY=VALUE",
                    help="override a key of the teacher's config (repeatable), e.g. optim.lr=1e-3")
    ap.add_argument("--student-set", action="append", metavar="KEY=VALUE",
                    help="override a key of both students' configs (repeatable)")
    ap.add_argument("--retrain-teacher", action="store_true", help="ignore a cached teacher")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(args.worker)
    t_start = time.time()
    try:
        return _main(args, t_start)
    except ValueError as e:
        say_error("tailkd-demo", e)
        return 2


def _main(args, t_start: float) -> int:
    if not (CONFIG_DIR / "demo_teacher.yaml").exists():
        raise ValueError(f"{CONFIG_DIR} holds no demo configs: run tailkd-demo from a checkout of the repository "
                         "installed with `pip install -e .` (the README's install line)")
    nproc = default_nproc() if args.nproc is None else args.nproc
    out = Path(args.out).resolve()
    claim_out_dir(out, prog="tailkd-demo")  # before anything under it is replaced
    cache = Path(args.cache_dir).resolve() if args.cache_dir else default_cache_dir()
    overlay = load_overlay(args.overlay or (CONFIG_DIR / "demo_tiny.yaml" if args.tiny else None))
    prep = {**DEFAULT_PREPARE, **overlay.get("prepare", {})}
    eval_rows = int(overlay.get("eval_rows", DEFAULT_EVAL_ROWS))
    t_over = {**overlay.get("teacher", {}), **parse_sets(args.teacher_set)}
    s_over = {**overlay.get("student", {}), **parse_sets(args.student_set)}
    if args.teacher_steps is not None:
        t_over["optim.max_steps"] = args.teacher_steps
    if args.student_steps is not None:
        s_over["optim.max_steps"] = args.student_steps
    s_over.update({"seed": args.seed, "models.student.init_seed": args.seed})
    _say(f"tailkd-demo: {nproc} rank(s), engine {args.engine}, output {out}, cache {cache}")

    _say("\n[1/5 data] python-stdlib sources -> trained byte-level BPE -> MDS shards")
    data, data_key = prepare_data(cache, seq_len=prep["seq_len"], vocab=prep["vocab"], max_docs=prep["max_docs"],
                                  val_fraction=prep["val_fraction"])
    t_data = time.time() - t_start
    for name in ("tad", "kl"):  # every demo run starts fresh
        shutil.rmtree(out / "runs" / name, ignore_errors=True)
    t_stage, slot, _ = teacher_stage(cache_dir=cache, data=data, data_key=data_key, nproc=nproc, engine=args.engine,
                                     eval_rows=eval_rows, overrides=t_over, retrain=args.retrain_teacher)
    stages = []
    if t_stage is None:
        _say(f"\n[2/5 teacher] reusing the cached teacher {slot} (same settings and data)")
    else:
        t_stage["label"] = "2/5 teacher"
        stages.append(t_stage)
    stages.append(student_stage("tad", out=out, data=data, teacher_dir=slot, nproc=nproc, engine=args.engine,
                                eval_rows=eval_rows, overrides={**s_over, "loss.divergence": "tad", "loss.k": 10,
                                                                "loss.beta": 2.0},
                                label="3/5 TAD", title="distilling the student with TAD (k=10, beta=2)"))
    stages.append(student_stage("kl", out=out, data=data, teacher_dir=slot, nproc=nproc, engine=args.engine,
                                eval_rows=eval_rows, overrides={**s_over, "loss.divergence": "forward_kl"},
                                label="4/5 KL", title="the same student, same seed and batches, with forward KL"))
    rc = launch_worker({"stages": stages}, out / "plan.json", nproc=nproc)
    if rc != 0:
        say_error("tailkd-demo", f"the training worker failed (exit {rc}); see the messages above")
        return 1

    _say("\n[5/5 report]")
    teacher = teacher_record(slot)
    students = [json.loads(Path(s["result"]).read_text()) for s in stages if s["name"] in ("tad", "kl")]
    rows = table_rows(teacher, students)
    for r in rows:
        for k in ("nll", "ppl", "ece") + (("top1",) if r is not rows[0] else ()):
            if r[k] is None or not math.isfinite(r[k]):
                raise ValueError(f"non-finite {k} for {r['model']}")
    # The teacher's TensorBoard events next to the students', so one --logdir shows all runs.
    tb_teacher = out / "runs" / "teacher" / "tb"
    shutil.rmtree(tb_teacher, ignore_errors=True)
    if (slot / "tb").is_dir():
        shutil.copytree(slot / "tb", tb_teacher)
    png = plot_curves(students, teacher, out / "curves.png")
    wall = time.time() - t_start
    table = format_table(rows)
    note = ("teacher: " + ("trained in this run" if t_stage else f"cached ({slot.name})")
            + f", its tok/s is from its own CE-only training; students: {students[0]['steps']} steps each, "
            f"{nproc} rank(s), engine {args.engine}; held-out = {int(students[0]['eval']['tokens']):,} validation "
            "tokens of files never trained on")
    results = {"rows": rows, "teacher": {k: v for k, v in teacher.items() if k != "history"},
               "students": [{k: v for k, v in s.items() if k != "history"} for s in students],
               "wall_s": wall, "data_s": t_data, "nproc": nproc, "engine": args.engine, "data": str(data),
               "teacher_dir": str(slot), "teacher_cached": t_stage is None}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(format_table(rows, markdown=True) + "\n\n" + note + "\n")
    _say("\n" + table + "\n\n" + note)
    d = {r["model"]: r for r in rows}
    tad, kl = rows[1], rows[2]
    _say(f"\nTAD vs forward KL: held-out NLL {tad['nll'] - kl['nll']:+.4f}, top-1 agreement "
         f"{tad['top1'] - kl['top1']:+.4f}, Full-ECE {100 * (tad['ece'] - kl['ece']):+.3f} points "
         "(negative NLL/ECE and positive agreement = TAD better)")
    del d
    parts = [f"data {_fmt_s(t_data)}"] + ([f"teacher {_fmt_s(teacher['wall_s'])}"] if t_stage else ["teacher cached"])
    parts += [f"{s['name'].upper()} {_fmt_s(s['wall_s'])}" for s in students]
    _say("\nstage times:  " + ", ".join(parts))
    _say(f"curves:       {png}\nTensorBoard:  tensorboard --logdir {out / 'runs'}\n"
         f"table:        {out / 'results.md'} (and results.json)\n"
         f"students:     {out / 'runs' / 'tad' / 'hf_student'}, {out / 'runs' / 'kl' / 'hf_student'} (HF format)\n"
         f"teacher:      {slot / 'hf_student'}\nconfigs:      {out / 'configs'} (rerun a stage: tailkd-train "
         f"{out / 'configs' / 'tad.yaml'})\nwall time:    {_fmt_s(wall)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
