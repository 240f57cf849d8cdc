"""tailkd-train CONFIG.yaml [dotted.key=value ...] [--engine deepspeed|fsdp2]

Launched by ``deepspeed``, ``torchrun`` or ``srun`` (the topology reads whichever environment
it finds), or as one plain process. ``train()`` delegates: config -> topology -> preflight
(models, vocabularies, shards) -> engine adapter -> data -> resume -> the loop (step, log,
eval, checkpoint) -> export.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from tailkd_dist import checkpoint
from tailkd_dist.config import TrainConfig, check_k_fits, load_config, resolve_loss_group
from tailkd_dist.hidden import HiddenTerm
from tailkd_dist.metrics import TensorBoard, evaluate, step_scalars
from tailkd_dist.models import build_model, plan_vocab, resolve_dtype, tokenizer_dir
from tailkd_dist.parallel.topology import Topology, validate_degrees, DistEnv
from tailkd_dist.signals import StopSignals, fault_pause
from tailkd_dist.staging import write_atomic
from tailkd_dist.losses import group_chunk_size, rowpass
from tailkd_dist.losses.rowpass import row_path
from tailkd_dist.step import ROW_PASSES, train_step
from tailkd_dist.user_error import ArgumentParser, say_error

log = logging.getLogger("tailkd_dist")


def chunk_reason(cfg: TrainConfig, *, device: torch.device, vocab: int) -> str:
    """What the fused loss's chunk size is and where it comes from (the run says it at start)."""
    if cfg.loss.chunk_size:
        return f"{cfg.loss.chunk_size} positions (loss.chunk_size)"
    g = cfg.loss.loss_group_size
    rows = group_chunk_size(accelerator=device.type != "cpu", vocab=vocab, group_size=g)
    return (f"{rows} positions (loss.chunk_size 0 = auto: derived for {device.type} and the "
            f"vocabulary slice V/G = {-(-vocab // g)})")


def _append_record(cfg: TrainConfig, record: dict) -> None:
    with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def _report_eval(ev: dict, step: int, *, cfg: TrainConfig, tb, rank0: bool, record: bool = True) -> None:
    """An evaluation where users look: TensorBoard, the console, and its own metrics.jsonl
    record (``step`` and the ``eval/...`` values)."""
    tb.scalars({f"eval/{k}": v for k, v in ev.items()}, step)
    if rank0:
        print(f"eval at step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in ev.items()), flush=True)
        if record:
            _append_record(cfg, {"step": step, **{f"eval/{k}": v for k, v in ev.items()}})


def _drop_records_after(cfg: TrainConfig, step: int) -> None:
    """A resumed run re-runs the steps after its checkpoint: their records from the run that
    stopped go (rewritten whole, atomically), so metrics.jsonl holds each step once."""
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            later = json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError):  # a line cut by the crash: kept as it was
            later = False
        if not later:
            kept.append(line)
    if len(kept) != len(lines):
        write_atomic(path, "".join(x + "\n" for x in kept))
        log.info("metrics.jsonl: %d record(s) after step %d dropped (those steps run again)",
                 len(lines) - len(kept), step)


def build_topology(cfg: TrainConfig) -> Topology:
    env = DistEnv.from_environ()
    resolve_loss_group(cfg, env.world_size)
    validate_degrees(world_size=env.world_size, loss_group_size=cfg.loss.loss_group_size)
    if env.world_size == 1:
        return Topology.single()
    return Topology.build(loss_group_size=cfg.loss.loss_group_size, env=env,
                          timeout_s=cfg.engine.dist_timeout_s)


def make_adapter(cfg, topo, teacher, student, vocab, dtype):
    if cfg.engine.kind == "deepspeed":
        from tailkd_dist.engines.deepspeed_engine import DeepSpeedAdapter

        return DeepSpeedAdapter(cfg=cfg, topo=topo, teacher=teacher, student=student, vocab=vocab, dtype=dtype)
    from tailkd_dist.engines.fsdp2_engine import FSDP2Adapter

    return FSDP2Adapter(cfg=cfg, topo=topo, teacher=teacher, student=student, vocab=vocab, dtype=dtype)


def load_models(cfg: TrainConfig, topo, dtype: torch.dtype):
    """(teacher or None, student), each whole on every rank, or (``engine.sharded_load``, a
    directory) without a whole copy on every rank: DeepSpeed reads it straight into ZeRO-3
    partitions; FSDP2 has rank 0 read it while the other ranks build it on the meta device
    and receive their shards from rank 0 when the engine shards it."""
    t_zero3 = s_zero3 = None
    if cfg.engine.kind == "deepspeed":
        from tailkd_dist.engines.deepspeed_engine import zero3_load_configs

        t_zero3, s_zero3 = zero3_load_configs(cfg, world_size=topo.world_size, dtype=dtype)
    from tailkd_dist.engines.fsdp2_engine import loads_from_rank0

    models = {}
    for role, spec, zero3 in (("teacher", cfg.models.teacher, t_zero3), ("student", cfg.models.student, s_zero3)):
        if role == "teacher" and spec.cache is not None:
            models[role] = cached_teacher_model(spec.cache, remote=spec.cache_remote)  # its head; no body
            if topo.rank == 0:
                fetched = f", fetched into {spec.cache}" if spec.cache_remote else ""
                log.info("teacher: read from the cache %s%s (its final hidden states and lm_head; the teacher "
                         "itself is never built)", spec.cache_remote or spec.cache, fetched)
            continue
        if role == "teacher" and spec.path is None and spec.config is None:
            models[role] = None  # CE-only training
            continue
        if zero3 is None:
            from_rank0 = loads_from_rank0(cfg, topo.world_size, role)
            models[role] = build_model(spec, dtype=torch.float32, attention=cfg.models.attention,
                                       meta=from_rank0 and topo.rank != 0)
            if from_rank0 and topo.rank == 0:
                log.info("%s %s read by rank 0 only: the other %d ranks built it on the meta device and "
                         "receive their FSDP2 shards from rank 0", role, spec.path, topo.world_size - 1)
            continue
        model = models[role] = build_model(spec, dtype=dtype, attention=cfg.models.attention, zero3_config=zero3)
        mine = sum(p.ds_tensor.numel() for p in model.parameters())
        total = sum(p.ds_numel for p in model.parameters())
        if topo.rank == 0:
            log.info("%s %s loaded into ZeRO-3 partitions: %d of its %d parameters on this rank",
                     role, spec.path, mine, total)
    return models["teacher"], models["student"]


def cached_teacher_model(cache: str, *, remote: str | None = None):
    """The teacher of a cache as the engines take it: its config and lm_head, no body."""
    from transformers import AutoConfig

    from tailkd_dist.data.teacher_cache import load_head, read_cache_manifest
    from tailkd_dist.engines.teacher import CacheHeadModel

    section = read_cache_manifest(cache, remote=remote)["teacher_cache"]
    raw = dict(section["config"])
    weight, bias = load_head(cache, remote=remote, sha256=section.get("head_sha256"))
    return CacheHeadModel(config=AutoConfig.for_model(raw.pop("model_type"), **raw), weight=weight, bias=bias)


def make_loaders(cfg: TrainConfig, *, tok_dir, vocab: int):
    from tailkd_dist.data.dataset import LoaderConfig, check_local_shards, make_loader

    common = dict(local=cfg.data.path if cfg.data.remote is None else os.path.join(cfg.output_dir, "data_cache"),
                  remote=cfg.data.remote, teacher_cache=cfg.models.teacher.cache,
                  teacher_cache_remote=cfg.models.teacher.cache_remote,
                  batch_size=cfg.data.micro_batch_size,
                  num_workers=cfg.data.num_workers, tokenizer_dir=tok_dir, model_vocab_size=vocab)
    train = make_loader(LoaderConfig(split=cfg.data.train_split, shuffle=True, seed=cfg.data.shuffle_seed,
                                     drop_last=True, **common))
    evals = None
    if cfg.data.eval_split in train.dataset.manifest["splits"]:
        # Every split the run reads is checked now (hashes, like the train split's), not when
        # the first evaluation comes, possibly hours later; later evaluations check sizes only.
        check_local_shards(Path(common["local"], cfg.data.eval_split), remote=cfg.data.remote, mode="hash",
                           algo=LoaderConfig.validate_hash)
        evals = LoaderConfig(split=cfg.data.eval_split, shuffle=False, drop_last=False, local_check="size", **common)
    return train, evals


def _eval_batches(eval_cfg, n: int):
    from tailkd_dist.data.dataset import make_loader

    loader = make_loader(eval_cfg)
    out = []
    for b in loader:
        out.append(b)
        if len(out) >= n:
            break
    return out


def preflight(cfg: TrainConfig) -> None:
    """The cheap checks of tools/preflight.py before anything heavy (every rank runs them, so
    every rank fails alike): the devices the job asks for, layout, vocabularies and tokenizers
    from the configs, the shards' manifest, and the per-rank memory estimate."""
    from tailkd_dist.parallel.topology import DistEnv as _Env
    from tailkd_dist.preflight import device_problems, run_preflight

    problems = device_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    checkpoint.check_output_dir(cfg)
    if cfg.checkpoint.export_hf_at_end:
        from tailkd_dist.export import EXPORT_MARKER, check_export_target

        target = os.path.join(cfg.output_dir, "hf_student")
        try:
            check_export_target(target, run_dir=None)
        except ValueError:
            raise ValueError(f"{target} (where the end-of-run export goes) is not an earlier export (no "
                             f"{EXPORT_MARKER}): move it away, or set checkpoint.export_hf_at_end=false") from None
    env = _Env.from_environ()
    report = run_preflight(cfg, world_size=env.world_size, local_world_size=env.local_world_size)
    if not report.ok:  # the problem alone: a warning beside it (an estimate it made moot) is noise
        raise ValueError("preflight: " + "; ".join(report.problems))
    for w in report.warnings:
        log.warning("preflight: %s", w)


def find_resume(cfg: TrainConfig, topo) -> tuple[str | None, dict | None]:
    """(tag, trainer state) of the checkpoint to resume, or (None, None) for a fresh run;
    refuses one written by another configuration or world size. Every rank reads the same
    files, so every rank decides alike."""
    ckpt_root = checkpoint.root(cfg.output_dir)
    if topo.rank == 0:
        checkpoint.recover(ckpt_root)
    _barrier(topo)
    tag = state = None
    if cfg.checkpoint.resume:
        tag, note = checkpoint.resolve_latest(ckpt_root)
        if note and topo.rank == 0:
            log.warning("%s", note)
    if tag is not None:
        path = os.path.join(ckpt_root, tag)
        state = checkpoint.read_json(os.path.join(path, "trainer_state.json"))
        checkpoint.check_resume(cfg, ckpt_path=path, state=state, world_size=topo.world_size)
    return tag, state


def _barrier(topo) -> None:
    if topo.world_size > 1:
        torch.distributed.barrier(group=topo.group("world"))


def _logged(step: int, cfg) -> bool:
    """Is step (counted from 1) logged? Only those steps pay for the loss's statistics."""
    return step % cfg.logging.every_steps == 0 or step == cfg.optim.max_steps


def train(cfg: TrainConfig) -> dict:
    """One training run. SIGTERM / SIGUSR1 / SIGINT inside the step loop: finish the step,
    save, stop with one line; anywhere else, or a second one: the process ends at once."""
    with StopSignals() as stop:
        return _train(cfg, stop)


def _train(cfg: TrainConfig, stop: StopSignals) -> dict:
    fault_pause("startup")
    preflight(cfg)
    topo = build_topology(cfg)
    from tailkd_dist.parallel import liveness

    liveness.start(topo, timeout_s=cfg.engine.dist_timeout_s)  # before engines make their groups
    rank0 = topo.rank == 0
    tag, resumed = find_resume(cfg, topo)
    torch.manual_seed(cfg.seed)
    dtype = resolve_dtype(cfg.models.dtype)
    # Preflight: everything cheap that can be wrong, before any engine is built.
    teacher, student = load_models(cfg, topo, dtype)
    shapes = checkpoint.model_shapes(teacher=teacher, student=student)
    if resumed is not None:
        checkpoint.check_model_shapes(resumed, shapes, tag=tag)
    _barrier(topo)  # every rank has read the run directory before rank 0 writes to it
    if rank0:
        checkpoint.start_run_dir(cfg, fresh=tag is None)
    has_teacher = teacher is not None
    plan = plan_vocab(teacher if has_teacher else student, student,
                      teacher_spec=cfg.models.teacher if has_teacher else cfg.models.student,
                      student_spec=cfg.models.student)
    tok = tokenizer_dir(cfg.models.student) or tokenizer_dir(cfg.models.teacher)
    check_k_fits(cfg, plan.vocab)
    train_loader, eval_cfg = make_loaders(cfg, tok_dir=tok, vocab=plan.vocab)

    # The hidden-state term's hooks go on the blocks before an engine wraps them.
    hidden = HiddenTerm.build(cfg=cfg, teacher=teacher, student=student, device=topo.device)
    adapter = make_adapter(cfg, topo, teacher, student, plan.vocab, dtype)
    del teacher, student
    path, compile_said = row_path(adapter.device, ROW_PASSES[cfg.loss.row_passes]), 0
    if rank0:
        log.info("loss row passes: %s", path.reason)
        log.info("loss chunks: %s", chunk_reason(cfg, device=adapter.device, vocab=plan.vocab))
    start_step, tokens_seen, run_id = 0, 0, checkpoint.new_run_id()
    if tag is not None:
        state = checkpoint.load(adapter, cfg, tag, hidden=hidden)
        start_step, tokens_seen = state["step"], state["tokens"]
        if rank0:
            _drop_records_after(cfg, start_step)
        run_id = state.get("run_id") or run_id  # a checkpoint of an older version: adopted
        train_loader.load_state_dict(state["loader"])
        if rank0:
            log.info("resumed from %s (step %d)", tag, start_step)
    tb = TensorBoard(os.path.join(cfg.output_dir, "tb") if rank0 and cfg.logging.tensorboard else None)
    bar = None
    if rank0 and cfg.logging.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=cfg.optim.max_steps, initial=start_step, desc="distil", unit="step", file=sys.stderr)

    def save(step):
        trainer_state = {
            "step": step, "tokens": tokens_seen, "loader": train_loader.state_dict(),
            "loss_group_size": topo.loss_size, "world_size": topo.world_size,
            "body_prefix": adapter.body_prefix, "tokenizer_dir": tok, "vocab_note": plan.note,
            "run_id": run_id, "model_shapes": shapes,
        }
        return checkpoint.save(adapter, cfg, step=step, trainer_state=trainer_state, hidden=hidden)

    history = []
    it = iter(train_loader)
    step = start_step
    last_eval, eval_step = None, None
    stopped_by = None
    fresh_epoch = False
    with stop.step_loop():
        while step < cfg.optim.max_steps:
            t0 = time.perf_counter()
            micro = []
            while len(micro) < cfg.optim.grad_accum:
                try:
                    micro.append(next(it))
                    fresh_epoch = False
                except StopIteration:  # a new epoch (streaming's order is deterministic per epoch)
                    if fresh_epoch:  # a whole epoch gave nothing: another would spin forever
                        raise ValueError(f"an epoch of data split {cfg.data.train_split!r} gives this rank no micro-batch "
                                         f"of data.micro_batch_size = {cfg.data.micro_batch_size} rows: lower "
                                         "data.micro_batch_size, or use fewer ranks or more data")
                    it = iter(train_loader)
                    fresh_epoch = True
            fault_pause("loop")
            res = train_step(adapter, micro, step=step, cfg=cfg, stats=_logged(step + 1, cfg), hidden=hidden)
            step += 1
            if rank0 and path.compiled and compile_said < rowpass.COMPILE_STATS["graphs"]:
                # Compilation happens on first use (the first step; a logged or an eval step
                # may add a graph): said when it happens, with what it cost.
                compile_said = rowpass.COMPILE_STATS["graphs"]
                log.info("loss row passes: %d graph(s) compiled so far, %.1f s in all (at step %d)",
                         compile_said, rowpass.COMPILE_STATS["seconds"], step)
            liveness.progress(step)
            tokens_seen += res.tokens
            dt = time.perf_counter() - t0
            scalars = step_scalars(res, cfg)
            scalars.update({"perf/tokens_per_s": res.tokens / dt, "perf/step_s": dt,
                            **{f"time/{k}_s": v for k, v in res.times.items()}})
            if torch.cuda.is_available():
                scalars["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            else:
                import resource

                scalars["perf/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            history.append({"step": step, **scalars})
            if rank0:  # machine-readable per-step record
                _append_record(cfg, {"step": step, **scalars})
            if _logged(step, cfg):
                tb.scalars(scalars, step)
                if rank0:
                    msg = (f"step {step}/{cfg.optim.max_steps} loss {scalars['loss/total']:.4f} ce {scalars['loss/ce']:.4f} "
                           f"{cfg.loss.divergence} {scalars[f'loss/{cfg.loss.divergence}']:.4f} aT {scalars['tail/teacher_mass_aT_mean']:.3f} "
                           f"gnorm {res.grad_norm:.3f} lr {res.lr:.2e} tok/s {scalars['perf/tokens_per_s']:.0f}")
                    (bar.write(msg) if bar else print(msg, flush=True))
            if bar:
                bar.update(1)
            if eval_cfg is not None and cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                last_eval, eval_step = evaluate(adapter, _eval_batches(eval_cfg, cfg.eval.max_batches), cfg), step
                _report_eval(last_eval, step, cfg=cfg, tb=tb, rank0=rank0)
            if stop.requested(topo):
                stopped_by = stop.signal or "peer"
                where = os.path.join(checkpoint.root(cfg.output_dir), save(step))
                if rank0:
                    sys.stderr.write(f"tailkd-train: stopped by {stop.name} after step {step}: checkpoint saved "
                                     f"in {where}; run the same command again to resume\n")
                    sys.stderr.flush()
                break
            if step % cfg.checkpoint.every_steps == 0 and step < cfg.optim.max_steps:
                save(step)
    if bar:
        bar.close()
    if stopped_by is None:
        if step > start_step or tag is None:  # a finished run started again has nothing new to save
            save(step)
        if eval_cfg is not None and eval_step != step:  # not already evaluated at this step
            fault_pause("eval")
            last_eval = evaluate(adapter, _eval_batches(eval_cfg, cfg.eval.max_batches), cfg)
            # A finished run started again evaluates (and says) once more, but its record is there.
            _report_eval(last_eval, step, cfg=cfg, tb=tb, rank0=rank0, record=step > start_step)
        if cfg.checkpoint.export_hf_at_end:
            from tailkd_dist.export import export_live

            fault_pause("export")
            export_live(adapter, os.path.join(cfg.output_dir, "hf_student"), tokenizer_dir=tok)
    tb.close()
    return {"history": history, "eval": last_eval, "step": step, "stopped_by": stopped_by, "adapter": adapter}


def main(argv=None) -> int:
    ap = ArgumentParser(prog="tailkd-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config (see configs/ and README)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. loss.beta=5")
    ap.add_argument("--engine", choices=["deepspeed", "fsdp2"], help="override engine.kind")
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = ap.parse_intermixed_args(argv)  # overrides before or after the options
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed 0.19 still calls torch's pre-2.13 collective names, which warn on every call.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*is deprecated.*")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = list(args.overrides) + ([f"engine.kind={args.engine}"] if args.engine else [])
    try:
        cfg = load_config(args.config, overrides)
        train(cfg)
    except (ValueError, FloatingPointError, OSError) as e:  # OSError: disk full, permissions
        from tailkd_dist.staging import describe_write_error

        say_error("tailkd-train", describe_write_error(e) if isinstance(e, OSError) else e)
        return 2
    except RuntimeError as e:  # a failed collective: name the rank(s) it was waiting for
        from tailkd_dist.parallel import liveness

        if liveness.report(e):
            return 1  # the line names the rank(s); a traceback through the collective adds nothing
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
