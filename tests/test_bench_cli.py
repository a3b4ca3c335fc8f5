"""The evaluation harness: metrics against the library's oracles, a resumable sweep, tables, plots."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import pysparse_attn as psa
from pysparse_attn._reference import masked_attention
from pysparse_attn.bench import compare, metrics
from pysparse_attn.bench.__main__ import main
from pysparse_attn.bench.plot import pareto_front, plot_records
from pysparse_attn.bench.sweep import parse_workload, read_records
from pysparse_attn.workloads import video_qkv


def fresh_seed():
    return int(np.random.SeedSequence().entropy % 2**31)


def test_dense_reference_and_recall_match_the_library_oracles():
    seed = fresh_seed()
    q, k, v = video_qkv((2, 5, 7), heads=2, head_dim=16, seed=seed, dtype=np.float64)
    k, v = k[:, :1], v[:, :1]  # GQA: two query heads share one kv head
    block = (16, 16)  # 70 tokens: partial last tiles
    reference = metrics.dense_reference(q, k, v, block, rows_per_chunk=23)
    every_tile = np.ones((1, 2, 5, 5), dtype=bool)
    exact, _ = masked_attention(q, k, v, every_tile, block, 0.25)
    # float64 both ways, different summation order.
    np.testing.assert_allclose(reference.out, exact, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(reference.tile_mass.sum(-1), 1.0, rtol=1e-12)
    kept = np.random.default_rng(seed).random((1, 2, 5, 5)) < 0.5
    kept[..., 0] = True
    np.testing.assert_allclose(metrics.recall_from_tile_mass(reference, kept),
                               psa.recall(q, k, kept, block=block), rtol=1e-12, atol=1e-14,
                               err_msg=f"seed={seed}")


def test_error_metrics_on_known_perturbations():
    rng = np.random.default_rng(fresh_seed())
    ref = rng.standard_normal((1, 3, 20, 8))
    same = metrics.error_metrics(ref.copy(), ref)
    assert same["rel_l2"] == 0.0 and same["rel_l1"] == 0.0
    assert same["cosine"] == pytest.approx(1.0, abs=1e-15)
    scaled = metrics.error_metrics(1.1 * ref, ref)
    assert scaled["rel_l2"] == pytest.approx(0.1) and scaled["rel_l1"] == pytest.approx(0.1)
    assert scaled["cosine"] == pytest.approx(1.0)
    one_head = ref.copy()
    one_head[0, 2] *= 1.5
    worst = metrics.error_metrics(one_head, ref)
    assert worst["rel_l2_worst_head"] == pytest.approx(0.5)
    assert worst["rel_l2"] < 0.5
    stats = metrics.recall_metrics(np.array([1.0, 0.9, 0.5, 1.0]))
    assert stats["recall_min"] == 0.5 and stats["recall_mean"] == pytest.approx(0.85)


def run_cli(*args):
    assert main([str(a) for a in args]) == 0


SMALL = "video:2x6x9:2:16:local+global"


def test_sweep_records_are_complete_and_the_sweep_resumes(tmp_path):
    out = tmp_path / "sweep.jsonl"
    common = ["sweep", "-o", out, "-w", SMALL, "--block", "16x16", "--repeat", "1",
              "--no-progress", "--seed", fresh_seed(),
              "-m", "recall-peak", "-m", "topk", "-m", "sla-fit",
              "--values", "recall-peak=0.9,0.5", "--values", "topk=0.5",
              "--values", "sla-fit=0.5"]
    run_cli(*common)
    records = read_records(out)
    header, runs = records[0], records[1:]
    assert header["type"] == "environment"
    for field in ("git_commit", "date", "command", "numpy", "device", "backend"):
        assert header[field], field
    assert len(runs) == 4 and {r["type"] for r in runs} == {"run"}
    for run in runs:
        assert 0.0 <= run["tile_sparsity"] <= 1.0 and 0.0 <= run["flop_sparsity"] <= 1.0
        assert 0.0 < run["recall_min"] <= run["recall_p1"] <= run["recall_mean"] <= 1.0 + 1e-12
        assert run["rel_l2"] >= 0 and run["rel_l1"] >= 0 and -1 <= run["cosine"] <= 1 + 1e-12
        assert run["time_s"] > 0 and run["speedup"] > 0
    recall_runs = {r["value"]: r for r in runs if r["method"] == "recall-peak"}
    # The certified bound holds on the exact recall the harness measures.
    for target, run in recall_runs.items():
        assert run["recall_min"] >= target - 1e-6
    assert [r for r in runs if r["method"] == "sla-fit"][0]["fit"] == "in-sample"

    run_cli(*common)  # everything is there: nothing is added, not even a header
    assert len(read_records(out)) == len(records)

    # A torn last line (an interrupted write) is ignored and that run is redone.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    run_cli(*common)
    again = [r for r in read_records(out) if r.get("type") == "run"]
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in runs)


def synthetic_records():
    def run(method, value, sparsity, error):
        return {"type": "run", "workload": "w", "method": method, "parameter": "x",
                "value": value, "tile_sparsity": sparsity, "flop_sparsity": sparsity / 2,
                "rel_l2": error, "speedup": 1.0 + sparsity, "backend": "cpu"}
    return [{"type": "environment"},
            run("a", 1, 0.2, 0.005), run("a", 2, 0.6, 0.02), run("a", 3, 0.9, 0.2),
            run("b", 1, 0.5, 0.04), run("b", 2, 0.95, 0.5)]


def test_matched_error_and_matched_sparsity_tables():
    records = synthetic_records()
    table = compare.matched_error(records, (0.01, 0.03, 0.05))["w"]
    assert table["a"][0.01]["value"] == 1 and table["a"][0.03]["value"] == 2
    assert table["b"][0.01] is None and table["b"][0.05]["value"] == 1
    text = compare.markdown_matched_error(records, (0.01, 0.03, 0.05))
    assert "| a | 20.0% (10.0%; x=1) | 60.0% (30.0%; x=2) | 60.0% (30.0%; x=2) |" in text
    assert "| b | — | — | 50.0% (25.0%; x=1) |" in text
    rst = compare.markdown_matched_error(records, (0.01, 0.03, 0.05), fmt="rst")
    assert ".. list-table:: w:" in rst
    assert "   * - b\n     - —\n     - —\n     - 50.0% (25.0%; x=1)" in rst
    with pytest.raises(ValueError, match="fmt"):
        compare.markdown_matched_error(records, fmt="html")
    by_sparsity = compare.matched_sparsity(records, (0.5, 0.9))["w"]
    assert by_sparsity["a"][0.5]["value"] == 2 and by_sparsity["b"][0.9]["value"] == 2


def test_pareto_front_keeps_only_undominated_points():
    points = [(0.1, 0.01), (0.5, 0.02), (0.4, 0.05), (0.9, 0.3), (0.9, 0.2)]
    assert pareto_front(points) == [(0.1, 0.01), (0.5, 0.02), (0.9, 0.2)]


def test_plots_are_written(tmp_path):
    paths = plot_records(synthetic_records(), tmp_path, formats=("png", "svg"))
    assert {p.name for p in paths} == {"w_error.png", "w_error.svg", "w_speedup.png",
                                       "w_speedup.svg"}
    for path in paths:
        assert path.stat().st_size > 1000


def test_cli_compare_and_errors(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in synthetic_records()) + "\n")
    result = subprocess.run([sys.executable, "-m", "pysparse_attn.bench", "compare", str(path),
                             "--by", "error"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| a |" in result.stdout
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["compare", str(empty)]) == 1
    with pytest.raises(SystemExit):
        main(["sweep", "-o", str(path), "-m", "no-such-method"])
    with pytest.raises(SystemExit):
        main(["sweep", "-o", str(path), "--block", "64"])


@pytest.mark.parametrize("text", ["nope", "video:2x3:1:8:local", "video:2x3x4:1:8:spiral",
                                  "video:axbxc:1:8:local"])
def test_bad_workloads_are_rejected(text):
    with pytest.raises(ValueError):
        workload = parse_workload(text)
        workload.tensors()


def test_user_file_workload(tmp_path):
    q, k, v = video_qkv((2, 4, 5), heads=2, head_dim=8, seed=fresh_seed())
    path = tmp_path / "layer.npz"
    np.savez(path, q=q.transpose(0, 2, 1, 3), k=k.transpose(0, 2, 1, 3),
             v=v.transpose(0, 2, 1, 3))
    workload = parse_workload(f"file:{path}:bnhd", block=(8, 8))
    for got, want in zip(workload.tensors(), (q, k, v)):
        np.testing.assert_array_equal(got, want)
    assert workload.describe()["file"] == str(path)
