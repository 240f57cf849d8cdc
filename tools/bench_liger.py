"""Benchmark: our fused loss against Liger-Kernel's chunked distillation loss, on this machine.

    pip install --no-deps liger-kernel==0.8.5      # benchmark-only peer, never a dependency
    python tools/bench_liger.py                    # N=2048, d=512, V in {32003, 128256}
    python tools/bench_liger.py --vocab 32003 --divergences jsd

Liger's ``LigerFusedLinearJSDLoss`` computes CE + the generalised JSD of the same definition as
ours (m = beta p + (1 - beta) q, p the teacher's), with beta = 0 forward KL and beta = 1 reverse
KL, from hidden states and lm_head weights, chunk by chunk; its per-chunk function is
``torch.compile``d (on a CPU Inductor emits C++). Configured to compute the same quantity:
weight_hard_loss = weight_soft_loss = 1 (ours: ce_weight = kd_weight = 1), and Liger divides by
the valid-token count where we return the sum. Before anything is timed, both run on a small
batch with the same V (N = 64, d = 32) and loss and gradients are compared (float32: the
largest relative difference must stay below 1e-4, else the script stops).

Every measurement runs in its own process (peak RSS above the state before the call): time is
the best of --repeats calls of forward + backward (CPU time of the process, --threads threads),
after one first call that is reported apart (the compilation of a compiled path). Ours runs
at its default chunk (derived for the device) with eager row passes (the CPU default) and with
compiled ones; Liger at its default chunk (1024) unless --liger-chunk.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}
IMPLS = ("ours, eager", "ours, compiled", "liger")


def _inputs(n, d, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape, std: torch.empty(*shape).normal_(0, std, generator=g)  # noqa: E731
    hs, ht = mk(n, d, std=1.0), mk(n, d, std=1.0)
    ws, wt = mk(v, d, std=0.02), mk(v, d, std=0.05)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100  # masked positions
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt, labels


def loss_fn(impl: str, div: str, *, liger_chunk: int):
    """One forward + backward of ``impl``; returns (loss / valid tokens, the call)."""
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        mod = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=LIGER_BETA[div],
                                      ignore_index=-100, temperature=1.0, compiled=True, chunk_size=liger_chunk)
        return lambda hs, ws, ht, wt, lab: mod(hs, ws, ht, wt, lab)
    from tailkd_dist.losses import fused_linear_distill

    def ours(hs, ws, ht, wt, lab):
        loss, stats = fused_linear_distill(hs, ws, ht, wt, lab, divergence=div, jsd_beta=0.5, stats=False,
                                           compiled=impl == "ours, compiled")
        return loss / stats["valid_count"]
    return ours


def agreement(div: str, v: int, liger_chunk: int) -> float:
    """Largest relative difference of loss and gradients, ours (eager) against Liger."""
    out = {}
    for impl in ("ours, eager", "liger"):
        hs, ws, ht, wt, lab = _inputs(64, 32, v, seed=1)
        loss = loss_fn(impl, div, liger_chunk=min(liger_chunk, 16))(hs, ws, ht, wt, lab)
        loss.backward()
        out[impl] = (loss.detach(), hs.grad, ws.grad)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))  # noqa: E731
    return max(rel(a, b) for a, b in zip(out["ours, eager"], out["liger"]))


def one(args) -> dict:
    torch.set_num_threads(args.threads)
    hs, ws, ht, wt, lab = _inputs(args.n, args.d, args.vocab)
    call = loss_fn(args.impl, args.div, liger_chunk=args.liger_chunk)

    def fn():
        call(hs, ws, ht, wt, lab).backward()

    t0 = time.process_time()
    fn()
    first = time.process_time() - t0
    hs.grad = ws.grad = None
    secs, peak = benchutil.measure(fn, device=torch.device("cpu"))
    times = [secs]
    for _ in range(args.repeats - 1):
        hs.grad = ws.grad = None
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return {"seconds": min(times), "peak": peak, "first_call": first}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--vocab", type=int, nargs="*", default=[32003, 128256])
    ap.add_argument("--divergences", nargs="*", choices=list(LIGER_BETA), default=list(LIGER_BETA))
    ap.add_argument("--impls", nargs="*", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--liger-chunk", type=int, default=1024)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--div", choices=list(LIGER_BETA), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        args.vocab = args.vocab[0]
        print(json.dumps(one(args)))
        return
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        sys.exit("bench_liger: liger-kernel is not installed: pip install --no-deps liger-kernel==0.8.5")
    from tailkd_dist.losses import default_chunk_size

    me = os.path.abspath(__file__)
    rows = []
    for v in args.vocab:
        for div in args.divergences:
            err = agreement(div, v, args.liger_chunk)
            print(f"  V={v} {div}: loss and gradients agree to {err:.1e} (relative)", file=sys.stderr, flush=True)
            if err > 1e-4:
                sys.exit(f"bench_liger: ours and Liger disagree by {err:.1e} on {div} at V={v}; nothing timed")
            res = {}
            for impl in args.impls:
                r = benchutil.run_isolated(me, ["--one", "--impl", impl, "--div", div, "--vocab", str(v),
                                                "--n", str(args.n), "--d", str(args.d), "--repeats", str(args.repeats),
                                                "--threads", str(args.threads), "--liger-chunk", str(args.liger_chunk)])
                res[impl] = r
                print(f"  V={v} {div:10s} {impl:15s}: {r['seconds']:.2f} s, peak {benchutil.mib(r['peak'])} MiB, "
                      f"first call {r['first_call']:.1f} s", file=sys.stderr, flush=True)
            base = res.get("liger")
            for impl, r in res.items():
                chunk = args.liger_chunk if impl == "liger" else default_chunk_size(accelerator=False, vocab_local=v)
                rows.append([v, div, impl, chunk, f"{r['seconds']:.2f}",
                             f"{r['seconds'] / base['seconds']:.2f}" if base else "-", benchutil.mib(r["peak"]),
                             f"{r['peak'] / base['peak']:.2f}" if base else "-", f"{r['first_call']:.1f}"])
    print(f"N={args.n}, d={args.d}, fp32, CE + divergence (jsd beta 0.5), fwd+bwd, statistics off, every "
          f"7th position masked; time = CPU s of the process ({args.threads} thread(s)), best of "
          f"{args.repeats} after a first call; {benchutil.machine()}")
    print(benchutil.table(["V", "divergence", "impl", "chunk", "s", "s / liger", "peak MiB", "peak / liger",
                           "first call s"], rows))


if __name__ == "__main__":
    main()
