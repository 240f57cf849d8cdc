"""FSDP2 adapter: teacher and student bodies under ``torch.distributed.fsdp.fully_shard``
(per decoder block and at the root), the lm_heads as DTensors whose local row shards feed the
vocab-parallel fused loss in place, checkpoints with ``torch.distributed.checkpoint`` (DCP).

The design (the mesh, where the head gradient lands and why it is right, the gradient scale,
precision, tied embeddings, checkpoints) is in docs/engines.md.
"""
from __future__ import annotations

import json
import logging
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from tailkd_dist.engines.base import EngineAdapter, decay_groups, rng_state, set_rng_state
from tailkd_dist.models import decoder_blocks, lm_head_of
from tailkd_dist.parallel.single import init_single_process_group

log = logging.getLogger("tailkd_dist")

DCP_DIR = "dcp"
META_FILE = "fsdp2.json"
BODY_KEY = "body"  # FQN prefix of the body inside the checkpointed student
HEAD_KEY = "lm_head"


class VocabShardedHead(nn.Module):
    """An lm_head as DTensor parameters sharded on dim 0 (rows = vocabulary) over ``mesh``.
    Never run forward: the fused loss reads :meth:`local_weight` / :meth:`local_bias`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, mesh, device: torch.device,
                 trainable: bool, dtype: torch.dtype = torch.float32, from_rank0: bool = False):
        super().__init__()
        from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

        self.placements = tuple([Replicate()] * (mesh.ndim - 1) + [Shard(0)])
        # The local part of the gradient is complete along the shard dim and a partial sum
        # along the replicate (HSDP "dp") dim, if any (module docstring).
        self.grad_placements = tuple([Partial()] * (mesh.ndim - 1) + [Shard(0)])

        def shard(t):
            if from_rank0:
                # Only rank 0 read the files (sharded load): it scatters the rows. The other
                # ranks pass an uninitialised stand-in of the same shape (never read).
                full = torch.empty(t.shape, dtype=dtype, device=device) if t.is_meta else t.detach().to(device, dtype)
                return nn.Parameter(distribute_tensor(full.contiguous(), mesh, self.placements, src_data_rank=0),
                                    requires_grad=trainable)
            # Every rank holds the same full rows (same seed / same files): take the local chunk
            # without communication, exactly as fully_shard does for the body.
            dt = distribute_tensor(t.detach().to(device, dtype).contiguous(), mesh, self.placements,
                                   src_data_rank=None)
            return nn.Parameter(dt, requires_grad=trainable)

        self.weight = shard(weight)
        self.bias = None if bias is None else shard(bias)

    def _local(self, p):
        if p is None:
            return None
        if p.requires_grad and torch.is_grad_enabled():
            return p.to_local(grad_placements=self.grad_placements)
        return p.to_local()

    def local_weight(self) -> torch.Tensor:
        return self._local(self.weight)

    def local_bias(self) -> torch.Tensor | None:
        return self._local(self.bias)


class _LocalRows:
    """What ``step.py`` / ``metrics.py`` read as ``adapter.student_head``: ``.weight`` and
    ``.bias`` are this rank's rows (``to_local`` views, a fresh autograd edge each access), cast
    to the compute dtype like FSDP's ``param_dtype`` does for the body (the fused loss wants
    hidden states and weights in one dtype; the gradient flows back through the cast into
    the fp32 master shard)."""

    def __init__(self, head: VocabShardedHead, compute_dtype: torch.dtype):
        self.head, self.compute_dtype = head, compute_dtype

    def _cast(self, t):
        return t if t is None or t.dtype == self.compute_dtype else t.to(self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self._cast(self.head.local_weight())

    @property
    def bias(self) -> torch.Tensor | None:
        return self._cast(self.head.local_bias())


class _Student(nn.Module):
    """The trained student as one module for DCP: body (FSDP) + head (DTensor shards)."""

    def __init__(self, body: nn.Module, head: VocabShardedHead):
        super().__init__()
        setattr(self, BODY_KEY, body)
        setattr(self, HEAD_KEY, head)


def _ensure_process_group() -> None:
    """FSDP2 and DTensors need a process group, also for one process: a private 1-rank one."""
    init_single_process_group()


def loads_from_rank0(cfg, world_size: int, role: str) -> bool:
    """``engine.sharded_load`` under FSDP2: only rank 0 reads this model's files; the other
    ranks build it on the meta device and receive their shards (``train.load_models``)."""
    spec = getattr(cfg.models, role)
    return cfg.engine.kind == "fsdp2" and cfg.engine.sharded_load and world_size > 1 and spec.path is not None


def _fill_from_rank0(body: nn.Module, full_sd: dict | None, device: torch.device) -> None:
    """After fully_shard: every rank's shards from rank 0's full state dict (``full_sd``; None
    on the other ranks, whose body is still on the meta device), and every buffer, including
    the non-persistent ones a state dict leaves out (rotary frequencies), from rank 0 too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if full_sd is None:
        body.to_empty(device=device)
    set_model_state_dict(body, full_sd or {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buf in body.buffers():
        if not isinstance(buf, DTensor):
            dist.broadcast(buf, src=0)


def shard_frozen_body(body: nn.Module, *, mesh, compute: torch.dtype, device: torch.device,
                      from_rank0: bool) -> None:
    """A frozen body (the teacher's) under FSDP2, in place: stored in the compute dtype (no
    master copy), every unit resharded right after its forward (the root too: there is no
    backward). ``from_rank0``: only rank 0 holds the weights (the others: the meta device)."""
    from torch.distributed.fsdp import fully_shard

    body.requires_grad_(False)
    body.to(compute)
    full = body.state_dict() if from_rank0 and dist.get_rank() == 0 else None
    for _, _, block in decoder_blocks(body):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(body, mesh=mesh, reshard_after_forward=True)
    if from_rank0:
        _fill_from_rank0(body, full, device)
    body.eval()


class FSDP2Adapter(EngineAdapter):
    name = "fsdp2"

    def loads_from_rank0(self, role: str) -> bool:
        return loads_from_rank0(self.cfg, self.topo.world_size, role)

    def __init__(self, *, cfg, topo, teacher, student, vocab, dtype):
        super().__init__(cfg=cfg, topo=topo, teacher=teacher, student=student, vocab=vocab)
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        if topo.mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            _ensure_process_group()
            self.mesh = init_device_mesh(self.device.type, (1,))
        elif topo.dp_size == 1:
            self.mesh = topo.mesh["loss"]  # FSDP over every rank
        else:
            self.mesh = topo.mesh  # HSDP: replicate over "dp", shard over "loss"
        if topo.loss_size == 1 and topo.world_size > 1 and topo.rank == 0:
            log.warning("engine fsdp2 shards the models over the loss group, which has 1 rank here: "
                        "every rank holds full replicas (HSDP with shard size 1); set "
                        "loss.loss_group_size=%d to fully shard", topo.world_size)

        on_gpu = self.device.type == "cuda"
        if dtype != torch.float32 and not on_gpu and topo.rank == 0:
            log.warning("engine fsdp2 on CPU computes in float32 (models.dtype %s ignored)", dtype)
        # Student: fp32 master parameters, compute in `dtype`, gradients reduced in fp32.
        compute = dtype if on_gpu else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) \
            if compute != torch.float32 else MixedPrecisionPolicy()

        # Heads first (they are copies of the rows 0..vocab-1 of each model's lm_head), so that
        # fully_shard never sees them: the bodies do not contain the lm_heads.
        # The student's head keeps fp32 master rows (like the body); the frozen teacher's is
        # stored in the compute dtype, as its body is.
        self.student_lm_head = self._make_head(student, trainable=True, dtype=torch.float32, role="student")
        self.student_head = _LocalRows(self.student_lm_head, compute)
        self.teacher_lm_head = self.teacher_head = None
        if teacher is not None:  # None: CE-only training (loss.divergence none)
            self.teacher_lm_head = self._make_head(teacher, trainable=False, dtype=compute, role="teacher")
            self.teacher_head = _LocalRows(self.teacher_lm_head, compute)

        # Sharded load: rank 0's full weights, taken before any wrapping or sharding.
        rank0 = topo.rank == 0
        s_full = self.student_body.state_dict() if rank0 and self.loads_from_rank0("student") else None
        blocks = decoder_blocks(self.student_body)
        if cfg.engine.activation_checkpointing:
            # Non-reentrant checkpointing around each block, and FSDP around the wrapper (as
            # torchtitan does): the block's all-gather stays outside the recomputed region.
            # State-dict FQNs drop the wrapper's "_checkpoint_wrapped_module." (DCP does that).
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                CheckpointImpl, checkpoint_wrapper)

            for i, (parent, attr, block) in enumerate(blocks):
                wrapped = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                setattr(parent, attr, wrapped)
                blocks[i] = (parent, attr, wrapped)
        for _, _, block in blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard(self.student_body, mesh=self.mesh, mp_policy=mp)
        for unit in self.student_body.modules():
            if isinstance(unit, FSDPModule):
                # The loss is already a sum normalised by the global token count: FSDP must sum
                # the ranks' gradients, not average them (as torchtitan sets it). Factor 1 is a
                # plain SUM reduction on every backend (gloo has no pre-multiplied sum).
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
        if self.loads_from_rank0("student"):
            _fill_from_rank0(self.student_body, s_full, self.device)
            del s_full
        # Teacher: frozen, no master copy needed (stored in the compute dtype on GPUs), every
        # unit resharded right after its forward (the root too: there is no backward).
        if self.teacher_body is not None:
            shard_frozen_body(self.teacher_body, mesh=self.mesh, compute=compute, device=self.device,
                              from_rank0=self.loads_from_rank0("teacher"))

        self.student = _Student(self.student_body, self.student_lm_head)
        self.student_module = self.student_body
        self.teacher = self._teacher(self.teacher_body, self.teacher_head)
        self.grad_replica_factor = 1.0  # FSDP sums the ranks' gradients (divide factor 1)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            decay_groups(self.student.parameters(), o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)

    def _make_head(self, model, *, trainable: bool, dtype: torch.dtype, role: str) -> VocabShardedHead:
        head = lm_head_of(model)
        bias = getattr(head, "bias", None)
        return VocabShardedHead(head.weight[: self.vocab], None if bias is None else bias[: self.vocab],
                                mesh=self.mesh, device=self.device, trainable=trainable, dtype=dtype,
                                from_rank0=self.loads_from_rank0(role))

    # -- the step ---------------------------------------------------------------------------
    def train(self):
        self.student.train()

    def eval(self):
        self.student.eval()

    def loss_scale(self, n_global):
        return 1.0 / n_global  # FSDP sums the ranks' gradients (divide factor 1)

    def backward(self, loss) -> None:
        loss.backward()

    def micro_step(self) -> None:
        """FSDP2 reduce-scatters every micro-batch and sums into the sharded gradients."""

    def finish_grads(self) -> None:
        """The head gradient: summed over the replicas (HSDP), as FSDP sums the body's."""
        for p in self.student_lm_head.parameters():
            if p.grad is None:
                continue
            if tuple(p.grad.placements) != tuple(p.placements):
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)  # Partial("dp") -> Replicate: all-reduce

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.student.parameters() if p.grad is not None]

    def grad_sq_norm(self) -> torch.Tensor:
        """One reduction per mesh dimension over the body and head DTensors."""
        norm = torch.nn.utils.get_total_norm(self._grads(), norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # partial sums over the shard dim -> the global norm
        return norm.double().pow(2)

    def clip_grads(self, coef: float) -> None:
        torch._foreach_mul_(self._grads(), coef)

    def apply_step(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoints ------------------------------------------------------------------------
    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.student, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, ckpt_dir: str, tag: str) -> None:
        import torch.distributed.checkpoint as dcp

        path = os.path.join(ckpt_dir, tag)
        dcp.save(self._state(), checkpoint_id=os.path.join(path, DCP_DIR))
        if self.topo.rank == 0:
            bias = self.student_lm_head.bias is not None
            meta = {"format": "tailkd-fsdp2/1", "dcp": DCP_DIR, "body": f"model.{BODY_KEY}.",
                    "head_weight": f"model.{HEAD_KEY}.weight",
                    "head_bias": f"model.{HEAD_KEY}.bias" if bias else None,
                    "body_prefix": self.body_prefix, "vocab": self.vocab}
            with open(os.path.join(path, META_FILE), "w") as f:
                json.dump(meta, f, indent=1)

    def load(self, ckpt_dir: str, tag: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=os.path.join(ckpt_dir, tag, DCP_DIR))
        set_state_dict(self.student, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def extra_state(self) -> dict:
        """Per rank: RNG states (model, head and optimizer are in the DCP files)."""
        return {"student_extra_rows": self.student_extra_rows, "rng": rng_state()}

    def load_extra_state(self, state: dict) -> None:
        set_rng_state(state["rng"])

    # -- export -----------------------------------------------------------------------------
    def body_state_dict(self) -> dict | None:
        """The student body's full fp32 state dict on rank 0 (None elsewhere), gathered by
        DCP's state-dict API (one FSDP unit at a time, offloaded to CPU on rank 0)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.student_body,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.topo.rank != 0:
            return None
        return {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu() for k, v in sd.items()}

    def full_student_head(self):
        """The whole student lm_head (every rank; export only)."""
        w = self.student_lm_head.weight.full_tensor().detach().cpu()
        b = self.student_lm_head.bias
        return w, None if b is None else b.full_tensor().detach().cpu()


def read_dcp_student(ckpt_path: str) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """(body state dict, full head weight, full head bias) from a checkpoint directory written
    by :class:`FSDP2Adapter`, in one process without a process group (model entries only: the
    optimizer state is not read)."""
    import torch.distributed.checkpoint as dcp

    with open(os.path.join(ckpt_path, META_FILE)) as f:
        meta = json.load(f)
    reader = dcp.FileSystemReader(os.path.join(ckpt_path, meta["dcp"]))
    md = reader.read_metadata()
    wanted = [k for k in md.state_dict_metadata if k.startswith(meta["body"])
              or k in (meta["head_weight"], meta["head_bias"])]
    flat = {}
    for k in wanted:
        m = md.state_dict_metadata[k]
        flat[k] = torch.empty(m.size, dtype=m.properties.dtype)
    state = {"model": {k[len("model."):]: v for k, v in flat.items()}}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": intended here
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, storage_reader=reader, no_dist=True)
    model = state["model"]
    body_pfx = meta["body"][len("model."):]
    body = {k[len(body_pfx):]: v for k, v in model.items() if k.startswith(body_pfx)}
    weight = model[meta["head_weight"][len("model."):]]
    bias = model[meta["head_bias"][len("model."):]] if meta["head_bias"] else None
    return body, weight, bias
