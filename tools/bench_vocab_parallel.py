"""Benchmark: the vocabulary-parallel fused loss, P = 1 vs 2 ranks measured, P = 4, 8 computed
(issue "TAD over vocabulary-sharded logits and sequence-sharded tokens").

    python tools/bench_vocab_parallel.py                          # N=2048, d=512, V=128256, k=10, TAD
    python tools/bench_vocab_parallel.py --vocab 32003 --n 512    # quick small run

The same global batch (N positions in total, d, V, k, fp32, chunk_size 1024 unless --chunk) is
run by a loss group of P ranks: positions split evenly over the ranks (rank r holds positions
[r*N/P, (r+1)*N/P), the remainder to the first ranks), vocabulary rows split into contiguous
slices in rank order (the remainder to the first ranks). P=1 is one process with
vocab_group=None; P=2 is two processes joined by gloo over 127.0.0.1. Every rank is a FRESH
process (peak memory on CPU is the process's RSS high-water mark) and fills only its own
inputs, block by block from seeds fixed per global row block, so every P sees the same global
numbers without any rank ever holding the whole lm_head or a temporary as large as its inputs.
Each rank measures one forward+backward (CE + TAD, gradients w.r.t. the student's hidden states
and lm_head shard) inside tailkd_dist.parallel.vocab_parallel.CommCounter:

* time: the max over ranks (best of --repeats calls); peak extra memory: the max over ranks,
  from the first call;
* numbers per token of the loss's scalar collectives (the teacher's and the student's
  all-gathers + partial SUM; CommCounter.numbers_per_token) against the design's formula
  (losses.traffic.loss_numbers_per_token, with the TAD pre-pass when N > chunk_size: the N positions are one document);
* numbers per token that move hidden states (forward gather of the student's and teacher's
  hidden states + backward reduce-scatter of the hidden-state gradient);
* bytes per token of the scalar collectives (fp32) against gathering one model's full logits
  instead (V * 4 bytes per token; student and teacher together would be twice that).

Rows P = 4 and 8 are the formula only (time and memory "computed": not measured). Threads:
the machine's cores are divided among the ranks (--threads sets the per-rank count), so P=1
and P=2 use the same cores. Under the table: PASS/MISS for the issue's three targets, and a
check that the ranks' loss sums add up to the P=1 loss.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchutil  # noqa: E402

_ROW_BLOCK = 1024  # rows per seeded block of the global tensors (a slice fills only its blocks)


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges, sizes differing by at most one (larger first)."""
    out, start = [], 0
    for r in range(parts):
        size = total // parts + (1 if r < total % parts else 0)
        out.append((start, start + size))
        start += size
    return out


def _fill_rows(out: torch.Tensor, start: int, stop: int, *, seed: int, std: float) -> torch.Tensor:
    """Rows [start, stop) of a global [R, d] N(0, std^2) tensor whose block j (rows
    [j*B, (j+1)*B)) comes from its own generator: the same numbers for every slicing, and at
    most one block as a temporary."""
    d = out.shape[1]
    row = start
    while row < stop:
        j = row // _ROW_BLOCK
        b0, b1 = j * _ROW_BLOCK, (j + 1) * _ROW_BLOCK
        g = torch.Generator().manual_seed(seed * 1_000_003 + j)
        block = torch.empty(min(b1, stop) - b0, d, dtype=out.dtype).normal_(0, std, generator=g)
        hi = min(b1, stop)
        out[row - start : hi - start] = block[row - b0 :]
        del block
        row = hi
    return out


def _labels(start: int, stop: int, vocab: int, *, seed: int) -> torch.Tensor:
    out = torch.empty(stop - start, dtype=torch.long)
    row = start
    while row < stop:
        j = row // _ROW_BLOCK
        b0, hi = j * _ROW_BLOCK, min((j + 1) * _ROW_BLOCK, stop)
        g = torch.Generator().manual_seed(seed * 1_000_003 + j)
        out[row - start : hi - start] = torch.randint(0, vocab, (hi - b0,), generator=g)[row - b0 :]
        row = hi
    return out


def one(args) -> dict:
    """One rank of a loss group of args.p ranks (args.p = 1: no process group)."""
    import torch.distributed as dist

    from tailkd_dist.losses import fused_linear_distill
    from tailkd_dist.parallel.vocab_parallel import SCALAR_TAGS, CommCounter

    torch.set_num_threads(args.threads)
    group = None
    if args.p > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                world_size=args.p)
        group = dist.group.WORLD
    p0, p1 = _split(args.n, args.p)[args.rank]
    v0, v1 = _split(args.vocab, args.p)[args.rank]
    dtype = torch.float32
    hs = _fill_rows(torch.empty(p1 - p0, args.d, dtype=dtype), p0, p1, seed=1, std=1.0).requires_grad_()
    ht = _fill_rows(torch.empty(p1 - p0, args.d, dtype=dtype), p0, p1, seed=2, std=1.0)
    ws = _fill_rows(torch.empty(v1 - v0, args.d, dtype=dtype), v0, v1, seed=3, std=0.02).requires_grad_()
    wt = _fill_rows(torch.empty(v1 - v0, args.d, dtype=dtype), v0, v1, seed=4, std=0.05)
    labels = _labels(p0, p1, args.vocab, seed=5)
    extra = {} if args.chunk is None else {"chunk_size": args.chunk}
    counter = CommCounter()
    losses = []

    def fwd_bwd():
        with counter:
            loss, _ = fused_linear_distill(hs, ws, ht, wt, labels, divergence=args.div, k=args.k,
                                           beta=2.0, vocab_group=group, **extra)
            loss.backward()
        losses.append(loss.item())

    if group is not None:
        dist.barrier(group)
    secs, peak = benchutil.measure(fwd_bwd, device=torch.device("cpu"))
    result = {
        "rank": args.rank, "seconds": secs, "peak": peak, "loss": losses[0],
        "tokens": counter.tokens,
        "numbers_per_token": counter.numbers_per_token,
        "hidden_numbers_per_token": counter.hidden_numbers_per_token,
        "scalar_bytes": sum(counter.bytes_by_tag[t] for t in SCALAR_TAGS),
        "by_op": counter.by_op, "calls": dict(counter.calls), "bytes": counter.bytes,
    }
    times = [secs]
    for _ in range(args.repeats - 1):
        hs.grad = ws.grad = None
        if group is not None:
            dist.barrier(group)
        t0 = time.perf_counter()
        fwd_bwd()
        times.append(time.perf_counter() - t0)
    result["seconds"] = min(times)
    if group is not None:
        dist.barrier(group)
        dist.destroy_process_group()
    return result


def _launch(me: str, p: int, common: list[str], threads: int, timeout: float) -> list[dict]:
    """Start p fresh processes (one per rank) at once; their JSON results, by rank."""
    port = None
    if p > 1:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
           "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    procs = []
    for r in range(p):
        cmd = [sys.executable, me, "--one", "--p", str(p), "--rank", str(r), "--threads", str(threads),
               *common] + (["--port", str(port)] if port else [])
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    deadline = time.monotonic() + timeout
    outs: list = [None] * p
    try:
        for r, proc in enumerate(procs):
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                raise RuntimeError(f"P={p} rank {r} failed (exit {proc.returncode}):\n{err[-4000:]}")
            outs[r] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs:  # only our own children, if one failed or timed out
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="positions in the global batch (split over the ranks)")
    ap.add_argument("--d", type=int, default=512, help="hidden size (student and teacher)")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--div", choices=["tad", "forward_kl", "reverse_kl", "jsd"], default="tad")
    ap.add_argument("--chunk", type=int, default=1024, help="chunk_size (the same for every group size)")
    ap.add_argument("--computed", type=int, nargs="*", default=[4, 8], help="group sizes given by the formula only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / P)")
    ap.add_argument("--repeats", type=int, default=1, help="time = best of this many calls")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per measured configuration")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--p", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return

    from tailkd_dist.losses.traffic import loss_numbers_per_token

    chunk = args.chunk
    prepass = args.div == "tad" and args.n > chunk  # the design's TAD pre-pass (more than one chunk)
    formula = lambda p: loss_numbers_per_token(group_size=p, k=args.k, divergence=args.div,  # noqa: E731
                                               temperature=1.0, prepass=prepass)
    full_bytes = args.vocab * 4
    me = os.path.abspath(__file__)
    common = ["--n", str(args.n), "--d", str(args.d), "--vocab", str(args.vocab), "--k", str(args.k),
              "--div", args.div, "--repeats", str(args.repeats)] + (
              ["--chunk", str(args.chunk)] if args.chunk else [])
    cores = os.cpu_count() or 1
    res = {}
    for p in (1, 2):
        threads = args.threads or max(1, cores // p)
        ranks = _launch(me, p, common, threads, args.timeout)
        res[p] = dict(
            ranks=ranks, threads=threads,
            seconds=max(r["seconds"] for r in ranks), peak=max(r["peak"] for r in ranks),
            loss=sum(r["loss"] for r in ranks),
        )
        print(f"  P={p} ({threads} thread(s) per rank): {res[p]['seconds']:.2f} s, peak per rank "
              + ", ".join(f"{benchutil.mib(r['peak'])}" for r in ranks) + " MiB, "
              + f"by_op rank 0 {ranks[0]['by_op']}", file=sys.stderr, flush=True)

    rows = []
    for p in (1, 2):
        r0 = res[p]["ranks"][0]
        # Every rank records the same collectives (the group's); rank 0's counter stands for all.
        meas = r0["numbers_per_token"]
        sbytes = r0["scalar_bytes"] / max(r0["tokens"], 1)
        rows.append([
            p, f"{meas:g}", "— (no group)" if p == 1 else f"{formula(p)}",
            f"{r0['hidden_numbers_per_token']:g}", f"{sbytes:g}", f"{full_bytes:,}",
            f"{100 * sbytes / full_bytes:.3f}%", benchutil.mib(res[p]["peak"]),
            f"{res[p]['peak'] / res[1]['peak']:.2f}", f"{res[p]['seconds']:.2f}",
        ])
    for p in args.computed:
        nb = 4 * formula(p)
        rows.append([p, "computed", f"{formula(p)}", f"{3 * args.d} (computed: 2d + d)", f"{nb}",
                     f"{full_bytes:,}", f"{100 * nb / full_bytes:.3f}%", "computed", "computed", "computed"])

    print(f"N={args.n} positions in total, d={args.d}, V={args.vocab}, k={args.k}, {args.div}, fp32, "
          f"chunk_size={chunk} (TAD pre-pass: {'yes' if prepass else 'no'}), CE + divergence, fwd+bwd, "
          f"time = best of {args.repeats} call(s), max over ranks; gloo on 127.0.0.1; "
          f"threads per rank P=1: {res[1]['threads']}, P=2: {res[2]['threads']}; {benchutil.machine()}")
    print(benchutil.table(
        ["P", "measured loss numbers/token", "formula numbers/token", "hidden-state numbers/token",
         "loss bytes/token (fp32)", "full-logits bytes/token (V*4)", "loss / full logits",
         "peak MiB per rank", "peak / P=1", "time s"],
        rows,
    ))

    m2 = res[2]["ranks"][0]["numbers_per_token"]
    f2 = formula(2)
    same = all(r["numbers_per_token"] == m2 for r in res[2]["ranks"])
    ok1 = m2 == f2 and same
    print(f"{'PASS' if ok1 else 'MISS'}: measured numbers/token at P=2 = {m2:g} "
          f"{'==' if m2 == f2 else '!='} formula {f2}" + ("" if same else " (ranks disagree)"))
    r8 = 4 * formula(8) / full_bytes
    ok2 = r8 <= 0.01
    print(f"{'PASS' if ok2 else 'MISS'}: computed at P=8, k={args.k}, V={args.vocab}: loss scalar traffic "
          f"{4 * formula(8)} B/token = {100 * r8:.3f}% of gathering the logits ({full_bytes:,} B/token), target <= 1%")
    mr = res[2]["peak"] / res[1]["peak"]
    ok3 = mr <= 0.6
    print(f"{'PASS' if ok3 else 'MISS'}: peak loss memory per rank at P=2 = {benchutil.mib(res[2]['peak'])} MiB "
          f"= {mr:.2f}x that of P=1 ({benchutil.mib(res[1]['peak'])} MiB) on the same global batch, target <= 0.6x")
    l1, l2 = res[1]["loss"], res[2]["loss"]
    print(f"check: loss sum over the P=2 ranks {l2:.6g} vs P=1 {l1:.6g} (relative difference "
          f"{abs(l2 - l1) / max(abs(l1), 1e-30):.1e}); P=2 rank 0 collectives by tag (numbers): "
          f"{res[2]['ranks'][0]['by_op']}")


if __name__ == "__main__":
    main()
