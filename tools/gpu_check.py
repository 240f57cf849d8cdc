"""One short GPU check of the loss path (run on a lent GPU machine; prints a table).

    python tools/gpu_check.py

bf16 hidden states and lm_heads (fp32 math inside), N positions, d, V = 128256: the fused
TAD and forward-KL loss (fwd+bwd) against the bf16 matmul peak measured in the same process
(a [N, d] x [d, V] product: TAD needs 5 of them, KL 4), peak memory against the naive
autograd loss, and the vocab-parallel path on an NCCL process group (world size 1 here: one
GPU; it exercises the NCCL collectives and CUDA code path, not multi-GPU scaling).
"""
import os
import time

import torch
import torch.distributed as dist

from tailkd_dist.losses import cross_entropy, forward_kl, fused_linear_distill, tad_divergence


def bench(fn, reps=5):
    fn(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main():
    dev = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name(), "bf16:", torch.cuda.is_bf16_supported(), flush=True)
    N, d, V = 8192, 4096, 128256
    g = torch.Generator(device=dev).manual_seed(0)
    hs = torch.randn(N, d, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    ht = torch.randn(N, d, device=dev, dtype=torch.bfloat16, generator=g)
    ws = (torch.randn(V, d, device=dev, dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_()
    wt = torch.randn(V, d, device=dev, dtype=torch.bfloat16, generator=g) * 0.03
    labels = torch.randint(0, V, (N,), device=dev, generator=g)
    mm = bench(lambda: hs.detach() @ ws.detach().t())
    tflops = 2 * N * d * V / mm / 1e12
    rows = [("bf16 matmul [N,d]x[d,V]", mm, tflops, "", "")]
    for div, n_mm in (("forward_kl", 4), ("tad", 5)):
        for chunk in (1024, 4096):
            def f():
                hs.grad = ws.grad = None
                loss, _ = fused_linear_distill(hs, ws, ht, wt, labels, divergence=div, chunk_size=chunk)
                loss.backward()
            torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
            t = bench(f, reps=3)
            peak = torch.cuda.max_memory_allocated() - base
            rows.append((f"fused {div} chunk {chunk}", t, 2 * N * d * V * n_mm / t / 1e12,
                         f"{n_mm * mm / t:.2f} of matmul-bound", f"{peak / 2**30:.2f} GiB"))
    for div in ("forward_kl", "tad"):
        def naive():
            hs.grad = ws.grad = None
            s = (hs @ ws.t()).float()
            with torch.no_grad():
                t_ = (ht @ wt.t()).float()
            kd = tad_divergence(s, t_) if div == "tad" else forward_kl(s, t_)
            (cross_entropy(s, labels) + kd).sum().backward()
        torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        try:
            t = bench(naive, reps=2)
            rows.append((f"naive {div}", t, float("nan"), "", f"{(torch.cuda.max_memory_allocated() - base) / 2**30:.2f} GiB"))
        except torch.cuda.OutOfMemoryError:
            rows.append((f"naive {div}", float("nan"), float("nan"), "OOM", ""))
        torch.cuda.empty_cache()
    print(f"N={N} d={d} V={V} bf16 inputs, fp32 loss math")
    print("| what | seconds | TFLOP/s (matmul work) | speed vs matmul bound | peak extra |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.4f} | {r[2]:.0f} | {r[3]} | {r[4]} |")

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    grp = dist.new_group([0])
    h1 = hs.detach()[:1024].clone().requires_grad_(); w1 = ws.detach().clone().requires_grad_()
    l_ref, _ = fused_linear_distill(h1, w1, ht[:1024], wt, labels[:1024], chunk_size=512)
    l_ref.backward(); g_ref = h1.grad.clone(); h1.grad = None
    l_grp, _ = fused_linear_distill(h1, w1, ht[:1024], wt, labels[:1024], chunk_size=512, vocab_group=grp)
    l_grp.backward()
    print(f"NCCL group path: loss {l_grp.item():.6f} vs no group {l_ref.item():.6f}; "
          f"hidden grad rel diff {((h1.grad - g_ref).float().norm() / g_ref.float().norm()).item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
