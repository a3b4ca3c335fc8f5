"""bench/finetune_sla.py: the SLA fine-tuning demonstration runs end to end (CPU smoke preset).

The GPU preset is run on the GPU machine; here the tiny preset checks the whole path: dense
training, the switch to SLA, fine-tuning that reaches W, b and the model, the record and the
summary.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install .[torch])")
pytest.importorskip("diffusers", reason="diffusers is not installed (pip install .[diffusers])")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "finetune_sla.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("finetune_sla", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_preset_trains_dense_then_fine_tunes_sla_and_writes_its_record(demo, tmp_path,
                                                                           capsys):
    # Sized for well under 30 s on two idle cores; no wall-clock assertion (a shared machine
    # can be many times slower), the record carries the time taken. The preset's time budget
    # is lifted so that a loaded machine still runs every step the assertions below count.
    record = demo.main(["--smoke", "--time-budget", "3600", "--out", str(tmp_path)])
    assert record["wall_s"] > 0
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert written == [".json", ".md"], written
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["commit"] and saved["command"].startswith("bench/finetune_sla.py --smoke")
    for key in ("dense", "sla_before", "sla_after", "finetune"):
        assert key in saved, key
    numbers = [saved["dense"]["eval_loss"], saved["sla_before"]["loss"],
               saved["sla_after"]["loss"], saved["sla_before"]["rel_l2_vs_dense"],
               saved["sla_after"]["rel_l2_vs_dense"], saved["dense"]["step_ms"],
               saved["finetune"]["step_ms"]]
    assert all(math.isfinite(x) and x >= 0 for x in numbers), numbers
    # Sparse-only attention differs from dense; the zero-initialised W and b learnt something.
    assert record["sla_before"]["rel_l2_vs_dense"] > 0
    assert record["finetune"]["sla_weight_norm"] > 0
    assert record["finetune"]["steps_run"] == record["finetune"]["steps_asked"] == 30
    # 16 key tiles of 16 tokens, 1 critical: 15/16 of the tiles not computed exactly.
    assert record["tile_sparsity"] == pytest.approx(15 / 16)
    assert record["measured_sparsity"] == pytest.approx(15 / 16)
    summary = next(tmp_path.glob("*.md")).read_text()
    assert "SLA before fine-tuning" in summary and "Small and synthetic" in summary
    assert "SLA after fine-tuning" in capsys.readouterr().out


def test_time_budget_stops_fine_tuning_and_says_how_many_steps_ran(demo):
    record = demo.main(["--smoke", "--steps-dense", "2", "--steps-finetune", "1000",
                        "--time-budget", "0.5"])
    assert 1 <= record["finetune"]["steps_run"] < 1000
    assert record["finetune"]["steps_asked"] == 1000


def test_bad_options_and_missing_packages_are_named(demo, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--smoke", "--height", "15"])
    assert "--height must be an even number" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="needs the Python package 'no-such-package'"):
        demo._needs("no_such_module_for_this_test", "no-such-package")
