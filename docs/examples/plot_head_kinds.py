"""
The four head kinds of the synthetic workloads
==============================================

:func:`~pysparse_attn.workloads.video_qkv` builds heads whose attention has a known shape on the
T × H × W token grid. Here is one query row of each kind, reshaped to the grid: the query sits
in the middle of frame 2.
"""

import matplotlib.pyplot as plt
import numpy as np

from pysparse_attn.workloads import HEAD_KINDS, video_qkv

grid = (5, 12, 16)
q, k, v = video_qkv(grid, heads=4, head_dim=64, kinds=HEAD_KINDS, seed=0)
T, H, W = grid
query = (2 * H + H // 2) * W + W // 2  # frame 2, centre of the image

fig, axes = plt.subplots(4, T, figsize=(10, 6.5), constrained_layout=True)
for head, kind in enumerate(HEAD_KINDS):
    logits = q[0, head, query].astype(np.float64) @ k[0, head].T.astype(np.float64) / 8.0
    row = np.exp(logits - logits.max())
    row /= row.sum()
    frames = row.reshape(T, H, W)
    for t in range(T):
        axes[head, t].imshow(frames[t], vmin=0, vmax=row.max(), cmap="magma")
        axes[head, t].set_xticks([])
        axes[head, t].set_yticks([])
        if head == 0:
            axes[head, t].set_title(f"frame {t}")
    axes[head, 0].set_ylabel(kind)
fig.suptitle("softmax row of one query (frame 2, centre), per head kind")

plt.show()

# %%
# The *local* head attends around the query in its own and the neighbouring frames; the
# *temporal* head attends to the same spatial neighbourhood in every frame; the *global* head
# puts most of its mass on a few sink tokens; the *diffuse* head is nearly uniform, and no
# sparse method should skip much of it.
