"""bench/reuse_on_model.py: plan reuse on the trained demonstration model's own attention.

The smoke preset runs the whole path in seconds on a CPU: dense training (bench/finetune_sla.py's
functions), the model's sampler with one self-attention layer captured at every step, the
capture read back by load_trajectory, and the reuse benchmark's variants on it. The capture is
checked to be what the layer attends: the stock processor's output is the attention of the
captured q, k, v, and capturing leaves the model's output unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install .[torch])")
pytest.importorskip("diffusers", reason="diffusers is not installed (pip install .[diffusers])")

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "reuse_on_model.py"
LABELS = ["docs", "late", "late-m1", "late-natural", "late-plain"]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("reuse_on_model", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_preset_trains_samples_captures_and_benchmarks(demo, tmp_path, capsys):
    from pysparse_attn.workloads import load_trajectory

    out, capture, saved = tmp_path / "out", tmp_path / "capture", tmp_path / "model.pt"
    record = demo.main(["--smoke", "--out", str(out), "--capture", str(capture),
                        "--save-model", str(saved)])
    steps = record["config"]["sampler_steps"]
    assert record["preset"] == "smoke" and steps == 8
    # The capture: a load_trajectory directory that carries its own grid and sigmas.
    trajectory = load_trajectory(capture)
    assert len(trajectory) == steps and trajectory.grid == (4, 8, 8)
    assert trajectory.sigmas[0] == 1.0 and np.all(np.diff(trajectory.sigmas) < 0)
    q, k, v = trajectory[steps - 1]
    assert q.shape == k.shape == v.shape == (1, 2, 256, 16) and q.dtype == np.float32
    meta = json.loads((capture / "capture.json").read_text())
    assert meta["layer"] == 1 and len(meta["timesteps"]) == steps
    assert meta["timesteps"][0] == pytest.approx(1000.0)
    # The benchmark's files, one set per variant, and this script's record and table.
    for label in LABELS:
        for suffix in (".jsonl", ".md", ".png"):
            assert (out / f"reuse-model-{label}{suffix}").exists(), (label, suffix)
    assert (out / "reuse-model-variants.md").exists()
    saved_record = json.loads((out / "reuse-on-model.json").read_text())
    assert saved_record["commit"] and saved_record["command"].startswith(
        "bench/reuse_on_model.py --smoke")
    assert sorted(saved_record["bench"]["summaries"]) == sorted(LABELS)
    for label, summary in saved_record["bench"]["summaries"].items():
        assert summary["steps"] == steps, label
        assert all(math.isfinite(summary[key]) for key in (
            "rel_l2_mean", "rel_l2_max", "speedup_vs_dense", "plan_density_mean")), label
        # The kernel's certificate: Recall(R) holds on every row of every step.
        assert summary["recall_min"] >= summary["recall_bound_min"] - 1e-6, label
    records = [json.loads(x) for x in (out / "reuse-model-late.jsonl").read_text().splitlines()]
    header = records[0]
    assert header["trajectory"]["loader"] == "load_trajectory"
    assert header["trajectory"]["grid"] == [4, 8, 8] and header["trajectory"]["heads"] == 2
    sigmas = [r["sigma"] for r in records if r.get("type") == "step"]
    np.testing.assert_allclose(sigmas, trajectory.sigmas)
    model = saved_record["model"]
    assert model["train_loss_last"] < model["train_loss_first"]
    assert 0 < model["eval_loss"] < model["eval_loss_zero"]
    table = (out / "reuse-on-model.md").read_text()
    assert "## Per step" in table and "| late-plain |" in table and "Small and synthetic" in table
    assert "Plan reuse on the trained model" in capsys.readouterr().out
    # --model: the saved dense model, loaded instead of trained.
    again = demo.main(["--smoke", "--model", str(saved), "--steps", "4", "--out",
                       str(tmp_path / "again")])
    assert again["model"]["loaded_from"] == str(saved)
    assert again["model"]["eval_loss"] == pytest.approx(model["eval_loss"], rel=1e-5)
    assert again["bench"]["summaries"]["late"]["steps"] == 4


def test_capture_is_what_the_layer_attends_and_changes_nothing(demo):
    import finetune_sla  # on sys.path once the module is loaded

    config = dict(demo.PRESETS["smoke"])
    model = finetune_sla.build_model(torch, config, torch.device("cpu"), seed=1).eval()
    task = finetune_sla.Task(torch, config, torch.device("cpu"), seed=1)
    noisy, timestep, _ = task.batch(1, seed=3)
    attn = model.blocks[1].attn1
    seen = {}
    hook = attn.register_forward_hook(lambda module, inputs, output: seen.update(out=output))
    with torch.no_grad():
        plain = task.predict(model, noisy, timestep)
        captured = []
        remove = demo.install_capture(model, 1, lambda *qkv: captured.append(qkv))
        with_capture = task.predict(model, noisy, timestep)
        remove()
    hook.remove()
    assert len(captured) == 1 and type(attn.processor).__name__ == "WanAttnProcessor"
    torch.testing.assert_close(with_capture, plain, rtol=0, atol=0)
    q, k, v = captured[0]  # (B, N, H, D)
    attended = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2).flatten(2)
    torch.testing.assert_close(attn.to_out[0](attended), seen["out"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="--layer 5"):
        demo.install_capture(model, 5, lambda *qkv: None)


def test_variants_at_50_steps_are_those_of_the_gpu_script(demo):
    script = (ROOT / "bench" / "gpu_workloads.sh").read_text()
    plain = re.search(r"^PLAIN=(\S+)", script, re.M).group(1)
    first_run = script.split("run_step reuse ", 1)[1].split("\n\n", 1)[0]
    expected = [v.replace("$PLAIN", plain)
                for v in re.findall(r"--variant (\S+)", first_run)]
    assert demo.variants(50) == expected
    assert [v.split(":")[0] for v in expected] == LABELS
    assert "dense-steps=4," in demo.variants(10)[1]  # 40% of the steps
