"""Which plan densities and errors plan reuse can reach on the synthetic Wan trajectory (CPU).

Attention at 32,760 tokens is too slow on a CPU for the full benchmark, but query tiles are
independent: this script attends only a few sampled query tiles (all keys) at every step of
``denoising_trajectory("wan2.1-1.3b-480p")``, with ``Recall`` over every tile (what a refresh
keeps) and over the kept set of ``lag`` steps earlier, with and without a one-tile dilation in
the token grid (what a reused step visits), against exact float64 attention of those rows. The
densities it reports bound what a GPU run of ``python -m pysparse_attn.bench reuse`` can save;
``docs/reuse.rst`` uses them to choose the settings of ``bench/gpu_workloads.sh``.

    PYTHONPATH=. python bench/reuse_density.py -o bench/results/density-reuse-cpu-DATE.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pysparse_attn as psa  # noqa: E402
from pysparse_attn import workloads  # noqa: E402
from pysparse_attn.bench.sweep import environment  # noqa: E402
from pysparse_attn.reuse import dilate_tiles, tile_neighbourhood  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True, help="JSONL file (overwritten)")
    parser.add_argument("--shape", default="wan2.1-1.3b-480p", help="trajectory shape")
    parser.add_argument("--heads", type=int, default=4, help="heads (default 4: one per kind)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    parser.add_argument("--tiles", type=int, default=8, help="query tiles sampled (default 8)")
    parser.add_argument("--block", default="128x64", help="BqxBk (default 128x64)")
    parser.add_argument("--targets", default="0.95,0.8", help="Recall targets (default 0.95,0.8)")
    parser.add_argument("--lags", default="5,10", help="reuse lags in steps (default 5,10)")
    args = parser.parse_args(argv)
    block = tuple(int(b) for b in args.block.split("x"))
    trajectory = workloads.denoising_trajectory(args.shape, steps=args.steps, heads=args.heads,
                                                dtype="float32")
    n = int(np.prod(trajectory.grid))
    nq = -(-n // block[0])
    rng = np.random.default_rng(0)
    tiles = np.append(np.sort(rng.choice(nq - 1, size=args.tiles - 1, replace=False)), nq - 1)
    rows = np.concatenate([np.arange(t * block[0], min((t + 1) * block[0], n)) for t in tiles])
    reach = tile_neighbourhood(n, block[1], 1, trajectory.grid)
    targets = [float(t) for t in args.targets.split(",")]
    lags = [int(x) for x in args.lags.split(",")]
    kept_by_step = {t: {} for t in targets}
    with open(args.output, "w") as sink:
        sink.write(json.dumps(dict(environment("cpu"), trajectory=trajectory.description,
                                   rows=len(rows), block=list(block))) + "\n")
        for step in range(args.steps):
            began = time.perf_counter()
            q, k, v = trajectory[step]
            q = np.ascontiguousarray(q[:, :, rows])
            exact = np.empty(q.shape)
            for h in range(q.shape[1]):
                logits = (q[0, h].astype(np.float64) @ k[0, h].astype(np.float64).T
                          * q.shape[-1] ** -0.5)
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                exact[0, h] = (p / p.sum(axis=1, keepdims=True)) @ v[0, h].astype(np.float64)

            def error(out):
                diff = out.astype(np.float64) - exact
                return float(np.sqrt((diff ** 2).sum() / (exact ** 2).sum()))

            record = {"type": "step", "step": step, "sigma": float(trajectory.sigmas[step])}
            for target in targets:
                rule = psa.Recall(target)
                out, stats = psa.attention(q, k, v, skip=rule, block=block, backend="cpu",
                                           return_stats=True)
                kept = np.asarray(stats.kept)
                kept_by_step[target][step] = kept
                entry = {"kept_per_head": kept.mean(axis=(0, 2, 3)).round(4).tolist(),
                         "rel_l2": error(out)}
                for lag in lags:
                    if step - lag not in kept_by_step[target]:
                        continue
                    for margin in (0, 1):
                        bitmap = kept_by_step[target][step - lag]
                        if margin:
                            bitmap = dilate_tiles(bitmap, reach)
                        plan = psa.Plan.from_kept(bitmap, block=block, order="natural",
                                                  shape=(1, q.shape[1], len(rows), n))
                        out, stats = psa.attention(q, k, v, plan=plan, skip=rule,
                                                   backend="cpu", return_stats=True)
                        entry[f"lag{lag}_margin{margin}"] = {
                            "plan_per_head": bitmap.mean(axis=(0, 2, 3)).round(4).tolist(),
                            "kept_per_head": np.asarray(stats.kept).mean(axis=(0, 2, 3))
                            .round(4).tolist(), "rel_l2": error(out)}
                record[f"recall{target:g}"] = entry
            record["seconds"] = time.perf_counter() - began
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            print(step, f"{record['seconds']:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
