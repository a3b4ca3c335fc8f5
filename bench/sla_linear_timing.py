"""Time the SLA linear branch + merge at the Wan2.1-1.3B shape (run on the GPU machine)."""
import numpy as np
import cupy
from cupyx.profiler import benchmark
import ml_dtypes

import pysparse_attn as psa
from pysparse_attn.backends import cupy as be
from pysparse_attn._select import SlaSplit
from pysparse_attn._plan import tile_count

B, H, N, D = 1, 12, 32760, 128
block = (128, 64)
rng = cupy.random.default_rng(0)
q, k, v = (rng.standard_normal((B, H, N, D), dtype=cupy.float32).astype(ml_dtypes.bfloat16)
           for _ in range(3))
scale = D ** -0.5
plan = be.build_plan(cupy, q, k, SlaSplit(0.05, 0.5), "natural", 4, block, scale, "marginal")
plan_c = be.build_plan(cupy, q, k, SlaSplit(0.05, 0.5), "natural", 4, block, scale, "complement")
W = cupy.asarray(np.random.default_rng(1).standard_normal((D, D)).astype(np.float32) * 0.05)
b = cupy.asarray(np.random.default_rng(2).standard_normal(D).astype(np.float32) * 0.05)
o_s = be.forward(q, k, v, plan, 0, 0.0, scale, False)[0]
o_s32 = o_s.astype(cupy.float32)
marg = plan.marginal
print("marginal share", float(marg.mean()))


def t(name, f, n=20):
    r = benchmark(f, n_repeat=n, n_warmup=3)
    print(f"{name:48s} {r.gpu_times.mean() * 1e3:8.3f} ms (cpu {r.cpu_times.mean() * 1e3:7.3f})")


t("sparse forward (bf16 out)", lambda: be.forward(q, k, v, plan, 0, 0.0, scale, False))
t("linear_branch marginal", lambda: be.linear_branch(q, k, v, marg, block, "softmax", 0.0))
t("sla_merge marginal (O_s fp32)", lambda: be.sla_merge(q, k, v, o_s32, marg, block, "softmax",
                                                        0.0, W, b, q.dtype, mode="marginal"))
t("sla_merge marginal (O_s bf16)", lambda: be.sla_merge(q, k, v, o_s, marg, block, "softmax",
                                                        0.0, W, b, q.dtype, mode="marginal"))
t("sla_merge complement", lambda: be.sla_merge(q, k, v, o_s32, plan_c.marginal, block, "softmax",
                                               0.0, W, b, q.dtype, mode="complement"))
ones = cupy.ones_like(marg)
t("sla_merge global", lambda: be.sla_merge(q, k, v, o_s32, ones, block, "softmax", 1e-5, W, b,
                                           q.dtype, mode="global"))
t("public sla_attention (plan + sparse + linear)",
  lambda: psa.sla_attention(q, k, v, critical=0.05, negligible=0.5, block=block, proj_weight=W,
                            proj_bias=b), n=10)
t("public sla_attention check_finite=False",
  lambda: psa.sla_attention(q, k, v, critical=0.05, negligible=0.5, block=block, proj_weight=W,
                            proj_bias=b, check_finite=False), n=10)

# Stage breakdown of the marginal pipeline.
nq, nk = tile_count(N, 128), tile_count(N, 64)
op = "bfloat16"
t("  phi(K) + Z_J", lambda: be._features(cupy, k, 64, "softmax", False))
phi_k, tile_z = be._features(cupy, k, 64, "softmax", False)
tile_h = cupy.empty((B, H, nk, D, D), dtype=q.dtype)
full, rest = N // 64, N % 64


def states():
    for first, tiles, keys in ((0, full, 64), (full, 1 if rest else 0, rest)):
        if tiles:
            be._gemm(D, D, keys, be._tile_pointers(phi_k, tiles, 64, first), D,
                     be._tile_pointers(v, tiles, 64, first), D,
                     be._tile_pointers(tile_h.reshape(B, H, nk * D, D), tiles, D, first), D,
                     types=(op, op), a_t=True, batch=B * H * tiles, pointers=True)


t("  H_J GEMMs (pointer-batched)", states)
flags = cupy.ascontiguousarray(marg.reshape(B, H, nq, nk), dtype=cupy.float32)
fl = flags.astype(q.dtype)
hs = cupy.empty((B, H, nq, D * D), dtype=q.dtype)
t("  H_I = M H_J GEMM", lambda: be._gemm(nq, D * D, nk, fl, nk, tile_h, D * D, hs, D * D,
                                        types=(op, op), batch=B * H,
                                        strides=(nq * nk, nk * D * D, nq * D * D)))
z = cupy.matmul(flags, tile_z)
t("  Z_I = M Z_J (fp32 matmul)", lambda: cupy.matmul(flags, tile_z))
t("  phi(q)/den", lambda: be._features(cupy, q, 128, "softmax", True, z=z, z_layout=(H, 1, 1)))
phi_q, _ = be._features(cupy, q, 128, "softmax", True, z=z, z_layout=(H, 1, 1))
ol = cupy.empty((B, H, nq * 128, D), dtype=cupy.float32)
t("  O_l GEMM", lambda: be._gemm(128, D, D, phi_q, D, hs, D, ol, D, types=(op, "float32"),
                                 batch=B * H * nq, strides=(128 * D, D * D, 128 * D)))
y = cupy.empty_like(ol)
t("  Y = O_l W^T (TF32)", lambda: be._gemm(B * H * nq * 128, D, D, ol, D, W, D, y, D,
                                           types=("float32", "float32"), b_t=True,
                                           compute=be._COMPUTE_32F_FAST_TF32))
