"""DeepSpeed adapter: the student body in a ZeRO-1/2/3 engine, the teacher body in its own
ZeRO-3 inference engine (no optimizer, no gradients, its own config so it can be offloaded),
the lm_heads outside both as vocabulary shards (parallel/lm_head.py explains why).

The gradient bookkeeping and the clipping by the global norm while DeepSpeed owns the body's
gradient partitions are explained in docs/engines.md.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from tailkd_dist.engines.base import EngineAdapter, decay_groups, rng_state, set_rng_state
from tailkd_dist.engines.ds_config import student_ds_config, teacher_ds_config
from tailkd_dist.models import is_partitioned, lm_head_of
from tailkd_dist.parallel.lm_head import ShardedHead
from tailkd_dist.parallel.single import init_single_process_group


def ensure_torch_distributed() -> None:
    """DeepSpeed needs a process group even for one process."""
    import deepspeed

    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        _unlink_shm_buffer()
        return
    # One process: a private one-rank group (no rendezvous, no port), then DeepSpeed wraps it as
    # it wraps a launcher's group.
    init_single_process_group()
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def _unlink_shm_buffer() -> None:
    """DeepSpeed's shared-memory all-reduce on CPUs (ranks of one machine, started by the
    ``deepspeed`` launcher, which sets LOCAL_SIZE) creates one 66 MiB file per rank,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never
    removes it. Every rank maps every other rank's file before its initialisation returns,
    so after a barrier the names are no longer needed: each rank unlinks its own now, and the
    memory goes back when the last process mapping it ends, however it ends (even SIGKILL)."""
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return  # no shared-memory all-reduce was set up
    dist.barrier()  # every rank has mapped every other rank's buffer
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


def zero3_load_configs(cfg, *, world_size: int, dtype: torch.dtype) -> tuple[dict | None, dict | None]:
    """(teacher, student): the DeepSpeed config to load each model into its ZeRO-3 partitions
    with, or None to load it whole (``engine.sharded_load``; only models read from a directory,
    the student only when its engine is ZeRO-3)."""
    if cfg.engine.kind != "deepspeed" or not cfg.engine.sharded_load:
        return None, None
    teacher = student = None
    if cfg.models.teacher.path is not None:
        teacher = teacher_ds_config(cfg, world_size=world_size, dtype=dtype)
    if cfg.models.student.path is not None:
        s_cfg = student_ds_config(cfg, world_size=world_size, dtype=dtype)
        if s_cfg.get("zero_optimization", {}).get("stage") == 3:
            student = s_cfg
    if teacher is not None or student is not None:
        ensure_torch_distributed()  # zero.Init partitions over the world group
    return teacher, student


def frozen_body_engine(body, t_cfg: dict):
    """A frozen body (the teacher's) in a ZeRO-3 inference engine (``teacher_ds_config``)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=body, config=t_cfg)
    engine.eval()
    return engine


class DeepSpeedAdapter(EngineAdapter):
    name = "deepspeed"

    def __init__(self, *, cfg, topo, teacher, student, vocab, dtype):
        super().__init__(cfg=cfg, topo=topo, teacher=teacher, student=student, vocab=vocab)
        import deepspeed

        o, W = cfg.optim, topo.world_size
        ds_cfg = student_ds_config(cfg, world_size=W, dtype=dtype)
        t_cfg = teacher_ds_config(cfg, world_size=W, dtype=dtype) if self.teacher_body is not None else None
        stage = ds_cfg["zero_optimization"]["stage"]
        ensure_torch_distributed()
        self.stage = stage
        self._init_heads(teacher=teacher, student=student, vocab=vocab)
        # Drop the lm_heads from the bodies' parameter sets: the shards own those rows now.
        # (a body loaded into ZeRO-3 partitions already has the config's dtype)
        if not is_partitioned(self.student_body):
            self.student_body.to(dtype)
        if self.teacher_body is not None and not is_partitioned(self.teacher_body):
            self.teacher_body.to(dtype)
        optimizer = None
        if "optimizer" not in ds_cfg:  # a client optimizer: plain torch AdamW (no JIT-built op)
            optimizer = torch.optim.AdamW(
                decay_groups(self.student_body.parameters(), o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.student_body, optimizer=optimizer, config=ds_cfg,
            model_parameters=None if optimizer is not None else decay_groups(self.student_body.parameters(), o.weight_decay),
        )
        teacher_engine = None
        if self.teacher_body is not None:  # None: CE-only, or a teacher cache (no body)
            teacher_engine = frozen_body_engine(self.teacher_body, t_cfg)
        self.student_module = self.engine
        self.teacher = self._teacher(teacher_engine, self.teacher_head)
        # DeepSpeed averages the body's gradients over the W ranks, so the loss is scaled by W
        # (loss_scale): a gradient it does not reduce is W times its rank's share.
        self.grad_replica_factor = float(W)
        self._body_sq: torch.Tensor | None = None
        self._clip_body = 0.0  # DeepSpeed's clip_grad for the next step (set by clip_grads)

    def _init_heads(self, *, teacher, student, vocab: int) -> None:
        """The heads as vocabulary shards outside DeepSpeed (parallel/lm_head.py), the
        student's with its own AdamW."""
        lr, ls = self.topo.loss_rank, self.topo.loss_size
        self.student_head = ShardedHead.from_linear(
            lm_head_of(student), vocab=vocab, rank=lr, size=ls, trainable=True).to(self.device)
        self.teacher_head = None if teacher is None else ShardedHead.from_linear(
            lm_head_of(teacher), vocab=vocab, rank=lr, size=ls, trainable=False).to(self.device)
        o = self.cfg.optim
        self.head_opt = torch.optim.AdamW(
            decay_groups(self.student_head.parameters(), o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)

    def train(self):
        self.engine.train()

    def eval(self):
        self.engine.eval()

    # -- the step ---------------------------------------------------------------------------
    def loss_scale(self, n_global):
        return self.cfg.optim.grad_accum * self.grad_replica_factor / n_global

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def micro_step(self) -> None:
        """Between micro-batches DeepSpeed wants step() too (it only counts there)."""
        self.engine.step()

    def finish_grads(self) -> None:
        """The head shard's gradient summed over its replicas, divided once by W."""
        assert self.engine.is_gradient_accumulation_boundary()
        self.student_head.finish_grads(self.topo.group("dp"), divide_by=self.grad_replica_factor)

    def grad_sq_norm(self) -> torch.Tensor:
        """|body|^2 (read from the ZeRO optimizer, already all-reduced) + |all head shards|^2."""
        head_sq = self.student_head.grad_sq_norm().to(self.device)
        if self.loss_group is not None:
            dist.all_reduce(head_sq, group=self.loss_group)  # shards differ within a loss group
        opt = self.engine.optimizer
        # The same functions the ZeRO optimizers' own step() uses.
        if hasattr(opt, "scaled_global_norm"):  # ZeRO-1/2
            norm = opt.scaled_global_norm()
        else:  # ZeRO-3
            norms = opt._get_norm_groups()
            norm = torch.stack([torch.as_tensor(n, dtype=torch.float32) for n in norms]).pow(2).sum().sqrt()
        norm = torch.as_tensor(norm, dtype=torch.float32) / float(getattr(opt, "loss_scale", 1.0))
        self._body_sq = norm.pow(2).to(head_sq)  # kept for clip_grads
        return self._body_sq + head_sq

    def clip_grads(self, coef: float) -> None:
        """The heads now; the body inside DeepSpeed's step: its clip_grad for this step is set
        so that its own clipping (max_norm / body norm) scales the body by ``coef`` too."""
        self._clip_body = coef * float(self._body_sq.sqrt())
        for p in self.student_head.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)

    def apply_step(self, lr: float) -> None:
        for opt in (self.engine.optimizer, self.head_opt):
            for g in opt.param_groups:
                g["lr"] = lr
        self.engine.optimizer.clip_grad, self._clip_body = self._clip_body, 0.0  # 0: no clipping
        self.engine.step()
        self.head_opt.step()
        self.head_opt.zero_grad(set_to_none=True)

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, ckpt_dir: str, tag: str) -> None:
        self.engine.save_checkpoint(ckpt_dir, tag=tag, save_latest=False)

    def load(self, ckpt_dir: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")

    def extra_state(self) -> dict:
        """Per rank: the head shard and its optimizer, the rows beyond the vocabulary, RNG."""
        return {"student_head": self.student_head.state_dict(), "head_opt": self.head_opt.state_dict(),
                "student_extra_rows": self.student_extra_rows, "rng": rng_state()}

    def load_extra_state(self, state: dict) -> None:
        self.student_head.load_state_dict(state["student_head"])
        self.head_opt.load_state_dict(state["head_opt"])
        set_rng_state(state["rng"])

    # -- export -----------------------------------------------------------------------------
    def full_student_head(self):
        return self.student_head.gather_full(self.loss_group)

    def body_state_dict(self) -> dict | None:
        """The student body's full fp32 state dict on rank 0 (None elsewhere), gathered one
        parameter at a time under ZeRO-3 so no rank holds more than one extra tensor."""
        import deepspeed

        rank0 = self.topo.rank == 0
        out = {}
        module = self.engine.module
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank0:
                    out[name] = p.detach().to("cpu", torch.float32).clone()
        if rank0:
            persistent = set(module.state_dict().keys())
            for name, b in module.named_buffers():
                if name in persistent:  # not rotary inv_freq & co., which HF rebuilds
                    out[name] = b.detach().cpu().clone()
        return out if rank0 else None
