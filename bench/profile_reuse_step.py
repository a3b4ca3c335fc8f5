"""Where a ``PlanReuse`` call's GPU time goes, beside the kernel alone on the same plan.

At the Wan2.1-1.3B attention shape (bf16, B=1, H=12, N=32,760, D=128, 128x64 tiles), on one
step of the synthetic denoising trajectory: a ``PlanReuse`` layer refreshed at step ``S``,
then, from forks of that state, a reused step (``S + 1``) and a refresh step
(``S + refresh_every``), each as the whole call and as ``attention`` on the plan it used
(queued ``do_bench`` medians), with the kernel-by-kernel table of each call (torch.profiler,
which sees CuPy's kernels too).

    python3 bench/profile_reuse_step.py [--step 30] [--skip recall:0.8] [--rows 16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, default=30)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--skip", default="recall:0.8")
    parser.add_argument("--refresh-every", type=int, default=5)
    parser.add_argument("--rows", type=int, default=16)
    args = parser.parse_args()
    import torch
    from triton.testing import do_bench

    import pysparse_attn as psa
    from pysparse_attn.bench.reuse import parse_rule
    from pysparse_attn.bench.sweep import to_backend
    from pysparse_attn.workloads import denoising_trajectory
    from profile_sla_step import table

    trajectory = denoising_trajectory("wan2.1-1.3b-480p", steps=args.steps, dtype="float32")
    q, k, v = (to_backend(x, "cupy", "bfloat16") for x in trajectory[args.step])
    rule = parse_rule(args.skip)
    options = dict(backend="cupy", check_finite=False)
    variants = {
        "plain (rule at refreshes only)": dict(mass_budget=None, kept_tolerance=None,
                                               rule_in_plan=False),
        "guarded (rule in plan, guard on)": dict(),
    }
    rows = []
    for label, extra in variants.items():
        reuse = psa.PlanReuse(rule, refresh_every=args.refresh_every, dense_steps=0,
                              block=(128, 64), grid=trajectory.grid, **extra)
        reuse.attention(q, k, v, layer=0, step=args.step, **options)
        for kind, step in (("reused", args.step + 1), ("refresh", args.step + args.refresh_every)):
            _, probe = reuse.fork().attention(q, k, v, layer=0, step=step, **options)
            plan = probe.attention.plan
            ran_rule = extra.get("rule_in_plan", True) or kind == "refresh"
            kernel_rule = rule if ran_rule else None

            def call(step=step):
                return reuse.fork().attention(q, k, v, layer=0, step=step, **options)

            def kernel(plan=plan, r=kernel_rule):
                return psa.attention(q, k, v, plan=plan, skip=r, block=(128, 64), **options)

            whole = do_bench(call, warmup=5, rep=60)
            alone = do_bench(kernel, warmup=5, rep=60)
            rows.append((label, kind, probe.plan_density, whole, alone))
            table(torch, call, f"{label}, {kind} step {step}", args.rows)
    dense = do_bench(lambda: psa.attention(q, k, v, block=(128, 64), **options), warmup=5,
                     rep=60)
    print(f"\ndense attention {dense:.3f} ms")
    print(f"{'variant':34} {'step':8} {'plan':>6} {'call ms':>8} {'kernel ms':>9} {'extra':>6}")
    for label, kind, density, whole, alone in rows:
        print(f"{label:34} {kind:8} {density:6.3f} {whole:8.3f} {alone:9.3f} "
              f"{whole - alone:6.3f}")


if __name__ == "__main__":
    main()
