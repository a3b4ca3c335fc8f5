"""The main job (`make demo`) end to end, at a size that runs in seconds."""

from __future__ import annotations

import re

import pytest

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
    # Every column of the table is explained in one line under it.
    for name, meaning in demo.COLUMNS:
        assert f"  {name:<13} {meaning}" in printed.splitlines()


def test_demo_plot_shows_speed_and_marks_exact_errors(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    drawn = {}

    def keep(figure, *args, **kwargs):
        drawn["figure"] = figure

    monkeypatch.setattr(pyplot.Figure, "savefig", keep)
    rows = [demo.Row("dense", "-", 0.0, 1.0, 1.0, 0.0, 0.02, 1.0),
            demo.Row("TopK", "ratio=0.5", 0.5, 0.9, 0.95, 0.03, 0.01, 2.0),
            demo.Row("TopK", "ratio=0.1", 0.9, 0.5, 0.7, 0.2, 0.005, 4.0)]
    demo._plot(rows, tmp_path / "p.png", "demo, cpu backend: a workload")
    speed, tiles = drawn["figure"].axes
    assert "speedup" in speed.get_ylabel() and "sparsity" in tiles.get_ylabel()
    assert drawn["figure"]._suptitle.get_text() == "demo, cpu backend: a workload"
    for axis in (speed, tiles):
        labels = {text.get_text() for text in axis.texts}
        assert {"-", "ratio=0.5", "ratio=0.1", "error 0 (exact)"} <= labels
        # The zero error sits on the "exact" line at a tenth of the smallest nonzero error.
        assert axis.lines[0].get_xdata()[0] == pytest.approx(0.003)
