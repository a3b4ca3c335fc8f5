"""A training step through SLA at the Wan2.1-1.3B attention shape, beside torch SDPA (GPU).

Times, in one process on one GPU, at (B, H, N, D) = (1, 12, 32760, 128), bfloat16, video-like
heads (bench/gpu.py's workload):

* ``SparseLinearAttention`` forward and forward+backward at 95% tile sparsity
  (``critical=0.05``), W and b trainable;
* torch SDPA's cuDNN forward, backward (``.peers/anchors.py``) and forward+backward;
* the overhead of the torch operator ``pysparse_attn.torch.attention`` over the core call
  (``pysparse_attn.attention`` on CuPy arrays), both queued back to back
  (``triton.testing.do_bench``, median), at this shape and at N = 4096 where the host side shows;
* the same overhead for ``pysparse_attn.jax.attention`` under ``jax.jit`` when JAX sees a GPU
  (skipped with the reason otherwise).

    python3 bench/train_step.py [--out DIR] [--time-budget S]

Targets: torch op overhead <= 0.02 ms; SLA forward+backward >= 5x faster than SDPA cuDNN
forward+backward. A slow step is timed on a
few repetitions only and the JSON record says so; every figure is written as soon as it is
measured, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

# JAX would take 75% of the GPU's memory at its first use, from under torch's and CuPy's.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, ".peers")
from pysparse_attn.bench.results import git_commit  # noqa: E402

SHAPE = (1, 12, 32760, 128)
SMALL_N = 4096
# A call slower than this is not given to do_bench (which would repeat it for seconds):
# it is timed by CUDA events over a few repetitions instead.
SLOW_MS = 500.0


class Recorder:
    """Figures printed and appended to the JSON file at once."""

    def __init__(self, out, meta):
        self.meta, self.records = meta, []
        self.path = None
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            self.path = Path(out) / f"train-step-{meta['date']}.json"

    def add(self, name, ms, note="", **extra):
        record = dict(name=name, ms=ms, note=note, **extra)
        self.records.append(record)
        shown = "        -   " if ms is None else f"{ms:9.3f} ms"
        print(f"{name:56s} {shown}   {note}", flush=True)
        if self.path:
            self.path.write_text(json.dumps(dict(self.meta, records=self.records), indent=1))
        return ms


def timed(torch, fn, deadline=None, reps_slow=3):
    """Median ms of ``fn`` queued back to back; ``(ms, method)``.

    A call slower than ``SLOW_MS`` is timed by CUDA events, call by call, at most
    ``reps_slow`` times and not past ``deadline`` (``time.perf_counter()`` seconds).
    """
    from triton.testing import do_bench

    fn()  # compile, warm caches
    torch.cuda.synchronize()
    tic = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = (time.perf_counter() - tic) * 1e3
    if once < SLOW_MS:
        return do_bench(fn, warmup=25, rep=200, return_mode="median"), "do_bench median"
    times = [once]
    while len(times) < reps_slow and (deadline is None
                                      or time.perf_counter() + once / 1e3 < deadline):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], f"median of {len(times)} (slow: {once:.0f} ms)"


def overheads(torch, recorder, shape, label):
    """The torch operator and the core call on the same data, TopK(0.05), queued."""
    import cupy

    import pysparse_attn as psa
    import pysparse_attn.torch as pt
    from gpu import video_like

    q, k, v = video_like(cupy, *shape, strength=1.0, seed=1)
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    options = dict(select=psa.TopK(ratio=0.05), block=(128, 64))
    core, _ = timed(torch, lambda: psa.attention(q, k, v, **options))
    recorder.add(f"core psa.attention TopK(0.05) {label}", core, "CuPy arrays")
    dlpack, _ = timed(torch, lambda: psa.attention(tq, tk, tv, **options))
    recorder.add(f"core psa.attention on torch tensors {label}", dlpack, "DLPack in and out")
    op, _ = timed(torch, lambda: pt.attention(tq, tk, tv, **options))
    recorder.add(f"torch op pt.attention {label}", op, "custom op, no grad")
    recorder.add(f"torch op overhead over the core call {label}", op - core,
                 "target <= 0.02 ms", target_ms=0.02, met=op - core <= 0.02)


def jax_overhead(recorder, shape, label):
    """``jax.jit`` of pysparse_attn.jax.attention on GPU arrays against the core call."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as error:
        print(f"JAX overhead skipped: JAX is not importable ({error})")
        return recorder.add(f"jax overhead {label}", None, f"skipped: {error}")
    if not any(d.platform == "gpu" for d in jax.devices()):
        reason = f"JAX sees no GPU (devices: {jax.devices()})"
        print(f"JAX overhead skipped: {reason}")
        return recorder.add(f"jax overhead {label}", None, f"skipped: {reason}")
    import cupy
    import numpy as np

    import pysparse_attn as psa
    import pysparse_attn.jax as pj

    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.bfloat16)
               for _ in range(3))
    options = dict(select=psa.TopK(ratio=0.05), block=(128, 64))
    route = pj.device_route()
    jitted = jax.jit(lambda q, k, v: pj.attention(q, k, v, **options))
    cq, ck, cv = (cupy.from_dlpack(x) for x in (q, k, v))

    def batch_ms(call, finish, n=50):
        """Best of 5 batches of ``n`` queued calls, wall clock, ended by one ``finish``."""
        finish(call())
        best = float("inf")
        for _ in range(5):
            tic = time.perf_counter()
            for _ in range(n):
                result = call()
            finish(result)
            best = min(best, (time.perf_counter() - tic) * 1e3 / n)
        return best

    jax_ms = batch_ms(lambda: jitted(q, k, v), lambda out: out.block_until_ready())
    core_ms = batch_ms(lambda: psa.attention(cq, ck, cv, **options),
                       lambda out: cupy.cuda.Device().synchronize())
    recorder.add(f"jax.jit pj.attention {label}", jax_ms,
                 f"route: {route or 'pure_callback through the host'}")
    recorder.add(f"core psa.attention (CuPy) {label}, wall", core_ms, "same timing method")
    return recorder.add(f"jax overhead over the core call {label}", jax_ms - core_ms,
                        "wall clock, best of 5 batches of 50 queued calls")


def training_step(torch, recorder, args, deadline):
    import cupy

    import anchors
    import pysparse_attn.torch as pt
    from gpu import video_like

    q, k, v = video_like(cupy, *SHAPE, strength=1.0, seed=0)
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    do = torch.randn_like(tq)

    recorder.add("SDPA cuDNN forward", anchors.sdpa_forward(tq, tk, tv, "cudnn"), "anchors.py")
    recorder.add("SDPA cuDNN backward", anchors.sdpa_backward(tq, tk, tv, "cudnn"), "anchors.py")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    leaves = [x.detach().requires_grad_() for x in (tq, tk, tv)]

    def sdpa_step():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(*leaves)
        return torch.autograd.grad(out, leaves, do)

    sdpa_ms, method = timed(torch, sdpa_step)
    recorder.add("SDPA cuDNN forward+backward", sdpa_ms, method)

    sla = pt.SparseLinearAttention(SHAPE[-1], critical=args.critical, negligible=args.negligible,
                                   block=(128, 64), device="cuda")
    with torch.no_grad():  # a trained-looking W, b: the projection is computed, not skipped
        sla.weight.normal_(0, 0.02)
        sla.bias.normal_(0, 0.02)
    params = list(sla.parameters())

    def sla_forward():
        with torch.no_grad():
            return sla(tq, tk, tv)

    ms, method = timed(torch, sla_forward)
    recorder.add(f"SLA forward ({1 - args.critical:.0%} sparsity)", ms, method)
    if time.perf_counter() > deadline:
        return recorder.add("SLA forward+backward", None, "skipped: time budget spent")

    def sla_step():
        out = sla(*leaves)
        return torch.autograd.grad(out, leaves + params, do)

    ms, method = timed(torch, sla_step, deadline)
    recorder.add(f"SLA forward+backward ({1 - args.critical:.0%} sparsity)", ms, method)
    speedup = sdpa_ms / ms
    recorder.add("speed-up of the SLA step over SDPA cuDNN fwd+bwd", None,
                 f"{speedup:.2f}x (target >= 5x: {'met' if speedup >= 5 else 'not met'})",
                 speedup=speedup, met=speedup >= 5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON record")
    parser.add_argument("--critical", type=float, default=0.05)
    parser.add_argument("--negligible", type=float, default=0.10)
    parser.add_argument("--time-budget", type=float, default=100.0,
                        help="seconds after which the slow SLA step is skipped")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: "
                        "overhead, jax, train")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    deadline = time.perf_counter() + args.time_budget

    import torch

    if not torch.cuda.is_available():
        sys.exit("train_step.py needs a CUDA GPU (torch sees none)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    meta = dict(device=torch.cuda.get_device_name(), date=stamp, commit=git_commit(),
                command=" ".join(["bench/train_step.py"]
                                 + (argv if argv is not None else sys.argv[1:])),
                shape=list(SHAPE), dtype="bfloat16", critical=args.critical,
                negligible=args.negligible)
    print(f"{meta['device']}, {stamp}, commit {meta['commit']}", flush=True)
    recorder = Recorder(args.out, meta)
    small = (SHAPE[0], SHAPE[1], SMALL_N, SHAPE[3])
    parts = [("overhead", lambda: overheads(torch, recorder, small, f"N={SMALL_N}")),
             ("overhead", lambda: overheads(torch, recorder, SHAPE, f"N={SHAPE[2]}")),
             ("train", lambda: training_step(torch, recorder, args, deadline)),
             ("jax", lambda: jax_overhead(recorder, small, f"N={SMALL_N}"))]
    for name, part in parts:
        if name in skip:
            continue
        try:
            part()
        except Exception as error:  # reported, and the other parts still run
            print(f"{name} FAILED: {type(error).__name__}: {error}", flush=True)
            recorder.add(f"{name} failed", None, f"{type(error).__name__}: {error}")
    print("\n| figure | ms | note |\n|---|---|---|")
    for r in recorder.records:
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
        print(f"| {r['name']} | {ms} | {r['note']} |")
    return recorder.records


if __name__ == "__main__":
    main()
