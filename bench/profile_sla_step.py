"""Kernel-by-kernel GPU time of one SLA training step and of ``sla_vjp`` (torch.profiler/CUPTI).

At the Wan2.1-1.3B attention shape (bf16, B=1, H=12, N=32,760, D=128, 128x64 tiles,
``critical=0.05``): the ``SparseLinearAttention`` forward+backward of bench/train_step.py and a
bare ``sla_vjp`` with the forward's saved tensors, each profiled once after warm-up. CUPTI sees
every kernel on the device (CuPy's included), so the table names where the step's time goes.

    python3 bench/profile_sla_step.py [--negligible 0.10] [--rows 30]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPE = (1, 12, 32760, 128)


def table(torch, fn, label, rows, repeats=3):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"
              or getattr(e, "self_device_time_total", 0) > 0]
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") \
        else "self_cuda_time_total"
    events.sort(key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events) / repeats / 1e3
    print(f"\n== {label}: {total:.3f} ms of kernel time a call ({repeats} calls profiled)")
    print(f"{'ms/call':>8} {'count/call':>10}  kernel")
    for e in events[:rows]:
        print(f"{getattr(e, key) / repeats / 1e3:8.3f} {e.count / repeats:10.1f}  {e.key[:110]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--critical", type=float, default=0.05)
    parser.add_argument("--negligible", type=float, default=0.10)
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    import cupy
    import torch

    import pysparse_attn as psa
    import pysparse_attn.torch as pt
    from gpu import video_like

    q, k, v = video_like(cupy, *SHAPE, strength=1.0, seed=0)
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    do = torch.randn_like(tq)
    sla = pt.SparseLinearAttention(SHAPE[-1], critical=args.critical, negligible=args.negligible,
                                   block=(128, 64), device="cuda")
    with torch.no_grad():
        sla.weight.normal_(0, 0.02)
        sla.bias.normal_(0, 0.02)
    leaves = [x.detach().requires_grad_() for x in (tq, tk, tv)]
    params = list(sla.parameters())

    def step():
        out = sla(*leaves)
        return torch.autograd.grad(out, leaves + params, do)

    def forward():
        with torch.no_grad():
            return sla(tq, tk, tv)

    table(torch, forward, "SparseLinearAttention forward", args.rows)
    table(torch, step, "SparseLinearAttention forward+backward", args.rows)
    weight = cupy.asarray(sla.weight.detach())
    bias = cupy.asarray(sla.bias.detach())
    options = dict(block=(128, 64), proj_weight=weight, proj_bias=bias)
    out, stats = psa.sla_attention(q, k, v, critical=args.critical, negligible=args.negligible,
                                   return_stats=True, **options)
    cdo = cupy.random.default_rng(1).standard_normal(q.shape, dtype=cupy.float32).astype(q.dtype)
    table(torch, lambda: psa.sla_vjp(q, k, v, cdo, kept=stats.kept, out=out, lse=stats.lse,
                                     marginal=stats.marginal, critical=args.critical,
                                     negligible=args.negligible, **options),
          "sla_vjp (saved out, lse, kept, marginal)", args.rows)


if __name__ == "__main__":
    main()
