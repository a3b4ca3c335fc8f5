"""Benchmark of the CPU backend (issue 3): dense GFLOP/s against the machine's SGEMM, against
the float64 reference and NumPy/torch CPU attention, and the speedup of a TopK plan.

Run ``python bench/cpu.py`` (or ``make bench-cpu``). Every figure is measured in this run, on
this machine: best of ``--repeats`` wall-clock timings after one warm-up call. The table is
printed and written to ``bench/results/cpu.md``; one JSON line per run is appended to
``bench/results/cpu.jsonl``.

torch is never a dependency: its ``scaled_dot_product_attention`` is timed in-process when
torch is importable, or in a subprocess of ``--torch-python`` (a separate virtual environment)
when given, and skipped (and said so) otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pysparse_attn as psa  # noqa: E402
from pysparse_attn._plan import build_plan  # noqa: E402
from pysparse_attn.backends import cpu  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def best_time(function, repeats):
    """Best wall-clock seconds of ``repeats`` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def attention_flops(B, H, Nq, Nk, D):
    """Dense attention FLOPs: QK^T and P.V, 2 * N^2 * D each (exp and softmax not counted)."""
    return 4.0 * B * H * Nq * Nk * D


def sgemm_gflops(n, repeats):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    seconds = best_time(lambda: a @ b, repeats)
    return 2.0 * n**3 / seconds / 1e9


def numpy_attention(q, k, v, scale):
    """Plain NumPy float32 attention, one head at a time (materialises the N x N scores)."""
    out = np.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = (q[b, h] * scale) @ k[b, h].T
            s -= s.max(axis=1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=1, keepdims=True)
            out[b, h] = s @ v[b, h]
    return out


TORCH_SNIPPET = r"""
import json, sys, time, torch
B, H, N, D, repeats, threads = (int(x) for x in sys.argv[1:7])
clock = getattr(time, sys.argv[7])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
f = torch.nn.functional.scaled_dot_product_attention
with torch.inference_mode():
    f(q, k, v)
    best = float("inf")
    for _ in range(repeats):
        t = clock(); f(q, k, v); best = min(best, clock() - t)
print(json.dumps({"seconds": best, "torch": torch.__version__, "threads": torch.get_num_threads()}))
"""

SGEMM_SNIPPET = r"""
import sys, time
import numpy as np
n, repeats = int(sys.argv[1]), int(sys.argv[2])
a, b = (np.random.default_rng(0).standard_normal((n, n)).astype(np.float32) for _ in range(2))
a @ b
times = []
for _ in range(repeats):
    t = time.process_time(); a @ b; times.append(time.process_time() - t)
print(2.0 * n**3 / min(times) / 1e9)
"""


def single_core_sgemm(n, repeats):
    """NumPy SGEMM GFLOP/s on one thread, by CPU time (a subprocess pins BLAS to 1 thread)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", SGEMM_SNIPPET, str(n), str(repeats)],
                            capture_output=True, text=True, env=env, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def best_cpu_time(function, repeats):
    """Best process CPU seconds of ``repeats`` calls after a warm-up (for 1-thread runs)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        function()
        times.append(time.process_time() - start)
    return min(times)


def torch_sdpa(B, H, N, D, repeats, threads, torch_python, clock="perf_counter"):
    """``(seconds, description)`` of torch's CPU SDPA in float32, or ``(None, reason)``."""
    python = None
    try:
        import torch  # noqa: F401

        python = sys.executable
    except ImportError:
        python = torch_python
    if python is None:
        return None, "torch not importable and no --torch-python given"
    result = subprocess.run([python, "-c", TORCH_SNIPPET, str(B), str(H), str(N), str(D),
                             str(repeats), str(threads), clock], capture_output=True, text=True)
    if result.returncode != 0:
        return None, f"torch run failed: {result.stderr.strip().splitlines()[-1:]}"
    data = json.loads(result.stdout.strip().splitlines()[-1])
    return data["seconds"], f"torch {data['torch']}, {data['threads']} threads"


def machine():
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "cpu", "pysparse_attn"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uncommitted"
    if out.returncode != 0:
        return "uncommitted"
    return out.stdout.strip() + ("+uncommitted changes" if dirty else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="sequence length (default 4096)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--reference-n", type=int, default=1024,
                        help="sequence length for the slow float64 reference (default 1024)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU backend threads (default: OMP_NUM_THREADS or all cores)")
    parser.add_argument("--torch-python", default=os.environ.get("PYSPARSE_ATTN_TORCH_PYTHON"),
                        help="python of a separate venv with torch, for the SDPA comparison")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    B, H, N, D = 1, args.heads, args.n, args.dim
    load_before = os.getloadavg()
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, N, D)).astype(np.float32) for _ in range(3))
    scale = D**-0.5
    flops = attention_flops(B, H, N, N, D)
    rows = []

    def row(name, seconds, n=N, note=""):
        gflops = attention_flops(B, H, n, n, D) / seconds / 1e9 if seconds else None
        rows.append(dict(name=name, n=n, seconds=seconds, gflops=gflops, note=note))

    sgemm = sgemm_gflops(4096, args.repeats)

    dense_api = best_time(lambda: psa.attention(q, k, v, backend="cpu", threads=args.threads),
                          args.repeats)
    plan = build_plan(np, q, k, None, "natural", 4, (64, 64), scale)
    dense_kernel = best_time(
        lambda: cpu.forward(q, k, v, plan, None, scale, False, threads=args.threads),
        args.repeats)
    row("cpu backend, dense (psa.attention)", dense_api, note="float32, 64x64 tiles")
    row("cpu backend, dense (kernel only, plan prebuilt)", dense_kernel)

    for dtype in (np.float16, ml_dtypes.bfloat16):
        q16, k16, v16 = (x.astype(dtype) for x in (q, k, v))
        seconds = best_time(lambda: psa.attention(q16, k16, v16, backend="cpu",
                                                  threads=args.threads), args.repeats)
        row(f"cpu backend, dense {np.dtype(dtype).name} inputs", seconds,
            note="widened per tile row, float32 accumulation")

    numpy_seconds = best_time(lambda: numpy_attention(q, k, v, scale), args.repeats)
    row("NumPy float32 (matmul + exp, full N x N scores)", numpy_seconds)

    torch_seconds, torch_note = torch_sdpa(B, H, N, D, args.repeats, threads, args.torch_python)
    row("torch CPU scaled_dot_product_attention float32", torch_seconds, note=torch_note)

    nr = args.reference_n
    qr, kr, vr = (x[:, :, :nr] for x in (q, k, v))
    reference = best_time(lambda: psa.attention(qr, kr, vr, backend="reference"), 1)
    cpu_small = best_time(lambda: psa.attention(qr, kr, vr, backend="cpu",
                                                threads=args.threads), args.repeats)
    row("pysparse_attn reference (float64, Numba)", reference, n=nr,
        note=f"at N={nr}: too slow at N={N}")
    row("cpu backend, dense, same size as the reference", cpu_small, n=nr)

    topk = psa.TopK(ratio=0.1)
    topk_api = best_time(lambda: psa.attention(q, k, v, select=topk, backend="cpu",
                                               threads=args.threads), args.repeats)
    topk_plan = build_plan(np, q, k, topk, "natural", 4, (64, 64), scale)
    plan_seconds = best_time(lambda: build_plan(np, q, k, topk, "natural", 4, (64, 64), scale),
                             args.repeats)
    topk_kernel = best_time(lambda: cpu.forward(q, k, v, topk_plan, None, scale, False,
                                                threads=args.threads), args.repeats)
    kept_share = float(topk_plan.count.sum()) / (B * H * topk_plan.nq * topk_plan.nk)
    row("cpu backend, TopK(ratio=0.1) (psa.attention, incl. plan)", topk_api,
        note=f"{100 * (1 - kept_share):.1f}% tile sparsity; GFLOP/s dense-equivalent")
    row("cpu backend, TopK(ratio=0.1) (kernel only)", topk_kernel)

    do = rng.standard_normal(q.shape).astype(np.float32)
    vjp_seconds = best_time(lambda: psa.attention_vjp(q, k, v, do, backend="cpu",
                                                      threads=args.threads), 2)
    row("cpu backend, attention_vjp dense (forward kept set + backward)", vjp_seconds,
        note="GFLOP/s of the forward's 4N^2D, for scale only")

    # One core, timed by CPU time: robust to other processes on a shared machine.
    core_sgemm = single_core_sgemm(2048, args.repeats)
    core_ours = best_cpu_time(
        lambda: cpu.forward(q, k, v, plan, None, scale, False, threads=1), args.repeats)
    core_torch, core_torch_note = torch_sdpa(B, H, N, D, args.repeats, 1, args.torch_python,
                                             clock="process_time")
    core_rows = [
        ("NumPy SGEMM (2048^3, float32)", core_sgemm, ""),
        ("cpu backend, dense float32 (kernel)", flops / core_ours / 1e9, ""),
        ("torch CPU scaled_dot_product_attention float32",
         flops / core_torch / 1e9 if core_torch else None, core_torch_note),
    ]

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join([Path(sys.executable).name, "bench/cpu.py"] + sys.argv[1:])
    dense_share = dense_api and flops / dense_api / 1e9 / sgemm
    lines = [
        "# CPU backend benchmark",
        "",
        f"- device: {machine()}; backend threads: {threads}",
        f"- date: {now}; git commit: {git_commit()}",
        f"- command: `{command}`",
        f"- shape: B={B}, H={H}, N={N}, D={D}, float32 unless noted, 64x64 tiles; best of "
        f"{args.repeats} after a warm-up",
        f"- NumPy SGEMM (4096^3, float32, same run): **{sgemm:.1f} GFLOP/s**",
        f"- load average (1, 5, 15 min) before / after the run: "
        f"{', '.join(f'{x:.2f}' for x in load_before)} / "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (a shared machine: other "
        f"processes compete for the {os.cpu_count()} cores)",
        "",
        "| what | N | time (ms) | GFLOP/s | note |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        seconds = "n/a" if r["seconds"] is None else f"{1e3 * r['seconds']:.1f}"
        gflops = "n/a" if r["gflops"] is None else f"{r['gflops']:.1f}"
        lines.append(f"| {r['name']} | {r['n']} | {seconds} | {gflops} | {r['note']} |")
    lines += [
        "",
        f"One core (1 thread, best process CPU time of {args.repeats}; robust to other load):",
        "",
        "| what | GFLOP/s per core | note |",
        "|---|---|---|",
    ]
    for name, gflops, note in core_rows:
        lines.append(f"| {name} | {'n/a' if gflops is None else f'{gflops:.1f}'} | {note} |")
    lines += [
        "",
        "Targets (issue 3):",
        "",
        f"- dense float32 at >= 40% of SGEMM: **{100 * dense_share:.0f}%** "
        f"({flops / dense_api / 1e9:.1f} / {sgemm:.1f} GFLOP/s, through `psa.attention`)",
        f"- faster than the reference: **{reference / cpu_small:.0f}x** at N={nr}",
        f"- faster than NumPy float32 attention: **{numpy_seconds / dense_api:.1f}x**",
        "- faster than torch SDPA: " + (
            f"**{torch_seconds / dense_api:.2f}x**" if torch_seconds else f"not measured "
            f"({torch_note})"),
        f"- TopK(ratio=0.1) over dense >= 6x: **{dense_api / topk_api:.1f}x** through "
        f"`psa.attention` (plan build {1e3 * plan_seconds:.1f} ms included); "
        f"{dense_kernel / topk_kernel:.1f}x kernel only",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "cpu.md").write_text(text)
        record = dict(date=now, device=machine(), commit=git_commit(), command=command,
                      threads=threads, shape=[B, H, N, D], sgemm_gflops=sgemm, rows=rows,
                      load_before=load_before, load_after=os.getloadavg(),
                      one_core=[dict(name=n, gflops=g, note=t) for n, g, t in core_rows])
        with open(RESULTS / "cpu.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
