"""
Calibrating BLASST and CEF to a target sparsity
===============================================

A threshold that skips 50% of tiles on one model skips a different share on another, or at
another resolution. :func:`~pysparse_attn.calibrate.calibrate_blasst` reads the exact
sparsity-versus-threshold curve off one dense pass (a BLASST skip never moves the running max,
so every threshold's decisions are known from that pass) and fits the BLASST paper's model
``lam * Nk = a * exp(b * sparsity)``. :func:`~pysparse_attn.calibrate.calibrate_cef` replays
the kernel instead, because a CEF skip changes the state later decisions read.
"""

import matplotlib.pyplot as plt
import numpy as np

import pysparse_attn as psa
from pysparse_attn.calibrate import calibrate_blasst, calibrate_cef
from pysparse_attn.workloads import video_qkv

q, k, v = video_qkv((5, 12, 16), heads=4, head_dim=64, seed=2)
targets = [0.1, 0.2, 0.3, 0.4]

blasst = calibrate_blasst(q, k, targets)
cef = calibrate_cef(q, k, targets, refine=6)
for name, calibration in (("Blasst", blasst), ("Cef", cef)):
    for rule, target in zip(calibration.rules(), targets):
        _, stats = psa.attention(q, k, v, skip=rule, return_stats=True)
        print(f"{name}: target {target:.0%} -> {rule} -> measured {stats.sparsity:.1%}")

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
left.semilogy(blasst.curve_sparsity, blasst.curve_lam, label="exact curve (one dense pass)")
grid = np.linspace(0, blasst.max_sparsity, 50)
left.semilogy(grid, blasst.predict(grid), "--", label=f"fit a={blasst.a:.3g}, b={blasst.b:.3g}")
left.plot(blasst.achieved, blasst.lam, "o", label="calibrated targets")
left.set_xlabel("tile sparsity")
left.set_ylabel("Blasst lam")
left.legend(fontsize=8)
right.plot(cef.grid_lam, cef.grid_sparsity, "o-", label="replayed grid")
right.plot(cef.lam, cef.achieved, "s", label="calibrated targets")
right.set_xlabel("Cef lam (natural log)")
right.set_ylabel("tile sparsity")
right.legend(fontsize=8)
plt.show()
