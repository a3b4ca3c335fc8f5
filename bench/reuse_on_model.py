"""Plan reuse on a trained model's own attention, along its own sampler.

The synthetic trajectory of ``python -m pysparse_attn.bench reuse``
(:func:`pysparse_attn.workloads.denoising_trajectory`) imitates what a sampler does to one
attention layer. This runs :class:`pysparse_attn.PlanReuse` on tensors a model made instead:

1. **The model.** The small ``WanTransformer3DModel`` of the fine-tuning demonstration
   (``bench/finetune_sla.py``: a few layers, random init, nothing downloaded), trained *dense*
   on its task, flow-matching denoising of synthetic moving-blob latents, by that script's own
   functions (:func:`finetune_sla.train_dense`); or loaded with ``--model PATH`` (a file that
   ``--save-model PATH`` wrote: the config and the state dict).
2. **The sampler and the capture.** The model's own sampler, Euler steps of the flow-matching
   ODE the task trains (``x_t = (1 - t) x_0 + t noise``, the model predicts the velocity
   ``noise - x_0`` at timestep ``1000 t``): from pure noise at ``sigma_0 = 1``,
   ``x <- x + (sigma_{s+1} - sigma_s) v(x, 1000 sigma_s)`` down to ``sigma_S = 0``, with the
   shifted schedule of the synthetic trajectory (:func:`pysparse_attn.workloads.flow_sigmas`,
   ``--shift``, 5 by default). At every step a capturing attention processor installed on one
   self-attention layer (``--layer``, default the middle block; ``set_processor``, as
   :mod:`pysparse_attn.diffusers` installs its own) records the q, k, v that layer attends
   over (Wan's projections, RMS norms and rotary embedding,
   :func:`pysparse_attn.diffusers.self_attention_qkv`) and hands the call to the stock
   processor, so the model runs dense and unchanged. They are written as a
   :func:`~pysparse_attn.workloads.load_trajectory` directory (``step_SSS.npz``, ``bhnd``)
   with ``sigmas.npy``, ``grid.npy`` (the token grid T x H x W, frame-major, which lets
   PlanReuse dilate in the grid) and ``capture.json`` (timesteps, layer, model config).
3. **The benchmark.** ``python -m pysparse_attn.bench reuse --trajectory CAPTURE`` (its own
   functions, in this process) with the five PlanReuse variants of ``bench/gpu_workloads.sh``
   (docs/reuse.rst says why those): at 50 sampler steps exactly them; at fewer steps the
   ``late*`` variants' 20 dense steps scale to 40% of the steps.

Outputs in ``--out DIR``: the benchmark's files (``reuse-model-LABEL.jsonl``/``.md``/``.png``/
``.svg`` per variant, ``reuse-model-variants.md``), and ``reuse-on-model.json`` (the record:
model, training, sampler, capture, every variant's summary) with ``reuse-on-model.md`` (one
per-step table of every variant: kind, plan density, error against exact attention, recall
bound; the totals). The capture itself goes to ``--capture DIR`` (kept) or a temporary folder
(removed).

**What it shows and what it does not.** Plan reuse on attention that a trained model computes
along its own sampler, rather than on a generator's imitation; one layer, open loop (each step's
error is that of the layer's output on the dense trajectory's tensors; it is not fed back into
the sampler). The model is small and the task synthetic: this is not Wan2.1's attention.

    python3 bench/reuse_on_model.py --out DIR                    # CPU preset, <= 7 minutes
    python3 bench/reuse_on_model.py --device cuda --out DIR      # GPU preset, <= 3 minutes
    python3 bench/reuse_on_model.py --smoke                      # CPU, seconds (CI runs this)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
import finetune_sla  # noqa: E402  (the demonstration's model, task and training)
from pysparse_attn.bench.results import git_commit  # noqa: E402

# Presets. Model and task keys are those of finetune_sla's presets; "block" here is the
# benchmark's tile. gpu: finetune_sla's GPU model and task (16 x 16 x 16 = 4096 tokens; 128x64
# tiles: 32 query tiles x 64 key tiles), 50 sampler steps, bf16 on the CuPy backend. cpu: 2048
# tokens (8 x 16 x 16; 64x64 tiles: 32 x 32) and 4 heads, sized for 2 cores. smoke: seconds.
PRESETS = {
    "gpu": dict(finetune_sla.PRESETS["gpu"], sampler_steps=50, block=(128, 64),
                backend="cupy", dtype="bfloat16", repeat=3),
    "cpu": dict(finetune_sla.PRESETS["gpu"], frames=8, height=32, width=32, layers=3, heads=4,
                head_dim=32, ffn=256, batch=4, steps_dense=300, lr=1e-3, sampler_steps=50,
                block=(64, 64), backend="cpu", dtype="float32", repeat=3),
    "smoke": dict(finetune_sla.PRESETS["smoke"], steps_dense=20, sampler_steps=8,
                  block=(16, 16), backend="cpu", dtype="float32", repeat=1),
}
#: The keys that define the model and its task (saved with ``--save-model``).
MODEL_KEYS = ("frames", "height", "width", "layers", "heads", "head_dim", "ffn")
PREFIX = "reuse-model"


def variants(steps):
    """The PlanReuse variants of ``bench/gpu_workloads.sh`` for a run of ``steps`` steps.

    At 50 steps exactly those; otherwise the ``late*`` variants keep 40% of the steps dense
    (20 of 50 there). All run with ``--skip recall:0.8`` as the rule-alone comparison.
    """
    late = max(1, round(20 * steps / 50))
    plain = "mass-budget=none,kept-tolerance=none,rule-in-plan=false"
    base = f"skip=recall:0.8,dense-steps={late},refresh-every=5,margin="
    return ["docs:skip=recall:0.95,dense-steps=2,refresh-every=5,margin=1",
            f"late:{base}0", f"late-m1:{base}1", f"late-natural:{base}0,order=natural",
            f"late-plain:{base}0,{plain}"]


class CaptureWanAttnProcessor:
    """A ``WanAttention`` processor that records the self-attention's q, k, v, then runs the
    stock processor unchanged (the layer's output is the stock one).

    ``sink(q, k, v)`` receives detached ``(B, N, H, D)`` tensors, as the layer attends them;
    cross-attention calls pass straight through.
    """

    def __init__(self, stock, sink):
        self.stock = stock
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        if encoder_hidden_states is None and not attn.is_cross_attention:
            import torch

            from pysparse_attn.diffusers import self_attention_qkv

            with torch.no_grad():
                self.sink(*(x.detach() for x in self_attention_qkv(attn, hidden_states,
                                                                      rotary_emb)))
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask,
                          rotary_emb)


def install_capture(model, layer, sink):
    """Install :class:`CaptureWanAttnProcessor` on block ``layer``'s self-attention; returns a
    function that puts the stock processor back."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    blocks = model.blocks
    if not -len(blocks) <= layer < len(blocks):
        raise ValueError(f"--layer {layer}: the model has {len(blocks)} blocks")
    attn = blocks[layer].attn1
    stock = attn.processor
    if not isinstance(stock, WanAttnProcessor):
        raise TypeError(f"block {layer}'s self-attention runs {type(stock).__name__}, not "
                        "diffusers' WanAttnProcessor")
    attn.set_processor(CaptureWanAttnProcessor(stock, sink))
    return lambda: attn.set_processor(stock)


def sample_and_capture(torch, task, model, config, layer, steps, shift, seed, folder, clock):
    """The model's Euler flow-matching sampler from noise, capturing block ``layer``'s q, k, v
    at every step into ``folder`` (the load_trajectory format). Returns the capture's
    description and the final sample."""
    from pysparse_attn.workloads import flow_sigmas

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sigmas = flow_sigmas(steps, shift)
    grid = (config["frames"], config["height"] // 2, config["width"] // 2)
    shape = (1, finetune_sla.CHANNELS, config["frames"], config["height"], config["width"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 4242))
    x = x.to(task.device)
    captured = []
    remove = install_capture(model, layer, lambda q, k, v: captured.append((q, k, v)))
    timesteps = []
    try:
        model.eval()
        with torch.no_grad():
            for step, sigma in enumerate(sigmas):
                following = float(sigmas[step + 1]) if step + 1 < steps else 0.0
                timestep = torch.full((1,), 1000.0 * float(sigma), device=task.device)
                velocity = task.predict(model, x, timestep)
                x = x + (following - float(sigma)) * velocity
                if len(captured) != 1:
                    raise RuntimeError(f"step {step}: the layer was called {len(captured)} "
                                       "times, expected once")
                q, k, v = (t.float().transpose(1, 2).cpu().numpy() for t in captured.pop())
                np.savez(folder / f"step_{step:03d}.npz", q=q, k=k, v=v)
                timesteps.append(1000.0 * float(sigma))
    finally:
        remove()
    if int(np.prod(grid)) != q.shape[2]:
        raise RuntimeError(f"token grid {grid} does not match the {q.shape[2]} tokens captured")
    np.save(folder / "sigmas.npy", sigmas)
    np.save(folder / "grid.npy", np.array(grid))
    description = dict(layer=layer, steps=steps, shift=shift, sampler="euler-flow-matching",
                       sigmas=[float(s) for s in sigmas], timesteps=timesteps,
                       grid=list(grid), shape_bhnd=list(q.shape), layout="bhnd",
                       dtype="float32", model={k: config[k] for k in MODEL_KEYS})
    (folder / "capture.json").write_text(json.dumps(description, indent=1) + "\n")
    clock.say(f"captured {steps} steps of block {layer}'s self-attention: q, k, v "
              f"{tuple(q.shape)} (B, H, N, D), grid {grid}, in {folder}")
    return description, x


def run_bench(capture, out, config, args):
    """``python -m pysparse_attn.bench reuse --trajectory capture`` with :func:`variants`,
    through the bench's own parser and ``run``. Returns ``(argv, {label: summary})``."""
    from pysparse_attn.bench import reuse
    from pysparse_attn.bench.__main__ import build_parser

    bq, bk = config["block"]
    argv = ["reuse", "-o", str(Path(out) / PREFIX), "--trajectory", str(capture),
            "--backend", config["backend"], "--dtype", config["dtype"], "--block", f"{bq}x{bk}",
            "--repeat", str(config["repeat"]), "--skip", "recall:0.8"]
    if args.error_tiles is not None:
        argv += ["--error-tiles", str(args.error_tiles)]
    for variant in variants(config["sampler_steps"]):
        argv += ["--variant", variant]
    bench_args = build_parser().parse_args(argv)
    summaries = reuse.run(bench_args, ["python -m pysparse_attn.bench"] + argv)
    return argv, summaries


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _kind(r):
    return ("dense" if r["dense_step"] else "refresh" if r["refreshed_heads"] == r["heads"]
            else "partial" if r["refreshed_heads"] else "reused")


def summary_markdown(record, out):
    """The per-step table of every variant and the totals, as markdown."""
    r = record
    c = r["config"]
    labels = list(r["bench"]["summaries"])
    steps = {label: [x for x in _read_jsonl(Path(out) / f"{PREFIX}-{label}.jsonl")
                     if x.get("type") == "step"] for label in labels}
    m = r["model"]
    capture = r["capture"]
    lines = [
        "# Plan reuse on the trained model's attention",
        "",
        f"{r['device_name']}, {r['date']}, commit {r['commit']}",
        f"command: `{r['command']}`",
        "",
        f"Model: WanTransformer3DModel ({c['layers']} layers, {c['heads']} heads of "
        f"{c['head_dim']}, {m['parameters'] / 1e6:.2f} M parameters), "
        + (f"loaded from `{m['loaded_from']}`" if m.get("loaded_from") else
           f"trained dense {m['steps_dense']} steps on bench/finetune_sla.py's task "
           f"(train loss {m['train_loss_first']:.4f} -> {m['train_loss_last']:.4f})")
        + f"; held-out denoising loss {m['eval_loss']:.4f} (predicting zero: "
        f"{m['eval_loss_zero']:.4f}).",
        f"Sampler: {capture['steps']} Euler flow-matching steps from noise, shift "
        f"{capture['shift']}; captured block {capture['layer']}'s self-attention, q/k/v "
        f"{tuple(capture['shape_bhnd'])} (B, H, N, D), token grid "
        f"{'x'.join(map(str, capture['grid']))}. Benchmark: {r['bench']['backend']} backend, "
        f"{r['bench']['dtype']}, block {'x'.join(map(str, c['block']))}, rule alone "
        "Recall(0.8) over every tile.",
        "",
        "Variants (bench/gpu_workloads.sh's):",
        "",
        *[f"* `{v}`" for v in r["bench"]["variants"]],
        "",
        "## Totals",
        "",
        "| variant | time vs dense (speedup) | rule alone vs dense | mean rel. L2 | max rel. L2 "
        "| steps > 3% | dense / reused steps | head refreshes | mean plan density "
        "| min recall bound | min true recall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        s = r["bench"]["summaries"][label]
        lines.append(
            f"| {label} | {s['speedup_vs_dense']:.2f}x | {s['speedup_rule_vs_dense']:.2f}x | "
            f"{s['rel_l2_mean']:.4f} | {s['rel_l2_max']:.4f} | {s['steps_over_3pct']} | "
            f"{s['dense_steps']} / {s['reused_steps']} | {s['head_refreshes']} | "
            f"{s['plan_density_mean']:.3f} | {s['recall_bound_min']:.4f} | "
            f"{s['recall_min']:.4f} |")
    first = steps[labels[0]]
    lines += [
        "",
        "## Per step",
        "",
        "Each cell: kind (dense, refresh, partial = some heads refreshed, reused), plan "
        "density, rel. L2 error against exact float64 attention, minimum recall bound. "
        "*rule kept* is the kept density of Recall(0.8) over every tile at that step (how "
        "sparse the layer's attention is).",
        "",
        "| step | sigma | rule kept | " + " | ".join(labels) + " |",
        "|---:|---:|---:|" + "---|" * len(labels),
    ]
    for i, base in enumerate(first):
        cells = []
        for label in labels:
            x = steps[label][i]
            cells.append(f"{_kind(x)} {x['plan_density']:.2f} / {x['rel_l2']:.4f} / "
                         f"{x['recall_bound_min']:.3f}")
        sigma = "" if base["sigma"] is None else f"{base['sigma']:.3f}"
        lines.append(f"| {base['step']} | {sigma} | {base['rule_kept_density']:.3f} | "
                     + " | ".join(cells) + " |")
    lines += [
        "",
        f"Times and every other column: `{PREFIX}-LABEL.md` beside this file. Errors are "
        f"against exact float64 attention on {first[0]['error_rows']} query rows per head.",
        "",
        "Small and synthetic: a few-layer model trained minutes on moving blobs, one layer, "
        "open loop (each step's error is not fed back into the sampler). This is a trained "
        "model's attention along its own sampler, not Wan2.1's.",
    ]
    return "\n".join(lines) + "\n"


def prepare_model(torch, args, config, device, clock, sync):
    """The task and the dense model: loaded from ``--model`` or trained; saved with
    ``--save-model``. Returns ``(task, model, model record)``."""
    info = {}
    if args.model:
        saved = torch.load(args.model, map_location="cpu", weights_only=True)
        config.update({k: saved["config"][k] for k in MODEL_KEYS})
        task = finetune_sla.Task(torch, config, device, args.seed)
        model = finetune_sla.build_model(torch, config, device, args.seed)
        model.load_state_dict(saved["state_dict"])
        info.update(loaded_from=str(args.model))
        clock.say(f"model loaded from {args.model}")
    else:
        task, model, losses, times = finetune_sla.train_dense(torch, config, device, args.seed,
                                                              clock, sync=sync)
        info.update(steps_dense=len(losses), train_loss_first=losses[0],
                    train_loss_last=losses[-1], step_ms=finetune_sla.median_ms(times))
    if args.save_model:
        Path(args.save_model).parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(config={k: config[k] for k in MODEL_KEYS},
                        state_dict=model.state_dict()), args.save_model)
        clock.say(f"model saved to {args.save_model}")
    model.eval()
    evaluation, _ = finetune_sla.evaluate(task, model)
    target = task.eval_batch[2]
    info.update(parameters=sum(p.numel() for p in model.parameters()),
                eval_loss=evaluation["loss"], eval_loss_zero=float((target.float() ** 2).mean()))
    clock.say(f"dense model: held-out loss {info['eval_loss']:.4f} (zero prediction "
              f"{info['eval_loss_zero']:.4f})")
    return task, model, info


def run(args, clock):
    torch = finetune_sla._needs("torch", "torch")
    finetune_sla._needs("diffusers", "diffusers")
    device = torch.device(args.device)
    preset = "smoke" if args.smoke else "gpu" if device.type == "cuda" else "cpu"
    config = dict(PRESETS[preset])
    for name in ("steps_dense", "sampler_steps", "frames", "height", "width", "layers",
                 "backend", "dtype", "repeat"):
        value = getattr(args, name)
        if value is not None:
            config[name] = value
    if args.block is not None:
        config["block"] = tuple(int(x) for x in args.block.split("x"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    task, model, model_info = prepare_model(torch, args, config, device, clock, sync)
    layer = config["layers"] // 2 if args.layer is None else args.layer
    temporary = None
    capture = args.capture
    if capture is None:
        temporary = capture = tempfile.mkdtemp(prefix="reuse-model-capture-")
    try:
        description, sample = sample_and_capture(
            torch, task, model, config, layer, config["sampler_steps"], args.shift, args.seed,
            capture, clock)
        clock.say(f"final sample: std {float(sample.std()):.3f} (the task's clips have 1); "
                  f"benchmark: {len(variants(config['sampler_steps']))} variants, "
                  f"{config['backend']} backend, {config['dtype']}")
        started = clock.elapsed()
        bench_argv, summaries = run_bench(capture, args.out, config, args)
        clock.say(f"benchmark done in {clock.elapsed() - started:.0f} s")
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    description.pop("sigmas")  # in the step records
    return dict(
        preset=preset, config={k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in config.items()},
        model=model_info, capture=dict(description, sample_std=float(sample.std()),
                                       kept=None if temporary else str(capture)),
        bench=dict(argv=["python -m pysparse_attn.bench"] + bench_argv,
                   backend=config["backend"], dtype=config["dtype"],
                   variants=variants(config["sampler_steps"]), summaries=summaries))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu",
                        help="torch device: cpu (the cpu preset) or cuda (the GPU preset)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU preset (seconds; CI)")
    parser.add_argument("--model", help="load the dense model from this file (--save-model's) "
                                        "instead of training it")
    parser.add_argument("--save-model", help="save the dense model (config and state dict)")
    parser.add_argument("--layer", type=int,
                        help="block whose self-attention is captured (default: the middle one)")
    parser.add_argument("--steps", dest="sampler_steps", type=int, help="sampler steps")
    parser.add_argument("--shift", type=float, default=5.0,
                        help="flow-matching schedule shift (default 5, as the synthetic "
                             "trajectory)")
    parser.add_argument("--steps-dense", type=int, help="dense training steps")
    parser.add_argument("--frames", type=int, help="latent frames")
    parser.add_argument("--height", type=int, help="latent height (even)")
    parser.add_argument("--width", type=int, help="latent width (even)")
    parser.add_argument("--layers", type=int, help="transformer blocks")
    parser.add_argument("--backend", help="benchmark backend: cpu, cupy or reference")
    parser.add_argument("--dtype", help="benchmark dtype (float32, bfloat16, ...)")
    parser.add_argument("--block", help="benchmark tile BqxBk")
    parser.add_argument("--repeat", type=int, help="timed rounds per step")
    parser.add_argument("--error-tiles", type=int,
                        help="query tiles per head for the errors (default: every row)")
    parser.add_argument("--capture", help="keep the capture in this folder (default: a "
                                          "temporary one, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT") or "reuse-on-model-out",
                        help="folder for the records and tables")
    args = parser.parse_args(argv)
    finetune_sla.check_sizes(parser, args,
                             ("sampler_steps", "steps_dense", "frames", "layers", "repeat"))
    if args.block is not None:
        parts = args.block.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            parser.error(f"--block must look like 64x64, got {args.block!r}")

    clock = finetune_sla.Clock()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = run(args, clock)
    torch = sys.modules["torch"]
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU ({os.cpu_count()} cores)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    record = dict(device_name=device_name, date=stamp, commit=git_commit(),
                  command=" ".join(["bench/reuse_on_model.py"] + (
                      list(argv) if argv is not None else sys.argv[1:])),
                  wall_s=clock.elapsed(), **record)
    (out / "reuse-on-model.json").write_text(json.dumps(record, indent=1) + "\n")
    text = summary_markdown(record, out)
    (out / "reuse-on-model.md").write_text(text)
    print("\n" + text, flush=True)
    clock.say(f"wrote {out / 'reuse-on-model.json'}, .md and the benchmark's files "
              f"({PREFIX}-*)")
    return record


if __name__ == "__main__":
    main()
