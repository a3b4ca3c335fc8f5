"""The evaluation harness: metrics against the library's oracles, a resumable sweep, tables, plots."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import pysparse_attn as psa
from pysparse_attn._reference import masked_attention
from pysparse_attn.bench import compare, metrics, sweep
from pysparse_attn.bench import results as bench_results
from pysparse_attn.bench.__main__ import build_parser, main
from pysparse_attn.bench.plot import pareto_front, plot_records
from pysparse_attn.bench.sweep import LayoutWarning, parse_workload, read_records
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


def test_sweep_records_are_complete_and_the_sweep_resumes(tmp_path, capsys):
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
    assert "ranked by speedup" in capsys.readouterr().out  # the summary the docs promise
    assert len(read_records(out)) == len(records)

    # A torn last line (an interrupted write) is ignored and that run is redone.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    run_cli(*common)
    again = [r for r in read_records(out) if r.get("type") == "run"]
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in runs)


def synthetic_records(times=True):
    """Method a: sparser but slower at each budget; method b: less sparse, faster."""
    def run(method, value, sparsity, error, speedup):
        record = {"type": "run", "workload": "w", "method": method, "parameter": "x",
                  "value": value, "tile_sparsity": sparsity, "flop_sparsity": sparsity / 2,
                  "rel_l2": error, "backend": "cpu", "device": "test CPU"}
        if times:
            record.update(speedup=speedup, time_s=0.01 / speedup, dense_time_s=0.01)
        return record
    return [{"type": "environment"},
            run("a", 1, 0.2, 0.005, 1.1), run("a", 2, 0.6, 0.02, 1.3), run("a", 3, 0.9, 0.2, 3.0),
            run("b", 1, 0.1, 0.004, 2.0), run("b", 2, 0.5, 0.04, 1.5), run("b", 3, 0.95, 0.5, 9.0)]


def test_matched_error_ranks_by_sparsity_without_times():
    records = synthetic_records(times=False)
    table = compare.matched_error(records, (0.01, 0.03, 0.05))["w"]
    assert table["a"][0.01]["value"] == 1 and table["a"][0.03]["value"] == 2
    assert table["b"][0.01]["value"] == 1 and table["b"][0.05]["value"] == 2
    text = compare.markdown_matched_error(records, (0.01, 0.03, 0.05))
    assert "ranked by sparsity (the runs have no times" in text
    assert "| a | 20.0% (10.0%; x=1) | 60.0% (30.0%; x=2) | 60.0% (30.0%; x=2) |" in text
    assert "| b | 10.0% (5.0%; x=1) | 10.0% (5.0%; x=1) | 50.0% (25.0%; x=2) |" in text
    assert text.index("| a |") < text.index("| b |")  # a is sparser at the tightest budget
    rst = compare.markdown_matched_error(records, (0.01, 0.03, 0.05), fmt="rst")
    assert ".. list-table:: w:" in rst
    assert "   * - b\n     - 10.0% (5.0%; x=1)\n     - 10.0% (5.0%; x=1)\n" in rst
    with pytest.raises(ValueError, match="fmt"):
        compare.markdown_matched_error(records, fmt="html")
    with pytest.raises(ValueError, match="rank='speedup' needs"):
        compare.matched_error(records, rank="speedup")
    by_sparsity = compare.matched_sparsity(records, (0.5, 0.9))["w"]
    assert by_sparsity["a"][0.5]["value"] == 2 and by_sparsity["b"][0.9]["value"] == 3


def test_matched_error_ranks_by_speedup_when_runs_have_times():
    records = synthetic_records()
    table = compare.matched_error(records, (0.01, 0.03, 0.05))["w"]
    # Within 5%, a's fastest setting is x=2 (1.3x), b's is x=1 (2.0x, faster than its x=2).
    assert table["a"][0.05]["value"] == 2 and table["b"][0.05]["value"] == 1
    text = compare.markdown_matched_error(records, (0.01, 0.03, 0.05))
    assert "ranked by speedup over dense (same backend, same run; cpu backend; test CPU" in text
    assert "| b | 2.00x, 5 ms; 10.0% (5.0%); x=1 |" in text
    assert text.index("| b |") < text.index("| a |")  # b is faster at the tightest budget
    # Asked for sparsity, the same records rank a first again, and the title says why.
    forced = compare.markdown_matched_error(records, (0.01, 0.03, 0.05), rank="sparsity")
    assert "ranked by sparsity (as asked" in forced
    assert forced.index("| a |") < forced.index("| b |")
    assert "(2.00x)" not in forced and "x=1); 2.00x" in forced


def test_workloads_of_one_name_with_different_content_stay_apart():
    records = synthetic_records()
    for index, record in enumerate(records[1:]):
        record.update(workload_id=f"file:sha256={index % 2}", content_sha256=f"{index % 2}" * 64)
    tables = compare.matched_error(records)
    assert sorted(tables) == ["w [sha256 00000000]", "w [sha256 11111111]"]


def test_pareto_front_keeps_only_undominated_points():
    points = [(0.1, 0.01), (0.5, 0.02), (0.4, 0.05), (0.9, 0.3), (0.9, 0.2)]
    assert pareto_front(points) == [(0.1, 0.01), (0.5, 0.02), (0.9, 0.2)]


def test_plots_are_written(tmp_path):
    paths = plot_records(synthetic_records(), tmp_path, formats=("png", "svg"))
    assert {p.name for p in paths} == {"w_error.png", "w_error.svg", "w_speedup.png",
                                       "w_speedup.svg"}
    for path in paths:
        assert path.stat().st_size > 1000


def test_cli_compare(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in synthetic_records()) + "\n")
    result = subprocess.run([sys.executable, "-m", "pysparse_attn.bench", "compare", str(path),
                             "--by", "error"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| a |" in result.stdout and "ranked by speedup" in result.stdout
    run_cli("compare", path, "--by", "error", "--rank", "sparsity")
    assert "ranked by sparsity (as asked" in capsys.readouterr().out
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["compare", str(empty)]) == 1
    assert "no run records" in capsys.readouterr().err


def one_line_error(argv, capsys):
    """Run the CLI in-process; return its stderr after checking it is one line, no traceback,
    and the exit status is non-zero."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's own errors
        status = stop.code
    err = capsys.readouterr().err
    assert status not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("python -m pysparse_attn.bench"), err
    return lines[0]


def test_cli_reports_user_errors_as_one_line(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    sweep = ["sweep", "-o", out, "--no-progress"]
    assert "no-such-workload" in one_line_error(sweep + ["-w", "no-such-workload"], capsys)
    missing = tmp_path / "missing.npz"
    assert str(missing) in one_line_error(sweep + ["-w", f"file:{missing}:bnhd"], capsys)
    assert "no-such-method" in one_line_error(sweep + ["-m", "no-such-method"], capsys)
    assert "64x64" in one_line_error(sweep + ["--block", "64"], capsys)
    assert "--values" in one_line_error(sweep + ["--values", "topk=a,b"], capsys)
    assert "--repeat" in one_line_error(sweep + ["--repeat", "0"], capsys)
    assert "--frobnicate" in one_line_error(sweep + ["--frobnicate"], capsys)
    assert "does not exist" in one_line_error(["compare", tmp_path / "none.jsonl"], capsys)
    records = tmp_path / "r.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in synthetic_records(times=False)))
    assert "rank='speedup'" in one_line_error(["compare", records, "--rank", "speedup"], capsys)
    assert not out.exists()  # nothing was run
    # The real command line too, where a traceback would show.
    result = subprocess.run([sys.executable, "-m", "pysparse_attn.bench", "sweep", "-o",
                             str(out), "-w", "nope"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_every_cli_option_has_help():
    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for parser in parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{parser.prog} {action.option_strings or action.dest}"


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


def save_bnhd(path, seed, shape=(2, 4, 5), heads=2, head_dim=8):
    """Save video-like q, k, v in the (B, N, H, D) layout; return them in (B, H, N, D)."""
    q, k, v = video_qkv(shape, heads=heads, head_dim=head_dim, seed=seed)
    np.savez(path, **{name: x.transpose(0, 2, 1, 3) for name, x in zip("qkv", (q, k, v))})
    return q, k, v


def test_file_workloads_resume_by_content_hash(tmp_path, capsys):
    data, out = tmp_path / "layer.npz", tmp_path / "sweep.jsonl"
    save_bnhd(data, fresh_seed())
    command = ["sweep", "-o", out, "-w", f"file:{data}:bnhd", "--block", "8x8", "--repeat", "1",
               "--no-progress", "-m", "topk", "--values", "topk=0.5"]
    run_cli(*command)
    first = [r for r in read_records(out) if r.get("type") == "run"]
    assert len(first) == 1 and first[0]["content_sha256"] == sweep.file_digest(data)
    run_cli(*command)  # same content: resumed, nothing redone
    assert len([r for r in read_records(out) if r.get("type") == "run"]) == 1
    save_bnhd(data, fresh_seed() + 1)  # overwritten with other tensors: the stale run is not reused
    run_cli(*command)
    runs = [r for r in read_records(out) if r.get("type") == "run"]
    assert len(runs) == 2 and runs[0]["content_sha256"] != runs[1]["content_sha256"]
    assert runs[1]["content_sha256"] == sweep.file_digest(data)
    assert runs[0]["rel_l2"] != runs[1]["rel_l2"]
    # The summary printed after the last sweep shows the current content only, and compare
    # keeps the two contents apart.
    printed = capsys.readouterr().out.split("**")
    assert len([part for part in printed if "fastest setting" in part]) == 3
    assert len(compare.matched_error(read_records(out))) == 2


def test_a_shape_that_looks_like_the_other_layout_warns_naming_the_suffix(tmp_path, capsys):
    data = tmp_path / "layer.npz"
    save_bnhd(data, fresh_seed(), shape=(1, 4, 5), heads=2)  # saved (1, 20, 2, 8)
    with pytest.warns(LayoutWarning, match=r"N = 2 tokens but H = 20 heads.*:bnhd"):
        parse_workload(f"file:{data}", block=(8, 8)).tensors()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_workload(f"file:{data}:bnhd", block=(8, 8)).tensors()
    # Given explicitly, a suffix that reads N < H is doubted too, naming the other one.
    np.savez(data, **{name: np.zeros((1, 2, 20, 8), np.float32) for name in "qkv"})  # bhnd
    with pytest.warns(LayoutWarning, match=r"as given.*:bhnd"):
        parse_workload(f"file:{data}:bnhd", block=(8, 8)).tensors()
    # On the command line: one warning line, and the sweep still runs.
    save_bnhd(data, fresh_seed(), shape=(1, 4, 5), heads=2)
    run_cli("sweep", "-o", tmp_path / "s.jsonl", "-w", f"file:{data}", "--block", "8x8",
            "--repeat", "1", "--no-progress", "-m", "topk", "--values", "topk=0.5")
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        line for line in err.splitlines() if ":bnhd" in line]
    assert "warning: " in err


@pytest.mark.parametrize("namespace", ["numpy", "array_api_strict"])
def test_sampled_float32_reference_matches_the_float64_one_on_its_rows(namespace):
    seed = fresh_seed()
    q, k, v = video_qkv((2, 5, 7), heads=4, head_dim=16, seed=seed, dtype=np.float32)
    k, v = k[:, :2], v[:, :2]  # GQA
    block = (16, 16)  # 70 tokens: partial last tiles
    full = metrics.dense_reference(q, k, v, block)
    rows = metrics.sample_rows(70, 25, seed=seed)
    assert rows[0] == 0 and rows[-1] == 69 and np.all(np.diff(rows) > 0) and rows.size == 25
    if namespace == "array_api_strict":
        xp = pytest.importorskip("array_api_strict", reason="array-api-strict not installed")
        q, k, v = (xp.asarray(x) for x in (q, k, v))
    sampled = metrics.sampled_reference(q, k, v, block, rows, rows_per_chunk=7)
    # float32 logits over D = 16 and a float32 softmax: about 1e-6 relative.
    np.testing.assert_allclose(sampled.out, full.out[:, :, rows], rtol=1e-5, atol=1e-5,
                               err_msg=f"seed={seed}")
    np.testing.assert_allclose(sampled.tile_mass, full.tile_mass[:, :, rows], atol=1e-6)
    kept = np.random.default_rng(seed).random((1, 4, 5, 5)) < 0.5
    np.testing.assert_allclose(metrics.recall_from_tile_mass(sampled, kept),
                               metrics.recall_from_tile_mass(full, kept)[:, :, rows], atol=1e-6)
    out = np.asarray(full.out)
    assert sampled.restrict(out).shape == (1, 4, 25, 16)
    assert "25 of 70 rows" in sampled.description
    with pytest.raises(ValueError, match="rows"):
        metrics.sampled_reference(q, k, v, block, np.array([70]))


def test_sweep_with_a_sampled_reference(tmp_path):
    out = tmp_path / "s.jsonl"
    run_cli("sweep", "-o", out, "-w", SMALL, "--block", "16x16", "--repeat", "1",
            "--no-progress", "-m", "recall-peak", "--values", "recall-peak=0.9",
            "--reference-rows", "40")
    run = [r for r in read_records(out) if r.get("type") == "run"][0]
    assert run["reference"] == "float32 exact, 40 of 108 rows sampled"
    assert run["recall_min"] >= 0.9 - 1e-6 and run["rel_l2"] < 0.2


def test_results_export_and_the_docs_tables(tmp_path):
    out = tmp_path / "s.jsonl"
    run_cli("sweep", "-o", out, "-w", SMALL, "--block", "16x16", "--repeat", "1",
            "--no-progress", "--grid", "docs", "-m", "recall-peak", "-m", "topk")
    exported = tmp_path / "results.jsonl"
    run_cli("export", out, "-o", exported)
    results = bench_results.read_results([exported, out])  # sweep lines are skipped
    assert len(results) == 5
    for result in results:
        assert set(bench_results.RESULT_FIELDS) <= set(result)
        assert result["device_kind"] == "cpu" and result["time_ms"] > 0
    assert {r["method"] for r in results} == {"Recall", "TopK"}
    text = bench_results.render_method_tables(results)
    assert "No GPU results are in ``bench/results/`` yet" in text
    assert ".. list-table:: Recall (" in text and "R=0.95, order=peak" in text
    assert bench_results.render_method_tables([]).count("No ") == 2


def test_committed_result_files_are_complete():
    folder = Path(__file__).resolve().parent.parent / "bench" / "results"
    results = bench_results.read_results(folder)
    for result in results:
        missing = set(bench_results.RESULT_FIELDS) - set(result)
        assert not missing, (result.get("method"), missing)
    if not results:
        pytest.skip("no result files in bench/results/ yet")


def test_stats_repr_is_one_short_line():
    q, k, v = video_qkv((4, 8, 8), heads=2, head_dim=16, seed=fresh_seed())
    _, stats = psa.attention(q, k, v, skip=psa.Recall(0.9), block=(16, 16), return_stats=True)
    text = repr(stats)
    assert "\n" not in text and len(text) < 250, text
    assert f"sparsity={stats.sparsity:.1%}" in text and "tiles (B,H,nq,nk)=1x2x16x16" in text
    assert f"min/mean={float(stats.recall_bound.min()):.4f}" in text
    _, stats = psa.attention(q, k, v, select=psa.TopK(ratio=0.3), block=(16, 16),
                             return_stats=True)
    assert "(visited tiles only)" in repr(stats)


@pytest.mark.gpu
def test_gpu_sweep_times_on_the_device_against_a_sampled_float32_reference(tmp_path):
    import cupy

    q, k, v = video_qkv((2, 6, 11), heads=2, head_dim=64, seed=fresh_seed())
    rows = metrics.sample_rows(q.shape[2], 50, seed=1)
    on_host = metrics.sampled_reference(q, k, v, (64, 64), rows)
    on_device = metrics.sampled_reference(*(cupy.asarray(x) for x in (q, k, v)), (64, 64), rows)
    # The same float32 computation on two devices: summation order differs only.
    np.testing.assert_allclose(on_device.out, on_host.out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(on_device.tile_mass, on_host.tile_mass, atol=1e-5)

    out = tmp_path / "gpu.jsonl"
    run_cli("sweep", "-o", out, "-w", "video:2x6x11:2:64:local+global", "--backend", "cupy",
            "--dtype", "bfloat16", "--block", "128x64", "--repeat", "2", "--no-progress",
            "--reference-rows", "64", "-m", "recall-peak", "-m", "topk", "-m", "sla-fit",
            "--values", "recall-peak=0.9", "--values", "topk=0.5", "--values", "sla-fit=0.5")
    runs = [r for r in read_records(out) if r.get("type") == "run"]
    assert len(runs) == 3
    for run in runs:
        assert run["reference"] == "float32 exact, 64 of 132 rows sampled"
        assert run["backend"] == "cupy" and run["time_s"] > 0 and run["speedup"] > 0
        assert run["rel_l2"] < 0.5  # bf16 inputs: ~1e-2 from rounding alone
    recall = [r for r in runs if r["method"] == "recall-peak"][0]
    assert recall["recall_min"] >= 0.9 - 1e-3  # certified; the reference is float32
    exported = bench_results.export_sweep(read_records(out))
    assert {r["device_kind"] for r in exported} == {"gpu"}
    assert "No GPU results" not in bench_results.render_method_tables(exported)


@pytest.mark.slow
def test_gpu_workloads_script_runs_end_to_end_on_a_cpu_and_bundles_its_results(tmp_path):
    import os
    import tarfile

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), PYTHON=sys.executable, OUT=str(tmp_path),
               WORK=str(tmp_path / "work"), BACKEND="cpu", DTYPE="float32", BLOCK="16x16",
               SHAPE="3x8x12", STEPS="4", ERROR_TILES="2", SWEEP_WORKLOAD=SMALL)
    result = subprocess.run(["bash", str(root / "bench" / "gpu_workloads.sh")], cwd=root,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "workloads" / "summary.md").read_text()
    for expected in ("| docs |", "| late-natural |", "## sweep", "reuse: rc=0", "sweep: rc=0"):
        assert expected in summary, expected
    with tarfile.open(tmp_path / "workloads" / "workloads.tgz") as bundle:
        names = bundle.getnames()
    assert any(n.endswith("-late.jsonl") for n in names)
    assert any("methods-gpu-" in n for n in names) and any(n.endswith(".png") for n in names)
    assert sorted(p.name for p in (tmp_path / "workloads").iterdir()) == ["summary.md",
                                                                         "workloads.tgz"]


def test_docs_tables_put_gpu_results_first_with_their_device_and_date(tmp_path):
    out = tmp_path / "s.jsonl"
    run_cli("sweep", "-o", out, "-w", SMALL, "--block", "16x16", "--repeat", "1",
            "--no-progress", "-m", "topk", "--values", "topk=0.5")
    cpu = bench_results.export_sweep(read_records(out))
    gpu = [dict(r, device="NVIDIA H200", device_kind="gpu", backend="cupy",
                date="2026-12-02T01:00:00+00:00") for r in cpu]
    path = tmp_path / "methods-gpu-x.jsonl"
    bench_results.write_results(path, gpu)
    text = bench_results.render_method_tables(cpu + bench_results.read_results(path))
    assert text.index(".. rubric:: GPU") < text.index("**NVIDIA H200**, measured 2026-12-02")
    assert text.index("**NVIDIA H200**") < text.index(".. rubric:: CPU")
    assert "No GPU results" not in text and "``cupy`` backend" in text


def test_reuse_results_render_for_the_docs_gpu_first(tmp_path):
    from pysparse_attn.bench.__main__ import main
    from pysparse_attn.bench.reuse import render_reuse_results

    assert "No plan-reuse results" in render_reuse_results(tmp_path)
    assert main(["reuse", "-o", str(tmp_path / "reuse-cpu-a"), "--shape", "3x8x12", "--heads",
                 "2", "--head-dim", "32", "--steps", "3", "--block", "16x16", "--repeat",
                 "1", "--dense-steps", "1"]) == 0
    records = [json.loads(x) for x in (tmp_path / "reuse-cpu-a.jsonl").read_text().splitlines()]
    records[0].update(backend="cupy", device="NVIDIA H200", date="2026-12-01T00:00:00+00:00")
    (tmp_path / "reuse-gpu-b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "reuse-torn.jsonl").write_text('{"type": "environment"}\n')  # no summary
    text = render_reuse_results(tmp_path)
    assert text.startswith(".. list-table::") and "reuse-torn" not in text
    assert text.index("NVIDIA H200, 2026-12-01") < text.index("``reuse-cpu-a``")
    assert "(1, 2, 288, 32), float32, 16x16" in text


def test_packaging_metadata_reads_without_deprecation_warnings():
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("pysparse_attn")
    assert "Deprecat" not in result.stderr, result.stderr


def _finetune_record(device, date, before, after, steps):
    return {"device_name": device, "date": date, "commit": "abc1234", "tokens": 512,
            "config": {"layers": 2, "heads": 2, "head_dim": 16, "lr_finetune": 2e-3},
            "measured_sparsity": 0.969, "dense": {"step_ms": 20.0},
            "sla_before": {"rel_l2_vs_dense": before}, "sla_after": {"rel_l2_vs_dense": after},
            "finetune": {"steps_run": steps, "step_ms": 30.0}}


def test_finetune_runs_render_gpu_first_with_their_error_ratio(tmp_path):
    (tmp_path / "cpu-run").mkdir()
    (tmp_path / "cpu-run" / "finetune-sla-1.json").write_text(
        json.dumps(_finetune_record("CPU (2 cores)", "20261201T000000", 0.2, 0.1, 1500)))
    (tmp_path / "finetune-sla-2.json").write_text(
        json.dumps(_finetune_record("NVIDIA H200", "20261202T071400", 0.17, 0.119, 600)))
    (tmp_path / "unrelated.json").write_text("{}")
    runs = bench_results.read_finetune_runs(tmp_path)
    assert [run["device_name"] for run in runs] == ["NVIDIA H200", "CPU (2 cores)"]
    assert runs[1]["path"] == str(Path("cpu-run") / "finetune-sla-1.json")
    text = bench_results.render_finetune_results(tmp_path)
    rows = text.split("   * - ")[2:]
    assert rows[0].startswith("NVIDIA H200, 2026-12-02") and "0.700" in rows[0]
    assert "600, 0.002" in rows[0] and "0.1700 / 0.1190" in rows[0]
    assert rows[1].startswith("CPU (2 cores), 2026-12-01") and "0.500" in rows[1]
    assert "No fine-tuning runs" in bench_results.render_finetune_results(tmp_path / "cpu-run"
                                                                          / "none")


def test_forward_comparisons_render_one_table_per_run_newest_first(tmp_path):
    meta = {"device": "NVIDIA H200", "commit": "abc1234", "shape": [1, 12, 32760, 128],
            "block": [128, 64], "dtype": "bfloat16", "timing": "do_bench median"}
    runs = {"20261201T000000": [("dense", "torch sdpa cudnn", 11.0, {}),
                                ("dense", "wgmma", 15.0, {"skipped": 0.0, "of_cudnn": 0.733})],
            "20261202T000000": [("dense", "wgmma", 14.0, {"skipped": 0.0}),
                                ("dense", "sm90_ws", 12.0, {"skipped": 0.0}),
                                ("TopK(0.05)", "wgmma", 0.8, {"skipped": 0.95,
                                                             "speedup_vs_own_dense": 17.5}),
                                ("TopK(0.05)", "sm90_ws", None, {"error": "boom"})]}
    (tmp_path / "nested").mkdir()
    for date, rows in runs.items():
        lines = [json.dumps({**meta, "date": date, "what": what, "impl": impl, "ms": ms, **extra})
                 for what, impl, ms, extra in rows]
        (tmp_path / "nested" / f"forward-compare-{date}.jsonl").write_text("\n".join(lines))
    text = bench_results.render_forward_comparisons(tmp_path)
    newest, oldest = text.split("**NVIDIA H200**")[1:]
    assert newest.startswith(", 2026-12-02") and oldest.startswith(", 2026-12-01")
    assert "cuDNN 11.00 ms" in oldest and "cuDNN" not in newest.split("list-table")[0]
    assert "``sm90_ws``" in newest and "``sm90_ws``" not in oldest
    assert "   * - TopK(0.05)\n     - 95.0%\n     - 0.800 (17.50x)\n     - failed" in newest
    assert "     - 15.000 (73%)" in oldest
    assert "No forward comparisons" in bench_results.render_forward_comparisons(tmp_path / "x")
    # --mode schedule runs (the sm90_ws consumer schedules) render the same way, apart.
    assert "No forward schedule runs" in bench_results.render_forward_comparisons(
        tmp_path, mode="schedule")
    rows = [("strength 1: dense", "serial", 12.9, {"skipped": 0.0}),
            ("strength 3: Blasst(1e-3)", "serial", 10.5, {"skipped": 0.966,
                                                          "speedup_vs_own_dense": 1.2})]
    (tmp_path / "forward-schedule-20261203T000000.jsonl").write_text("\n".join(
        json.dumps({**meta, "date": "20261203T000000", "what": what, "impl": impl, "ms": ms,
                    **extra}) for what, impl, ms, extra in rows))
    schedule = bench_results.render_forward_comparisons(tmp_path, mode="schedule")
    assert schedule.count("**NVIDIA H200**") == 1 and "``serial``" in schedule
    assert "   * - strength 3: Blasst(1e-3)\n     - 96.6%\n     - 10.500 (1.20x)" in schedule
    assert "forward-schedule" not in bench_results.render_forward_comparisons(tmp_path)
