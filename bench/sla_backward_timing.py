"""Time the SLA backward at the Wan2.1-1.3B shape on the GPU: ``sla_vjp`` whole and its pieces.

bf16, B=1, H=12, N=32,760, D=128, 128x64 tiles, ``critical=0.05``, ``negligible=0.5`` (marginal
share ~50%), with W and b; the forward's saved out/lse and kept set are given, as an autograd
bridge gives them. Every piece is queued on the GPU with no host read; timed with
``triton.testing.do_bench`` (median) when Triton is importable, else CUDA events (median of
runs after warm-up).

    python bench/sla_backward_timing.py [--n 32760] [--heads 12] [--linear marginal]
"""
from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np

import cupy

import pysparse_attn as psa
from pysparse_attn.backends import cupy as backend


def timer():
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - any import failure means: use CUDA events
        do_bench = None

    def events(function, runs=50, warmup=5):
        for _ in range(warmup):
            function()
        times = []
        for _ in range(runs):
            start, stop = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            function()
            stop.record()
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop))
        return float(np.median(times))

    if do_bench is None:
        return events, "CUDA events (median)"
    return (lambda f: float(do_bench(f, warmup=25, rep=200, return_mode="median")),
            "triton.testing.do_bench (median)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--linear", default="marginal",
                        choices=("marginal", "complement", "global"))
    parser.add_argument("--critical", type=float, default=0.05)
    parser.add_argument("--negligible", type=float, default=0.5)
    args = parser.parse_args()

    time, how = timer()
    B, H, N, D = 1, args.heads, args.n, args.dim
    block = (128, 64)
    rng = cupy.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((B, H, N, D), dtype=cupy.float32)
                   .astype(ml_dtypes.bfloat16) for _ in range(4))
    host = np.random.default_rng(1)
    weight = cupy.asarray(host.standard_normal((D, D)).astype(np.float32) * 0.05)
    bias = cupy.asarray(host.standard_normal(D).astype(np.float32) * 0.05)
    options = dict(block=block, proj_weight=weight, proj_bias=bias, linear=args.linear)
    out, stats = psa.sla_attention(q, k, v, critical=args.critical, negligible=args.negligible,
                                   return_stats=True, **options)
    plan, kept, lse = stats.plan, stats.kept, stats.lse
    marginal = plan.marginal
    eps = 1e-5 if args.linear == "global" else 0.0
    scale = D ** -0.5
    cupy.cuda.Device().synchronize()
    print(f"shape B={B} H={H} N={N} D={D}, tiles {block}, critical {args.critical}, "
          f"negligible {args.negligible}, linear={args.linear}, marginal share "
          f"{float(cupy.asarray(marginal).mean()):.3f}; timer: {how}")

    rows = []

    def row(name, function, note=""):
        rows.append((name, time(function), note))

    row("sla_vjp whole (saved out, lse, kept, plan)",
        lambda: psa.sla_vjp(q, k, v, do, plan=plan, kept=kept, out=out, lse=lse, **options))
    row("sla_vjp whole, deterministic=True",
        lambda: psa.sla_vjp(q, k, v, do, plan=plan, kept=kept, out=out, lse=lse,
                            deterministic=True, **options))
    row("sla_vjp whole (saved out, lse, kept, marginal: no plan rebuilt)",
        lambda: psa.sla_vjp(q, k, v, do, kept=kept, out=out, lse=lse, marginal=marginal,
                            critical=args.critical, negligible=args.negligible, **options))
    row("sla_vjp whole (kept only: sparse backward recomputes O_s, LSE)",
        lambda: psa.sla_vjp(q, k, v, do, plan=plan, kept=kept, **options))
    # The sparse branch's output as sla_vjp hands it over (the merged output and its linear
    # terms), and as float32 O_s itself.
    merged = backend.sla_linear_vjp(q, k, v, do, marginal, block, "softmax", eps, weight,
                                    bias, out, mode=args.linear)[3]
    o_sparse = (merged.merged.astype(cupy.float32) - bias
                - backend._linear_output(q, k, v, marginal, block, "softmax", eps,
                                         weight=None, mode=args.linear)[:, :, :N] @ weight.T)
    lse_c = cupy.ascontiguousarray(cupy.asarray(lse), dtype=cupy.float32)
    kept_c = cupy.asarray(kept)
    row("  sparse backward (attention_backward, saved O_s, LSE)",
        lambda: backend.attention_backward(q, k, v, do, kept_c, block, scale, out=o_sparse,
                                           lse=lse_c, grad_dtype=None))
    for kernel in backend.BACKWARD_KERNELS:
        if backend.backward_kernel_unavailable_reason(kernel) is not None:
            continue
        for grad_dtype in (None, q.dtype):
            row(f"    kernel={kernel}, grads {np.dtype(grad_dtype or np.float32).name}",
                lambda kernel=kernel, grad_dtype=grad_dtype: backend.attention_backward(
                    q, k, v, do, kept_c, block, scale, out=o_sparse, lse=lse_c,
                    grad_dtype=grad_dtype, kernel=kernel))
    linear_grads = backend.sla_linear_vjp(q, k, v, do, marginal, block, "softmax", eps, weight,
                                          bias, out, mode=args.linear)[0]
    row("    default kernel, bf16 grads with the linear side's as addend (sla_vjp's call)",
        lambda: backend.attention_backward(q, k, v, do, kept_c, block, scale, out=merged,
                                           lse=lse_c, grad_dtype=q.dtype, addend=linear_grads,
                                           density=args.critical))
    row("    the same without the addend",
        lambda: backend.attention_backward(q, k, v, do, kept_c, block, scale, out=merged,
                                           lse=lse_c, grad_dtype=q.dtype,
                                           density=args.critical))
    o_sparse16 = o_sparse.astype(q.dtype)
    row("    default kernel, O_s in bf16, grads bf16",
        lambda: backend.attention_backward(q, k, v, do, kept_c, block, scale, out=o_sparse16,
                                           lse=lse_c, grad_dtype=q.dtype))
    row("  linear side whole (sla_linear_vjp, with the merged output)",
        lambda: backend.sla_linear_vjp(q, k, v, do, marginal, block, "softmax", eps, weight,
                                       bias, out, mode=args.linear))
    row("  linear side without the merged output (out not given)",
        lambda: backend.sla_linear_vjp(q, k, v, do, marginal, block, "softmax", eps, weight,
                                       bias, None, mode=args.linear))
    row("    forward states (phi, H_J, H_I, Z_I, phi(q)/den)",
        lambda: backend._linear_states(q, k, v, marginal, block, "softmax", eps,
                                       mode=args.linear))
    parts = backend._linear_states(q, k, v, marginal, block, "softmax", eps, mode=args.linear)
    rows_q = parts["phi_q"].shape[2]
    o_operand = cupy.empty((B, H, rows_q, D), dtype=parts["phi_q"].dtype)
    row("    O_l = (phi(q)/den) H_I (bf16 out: dW's operand)",
        lambda: backend._state_product(parts, parts["phi_q"], o_operand))
    do_operand = backend._row_padded(cupy, do, rows_q, parts["phi_q"].dtype)
    d_weight = cupy.empty((D, D), dtype=cupy.float32)
    row("    dW = dO^T O_l (one bf16 GEMM)",
        lambda: backend._gemm(D, D, B * H * rows_q, do_operand, D, o_operand, D, d_weight, D,
                              types=("bfloat16", "float32"), a_t=True))
    ones = cupy.ones((1, B * H * rows_q), dtype=cupy.float32).astype(ml_dtypes.bfloat16)
    d_bias = cupy.empty((1, D), dtype=cupy.float32)
    row("    db = 1^T dO (one bf16 GEMM)",
        lambda: backend._gemm(1, D, B * H * rows_q, ones, B * H * rows_q, do_operand, D, d_bias,
                              D, types=("bfloat16", "float32")))
    g_operand = cupy.empty((B, H, rows_q, D), dtype=parts["phi_q"].dtype)
    row("    g = dO W (one bf16 GEMM)",
        lambda: backend._gemm(B * H * rows_q, D, D, do_operand, D,
                              weight.astype(ml_dtypes.bfloat16), D, g_operand, D,
                              types=("bfloat16", "bfloat16")))
    row("    linear gradients (dH_I, aggregation, dV, dK, dQ stages)",
        lambda: backend._linear_grads(parts, q, k, "softmax", eps, g_operand))
    # The same run with the key side through the batched GEMMs and linear_key_grads instead
    # of linear_key_tile_grads (the path before 2026-12-04's fused kernel).
    backend._FUSED_KEY_SIDE = False
    row("    the same, key side by GEMMs (unfused)",
        lambda: backend._linear_grads(parts, q, k, "softmax", eps, g_operand))
    row("sla_vjp whole (saved out, lse, kept, plan), key side unfused",
        lambda: psa.sla_vjp(q, k, v, do, plan=plan, kept=kept, out=out, lse=lse, **options))
    backend._FUSED_KEY_SIDE = True
    cupy.cuda.Device().synchronize()

    width = max(len(name) for name, _, _ in rows)
    print(f"{'piece'.ljust(width)}  {'ms':>8}")
    for name, ms, note in rows:
        print(f"{name.ljust(width)}  {ms:8.3f}  {note}")
    print("target: sla_vjp whole <= 3.5 ms (issue 10)")


if __name__ == "__main__":
    main()
