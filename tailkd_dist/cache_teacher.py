"""tailkd-cache-teacher CONFIG.yaml [dotted.key=value ...] [--engine deepspeed|fsdp2]

Run the teacher once over the token shards of ``data.path`` and write a teacher cache to
``models.teacher.cache``: every row of every split with, per position, the teacher's final
hidden state (the input of its lm_head, in the dtype the online teacher hands the loss), and
its lm_head once (data/teacher_cache.py has the format, docs/teacher-cache.md the why). The same
config then trains from the cache: the teacher body is never built again.

Launched like training (one process, ``torchrun``, the ``deepspeed`` launcher, the sbatch
scripts with ``COMMAND=cache-teacher``): the teacher runs in the engine of ``engine.kind``, sharded over every rank (ZeRO-3
inference or FSDP2), each rank computing its own pieces of rows. The work is cut into pieces of
``--piece-rows`` rows, each written whole or not at all, so a killed run started again goes on
from the pieces it had finished and ends with the same bytes as an uninterrupted one; a stop
signal (SIGTERM, SIGUSR1, Ctrl-C) ends it after the current round of pieces, exit 0, as training
ends after the current step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tailkd_dist import __version__
from tailkd_dist.signals import StopSignals
from tailkd_dist.staging import write_atomic
from tailkd_dist.user_error import ArgumentParser, say_error, whole_number

PROG = "tailkd-cache-teacher"
MARKER = ".tailkd-cache-teacher.json"
"""In the cache directory from its first piece on: this command's output, and what from."""
SHARD_HASH = "xxh64"
log = logging.getLogger("tailkd_dist")


def _provenance(cfg, *, dtype: str, piece_rows: int) -> dict:
    from tailkd_dist.data.teacher_cache import file_sha256, teacher_identity

    return {"tokens_manifest_sha256": file_sha256(Path(cfg.data.path) / "manifest.json"),
            "tokens_path": str(Path(cfg.data.path).resolve()), "teacher": teacher_identity(cfg.models.teacher),
            "dtype": dtype, "piece_rows": piece_rows}


def _same_source(a: dict, b: dict) -> bool:
    keys = ("tokens_manifest_sha256", "dtype", "piece_rows")
    return all(a.get(k) == b.get(k) for k in keys) and all(
        a["teacher"].get(k) == b["teacher"].get(k) for k in ("config_sha256", "weights_fingerprint"))


def check_output(out: Path, provenance: dict) -> bool:
    """True if ``out`` is already a complete cache of this source; False if it may be (re)filled
    (absent, empty, or this command's unfinished cache of this source); else ValueError: nothing
    this command did not write is ever touched."""
    from tailkd_dist.data.teacher_cache import read_cache_manifest
    from tailkd_dist.staging import read_json

    key = f"config key 'models.teacher.cache' = {str(out)!r}"
    if out.exists() and not out.is_dir():
        raise ValueError(f"{key} is a file: name a directory for the cache")
    if (out / "manifest.json").exists():
        section = read_cache_manifest(out)["teacher_cache"]
        if not _same_source(section, provenance):
            raise ValueError(f"{key} is a complete cache of another source (teacher {section['teacher']['source']}, "
                             f"tokens {section.get('tokens_path')}, {section['dtype']}, pieces of "
                             f"{section.get('piece_rows')} rows): choose another directory, or remove it")
        return True
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ValueError(f"{key} is a directory this command did not write (no {MARKER}): choose another "
                             "directory; nothing in it was changed")
        mine = read_json(out / MARKER, fix=f"remove {out} and write the cache again")
        if not _same_source(mine, provenance):
            raise ValueError(f"{key} holds an unfinished cache of another source (teacher {mine['teacher']['source']}, "
                             f"tokens {mine.get('tokens_path')}, {mine.get('dtype')}, pieces of "
                             f"{mine.get('piece_rows')} rows): finish it with that config, or remove it")
    return False


def _load_teacher(cfg, topo, dtype: torch.dtype):
    """(callable batch -> final hidden states, the teacher model): the body in the engine of
    ``engine.kind``, sharded over every rank, as training holds it."""
    from tailkd_dist.engines.teacher import body_kwargs, final_hidden
    from tailkd_dist.models import body_of, build_model, hidden_scale

    spec, W = cfg.models.teacher, topo.world_size
    if cfg.engine.kind == "deepspeed":
        from tailkd_dist.engines.deepspeed_engine import ensure_torch_distributed, frozen_body_engine
        from tailkd_dist.engines.ds_config import teacher_ds_config
        from tailkd_dist.models import is_partitioned

        t_cfg = teacher_ds_config(cfg, world_size=W, dtype=dtype)
        zero3 = t_cfg if spec.path is not None and cfg.engine.sharded_load else None
        if zero3 is not None:
            ensure_torch_distributed()
        teacher = build_model(spec, dtype=dtype if zero3 else torch.float32, attention=cfg.models.attention,
                              zero3_config=zero3)
        body = body_of(teacher)
        body.requires_grad_(False)
        if not is_partitioned(body):
            body.to(dtype)
        ensure_torch_distributed()
        module = frozen_body_engine(body, t_cfg)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        from tailkd_dist.engines.fsdp2_engine import _ensure_process_group, loads_from_rank0, shard_frozen_body

        from_rank0 = loads_from_rank0(cfg, W, "teacher")
        teacher = build_model(spec, dtype=torch.float32, attention=cfg.models.attention,
                              meta=from_rank0 and topo.rank != 0)
        if topo.mesh is None:
            _ensure_process_group()
            mesh = init_device_mesh(topo.device.type, (1,))
        else:
            mesh = topo.mesh["loss"]  # the loss group is every rank (write_cache sets it)
        module = body_of(teacher)
        shard_frozen_body(module, mesh=mesh, compute=dtype, device=topo.device, from_rank0=from_rank0)
    scale = hidden_scale(teacher.config, role="teacher")

    @torch.no_grad()
    def hidden(batch: dict) -> torch.Tensor:
        return final_hidden(module(**body_kwargs(batch)), scale)

    return hidden, teacher


def _batch(rows: list[dict], device) -> dict:
    from tailkd_dist.data.dataset import _sample

    samples = [_sample(r["tokens"], r["doc_ids"]) for r in rows]
    return {k: torch.stack([s[k] for s in samples]).to(device) for k in ("input_ids", "position_ids")}


def write_cache(cfg, *, piece_rows: int, progress: bool = True, stop: StopSignals | None = None) -> dict:
    """Write (or finish) the cache; returns the summary (rank 0: what it printed). With ``stop``,
    a stop signal during the pieces ends the run after the current round of pieces, every rank
    at the same round (``{"stopped_by": ...}``): a rerun goes on from there."""
    from tailkd_dist.data.dataset import read_manifest
    from tailkd_dist.models import full_shape, lm_head_of

    topo, dtype, dtype_name = _start(cfg, piece_rows=piece_rows)
    out, data = Path(cfg.models.teacher.cache), Path(cfg.data.path)
    provenance = _provenance(cfg, dtype=dtype_name, piece_rows=piece_rows)
    manifest = read_manifest(local=str(data))
    done = check_output(out, provenance)  # every rank, before anything is created
    if topo.world_size > 1:
        dist.barrier()
    if done:
        if topo.rank == 0:
            print(f"{PROG}: {out} is already a complete cache of this teacher and these shards: nothing to do")
        return {"complete": True}
    if topo.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / MARKER).exists():
            write_atomic(out / MARKER, json.dumps({**provenance, "created_by": f"tailkd_dist {__version__}"},
                                                  indent=2) + "\n")
    if topo.world_size > 1:
        dist.barrier()
    hidden, teacher = _load_teacher(cfg, topo, dtype)
    d = full_shape(lm_head_of(teacher).weight)[1]
    plan = _Plan.of(manifest, data, piece_rows=piece_rows, d=d, dtype_name=dtype_name)
    t0 = time.time()
    with stop.step_loop() if stop is not None else contextlib.nullcontext():
        tokens_done, stopped = _compute_pieces(plan, hidden, out=out, topo=topo, micro_batch=cfg.data.micro_batch_size,
                                               stop=stop, progress=progress)
    if stopped:
        if topo.rank == 0:
            sys.stderr.write(f"{PROG}: stopped by {stop.name} with {plan.pieces_in(out)} of {len(plan.tasks)} pieces "
                             f"written in {out}: run the same command again to finish the cache\n")
            sys.stderr.flush()
        return {"stopped_by": stop.signal or "peer"}
    elapsed = time.time() - t0
    # Every rank's pieces are on disk before rank 0 indexes them.
    counts = torch.tensor([tokens_done], device=topo.device, dtype=torch.float64)
    if topo.world_size > 1:
        dist.all_reduce(counts)
    head = _gather_head(teacher, rank=topo.rank)
    summary = {}
    if topo.rank == 0:
        _publish(out, plan, head=head, config=teacher.config.to_dict(), provenance=provenance)
        computed = int(counts.item())
        summary = plan.summary(out, computed=computed, elapsed=elapsed)
        print(f"{PROG}: wrote {out}: {summary['rows']} rows, {summary['tokens']} tokens, "
              f"{summary['bytes'] / 2**20:.1f} MiB, {summary['bytes_per_token']:.0f} bytes/token (d = {d}, "
              f"{dtype_name}); this run computed {computed} tokens at {summary['tokens_per_s']:.0f} tokens/s")
    if topo.world_size > 1:
        dist.barrier()
    return summary


def _start(cfg, *, piece_rows: int):
    """The command's own checks and the trainer's start checks (data, vocabulary, memory; the
    teacher online), before anything is created: (topology, compute dtype, its cache name)."""
    from tailkd_dist.data.teacher_cache import DTYPES, cache_dtype
    from tailkd_dist.models import teacher_compute_dtype
    from tailkd_dist.parallel import liveness
    from tailkd_dist.parallel.topology import DistEnv
    from tailkd_dist.preflight import device_problems, run_preflight
    from tailkd_dist.train import build_topology

    spec = cfg.models.teacher
    if spec.cache is None:
        raise ValueError("config key 'models.teacher.cache' names where the cache is written: set it (e.g. "
                         "models.teacher.cache=/data/cache/my-teacher)")
    if spec.path is None and spec.config is None:
        raise ValueError("config key 'models.teacher': give the teacher to cache ('path' or 'config') beside "
                         "'cache'")
    if piece_rows < 1:
        raise ValueError(f"--piece-rows {piece_rows} must be at least 1")
    if cfg.data.remote is not None:
        raise ValueError("data.remote: the cache is written from local token shards (data.path); copy them "
                         "here first")
    if spec.cache_remote is not None:
        raise ValueError(f"config key 'models.teacher.cache_remote' = {spec.cache_remote!r}: the cache is written "
                         "to models.teacher.cache, a local directory; copy it to the remote once it is complete "
                         "(aws s3 sync, gcloud storage rsync, ...), then train with cache_remote set")
    env = DistEnv.from_environ()
    # The teacher is sharded over every rank: FSDP2 shards over the loss group.
    cfg.loss.loss_group_size = env.world_size
    cfg.loss.hidden_weight = 0.0
    topo = build_topology(cfg)
    # As training: engine.dist_timeout_s bounds every collective (the engines' own groups too),
    # and a failed one is reported naming the rank it waited for (main's RuntimeError branch).
    liveness.start(topo, timeout_s=cfg.engine.dist_timeout_s)
    dtype = teacher_compute_dtype(cfg, topo.device.type)
    dtype_name = cache_dtype(dtype)
    if dtype_name not in DTYPES:
        raise ValueError(f"models.dtype gives the teacher {dtype_name} hidden states; a cache stores float32 or "
                         "bfloat16")
    problems = device_problems(cfg)
    problems += run_preflight(_teacher_only(cfg), world_size=topo.world_size,
                              local_world_size=env.local_world_size).problems
    if problems:
        raise ValueError("preflight: " + "; ".join(problems))
    return topo, dtype, dtype_name


@dataclass
class _Plan:
    """The work: every split's rows cut into pieces of ``piece_rows``, and the cache's columns."""

    readers: dict
    tasks: list
    piece_rows: int
    seq_len: int
    d: int
    dtype_name: str
    columns: dict

    @classmethod
    def of(cls, manifest: dict, data: Path, *, piece_rows: int, d: int, dtype_name: str) -> "_Plan":
        from tailkd_dist.data.teacher_cache import COLUMN, DTYPES, MDSRows

        seq_len = manifest["seq_len"]
        # The tokens too: the trainer checks each cache row against the token row it stands beside.
        columns = {"tokens": manifest.get("columns", {}).get("tokens", f"ndarray:int32:{seq_len + 1}"),
                   COLUMN: f"ndarray:{DTYPES[dtype_name][1]}:{seq_len * d}"}
        readers = {s: MDSRows(data, s) for s in sorted(manifest["splits"])}
        tasks = [(s, i) for s, r in readers.items() for i in range(math.ceil(len(r) / piece_rows))]
        return cls(readers, tasks, piece_rows, seq_len, d, dtype_name, columns)

    def n_pieces(self, split: str) -> int:
        return math.ceil(len(self.readers[split]) / self.piece_rows)

    def rows(self, split: str, i: int) -> list[dict]:
        r = self.readers[split]
        return [r[k] for k in range(i * self.piece_rows, min((i + 1) * self.piece_rows, len(r)))]

    def pieces_in(self, out: Path) -> int:
        return sum((out / s / f"{i:06d}").is_dir() for s, i in self.tasks)

    def summary(self, out: Path, *, computed: int, elapsed: float) -> dict:
        rows = sum(len(r) for r in self.readers.values())
        size = sum(p.stat().st_size for p in out.rglob("*.mds"))
        return {"rows": rows, "tokens": rows * self.seq_len, "bytes": size,
                "bytes_per_token": size / (rows * self.seq_len), "tokens_per_s": computed / max(elapsed, 1e-9),
                "d": self.d, "dtype": self.dtype_name}


def _compute_pieces(plan: _Plan, hidden, *, out: Path, topo, micro_batch: int, stop: StopSignals | None,
                    progress: bool) -> tuple[int, bool]:
    """Round j: rank r computes and writes piece j * W + r (unless an earlier run did). Returns
    (tokens this rank computed, whether the ranks agreed to stop)."""
    from tailkd_dist.data.streaming_compat import MDSWriter
    from tailkd_dist.signals import fault_pause

    rank, W = topo.rank, topo.world_size
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(plan.tasks), desc="cache", unit="piece", file=sys.stderr)
    first = plan.readers[plan.tasks[0][0]][0]
    filler = _batch([first] * micro_batch, topo.device)  # keeps a rank with no work in step
    tokens_done, stopped = 0, False
    for j in range(math.ceil(len(plan.tasks) / W)):
        task = plan.tasks[j * W + rank] if j * W + rank < len(plan.tasks) else None
        target = out / task[0] / f"{task[1]:06d}" if task is not None else None
        if target is not None and target.is_dir():
            task = None  # finished by an earlier run
        rows = plan.rows(*task) if task is not None else []
        batches = [rows[k:k + micro_batch] for k in range(0, len(rows), micro_batch)]
        # ZeRO-3 / FSDP gather the teacher's weights collectively: every rank runs as many
        # forwards as the busiest one (the others on a filler batch, discarded). The same
        # exchange carries the stop flag, so the ranks stop at the same round.
        flags = torch.tensor([len(batches), 0 if stop is None or stop.signal is None else 1], device=topo.device)
        if W > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        forwards, stopping = flags.tolist()  # one host sync per round
        if stopping:
            stopped = True
            break
        states = []
        for k in range(forwards):
            if k < len(batches):
                states.append(hidden(_batch(batches[k], topo.device)).to("cpu"))
            else:
                hidden(filler)
        if task is not None:
            _write_piece(target, rows=rows, states=torch.cat(states), columns=plan.columns,
                         dtype=plan.dtype_name, writer_cls=MDSWriter)
            tokens_done += len(rows) * plan.seq_len
            fault_pause("cache_piece")  # tests: stop or kill the writer with some pieces done
        if bar is not None:
            bar.update(min(W, len(plan.tasks) - j * W))
    if bar is not None:
        bar.close()
    return tokens_done, stopped


def _gather_head(teacher, *, rank: int) -> dict:
    """The teacher's lm_head (+ bias) on rank 0's CPU."""
    from tailkd_dist.models import lm_head_of
    from tailkd_dist.parallel.lm_head import gathered

    weight, bias = lm_head_of(teacher).weight, getattr(lm_head_of(teacher), "bias", None)
    head = {}
    with gathered(weight, bias):  # a head loaded into ZeRO-3 partitions: gathered once (all ranks)
        if rank == 0:  # (under FSDP2's sharded load only rank 0 holds the weights)
            head["weight"] = weight.detach().to("cpu").clone().contiguous()
            if bias is not None:
                head["bias"] = bias.detach().to("cpu").clone().contiguous()
    return head


def _publish(out: Path, plan: _Plan, *, head: dict, config: dict, provenance: dict) -> None:
    """Rank 0, every piece on disk: the splits' indexes, the head, and the manifest last (a cache
    without it is unfinished)."""
    from safetensors.torch import save_file

    from tailkd_dist.data.teacher_cache import HEAD_FILE, KIND, file_sha256, stable_config

    for split in plan.readers:
        _merge_pieces(out / split, n_pieces=plan.n_pieces(split))
    tmp = out / f"{HEAD_FILE}.tmp"
    save_file(head, str(tmp))
    tmp.replace(out / HEAD_FILE)
    # The head's hash: a reader of a remote copy fetches it only when its own copy differs.
    section = {"kind": KIND, "d": plan.d, "seq_len": plan.seq_len, "config": stable_config(config),
               "head_sha256": file_sha256(out / HEAD_FILE),
               "splits": {s: {"rows": len(r)} for s, r in plan.readers.items()}, "columns": plan.columns,
               "code_version": __version__, **provenance}
    write_atomic(out / "manifest.json", json.dumps({"teacher_cache": section}, indent=2) + "\n")


def _teacher_only(cfg):
    """The config the trainer's start checks see: the teacher as given, no cache read yet."""
    import copy

    c = copy.deepcopy(cfg)
    c.models.teacher.cache = None
    return c


def _write_piece(target: Path, *, rows: list[dict], states: torch.Tensor, columns: dict, dtype: str,
                 writer_cls) -> None:
    """One piece, whole or not at all: written beside its place, renamed into it when complete."""
    from tailkd_dist.data.teacher_cache import COLUMN, to_column

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a killed run's unfinished piece
    with writer_cls(out=str(partial), columns=columns, hashes=[SHARD_HASH], size_limit="64mb") as writer:
        for row, h in zip(rows, states):
            writer.write({"tokens": row["tokens"], COLUMN: to_column(h, dtype)})
    partial.rename(target)


def _merge_pieces(split_dir: Path, *, n_pieces: int) -> None:
    """streaming's index over the pieces, in order: rows keep the token shards' order."""
    from tailkd_dist.data.streaming_compat import streaming


    missing = [i for i in range(n_pieces) if not (split_dir / f"{i:06d}" / "index.json").is_file()]
    if missing:
        raise ValueError(f"{split_dir}: pieces {missing[:5]} are missing after every rank finished")
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # merge_index warns about its temporary folder
    try:
        pieces = [str(split_dir / f"{i:06d}" / "index.json") for i in range(n_pieces)]
        streaming.base.util.merge_index(pieces, str(split_dir))
    finally:
        logging.getLogger().setLevel(quiet)


def main(argv=None) -> int:
    from tailkd_dist.config import load_config

    ap = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the training config (YAML); models.teacher.cache names the cache")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. models.teacher.cache=/data/c")
    ap.add_argument("--engine", choices=["deepspeed", "fsdp2"], help="override engine.kind")
    ap.add_argument("--piece-rows", type=whole_number(), default=1024,
                    help="rows per piece, the unit of work and of resumption (default 1024)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = list(args.overrides) + ([f"engine.kind={args.engine}"] if args.engine else [])
    # As training: a signal while pieces are computed stops after the current round (every
    # rank at the same one); anywhere else it ends the process at once. Pieces, head and
    # manifest are each published whole, so either way a rerun goes on where this one stopped.
    with StopSignals() as stop:
        try:
            cfg = load_config(args.config, overrides)
            write_cache(cfg, piece_rows=args.piece_rows, progress=not args.no_progress, stop=stop)
        except (ValueError, OSError) as e:
            from tailkd_dist.staging import describe_write_error

            say_error(PROG, describe_write_error(e) if isinstance(e, OSError) else e)
            return 2
        except RuntimeError as e:  # a failed collective: name the rank(s) it was waiting for
            from tailkd_dist.parallel import liveness

            if liveness.report(e, prog=PROG):
                return 1
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
