"""Benchmark: fused vs naive distillation loss, TAD vs forward KL (issue "The exact TAD loss").

    python tools/bench_loss.py                 # N=2048, d=512, V in {32003, 128256}
    python tools/bench_loss.py --vocab 32003   # one vocabulary
    python tools/bench_loss.py --passes --vocab 32003 --d 64   # element-wise passes per logit
    python tools/bench_loss.py --interleave --vocab 128256 --chunks 256 1024 --div tad
        # chunk sizes timed alternately in ONE process (the machine's drift falls on each)

For each (V, divergence) it measures one forward+backward of
  (a) naive: full [N, V] logits by matmul, the dense loss (tailkd_dist.losses.dense) and
      autograd — what a plain training loop does;
  (b) fused: tailkd_dist.losses.fused_linear_distill at the default chunk size (derived for
      the device: losses.default_chunk_size) and any extra --chunks (default 1024), gradients
      formed chunk by chunk.
Both compute CE + divergence (k=10, beta=2) and the gradients w.r.t. student hidden states
and lm_head weight. Every measurement runs in its own process (peak memory on CPU is the
process's high-water mark); time is the best of --repeats calls, memory is from the first.
On CPU the time is the process's CPU time with --threads threads (default 1): the machine is
shared, and CPU time is what other jobs do not inflate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402


def _inputs(n, d, v, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # normal_ in place: no temporaries that would lift the RSS high-water mark before the call
    mk = lambda *shape, std: torch.empty(*shape, dtype=dtype).normal_(0, std, generator=g).to(device)  # noqa: E731
    hs, ht = mk(n, d, std=1.0), mk(n, d, std=1.0)
    ws, wt = mk(v, d, std=0.02), mk(v, d, std=0.05)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt, labels


def one(args) -> dict:
    from tailkd_dist.losses import cross_entropy, forward_kl, fused_linear_distill, tad_divergence

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    hs, ws, ht, wt, labels = _inputs(args.n, args.d, args.vocab, device, dtype)

    def naive():
        s = hs @ ws.t()
        with torch.no_grad():
            t = ht @ wt.t()
        s32, t32 = s.float(), t.float()
        kd = tad_divergence(s32, t32, k=10, beta=2.0) if args.div == "tad" else forward_kl(s32, t32)
        (cross_entropy(s32, labels) + kd).sum().backward()

    def fused():
        loss, _ = fused_linear_distill(hs, ws, ht, wt, labels, divergence=args.div, k=10, beta=2.0,
                                       chunk_size=args.chunk or None, compiled=args.row_passes == "compiled")
        loss.backward()

    fn = naive if args.impl == "naive" else fused
    compile_s = None
    if args.impl == "fused" and args.row_passes == "compiled":
        # The first call compiles (reported apart); time and memory are the steady state's.
        compile_s = _time(fn)
        hs.grad = ws.grad = None
    secs, peak = benchutil.measure(fn, device=device)
    times = [secs]
    for _ in range(args.repeats - 1):
        hs.grad = ws.grad = None
        times.append(benchutil.measure(fn, device=device)[0] if device.type == "cuda" else _time(fn))
    return {"seconds": min(times), "peak": peak, "first_call": compile_s}


# Allocations write no element (a pass is a read or write of every logit).
ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")
# In-place writes at given indices: their ``self`` is touched only where the (small) index
# tensors point, not in full (those indices, [rows, k], are not logit-sized).
SPARSE_WRITES = ("scatter_", "scatter_add_", "scatter_reduce_", "index_put_", "index_fill_", "index_add_")
MATMULS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "dot", "mv", "addmv")


def _logit_sized(t, vocab: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == vocab


def _mutated(func, args, kwargs):
    """(name, tensor) of the arguments the operator's schema marks as written."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = args[i] if i < len(args) else kwargs.get(a.name)
            if isinstance(v, torch.Tensor):
                out.append((a.name, v))
    return out


def count_passes(fn, *, vocab: int, rows: int) -> dict:
    """Element-wise passes per logit of one call of ``fn`` (forward + backward).

    Method: a ``TorchDispatchMode`` sees every ATen operator that runs, forward and backward
    (the autograd engine carries the mode into backward), with its inputs AND outputs
    (``torch.profiler`` records only input shapes). For every operator that is not a matmul
    and not a view (views move no data), the elements of its logit-sized tensors are added
    up: tensors of two or more dimensions whose last size is ``vocab`` (pick a vocabulary
    size no other dimension has, e.g. 32003). An in-place operator's tensor counts as input
    and as output (it is read and written). The sum divided by rows * vocab is the number of
    passes over the logits. Allocations (``empty``) write nothing and are not counted, nor is
    the ``self`` of ``new_zeros`` & co. (only its dtype is read), nor that of an in-place write at
    indices (``scatter_`` & co.: it touches only the elements its index tensors name). A compiled or custom kernel counts its logit-sized inputs and
    outputs once each, which is what this counts for any single operator; an argument it
    writes without returning it (a custom operator's output buffer) counts as written too.
    The fused loss's compiled row passes are such operators (``rowpass``: one ``tailkd::``
    operator each, compiled with no [rows, V] intermediate; tests/test_rowpass_compiled.py
    checks Inductor's generated code for that)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.by_op = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name not in MATMULS and not func.is_view and name not in ALLOCATIONS:
                # new_zeros & co. take only dtype and device from ``self``: its data is not read;
                # a sparse write reads and writes its ``self`` only at its indices.
                sparse = name in SPARSE_WRITES
                flat, _ = tree_flatten((args[1:] if name.startswith("new_") or sparse else args, kwargs or {},
                                        None if sparse else out))
                outs = {id(t) for t in tree_flatten(out)[0]}
                # An argument the operator writes but does not return (a custom op's output
                # buffer) is read or not, but written: it counts once more.
                written = [] if sparse else [v for _, v in _mutated(func, args, kwargs or {}) if id(v) not in outs]
                n = sum(t.numel() for t in flat + written if _logit_sized(t, vocab))
                if n:
                    self.by_op[name] += n
            return out

    with Count() as c:
        fn()
    total = sum(c.by_op.values())
    return {"passes": total / (rows * vocab),
            "top": [(k, round(v / (rows * vocab), 2)) for k, v in c.by_op.most_common(8)]}


def passes_table(args) -> None:
    from tailkd_dist.losses import DIVERGENCES, cross_entropy, fused_linear_distill
    from tailkd_dist.losses import dense

    torch.set_num_threads(args.threads)
    v = args.vocab[0]
    hs, ws, ht, wt, labels = _inputs(args.n, args.d, v, torch.device("cpu"), torch.float32)
    refs = {"tad": lambda s, t: dense.tad_divergence(s, t, k=10, beta=2.0), "forward_kl": dense.forward_kl,
            "reverse_kl": dense.reverse_kl, "jsd": dense.jsd}
    rows = []
    for div in [d for d in DIVERGENCES if d in refs]:
        def naive():
            s = hs @ ws.t()
            with torch.no_grad():
                t = ht @ wt.t()
            (cross_entropy(s, labels) + refs[div](s, t)).sum().backward()

        def fused(stats=True, compiled=False):
            loss, _ = fused_linear_distill(hs, ws, ht, wt, labels, divergence=div, k=10, beta=2.0,
                                           chunk_size=args.chunk, stats=stats, compiled=compiled)
            loss.backward()

        # "no stats": a training step between logged ones (stats=False); "compiled": the row
        # passes compiled (the default on CUDA), warmed up first so compilation is not counted
        impls = [("naive", naive), ("fused", fused), ("fused, no stats", lambda: fused(False))]
        impls += [("fused, compiled", lambda: fused(True, True)), ("fused, compiled, no stats", lambda: fused(False, True))]
        for impl, fn in impls:
            if "compiled" in impl:
                fn()
            hs.grad = ws.grad = None
            r = count_passes(fn, vocab=v, rows=args.n)
            rows.append([div, impl, f"{r['passes']:.1f}", ", ".join(f"{k} {x}" for k, x in r["top"][:5])])
            print(f"  {div} {impl}: {r['passes']:.1f}", file=sys.stderr, flush=True)
    print(f"element-wise passes per logit, fwd+bwd, CE + divergence; N={args.n}, V={v}, fused chunk {args.chunk} "
          f"(one document spanning chunks: TAD runs its pre-pass)")
    print(benchutil.table(["divergence", "impl", "passes per logit", "largest operators (passes)"], rows))


def _time(fn):
    import time

    t0 = time.process_time()  # CPU time, as benchutil.measure on CPU
    fn()
    return time.process_time() - t0


def interleave_table(args) -> None:
    """The fused loss at each of --chunks, called alternately in one process, --repeats rounds
    after a warm-up call: between processes this machine's speed drifts by more than the
    differences in question. Runs against older checkouts too (through PYTHONPATH): ``compiled``
    is passed only when asked for."""
    from tailkd_dist.losses import fused_linear_distill

    torch.set_num_threads(args.threads)
    v = args.vocab[0]
    hs, ws, ht, wt, labels = _inputs(args.n, args.d, v, torch.device("cpu"), torch.float32)
    extra = {"compiled": True} if args.row_passes == "compiled" else {}

    def call(chunk):
        hs.grad = ws.grad = None
        loss, _ = fused_linear_distill(hs, ws, ht, wt, labels, divergence=args.div, k=10, beta=2.0,
                                       chunk_size=chunk, **extra)
        loss.backward()

    call(args.chunks[0])  # warm-up (and compilation, with --row-passes compiled)
    times = {c: [] for c in args.chunks}
    for _ in range(args.repeats):
        for c in args.chunks:
            times[c].append(_time(lambda: call(c)))
            print(f"  chunk {c}: {times[c][-1]:.2f} s", file=sys.stderr, flush=True)
    base = min(times[args.chunks[0]])
    print(f"{args.div}, N={args.n}, d={args.d}, V={v}, fp32, row passes {args.row_passes}, CPU s of the process "
          f"({args.threads} thread(s)), {args.repeats} alternating rounds in one process; {benchutil.machine()}")
    print(benchutil.table(["chunk", "CPU s per call", "best", f"best / chunk {args.chunks[0]}"],
                          [[c, ", ".join(f"{x:.2f}" for x in t), f"{min(t):.2f}", f"{min(t) / base:.3f}"]
                           for c, t in times.items()]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="positions")
    ap.add_argument("--d", type=int, default=512, help="hidden size (student and teacher)")
    ap.add_argument("--vocab", type=int, nargs="*", default=[32003, 128256])
    ap.add_argument("--chunks", type=int, nargs="*", default=[1024],
                    help="extra fused chunk sizes to show (besides the default, derived for the device)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--row-passes", choices=["eager", "compiled"], default="eager",
                    help="the fused loss's row passes (fused_linear_distill(compiled=...)); compiled: the first "
                         "call (compilation included) is run and reported apart")
    ap.add_argument("--passes", action="store_true",
                    help="count element-wise passes per logit instead of timing (first --vocab; see count_passes)")
    ap.add_argument("--interleave", action="store_true",
                    help="time the fused loss at each of --chunks alternately in one process (--div, first --vocab, "
                         "--repeats rounds)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=["naive", "fused"], help=argparse.SUPPRESS)
    ap.add_argument("--div", choices=["tad", "forward_kl"], default="tad", help="divergence (--interleave)")
    ap.add_argument("--chunk", type=int, default=1024, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.passes:
        passes_table(args)
        return
    if args.interleave:
        interleave_table(args)
        return
    if args.one:
        args.vocab = args.vocab[0]
        print(json.dumps(one(args)))
        return

    from tailkd_dist.losses import default_chunk_size

    def label(chunk: int, v: int) -> str:  # 0: the loss's default, derived for the device
        derived = default_chunk_size(accelerator=torch.cuda.is_available(), vocab_local=v)
        return str(chunk) if chunk else f"auto ({derived})"

    me = os.path.abspath(__file__)
    common = ["--n", str(args.n), "--d", str(args.d), "--dtype", args.dtype, "--repeats", str(args.repeats),
              "--threads", str(args.threads), "--row-passes", args.row_passes]
    rows = []
    for v in args.vocab:
        res = {}
        for div in ("forward_kl", "tad"):
            for impl, chunk in [("naive", 0), ("fused", 0)] + [("fused", c) for c in args.chunks]:
                r = benchutil.run_isolated(me, ["--one", "--impl", impl, "--div", div, "--chunk", str(chunk),
                                                "--vocab", str(v)] + common)
                res[(div, impl, chunk)] = r
                first = f", first call {r['first_call']:.1f} s" if r.get("first_call") is not None else ""
                print(f"  V={v} {div:10s} {impl:5s} chunk={label(chunk, v):>11s}: {r['seconds']:.2f} s, "
                      f"peak {benchutil.mib(r['peak'])} MiB{first}", file=sys.stderr, flush=True)
        for div in ("forward_kl", "tad"):
            nv = res[(div, "naive", 0)]
            for chunk in [0] + args.chunks:
                fu = res[(div, "fused", chunk)]
                kl = res[("forward_kl", "fused", chunk)]
                rows.append([
                    v, div, label(chunk, v), f"{nv['seconds']:.2f}", f"{fu['seconds']:.2f}",
                    f"{fu['seconds'] / nv['seconds']:.2f}", benchutil.mib(nv["peak"]), benchutil.mib(fu["peak"]),
                    f"{100 * fu['peak'] / nv['peak']:.1f}%", f"{fu['seconds'] / kl['seconds']:.2f}",
                ])
    clock = "wall s (CUDA)" if torch.cuda.is_available() else f"CPU s of the process ({args.threads} thread(s))"
    print(f"N={args.n}, d={args.d}, {args.dtype}, k=10, beta=2, CE + divergence, fwd+bwd, row passes "
          f"{args.row_passes}, time = {clock}, "
          f"best of {args.repeats}; {benchutil.machine()}")
    print(benchutil.table(
        ["V", "divergence", "fused chunk", "naive s", "fused s", "fused/naive time", "naive peak MiB",
         "fused peak MiB", "fused/naive memory", "fused time / fused KL time"],
        rows,
    ))


if __name__ == "__main__":
    main()
