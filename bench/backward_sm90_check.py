"""Device check of the wgmma (sm90) dK/dV backward pass: correctness, then timing.

Run on an H200 (or any compute capability 9.0 device) in one call of under four minutes::

    python3 bench/backward_sm90_check.py

Two wgmma families are checked: ``sm90`` (two warpgroups, 128 keys a CTA) and ``sm90_k64`` (one
warpgroup, 64 keys), each against the mma.sync kernel (``mma_sync``, the validated default).

1. ``registers``: each sm90 instance's registers and local memory (CuPy function attributes);
   a compile failure prints the NVRTC log and the script moves on.
2. ``vs fp64``: for bf16 and fp16, D 64 and 128, tiles (64, 64) and (128, 64), atomic and
   deterministic dQ, on B=1, Hq=2, Hkv=1 (GQA), Nq=333, Nk=301 (partial tiles, cross sizes), a
   sink key tile and a key tile nobody keeps: both kernels against the float64 reference on the
   same kept set. Pass: finite, the unkept key tile's dK/dV exactly zero, and per gradient
   ``err(sm90) <= 2 err(mma_sync) + 1e-3`` and ``<= GRAD_TOLERANCE[dtype]`` (relative L2).
   Why 2x: both kernels round P and dS to the 16-bit type before their products (as every
   tensor-core backward must), so the validated mma_sync kernel's error is the measure of what
   that rounding costs on this problem; the fast kernel may order its fp32 sums differently and
   round dS once more for dQ, not more than double it (the flash-attention rule, as in
   tests/test_gpu_backward.py); the 1e-3 floor covers fp32 summation order and exp2.approx.
3. ``vs mma_sync``: the same grid of cases on a larger problem (B=2, Hq=4, Hkv=2, Nq=1500,
   Nk=1300, a (B, N, H, D) buffer seen transposed, long key-major lists): rel-L2 difference of
   each gradient under GRAD_TOLERANCE[dtype] (the two kernels' errors add at most), and the
   deterministic dQ bitwise equal (the same dQ pass runs after either).
4. ``timing``: bf16 B=1 H=12 N=32760 D=128, dense and TopK(0.05) kept-set replay (the forward's
   out/lse given), both kernels, both dQ modes, 128x64 and 64x64 tiles, beside torch SDPA's
   cuDNN backward in the same process: CUDA-event medians of 10 runs after warm-up; inputs,
   kept set and cuDNN anchor from bench/gpu.py (backward_inputs, forward_kept_set,
   cudnn_backward_ms). A short table is printed last.

Every case is guarded (an exception prints and the next case runs); a watchdog ends the process
at ``--budget`` seconds (default 225) after printing the stacks, so a hung kernel cannot eat
the device call; what was measured by then has already been printed.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu import (backward_inputs, cudnn_backward_ms, forward_kept_set,  # noqa: E402
                 time_ms)

from pysparse_attn import _reference  # noqa: E402
from pysparse_attn._plan import tile_count  # noqa: E402
from pysparse_attn._select import TopK  # noqa: E402

DTYPES = ("bfloat16", "float16")
HEAD_DIMS = (64, 128)
BLOCKS = ((64, 64), (128, 64))
FAST = ("sm90", "sm90_k64")  # 128 and 64 keys a CTA (backends.cupy.BACKWARD_KERNELS)
KERNELS = ("mma_sync",) + FAST
#: As tests/test_gpu_backward.py: bf16 keeps 8 significant bits (P, dS rounded: relative L2
#: ~1e-2 over long sums), fp16 11 bits (~8x smaller).
GRAD_TOLERANCE = {"bfloat16": 3e-2, "float16": 5e-3}
ERROR_FLOOR = 1e-3

STARTED = time.time()
FAILURES = []


def elapsed():
    return time.time() - STARTED


def say(text):
    print(f"[{elapsed():6.1f} s] {text}", flush=True)


def guarded(label):
    """``fn`` run under a guard: an exception is printed (a compile error with its NVRTC log)
    and counted as a failure, and None returned."""
    def run(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # every case on its own
            FAILURES.append(label)
            log = getattr(error, "get_message", None)
            say(f"{label}: ERROR {type(error).__name__}")
            print(log() if callable(log) else str(error)[:8000], flush=True)
            traceback.print_exc(limit=4)
            return None
    return run


def _low(dtype_name):
    if dtype_name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype_name)


def problem(cupy, rng, dtype_name, B, Hq, Hkv, Nq, Nk, D, layout="bhnd"):
    """Device q, k, v, do in ``dtype_name`` and the exact float64 values of the rounded arrays."""
    shapes = ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D), (B, Hq, Nq, D))
    device, exact = [], []
    for shape, gain in zip(shapes, (1.5, 1.5, 1.0, 1.0)):
        x = rng.standard_normal(shape).astype(np.float32) * gain
        if layout == "bnhd":
            y = cupy.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).astype(
                _low(dtype_name)).transpose(0, 2, 1, 3)
        else:
            y = cupy.asarray(x).astype(_low(dtype_name))
        device.append(y)
        exact.append(cupy.asnumpy(y.astype(cupy.float32)).astype(np.float64))
    return device, exact


def kept_set(rng, B, Hq, nq, nk, density, sink, empty):
    kept = rng.random((B, Hq, nq, nk)) < density
    kept[..., sink] = True
    kept[..., empty] = False
    return kept


def host64(cupy, x):
    return cupy.asnumpy(x.astype(cupy.float32)).astype(np.float64)


def rel_l2(a, b):
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a))


def step_registers(cupy, backend):
    device = cupy.cuda.runtime.getDevice()
    for name in FAST:
        for dtype_name in DTYPES:
            for D in HEAD_DIMS:
                for stage in ("dkdv_accumulate_dq", "dkdv"):
                    label = f"compile {name} {stage} {dtype_name} D={D}"

                    def one():
                        function, shared = backend._backward_kernel(device, stage, dtype_name,
                                                                    D, name)
                        say(f"{label}: {function.num_regs} regs, local "
                            f"{function.local_size_bytes} B, shared {shared} B")
                    guarded(label)(one)


def step_vs_fp64(cupy, backend, rng):
    B, Hq, Hkv, Nq, Nk = 1, 2, 1, 333, 301
    for dtype_name in DTYPES:
        for D in HEAD_DIMS:
            for block in BLOCKS:
                for deterministic in (False, True):
                    label = (f"vs fp64 {dtype_name} D={D} {block[0]}x{block[1]} "
                             f"{'deterministic' if deterministic else 'atomic'}")
                    guarded(label)(_vs_fp64_case, cupy, backend, rng, label, dtype_name, D,
                                   block, deterministic, B, Hq, Hkv, Nq, Nk)


def _vs_fp64_case(cupy, backend, rng, label, dtype_name, D, block, deterministic, B, Hq, Hkv,
                  Nq, Nk):
    (q, k, v, do), exact = problem(cupy, rng, dtype_name, B, Hq, Hkv, Nq, Nk, D)
    nq, nk = tile_count(Nq, block[0]), tile_count(Nk, 64)
    kept = kept_set(rng, B, Hq, nq, nk, 0.5, sink=0, empty=2)
    scale = D ** -0.5
    reference = _reference.attention_backward(*exact, kept, block, scale)
    grads = {name: backend.attention_backward(q, k, v, do, cupy.asarray(kept), block, scale,
                                              deterministic=deterministic, kernel=name)
             for name in KERNELS}
    cupy.cuda.runtime.deviceSynchronize()
    for name in FAST:
        ok, parts = True, []
        for index, grad in enumerate(("dq", "dk", "dv")):
            want = reference[index]
            base, fast = (host64(cupy, grads[which][index]) for which in ("mma_sync", name))
            finite = bool(np.isfinite(fast).all())
            base_error, fast_error = rel_l2(base, want), rel_l2(fast, want)
            bound = min(2 * base_error + ERROR_FLOOR, GRAD_TOLERANCE[dtype_name])
            good = finite and fast_error <= bound
            if grad != "dq":  # key tile 2 kept by nobody: exact zeros
                good = good and bool((fast[:, :, 2 * 64:3 * 64] == 0).all())
            ok = ok and good
            parts.append(f"{grad} err {fast_error:.2e} (mma_sync {base_error:.2e}, bound "
                         f"{bound:.2e}, max|d| {np.abs(fast - want).max():.2e})")
        if not ok:
            FAILURES.append(f"{label} {name}")
        say(f"{label} {name}: {'PASS' if ok else 'FAIL'}: " + "; ".join(parts))


def step_vs_mma_sync(cupy, backend, rng):
    B, Hq, Hkv, Nq, Nk = 2, 4, 2, 1500, 1300
    for dtype_name in DTYPES:
        for D in HEAD_DIMS:
            for block in BLOCKS:
                label = f"vs mma_sync {dtype_name} D={D} {block[0]}x{block[1]} bnhd"
                guarded(label)(_vs_mma_sync_case, cupy, backend, rng, label, dtype_name, D,
                               block, B, Hq, Hkv, Nq, Nk)


def _vs_mma_sync_case(cupy, backend, rng, label, dtype_name, D, block, B, Hq, Hkv, Nq, Nk):
    (q, k, v, do), _ = problem(cupy, rng, dtype_name, B, Hq, Hkv, Nq, Nk, D, layout="bnhd")
    nq, nk = tile_count(Nq, block[0]), tile_count(Nk, 64)
    kept = cupy.asarray(kept_set(rng, B, Hq, nq, nk, 0.3, sink=1, empty=5))
    scale = D ** -0.5
    for name in FAST:
        ok, parts = True, []
        for deterministic in (False, True):
            base, fast = (backend.attention_backward(q, k, v, do, kept, block, scale,
                                                     deterministic=deterministic, kernel=which)
                          for which in ("mma_sync", name))
            for grad, a, b in zip(("dq", "dk", "dv"), fast, base):
                a, b = host64(cupy, a), host64(cupy, b)
                difference = rel_l2(a, b)
                good = bool(np.isfinite(a).all()) and difference <= GRAD_TOLERANCE[dtype_name]
                if grad != "dq":
                    good = good and bool((a[:, :, 5 * 64:6 * 64] == 0).all())
                if deterministic and grad == "dq":
                    good = good and bool((a == b).all())
                ok = ok and good
                parts.append(f"{'det' if deterministic else 'atomic'} {grad} {difference:.2e}")
        if not ok:
            FAILURES.append(f"{label} {name}")
        say(f"{label} {name}: {'PASS' if ok else 'FAIL'}: rel-L2 vs mma_sync " +
            ", ".join(parts))


def step_timing(cupy, backend, rows, reps):
    B, H, N, D = 1, 12, 32760, 128
    scale = D ** -0.5
    dense_flops = 2.5 * 4.0 * B * H * N * N * D  # backward = 2.5x forward FLOPs (5 GEMMs vs 2)
    q, k, v, do = backward_inputs(cupy, B, H, N, D)

    def cudnn():
        ms = cudnn_backward_ms(cupy, q, k, v, do, reps)[0]
        rows.append(("dense", "-", "torch sdpa cudnn", "-", ms, dense_flops / ms / 1e9, ""))
        say(f"timing cudnn dense: {ms:.2f} ms")
    guarded("timing cudnn")(cudnn)
    for label, selector in (("dense", None), ("TopK(0.05)", TopK(ratio=0.05))):
        for block in ((128, 64), (64, 64)):
            case = f"timing {label} {block[0]}x{block[1]}"
            state = guarded(case + " forward")(forward_kept_set, cupy, backend, q, k, v, block,
                                               selector, scale)
            if state is None:
                continue
            out, lse, kept = state
            density = float(kept.mean())
            reference = {}
            for deterministic in (False, True):
                for name in KERNELS:
                    mode = "deterministic" if deterministic else "atomic dQ"

                    def one():
                        def run():
                            return backend.attention_backward(
                                q, k, v, do, kept, block, scale, out=out, lse=lse,
                                deterministic=deterministic, grad_dtype=q.dtype, kernel=name)
                        grads = run()
                        note = ""
                        if name == "mma_sync":
                            reference[deterministic] = grads
                        elif deterministic in reference:  # the mma_sync gradients
                            wide = [[x.astype(cupy.float32) for x in pair]
                                    for pair in zip(grads, reference[deterministic])]
                            diffs = [float(cupy.linalg.norm(a - b) / cupy.linalg.norm(b))
                                     for a, b in wide]
                            note = "rel diff dq/dk/dv " + "/".join(f"{d:.1e}" for d in diffs)
                        ms = time_ms(cupy, run, reps=reps)[0]
                        tflops = dense_flops * density / ms / 1e9
                        rows.append((label, f"{block[0]}x{block[1]}", name, mode, ms, tflops,
                                     f"density {density:.3f} {note}"))
                        say(f"{case} {name} {mode}: {ms:.2f} ms {tflops:.0f} TFLOP/s {note}")
                    guarded(f"{case} {name} {mode}")(one)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=225.0,
                        help="seconds before the watchdog ends the process")
    parser.add_argument("--reps", type=int, default=10, help="timed runs per measurement")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.budget, exit=True)

    try:
        import cupy

        from pysparse_attn.backends import cupy as backend

        reason = backend.unavailable_reason() or backend.backward_kernel_unavailable_reason(
            "sm90")
    except Exception as error:  # no CuPy or no device: nothing to check here
        reason = f"{type(error).__name__}: {error}"
    if reason is not None:
        say(f"sm90 backward unavailable here: {reason}")
        return 2
    say(f"device {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
        f"CuPy {cupy.__version__}")
    rng = np.random.default_rng(20261202)
    step_registers(cupy, backend)
    step_vs_fp64(cupy, backend, rng)
    step_vs_mma_sync(cupy, backend, rng)
    rows = []
    if not args.skip_timing:
        step_timing(cupy, backend, rows, args.reps)
    print("\n| selection | tiles | kernel | dQ | ms | TFLOP/s | notes |")
    print("|---|---|---|---|---|---|---|")
    for selection, tiles, name, mode, ms, tflops, note in rows:
        print(f"| {selection} | {tiles} | {name} | {mode} | {ms:.2f} | {tflops:.0f} | {note} |")
    print(f"\n{len(FAILURES)} failing case(s){': ' + ', '.join(FAILURES) if FAILURES else ''}; "
          f"{elapsed():.0f} s", flush=True)
    faulthandler.cancel_dump_traceback_later()
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
