"""GPU backend: build, check and time everything in one run (``make bench-gpu``).

Steps, each logged under ``--out`` (default ``$OUT`` or ``bench/results/``):

1. ``compile``: every kernel instance through nvcc (registers and spills), when nvcc exists.
2. ``tests``: ``pytest -m gpu tests/test_gpu_backend.py``.
3. ``sanitize``: ``compute-sanitizer`` memcheck and racecheck over every forward instance on
   small odd shapes (this script's ``--sanitize-target`` mode, CuPy's memory pool off so that
   out-of-bounds accesses hit allocation boundaries), and every backward instance.
4. ``time``: the issue's targets, side by side in the same process: dense vs torch SDPA
   (flash and cuDNN backends), TopK(0.05) plan and kernel, in-loop skip rules at their sparsity
   vs this kernel's dense path, Recall's bookkeeping vs Blasst, the Wan2.2 shape and D = 64.

Times are CUDA-event medians after warm-up (the backward steps: queued back to back, as
triton.testing.do_bench times); dense-equivalent TFLOP/s = 4 B H Nq Nk D / t.
``backward`` (not in the default steps): the backward targets (dense and 5% kept-set replay
vs torch SDPA's cuDNN backward); ``backward_shapes`` (nor this one): the same at 90% sparsity,
D = 64, and N = 75,600 with H = 40 (``BACKWARD_SHAPES``). The results go to ``gpu-<date>.jsonl`` (one record per measurement, with device, date, commit
and command) and a markdown table printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pysparse_attn._plan import tile_count  # noqa: E402
from pysparse_attn._rules import Blasst, Cef, Recall  # noqa: E402
from pysparse_attn._select import BlockMask, TopK, TopP  # noqa: E402
from pysparse_attn.bench.results import git_commit  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Workloads


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def video_like(cupy, B, H, N, D, strength, seed, dtype=None, frames_hw=None):
    """q, k, v whose attention is local on a (frames, height, width) token grid.

    Tokens carry random low-frequency Fourier features of their grid position scaled by
    ``strength`` plus unit noise, so q.k decays with distance: larger ``strength``, more local
    attention, more tiles a skip rule can drop. Each head draws its own frequencies.
    """
    rng = cupy.random.default_rng(seed)
    if frames_hw is None:
        frames_hw = (21, 30, 52) if N == 32760 else (max(1, N // 1024), 32, 32)
    f, h, w = frames_hw
    n = cupy.arange(N)
    pos = cupy.stack([(n // (h * w)) % f, (n // w) % h, n % w], axis=-1).astype(cupy.float32)
    half = D // 2
    freq = rng.standard_normal((B, H, 1, half, 3), dtype=cupy.float32) * 0.35
    phase = (pos[None, None, :, None, :] * freq).sum(-1)               # (B, H, N, half)
    emb = cupy.concatenate([cupy.cos(phase), cupy.sin(phase)], axis=-1) * (strength / math.sqrt(
        0.5))
    q = emb + rng.standard_normal((B, H, N, D), dtype=cupy.float32)
    k = emb + rng.standard_normal((B, H, N, D), dtype=cupy.float32)
    v = rng.standard_normal((B, H, N, D), dtype=cupy.float32)
    return tuple(x.astype(dtype or _bf16()) for x in (q, k, v))


def random_inputs(cupy, B, H, N, D, seed, dtype=None):
    rng = cupy.random.default_rng(seed)
    return tuple(rng.standard_normal((B, H, N, D), dtype=cupy.float32).astype(dtype or _bf16())
                 for _ in range(3))


# ---------------------------------------------------------------------------------------------
# Timing


def time_ms(cupy, fn, reps=10, warmup=2):
    """Median milliseconds of ``fn()`` over ``reps`` CUDA-event-timed runs after warm-up."""
    for _ in range(warmup):
        fn()
    cupy.cuda.runtime.deviceSynchronize()
    times = []
    for _ in range(reps):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times)), float(np.min(times)), float(np.max(times))


def time_ms_queued(cupy, fn, reps=20, warmup=3):
    """Median milliseconds of ``fn()`` with every run queued back to back (events around each,
    one synchronisation at the end), as ``triton.testing.do_bench`` times: the host enqueues
    ahead of the GPU, so launch overhead shows only where the host is the slower side."""
    for _ in range(warmup):
        fn()
    cupy.cuda.runtime.deviceSynchronize()
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(reps)]
    for start, stop in events:
        start.record()
        fn()
        stop.record()
    events[-1][1].synchronize()
    times = [cupy.cuda.get_elapsed_time(start, stop) for start, stop in events]
    return float(np.median(times)), float(np.min(times)), float(np.max(times))


def tflops(B, H, Nq, Nk, D, ms):
    return 4.0 * B * H * Nq * Nk * D / (ms * 1e-3) / 1e12


def rel_l2(cupy, a, b):
    a = a.astype(cupy.float32)
    b = b.astype(cupy.float32)
    return float(cupy.linalg.norm(a - b) / cupy.linalg.norm(b))


def sampled_recall(cupy, q, k, kept, block, scale, tiles_per_head=4, seed=0):
    """Exact recall (float32) of ``kept`` on a few query tiles of every head: min and mean."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    nq = tile_count(Nq, block[0])
    rng = np.random.default_rng(seed)
    picks = rng.choice(nq, size=min(tiles_per_head, nq), replace=False)
    values = []
    for b in range(B):
        for t in picks:
            rows = slice(t * block[0], min((t + 1) * block[0], Nq))
            s = scale * cupy.matmul(q[b, :, rows].astype(cupy.float32),
                                    k[b].astype(cupy.float32).swapaxes(-1, -2))
            p = cupy.exp(s - s.max(axis=-1, keepdims=True))
            mask = cupy.repeat(kept[b, :, t], block[1], axis=-1)[:, :Nk]   # (H, Nk)
            values.append((p * mask[:, None, :]).sum(-1) / p.sum(-1))
    values = cupy.concatenate([v.ravel() for v in values])
    return float(values.min()), float(values.mean())


def sampled_error(cupy, q, k, v, out, block, scale, tiles_per_head=2, seed=0):
    """Relative L2 error of ``out`` vs exact full attention (float64) on a few query tiles of
    every head: the kernel's rounding plus whatever its skipped tiles left out."""
    B, H, Nq, D = q.shape
    nq = tile_count(Nq, block[0])
    group = H // k.shape[1]
    picks = np.random.default_rng(seed).choice(nq, size=min(tiles_per_head, nq), replace=False)
    num = den = 0.0
    for b in range(B):
        kb = cupy.repeat(k[b].astype(cupy.float64), group, axis=0)
        vb = cupy.repeat(v[b].astype(cupy.float64), group, axis=0)
        for t in picks:
            rows = slice(t * block[0], min((t + 1) * block[0], Nq))
            s = scale * cupy.matmul(q[b, :, rows].astype(cupy.float64), kb.swapaxes(-1, -2))
            p = cupy.exp(s - s.max(axis=-1, keepdims=True))
            exact = cupy.matmul(p, vb) / p.sum(-1, keepdims=True)
            got = out[b, :, rows].astype(cupy.float64)
            num += float(((got - exact) ** 2).sum())
            den += float((exact ** 2).sum())
    return math.sqrt(num / den)


# ---------------------------------------------------------------------------------------------
# Steps


def step_compile(out_dir, log):
    if shutil.which("nvcc") is None:
        log("compile: nvcc not on PATH, skipped")
        return None
    result = subprocess.run([sys.executable, "-m", "pysparse_attn.backends.compile_check",
                             "--arch", "sm_80", "--arch", "sm_90"], cwd=ROOT,
                            capture_output=True, text=True)
    (out_dir / "compile_check.log").write_text(result.stdout + result.stderr)
    log(f"compile: exit {result.returncode}; {result.stdout.strip().splitlines()[-1]}")
    return result.returncode


def step_tests(out_dir, log, select=None):
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
               "tests/test_gpu_backend.py"] + (["-k", select] if select else [])
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    (out_dir / "tests.log").write_text(result.stdout + result.stderr)
    tail = [line for line in result.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    log(f"tests: exit {result.returncode} in {time.time() - started:.0f} s; {tail[0]}")
    if result.returncode:
        log("\n".join(result.stdout.splitlines()[-60:]))
    return result.returncode


def step_sanitize(out_dir, log):
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        log("sanitize: compute-sanitizer not on PATH, skipped")
        return None
    codes = {}
    for name in ("memcheck", "racecheck"):
        command = [tool, "--tool", name, "--error-exitcode", "9", sys.executable,
                   str(Path(__file__).resolve()), "--sanitize-target"]
        started = time.time()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        text = result.stdout + result.stderr
        (out_dir / f"sanitize_{name}.log").write_text(text)
        summary = [line for line in text.splitlines() if "ERROR SUMMARY" in line
                   or "RACECHECK SUMMARY" in line]
        # Failed driver calls count as errors too; cuda.bindings' symbol lookups
        # (cuGetProcAddress) make some that are not the kernels': say how many of each.
        api = text.count("Program hit CUDA_ERROR")
        lookups = len(re.findall(r"Program hit CUDA_ERROR\w* .* cuGetProcAddress", text))
        log(f"sanitize {name}: exit {result.returncode} in {time.time() - started:.0f} s; "
            f"{summary[-1] if summary else text.strip().splitlines()[-1:]}; of them API errors "
            f"{api} ({lookups} in cuGetProcAddress)")
        codes[name] = result.returncode
    return codes


def _sanitize_linear_backward(backend, rng, q, k, w):
    """The linear side of the SLA backward (its row stages, the fused key side, the GEMMs) on
    q (1, 2, 150, D) and k (1, 1, 201, D): both tile sizes, every mode and feature map."""
    import cupy

    do = cupy.asarray(rng.standard_normal(q.shape).astype(np.float32)).astype(q.dtype)
    for block in ((64, 64), (128, 64)):
        nq, nk = -(-150 // block[0]), -(-201 // block[1])
        marginal = cupy.asarray(rng.random((1, 2, nq, nk)) < 0.5)
        for linear in ("marginal", "complement", "global"):
            flags = cupy.ones_like(marginal) if linear == "global" else marginal
            for feature_map in ("softmax", "elu1", "relu"):
                backend.sla_linear_vjp(q, k, k, do, flags, block, feature_map, 0.1, w, w[0], q,
                                       mode=linear)


def sanitize_target():
    """Run every forward instance once on small odd shapes (under compute-sanitizer)."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    cupy.cuda.set_allocator(None)  # plain cudaMalloc: out-of-bounds accesses are visible
    rng = np.random.default_rng(0)
    if os.environ.get("PSA_SANITIZE_LINEAR_ONLY"):  # the SLA backward's linear side alone
        for dtype in (_bf16(), np.float16):
            for D in (64, 128):
                q, k = (cupy.asarray(rng.standard_normal((1, heads, n, D)).astype(np.float32))
                        .astype(dtype) for heads, n in ((2, 150), (1, 201)))
                w = cupy.asarray(rng.standard_normal((D, D)).astype(np.float32))
                _sanitize_linear_backward(backend, rng, q, k, w)
        cupy.cuda.runtime.deviceSynchronize()
        print("sanitize target: the SLA backward's linear side ran (linear only)")
        return
    # PSA_SANITIZE_KERNELS (comma list) narrows the families, so that one not yet proven on the
    # device (a hang under the sanitizer stalls everything after it) gets its own call.
    chosen = os.environ.get("PSA_SANITIZE_KERNELS")
    kernels = [name for name in backend.KERNELS if backend.kernel_unavailable_reason(name) is None
               and (not chosen or name in chosen.split(","))]
    # Backward dK/dV families (BACKWARD_KERNELS) by the same list; a list naming none of them
    # (a forward family alone) keeps the default mma_sync backward, as before they existed.
    backward_kernels = [
        name for name in backend.BACKWARD_KERNELS
        if backend.backward_kernel_unavailable_reason(name) is None
        and (not chosen or name in chosen.split(","))] or ["mma_sync"]
    rules = {rule.functor: rule for rule in (Blasst(0.5), Cef(-1.0), Recall(0.5),
                                             Recall(0.5, exact=True))}
    for kernel, (dtype, D, bq, bk, functor) in ((kernel, key) for kernel in kernels
                                                for key in sorted(backend.FORWARD_INSTANCES)):
        dtype = _bf16() if dtype == "bfloat16" else np.float16
        q = cupy.asarray(rng.standard_normal((1, 2, 150, D)).astype(np.float32)).astype(dtype)
        k = cupy.asarray(rng.standard_normal((1, 1, 201, D)).astype(np.float32)).astype(dtype)
        v = cupy.asarray(rng.standard_normal((1, 1, 201, D)).astype(np.float32)).astype(dtype)
        rule = rules.get(functor)
        plan = backend.build_plan(cupy, q, k, None, "peak" if rule else "natural", 4, (bq, bk),
                                  D ** -0.5)
        backend.forward(q, k, v, plan, rule, D ** -0.5, True, kernel=kernel)
        cupy.cuda.runtime.deviceSynchronize()
    # Rings reused many times over (1000 keys = 16 tiles, past every pipeline's depth), with a
    # rule that skips (the sm90_ws kernel's vote and V-for-kept-tiles handshakes).
    for kernel in kernels:
        for D, bq in ((128, 128), (64, 64), (128, 64)):
            q = cupy.asarray(rng.standard_normal((1, 2, 150, D)).astype(np.float32)).astype(
                np.float16)
            k = cupy.asarray(rng.standard_normal((1, 1, 1000, D)).astype(np.float32) * 2).astype(
                np.float16)
            for rule in (None, Blasst(0.05), Recall(0.8)):
                plan = backend.build_plan(cupy, q, k, None, "peak" if rule else "natural", 4,
                                          (bq, 64), D ** -0.5)
                backend.forward(q, k, k, plan, rule, D ** -0.5, True, kernel=kernel)
    cupy.cuda.runtime.deviceSynchronize()
    if os.environ.get("PSA_SANITIZE_FORWARD_ONLY"):  # the rest does not depend on the family
        print(f"sanitize target: the forward instances of {kernels} ran (forward only)")
        return
    for dtype in (_bf16(), np.float16):  # plan kernels: 65 key tiles (a partial score block)
        for D in (64, 128):
            q = cupy.asarray(rng.standard_normal((1, 2, 150, D)).astype(np.float32)).astype(dtype)
            k = cupy.asarray(rng.standard_normal((1, 1, 4100, D)).astype(np.float32)).astype(dtype)
            mask = cupy.asarray(rng.random((1, 2, 3, 65)) < 0.3)
            mask[0, 0, 1] = False  # a row with no tile
            for selector in (TopK(ratio=0.3), TopP(0.9), BlockMask(mask)):
                for order in ("natural", "peak"):
                    backend.build_plan(cupy, q, k, selector, order, 4, (64, 64), D ** -0.5)
    cupy.cuda.runtime.deviceSynchronize()
    import pysparse_attn as psa

    for dtype in (_bf16(), np.float16):  # SLA: the split plan kernel, linear branch and merge
        for D in (64, 128):
            q = cupy.asarray(rng.standard_normal((1, 2, 150, D)).astype(np.float32)).astype(dtype)
            k = cupy.asarray(rng.standard_normal((1, 1, 201, D)).astype(np.float32)).astype(dtype)
            w = cupy.asarray(rng.standard_normal((D, D)).astype(np.float32))
            for linear in ("marginal", "complement", "global"):
                for feature_map in ("softmax", "elu1", "relu"):
                    psa.sla_attention(q, k, k, critical=0.3, negligible=0.3, linear=linear,
                                      feature_map=feature_map, proj_weight=w, proj_bias=w[0],
                                      block=(64, 64))
            _sanitize_linear_backward(backend, rng, q, k, w)
            kept = cupy.zeros((1, 2, 3, 4), dtype=bool)
            kept[0, 0, 1, 2] = True  # every other row empty: O = 0, LSE = -inf written
            plan = psa.Plan.from_kept(kept, block=(64, 64), shape=(1, 2, 150, 201))
            for kernel in kernels:
                backend.forward(q, k, k, plan, None, D ** -0.5, True, out_dtype=np.float32,
                                kernel=kernel)
    cupy.cuda.runtime.deviceSynchronize()
    # Backward: every instance of every chosen family (both dQ modes, both forward tiles) on
    # odd sizes with GQA, an empty query tile (LSE = -inf) and an empty key tile, 16-bit and
    # float32 gradients, without and with an addend (dv's a view of a row-padded buffer, as
    # the SLA linear side hands it over), and with SLA's merged output for O_s.
    for backward_kernel, dtype_name, D in sorted(
            {(name, key[1], key[2]) for name in backward_kernels
             for key in backend.backward_instances(name)
             if key[1] is not None}):  # the untemplated lists kernel
        dtype = _bf16() if dtype_name == "bfloat16" else np.float16
        q, do = (cupy.asarray(rng.standard_normal((1, 4, 150, D)).astype(np.float32))
                 .astype(dtype) for _ in range(2))
        k, v = (cupy.asarray(rng.standard_normal((1, 2, 201, D)).astype(np.float32))
                .astype(dtype) for _ in range(2))
        addend = (cupy.ones((1, 4, 150, D), dtype=cupy.float32),
                  cupy.ones((1, 2, 201, D), dtype=cupy.float32),
                  cupy.ones((1, 2, 256, D), dtype=cupy.float32)[:, :, :201])
        for block in ((64, 64), (128, 64)):
            kept = cupy.asarray(rng.random((1, 4, tile_count(150, block[0]), 4)) < 0.6)
            kept[:, :, 0] = False
            kept[:, :, :, 1] = False
            for deterministic in (False, True):
                for grad_dtype, extra in ((None, None), (q.dtype, None), (q.dtype, addend)):
                    backend.attention_backward(q, k, v, do, kept, block, D ** -0.5,
                                               deterministic=deterministic,
                                               grad_dtype=grad_dtype, kernel=backward_kernel,
                                               addend=extra)
            # SLA's merged output standing for O_s (the preprocess's bias and delta terms).
            plan = psa.Plan.from_kept(kept, block=block, shape=(1, 4, 150, 201))
            out, lse = backend.forward(q, k, v, plan, None, D ** -0.5, False)[:2]
            merged = backend.MergedOutput(out, cupy.ones(D, dtype=cupy.float32),
                                          cupy.ones((1, 4, 150), dtype=cupy.float32))
            backend.attention_backward(q, k, v, do, kept, block, D ** -0.5, out=merged, lse=lse,
                                       grad_dtype=q.dtype, kernel=backward_kernel,
                                       addend=addend)
    cupy.cuda.runtime.deviceSynchronize()
    print(f"sanitize target: all instances of {kernels} ran, the plan kernels, SLA (forward and "
          f"the linear side of the backward) and the backward ({backward_kernels})")




def step_time(log, records, quick, part="all"):
    import cupy

    from pysparse_attn.backends import cupy as backend

    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as error:  # torch is optional: our numbers still stand alone
        torch = None
        log(f"time: torch unavailable ({error}); no SDPA baseline")

    def record(**fields):
        _record(records, fields)

    def ours(q, k, v, plan, rule=None, want_stats=False, warps=None, kernel=None):
        D = q.shape[-1]
        return backend.forward(q, k, v, plan, rule, D ** -0.5, want_stats, warps=warps,
                               kernel=kernel)

    def sdpa(q, k, v, which):
        tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
        kind = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[which]

        def run():
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(tq, tk, tv)
        return run

    def dense_block(label, B, H, N, D, blocks, reps, families=None):
        q, k, v = random_inputs(cupy, B, H, N, D, seed=1)
        families = families or [name for name in backend.KERNELS
                                if backend.kernel_unavailable_reason(name) is None]
        variants = [(kernel, block) for kernel in families for block in blocks]
        for kernel, block in variants:
            plan = backend.build_plan(cupy, q, k, None, "natural", 4, block, D ** -0.5)
            started = time.time()
            ours(q, k, v, plan, kernel=kernel)
            cupy.cuda.runtime.deviceSynchronize()
            compile_s = time.time() - started
            ms = time_ms(cupy, lambda: ours(q, k, v, plan, kernel=kernel), reps=reps)
            name = f"ours {kernel} {block[0]}x{block[1]}"
            record(what="dense", shape=label, impl=name, ms=ms[0],
                   ms_min=ms[1], ms_max=ms[2], tflops=tflops(B, H, N, N, D, ms[0]),
                   first_call_s=compile_s)
        if torch is not None:
            for which in ("flash", "cudnn"):
                try:
                    run = sdpa(q, k, v, which)
                    ms = time_ms(cupy, run, reps=reps)
                    record(what="dense", shape=label, impl=f"torch sdpa {which}", ms=ms[0],
                           ms_min=ms[1], ms_max=ms[2], tflops=tflops(B, H, N, N, D, ms[0]))
                    if which == "flash":
                        plan = backend.build_plan(cupy, q, k, None, "natural", 4, (128, 64),
                                                  D ** -0.5)
                        mine = ours(q, k, v, plan)[0]
                        theirs = cupy.from_dlpack(run())
                        record(what="dense agreement", shape=label,
                               impl=f"ours {backend.default_kernel()} 128x64 vs flash",
                               rel_l2=rel_l2(cupy, mine, theirs))
                except Exception as error:  # a backend this torch build lacks
                    record(what="dense", shape=label, impl=f"torch sdpa {which}",
                           error=str(error)[:200])
        del q, k, v

    B, H, N, D = 1, 12, 32760, 128
    target = f"B={B} H={H} N={N} D={D}"
    reps = 5 if quick else 15
    if part in ("all", "dense"):
        dense_block(target, B, H, N, D, [(128, 64), (64, 64)], reps)
    if part == "dense":
        dense_block("B=1 H=12 N=32760 D=64", 1, 12, 32760, 64, [(128, 64), (64, 64)], reps)
        return

    # TopK(0.05), 128x64 tiles: plan and kernel separately.
    q, k, v = video_like(cupy, B, H, N, D, strength=1.0, seed=2)
    scale = D ** -0.5
    block = (128, 64)
    plan_ms = time_ms(cupy, lambda: backend.build_plan(cupy, q, k, TopK(ratio=0.05), "natural",
                                                       4, block, scale), reps=reps)
    plan = backend.build_plan(cupy, q, k, TopK(ratio=0.05), "natural", 4, block, scale)
    plan_queued_ms = time_ms_queued(cupy, lambda: backend.build_plan(
        cupy, q, k, TopK(ratio=0.05), "natural", 4, block, scale))
    means_ms = time_ms_queued(cupy, lambda: (backend._tile_means(cupy, q, block[0], scale),
                                             backend._tile_means(cupy, k, block[1], 1.0)))
    scores_ms = time_ms_queued(cupy, lambda: backend.fused_block_scores(q, k, block, scale))
    record(what="topk 0.05 plan breakdown", shape=target, impl="ours 128x64",
           plan_sync_ms=plan_ms[0], plan_queued_ms=plan_queued_ms[0],
           tile_means_queued_ms=means_ms[0], block_scores_queued_ms=scores_ms[0],
           select_queued_ms_by_difference=plan_queued_ms[0] - scores_ms[0])
    kernel_ms = time_ms(cupy, lambda: ours(q, k, v, plan), reps=reps)
    kernel_queued_ms = time_ms_queued(cupy, lambda: ours(q, k, v, plan))
    dense_plan = backend.build_plan(cupy, q, k, None, "natural", 4, block, scale)
    dense_ms = time_ms(cupy, lambda: ours(q, k, v, dense_plan), reps=reps)
    dense_out = ours(q, k, v, dense_plan)[0]
    out, _, kept, _, _ = ours(q, k, v, plan, want_stats=True)
    record(what="topk 0.05", shape=target, impl="ours 128x64", plan_ms=plan_ms[0],
           plan_queued_ms=plan_queued_ms[0], ms=kernel_ms[0], queued_ms=kernel_queued_ms[0],
           dense_ms=dense_ms[0], sparsity=1 - float(kept.mean()),
           rel_l2_vs_dense=rel_l2(cupy, out, dense_out),
           recall_min_mean=sampled_recall(cupy, q, k, kept, block, scale))
    if part == "topk":
        return

    # In-loop skip rules on video-like heads, peak order, vs this kernel's dense path.
    rules = [("Blasst(1e-3)", Blasst(1e-3)), ("Blasst(1e-2)", Blasst(1e-2)),
             ("Cef(-8.5)", Cef(-8.5)), ("Recall(0.95)", Recall(0.95)),
             ("Recall(0.8)", Recall(0.8)), ("Recall(0.95,exact)", Recall(0.95, exact=True))]
    # SLA linear branch at the target shape (critical 5%, negligible 50%: 45% marginal).
    from pysparse_attn._select import SlaSplit

    sla_plan = backend.build_plan(cupy, q, k, SlaSplit(0.05, 0.5), "natural", 4, block, scale)
    linear_ms = time_ms(cupy, lambda: backend.linear_branch(q, k, v, sla_plan.marginal, block,
                                                            "softmax", 0.0), reps=reps)
    record(what="SLA linear branch", shape=target, impl="ours (cuBLAS GEMMs) 128x64",
           ms=linear_ms[0], marginal_share=float(sla_plan.marginal.mean()))

    for strength in ((1.0, 2.0) if quick else (1.0, 1.5, 2.0, 3.0)):
        q, k, v = video_like(cupy, B, H, N, D, strength=strength, seed=3)
        for block in [(128, 64), (64, 64)]:
            dense_plan = backend.build_plan(cupy, q, k, None, "natural", 4, block, scale)
            dense_ms = time_ms(cupy, lambda: ours(q, k, v, dense_plan), reps=reps)
            dense_out = ours(q, k, v, dense_plan)[0]
            record(what="dense error", shape=target, workload=f"video-like s={strength}",
                   impl=f"ours {block[0]}x{block[1]} natural",
                   rel_l2_vs_exact=sampled_error(cupy, q, k, v, dense_out, block, scale))
            peak_plan = backend.build_plan(cupy, q, k, None, "peak", 4, block, scale)
            for label, rule in rules:
                ms = time_ms(cupy, lambda: ours(q, k, v, peak_plan, rule), reps=reps)
                out, _, kept, _, bound = ours(q, k, v, peak_plan, rule, want_stats=True)
                record(what="skip rule", shape=target, workload=f"video-like s={strength}",
                       impl=f"ours {block[0]}x{block[1]} peak", rule=label, ms=ms[0],
                       dense_ms=dense_ms[0], speedup=dense_ms[0] / ms[0],
                       sparsity=1 - float(kept.mean()),
                       rel_l2_vs_dense=rel_l2(cupy, out, dense_out),
                       rel_l2_vs_exact=sampled_error(cupy, q, k, v, out, block, scale),
                       recall_bound_min=float(bound.min()),
                       recall_min_mean=sampled_recall(cupy, q, k, kept, block, scale))
            if strength != 1.0:
                continue
            # Bookkeeping: the same (full) kept set for every rule, nothing skipped (checked).
            for label, rule in [("none", None), ("Blasst(1e-30)", Blasst(1e-30)),
                                ("Recall(1.0)", Recall(1.0)), ("Cef(-1e4)", Cef(-1e4))]:
                ms = time_ms(cupy, lambda: ours(q, k, v, peak_plan, rule), reps=reps)
                kept = ours(q, k, v, peak_plan, rule, want_stats=True)[2]
                record(what="bookkeeping (nothing skipped)", shape=target,
                       impl=f"ours {block[0]}x{block[1]} peak", rule=label, ms=ms[0],
                       all_kept=bool(kept.all()))
        del q, k, v

    if not quick:
        dense_block("B=1 H=12 N=32760 D=64", 1, 12, 32760, 64, [(128, 64), (64, 64)], reps)
        dense_block("B=1 H=40 N=75600 D=128", 1, 40, 75600, 128, [(128, 64)], 3)
        # Skip rules at the Wan2.2 shape on video-like heads.
        B2, H2, N2 = 1, 40, 75600
        q, k, v = video_like(cupy, B2, H2, N2, D, strength=1.0, seed=4,
                             frames_hw=(21, 45, 80))
        plan_d = backend.build_plan(cupy, q, k, None, "natural", 4, (128, 64), scale)
        plan_p = backend.build_plan(cupy, q, k, None, "peak", 4, (128, 64), scale)
        dense_ms = time_ms(cupy, lambda: ours(q, k, v, plan_d), reps=3)
        dense_out = ours(q, k, v, plan_d)[0]
        for label, rule in [("Blasst(1e-3)", Blasst(1e-3)), ("Recall(0.95)", Recall(0.95))]:
            ms = time_ms(cupy, lambda: ours(q, k, v, plan_p, rule), reps=3)
            out, _, kept, _, _ = ours(q, k, v, plan_p, rule, want_stats=True)
            record(what="skip rule", shape="B=1 H=40 N=75600 D=128",
                   workload="video-like s=1.0", impl="ours 128x64 peak", rule=label, ms=ms[0],
                   dense_ms=dense_ms[0], speedup=dense_ms[0] / ms[0],
                   sparsity=1 - float(kept.mean()),
                   rel_l2_vs_dense=rel_l2(cupy, out, dense_out))


def _record(records, fields):
    records.append(fields)
    if records.path is not None:  # written as measured: a run cut short keeps its numbers
        with open(records.path, "a") as handle:
            handle.write(json.dumps({**records.meta, **fields}) + "\n")
    print(_markdown([fields]).splitlines()[-1], flush=True)


def backward_inputs(cupy, B, H, N, D, frames_hw=None):
    """The backward targets' inputs: video-like q, k, v (strength 1, on the token grid
    ``frames_hw``, as :func:`video_like`) and a random dO, bf16."""
    q, k, v = video_like(cupy, B, H, N, D, 1.0, seed=3, frames_hw=frames_hw)
    do = random_inputs(cupy, B, H, N, D, seed=4)[0]
    return q, k, v, do


def cudnn_backward_ms(cupy, q, k, v, do, reps):
    """(median, min, max) ms of torch SDPA's cuDNN backward on the same tensors (dense, no
    mask); raises where torch or its cuDNN attention is missing."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tq, tk, tv = (torch.from_dlpack(x).detach().requires_grad_() for x in (q, k, v))
    tdo = torch.from_dlpack(do)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        tout = F.scaled_dot_product_attention(tq, tk, tv)

    def cudnn_backward():
        torch.autograd.grad(tout, (tq, tk, tv), tdo, retain_graph=True)

    return time_ms_queued(cupy, cudnn_backward, reps=reps)


def forward_kept_set(cupy, backend, q, k, v, block, selector, scale):
    """(out, lse, kept) of the default forward on the plan of ``selector`` (None: dense),
    natural order: the kept set a backward replays and the forward statistics it is given."""
    plan = backend.build_plan(cupy, q, k, selector, "natural", 4, block, scale)
    return backend.forward(q, k, v, plan, None, scale, True)[:3]


def step_backward(log, records, quick):
    """The backward targets: dense (every tile kept) and kept-set replay at 5% of 128x64 tiles
    (TopK(0.05) on video-like heads), dQ by atomics and deterministic, beside torch SDPA's
    cuDNN backward; B=1, H=12, N=32760, D=128, bf16. The forward's out/lse are given (what
    attention_vjp replays); the list building alone and the recompute path are timed too."""
    import cupy

    from pysparse_attn.backends import cupy as backend

    B, H, N, D = (1, 12, 8192, 128) if quick else (1, 12, 32760, 128)
    shape = f"B{B} H{H} N{N} D{D}"
    reps = 5 if quick else 10
    scale = D ** -0.5
    dense_flops = 2.5 * 4.0 * B * H * N * N * D  # backward = 2.5x forward FLOPs (5 GEMMs vs 2)
    q, k, v, do = backward_inputs(cupy, B, H, N, D)
    try:
        ms = cudnn_backward_ms(cupy, q, k, v, do, reps)
        _record(records, dict(what="backward dense", shape=shape, impl="torch sdpa cudnn",
                              ms=ms[0], tflops=dense_flops / (ms[0] * 1e-3) / 1e12))
    except Exception as error:  # torch is optional: our numbers still stand alone
        log(f"backward: no cuDNN baseline ({type(error).__name__}: {error})")
    for label, block, selector in (("dense", (128, 64), None),
                                   ("dense", (64, 64), None),
                                   ("TopK(0.05) replay", (128, 64), TopK(ratio=0.05)),
                                   ("TopK(0.05) replay", (64, 64), TopK(ratio=0.05))):
        out, lse, kept = forward_kept_set(cupy, backend, q, k, v, block, selector, scale)
        density = float(kept.mean())
        flops = dense_flops * density
        lists_ms = time_ms_queued(
            cupy, lambda: backend._kept_lists(cupy, kept, block, (B, H, N, N)), reps=reps)
        # The density bound a public call hands over (a plan's capacity: here the selector's).
        nk = tile_count(N, block[1])
        bound = None if selector is None else selector.count(nk) / nk
        families = [None] + ([name for name in backend.BACKWARD_KERNELS
                              if backend.backward_kernel_unavailable_reason(name) is None]
                             if selector is not None else [])
        for kernel, deterministic in ((f, d) for f in families for d in (False, True)):
            def run(recompute=False):
                return backend.attention_backward(
                    q, k, v, do, kept, block, scale, out=None if recompute else out,
                    lse=None if recompute else lse, deterministic=deterministic,
                    grad_dtype=q.dtype, density=bound, kernel=kernel)
            ms = time_ms_queued(cupy, run, reps=reps)
            recompute_ms = time_ms_queued(cupy, lambda: run(True), reps=reps)
            chosen = kernel or backend.default_backward_kernel(bound)
            _record(records, dict(what=f"backward {label}", shape=shape,
                                  impl=f"ours {block[0]}x{block[1]} {chosen}"
                                  f"{' (default)' if kernel is None else ''}"
                                  f"{' deterministic' if deterministic else ' reduced dQ'}",
                                  ms=ms[0], tflops=flops / (ms[0] * 1e-3) / 1e12,
                                  density=density, lists_ms=lists_ms[0],
                                  with_forward_ms=recompute_ms[0]))
        if selector is not None:  # the public call, as an autograd bridge makes it
            import pysparse_attn as psa

            ms = time_ms_queued(cupy, lambda: psa.attention_vjp(
                q, k, v, do, select=selector, kept=kept, out=out, lse=lse, block=block),
                reps=reps)
            _record(records, dict(what=f"backward {label}", shape=shape,
                                  impl=f"psa.attention_vjp {block[0]}x{block[1]} (kept, out, "
                                  f"lse given)", ms=ms[0], density=density))


#: The other shapes and sparsity issue 10 asks to report, beside step_backward's main one:
#: (label, (B, H, N, D), token grid of the video-like heads, kept-set selectors).
BACKWARD_SHAPES = (
    ("Wan2.1-1.3B, 90% sparsity", (1, 12, 32760, 128), (21, 30, 52), (TopK(ratio=0.10),)),
    ("D = 64", (1, 12, 32760, 64), (21, 30, 52), (None, TopK(ratio=0.05))),
    ("Wan 720p, H = 40", (1, 40, 75600, 128), (21, 45, 80), (None, TopK(ratio=0.05))),
)


def step_backward_shapes(log, records, quick):
    """The backward at BACKWARD_SHAPES: dense and kept-set replay through the default kernel
    (reduced dQ) and ``psa.attention_vjp``, beside torch SDPA's cuDNN backward on the same
    tensors; the forward's out/lse given, as in :func:`step_backward`."""
    import cupy

    import pysparse_attn as psa
    from pysparse_attn.backends import cupy as backend

    reps = 3 if quick else 10
    block = (128, 64)
    for label, (B, H, N, D), grid, selectors in BACKWARD_SHAPES:
        if quick:
            H, N, grid = min(H, 4), 8192, (8, 32, 32)
        shape = f"B{B} H{H} N{N} D{D}"
        scale = D ** -0.5
        dense_flops = 2.5 * 4.0 * B * H * N * N * D
        q, k, v, do = backward_inputs(cupy, B, H, N, D, frames_hw=grid)
        try:
            ms = cudnn_backward_ms(cupy, q, k, v, do, reps)
            _record(records, dict(what=f"backward dense ({label})", shape=shape,
                                  impl="torch sdpa cudnn", ms=ms[0],
                                  tflops=dense_flops / (ms[0] * 1e-3) / 1e12))
        except Exception as error:  # torch is optional: our numbers still stand alone
            log(f"backward shapes: no cuDNN baseline ({type(error).__name__}: {error})")
        nk = tile_count(N, block[1])
        for selector in selectors:
            out, lse, kept = forward_kept_set(cupy, backend, q, k, v, block, selector, scale)
            density = float(kept.mean())
            bound = None if selector is None else selector.count(nk) / nk
            case = "dense" if selector is None else f"TopK({selector.ratio}) replay"
            ms = time_ms_queued(cupy, lambda: backend.attention_backward(
                q, k, v, do, kept, block, scale, out=out, lse=lse, grad_dtype=q.dtype,
                density=bound), reps=reps)
            _record(records, dict(what=f"backward {case} ({label})", shape=shape,
                                  impl=f"ours 128x64 {backend.default_backward_kernel(bound)} "
                                  f"(default)", ms=ms[0], density=density,
                                  tflops=dense_flops * density / (ms[0] * 1e-3) / 1e12))
            if selector is not None:
                ms = time_ms_queued(cupy, lambda: psa.attention_vjp(
                    q, k, v, do, select=selector, kept=kept, out=out, lse=lse, block=block),
                    reps=reps)
                _record(records, dict(what=f"backward {case} ({label})", shape=shape,
                                      impl="psa.attention_vjp 128x64 (kept, out, lse given)",
                                      ms=ms[0], density=density))
            del out, lse, kept
        del q, k, v, do
        cupy.get_default_memory_pool().free_all_blocks()


class _Records(list):
    """Measurements, appended to ``path`` (JSONL with ``meta``) as they are taken."""

    path = None
    meta: dict = {}


def _markdown(records):
    lines = ["| what | shape | impl | rule / workload | ms | TFLOP/s | other |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        other = {k: v for k, v in r.items() if k not in (
            "what", "shape", "impl", "rule", "workload", "ms", "tflops", "device", "date",
            "commit", "command")}
        other_text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else
                               f"{k}={tuple(round(x, 4) for x in v)}" if isinstance(v, tuple)
                               else f"{k}={v}" for k, v in other.items())
        rule = " ".join(str(r.get(k, "")) for k in ("rule", "workload")).strip()
        ms = f"{r['ms']:.3f}" if "ms" in r else ""
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        lines.append(f"| {r['what']} | {r.get('shape', '')} | {r.get('impl', '')} | {rule} | "
                     f"{ms} | {tf} | {other_text} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="compile,tests,sanitize,time",
                        help="comma-separated subset of compile,tests,sanitize,time,dense,topk,"
                        "backward,backward_shapes (dense, topk: only those rows of the time "
                        "step; backward: the backward targets, backward_shapes: the other "
                        "shapes they are reported at; neither in the default)")
    parser.add_argument("--tests", default=None, metavar="EXPR",
                        help="pytest -k expression selecting a subset of the GPU tests")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shapes")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench/results"))
    parser.add_argument("--sanitize-target", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sanitize_target:
        sanitize_target()
        return 0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split(",")
    messages = []

    def log(text):
        print(text, flush=True)
        messages.append(text)

    device = "no GPU"
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        device = f"{props['name'].decode()} (sm_{props['major']}{props['minor']}), " \
                 f"CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"
    except Exception as error:
        device = f"no GPU ({error})"
    stamp = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(device=device, date=stamp.isoformat(timespec="seconds"), commit=git_commit(),
                command=" ".join([Path(sys.executable).name] + sys.argv), host=platform.node())
    log(f"device: {device}; commit {meta['commit']}; {meta['date']}")
    status = 0
    if "compile" in steps:
        status |= bool(step_compile(out_dir, log))
    if "tests" in steps:
        status |= bool(step_tests(out_dir, log, args.tests))
    if "sanitize" in steps:
        codes = step_sanitize(out_dir, log)
        status |= bool(codes and any(codes.values()))
    records = _Records()
    if "backward" in steps or "backward_shapes" in steps:
        records.path = out_dir / f"gpu-backward-{stamp.strftime('%Y%m%dT%H%M%S')}.jsonl"
        records.meta = meta
        try:
            if "backward" in steps:
                step_backward(log, records, args.quick)
            if "backward_shapes" in steps:
                step_backward_shapes(log, records, args.quick)
        finally:
            (out_dir / "summary-backward.md").write_text(_markdown(records) + "\n")
            print(_markdown(records))
    if "time" in steps or "dense" in steps or "topk" in steps:
        records.path = out_dir / f"gpu-{stamp.strftime('%Y%m%dT%H%M%S')}.jsonl"
        records.meta = meta
        try:
            part = "all" if "time" in steps else "dense" if "dense" in steps else "topk"
            step_time(log, records, args.quick, part)
        finally:
            (out_dir / "summary.md").write_text(
                "\n".join(f"- {m}" for m in messages) + "\n\n" + _markdown(records) + "\n")
            print(_markdown(records))
    print("\n".join(messages[:6]))
    return status


if __name__ == "__main__":
    sys.exit(main())
