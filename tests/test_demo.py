"""The main job (`make demo`) end to end, at a size that runs in seconds."""

from __future__ import annotations

import re

from pysparse_attn import demo


def test_demo_prints_every_method_and_writes_the_plot(tmp_path, capsys):
    rows = demo.run_demo(frames=2, height=4, width=8, head_dim=16, block=(16, 16), repeats=1,
                         output_dir=str(tmp_path))
    printed = capsys.readouterr().out
    methods = {row.method for row in rows}
    assert {"dense", "Blasst natural", "Blasst peak", "Cef natural", "Recall peak",
            "Recall exact peak", "TopK", "TopP", "SLA W=0", "SLA fitted W"} <= methods
    for row in rows:
        assert row.method in printed and 0.0 <= row.sparsity <= 1.0 and row.seconds > 0.0
        if row.method == "dense":
            assert row.rel_l2 == 0.0 and row.sparsity == 0.0
        if row.method.startswith("Recall"):  # the certificate, on the exact float64 recall
            target = float(re.search(r"R=([0-9.]+)", row.setting).group(1))
            assert row.recall_min >= target
    # Least squares over (W, b) includes W = 0, b = 0: the fit never does worse in-sample.
    untrained = {row.setting: row.rel_l2 for row in rows if row.method == "SLA W=0"}
    for row in rows:
        if row.method == "SLA fitted W":
            assert row.rel_l2 <= untrained[row.setting] * (1 + 1e-4)
    plot = tmp_path / "pareto.png"
    assert plot.stat().st_size > 0 and str(plot) in printed
