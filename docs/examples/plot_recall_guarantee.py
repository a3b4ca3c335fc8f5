"""
The certified-recall rule and its guarantee
===========================================

``Recall(R)`` skips key tiles inside the loop while a bound on the skipped mass stays within
``1 - R`` of the kept mass. Every row then keeps at least ``R`` of its softmax mass, whatever
the data. This example checks the bound against the exact recall
(:func:`pysparse_attn.recall`) and the error bound
``||O_i - Ô_i|| <= 2 (1 - R_i) max_j ||v_j||`` row by row.
"""

import matplotlib.pyplot as plt
import numpy as np

import pysparse_attn as psa
from pysparse_attn.workloads import video_qkv

q, k, v = video_qkv((5, 12, 16), heads=4, head_dim=64, seed=1)
dense = psa.attention(q, k, v).astype(np.float64)

targets = [0.99, 0.95, 0.9, 0.8, 0.6]
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
for target in targets:
    out, stats = psa.attention(q, k, v, skip=psa.Recall(target), return_stats=True)
    exact = psa.recall(q, k, stats.kept)
    assert (stats.recall_bound >= target - 1e-6).all()
    assert (exact >= stats.recall_bound - 1e-5).all()
    error = np.linalg.norm(out.astype(np.float64) - dense, axis=-1)
    bound = 2 * (1 - exact) * np.linalg.norm(v.astype(np.float64), axis=-1).max(
        axis=-1, keepdims=True)
    left.hist(exact.ravel(), bins=60, range=(0.5, 1), histtype="step",
              label=f"R={target} ({stats.sparsity:.0%} tiles skipped)")
    right.scatter(bound.ravel()[::7], error.ravel()[::7], s=2, label=f"R={target}")
    print(f"R={target}: tile sparsity {stats.sparsity:.1%}, min exact recall "
          f"{exact.min():.4f}, rows within the error bound: {(error <= bound + 1e-4).mean():.1%}")

left.set_xlabel("exact recall of each row")
left.set_ylabel("rows")
left.legend(fontsize=7)
lim = right.get_xlim()[1]
right.plot([0, lim], [0, lim], "k--", lw=1, label="bound")
right.set_xlabel("2 (1 - recall) max ||v||")
right.set_ylabel("||O - Ô|| (row)")
right.legend(fontsize=7, markerscale=4)

plt.show()

# %%
# The recall of every row sits above its target (the bound is conservative: most rows keep far
# more), and the measured error of every row sits below ``2 (1 - R_i) max ||v||`` (the dashed
# diagonal): the worst case needs the dropped values to point exactly away from the kept ones.
