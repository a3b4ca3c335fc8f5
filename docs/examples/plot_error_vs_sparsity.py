"""
Error against sparsity for every method
=======================================

The question a user asks: at a given error, how many tiles does each method skip? This runs a
small sweep with the harness's building blocks (the same ones ``python -m pysparse_attn.bench
sweep`` uses) on a small video-like workload and plots relative L2 error against tile sparsity.
The committed, larger study is on :doc:`/benchmarks`.
"""

import matplotlib.pyplot as plt
import numpy as np

from pysparse_attn.bench import METHODS, dense_reference, error_metrics
from pysparse_attn.bench.sweep import parse_workload

workload = parse_workload("video:5x12x16:4:64:local+temporal+global+diffuse")
q, k, v = workload.tensors()
reference = dense_reference(q, k, v, workload.block)

methods = ["blasst", "blasst-peak", "cef", "recall-natural", "recall-peak", "topk", "topp", "sla"]
fig, axis = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
for name in methods:
    method = METHODS[name]
    points = []
    for value in method.values:
        out, stats = method.call(q, k, v, value, workload.block, "auto", workload)
        points.append((stats.sparsity, error_metrics(out, reference.out)["rel_l2"]))
    points.sort()
    axis.plot(*zip(*points), "o-", ms=3, label=name)
for budget in (0.01, 0.03, 0.05):
    axis.axhline(budget, color="grey", lw=0.6, ls=":")
axis.set_yscale("log")
axis.set_xlabel("tile sparsity")
axis.set_ylabel("relative L2 error vs dense")
axis.legend(fontsize=7, ncol=2)
plt.show()
