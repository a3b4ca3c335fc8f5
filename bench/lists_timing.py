"""Time the backward's kept-set lists (``_kept_lists``: query-major plan + key-major transpose).

At the Wan2.1-1.3B attention shape (B=1, H=12, N=32,760, 128x64 tiles): the bitmaps of
TopK(0.05) and TopK(0.9) plans, queued ``do_bench`` medians; prints one line per case.

    python3 bench/lists_timing.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    import cupy
    import numpy as np
    from triton.testing import do_bench

    import pysparse_attn as psa
    from pysparse_attn.backends import cupy as backend

    B, H, N, D = 1, 12, 32760, 128
    block = (128, 64)
    rng = np.random.default_rng(0)
    q, k = (cupy.asarray(rng.standard_normal((B, H, N, D), dtype=np.float32))
            .astype(cupy.float16) for _ in range(2))
    for ratio in (0.05, 0.9):
        kept = psa.plan(q, k, select=psa.TopK(ratio=ratio), block=block).visit_bitmap()
        call = lambda: backend._kept_lists(cupy, kept, block, (B, H, N, N))  # noqa: E731
        plan, col_offsets, col_indices = call()
        cupy.cuda.runtime.deviceSynchronize()
        ms = do_bench(call, warmup=10, rep=100)
        print(f"kept lists TopK({ratio}): {ms:.4f} ms, {int(kept.sum())} tiles, "
              f"last offsets {int(plan.row_offsets[0, -1, -1])} {int(col_offsets[0, -1, -1])}")


if __name__ == "__main__":
    main()
