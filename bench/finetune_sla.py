"""Fine-tuning SLA in a small Wan transformer: what it wins back over sparse-only attention.

A small ``WanTransformer3DModel`` (diffusers; a few layers, random initialisation from a config,
nothing downloaded) learns a synthetic denoising task with dense attention: flow-matching
denoising of moving-blob latent videos made in code
(:func:`pysparse_attn.workloads.moving_patterns`). Its self-attention is then switched to SLA at
95% tile sparsity (``critical=0.05``: 5% of key tiles exact, the rest linear or dropped) and the
whole model, SLA's ``W`` and ``b`` included, is fine-tuned on the same loss. Reported, on a
held-out batch with fixed noise:

* the denoising loss of the dense model, and of the SLA model before and after fine-tuning;
* the relative L2 error of the SLA model's output against the dense model's, before and after;
* the median training-step time, dense (diffusers' stock attention) and SLA.

**What it shows and what it does not.** It shows the SLA training path working end to end
(forward and backward through the custom operators inside a real diffusers model, gradients
reaching ``W``, ``b`` and the model) and how much of the loss and of the deviation from the dense
model a short fine-tune recovers at 95% sparsity. It is small and synthetic: a few million
parameters, a few thousand tokens, blobs instead of video latents, minutes of training. It says
nothing about the quality of a fine-tuned Wan2.1 on real videos, and its step times are those of
a small model (attention is a small share of them).

    python3 bench/finetune_sla.py --device cuda --out DIR      # GPU preset, about 6 minutes
    python3 bench/finetune_sla.py --smoke                      # CPU, seconds (CI runs this)

Writes ``DIR/finetune-sla-<stamp>.json`` (the record) and ``.md`` (a summary: device, date,
commit, command, the figures).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pysparse_attn.bench.results import git_commit  # noqa: E402

# Presets: the GPU one sizes N = 16 x 16 x 16 = 4096 tokens (64 key tiles of 64: 95% sparsity
# keeps 3 of them per query tile) and takes about 6 minutes on an H200 (the fine-tune stops at
# --time-budget, 240 s). Its batch of 16 follows the H200 runs of 2026-12-02: at batch 4, 600 and
# 2000 fine-tune steps left the error at 0.68x and 0.60x of its value before the fine-tune
# (the distillation loss noisy and flat); at batch 16 it reached 0.43x in 2079 steps (89 ms
# each) within the budget. The smoke one runs on a CPU in seconds.
PRESETS = {
    "gpu": dict(frames=16, height=32, width=32, layers=4, heads=4, head_dim=64, ffn=512,
                batch=16, steps_dense=400, steps_finetune=3000, lr=1e-3, lr_finetune=2e-3,
                block=(64, 64), time_budget=240.0, eval_batch=8),
    "smoke": dict(frames=4, height=16, width=16, layers=2, heads=2, head_dim=16, ffn=64,
                  batch=2, steps_dense=60, steps_finetune=30, lr=2e-3, lr_finetune=1e-3,
                  block=(16, 16), time_budget=20.0, eval_batch=4),
}
CHANNELS = 4
TEXT_TOKENS, TEXT_DIM = 8, 32


def _needs(module, package):
    """Import ``module``, or exit with a message naming the package to install or carry."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        sys.exit(f"finetune_sla.py needs the Python package '{package}' ({error}); install it "
                 f"(pip install {package}) or carry its wheel (bench/wheels.txt lists them)")


class Clock:
    """Progress lines with the time since start (the run must show where its minutes go)."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.start

    def say(self, text):
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
        print(f"[{stamp} +{self.elapsed():6.1f}s] {text}", flush=True)


def build_model(torch, config, device, seed):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=config["heads"],
        attention_head_dim=config["head_dim"], in_channels=CHANNELS, out_channels=CHANNELS,
        text_dim=TEXT_DIM, freq_dim=64, ffn_dim=config["ffn"], num_layers=config["layers"],
        rope_max_seq_len=1024)
    return model.to(device)


class Task:
    """Flow-matching denoising of moving-pattern clips (Wan's training objective).

    ``x_t = (1 - t) x_0 + t noise``, the model sees ``x_t`` at timestep ``1000 t`` and predicts
    the velocity ``noise - x_0``. One fixed "prompt" embedding for every clip: the task is
    unconditional, the cross-attention layers only see a constant.
    """

    def __init__(self, torch, config, device, seed):
        from pysparse_attn.workloads import moving_patterns

        self.torch, self.config, self.device = torch, config, device
        self.shape = dict(channels=CHANNELS, frames=config["frames"], height=config["height"],
                          width=config["width"])
        self.moving_patterns = moving_patterns
        generator = torch.Generator().manual_seed(seed)
        self.text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=generator).to(device)
        self.draws = (seed + 1) * 1_000_003  # training seeds never meet the held-out one
        # The held-out batch: its own clips, noise and timesteps, fixed for every evaluation.
        self.eval_batch = self.batch(config["eval_batch"], seed=-1 - seed)

    def batch(self, size, seed=None):
        torch = self.torch
        if seed is None:
            self.draws += 1
            seed = self.draws
        clean = torch.from_numpy(self.moving_patterns(size, seed=abs(seed), **self.shape))
        generator = torch.Generator().manual_seed(abs(seed) + 7)
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.rand(size, generator=generator).clamp(0.02, 0.98)
        noisy = (1 - t.view(-1, 1, 1, 1, 1)) * clean + t.view(-1, 1, 1, 1, 1) * noise
        return tuple(x.to(self.device) for x in (noisy, t * 1000, noise - clean))

    def predict(self, model, noisy, timestep):
        text = self.text.expand(noisy.shape[0], -1, -1)
        return model(noisy, timestep, text, return_dict=False)[0]

    def loss(self, model, batch):
        noisy, timestep, target = batch
        return self.torch.nn.functional.mse_loss(self.predict(model, noisy, timestep), target)

    def distance(self, model, teacher, batch):
        """Mean squared distance to ``teacher``'s prediction on the same noisy input."""
        noisy, timestep, _ = batch
        with self.torch.no_grad():
            target = self.predict(teacher, noisy, timestep)
        return self.torch.nn.functional.mse_loss(self.predict(model, noisy, timestep), target)


def train(task, model, steps, lr, clock, label, time_budget=None, sync=None, teacher=None):
    """AdamW on the denoising loss, or on the distance to ``teacher``'s prediction.

    The learning rate warms up linearly, then decays on a cosine to zero over the run,
    measured by steps or by the time budget, whichever is spent faster (so a run stopped by its
    budget ends decayed too).
    Returns (losses, step times in s, steps run).
    """
    torch = task.torch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses, times = [], []
    started = time.perf_counter()
    report_every = max(1, steps // 10)
    for step in range(steps):
        if time_budget is not None and time.perf_counter() - started > time_budget:
            clock.say(f"{label}: time budget of {time_budget:.0f} s reached after {step} "
                      f"of {steps} steps")
            break
        spent = step / steps
        if time_budget:
            spent = max(spent, (time.perf_counter() - started) / time_budget)
        # A linear warm-up over the first 5% of the steps: Adam's first updates move every
        # parameter by about the full rate, which would knock a trained model off at once.
        warm = min(1.0, (step + 1) / max(1, steps // 20))
        for group in optimizer.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * min(spent, 1.0)))
        batch = task.batch(task.config["batch"])
        tic = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, batch) if teacher is None else task.distance(model, teacher,
                                                                              batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())  # reads the loss back: the step has finished
        if sync is not None:
            sync()
        times.append(time.perf_counter() - tic)
        if step % report_every == 0 or step == steps - 1:
            clock.say(f"{label}: step {step + 1}/{steps} loss {losses[-1]:.4f} "
                      f"({times[-1] * 1e3:.0f} ms)")
    return losses, times, len(losses)


def train_dense(torch, config, device, seed, clock, sync=None):
    """The demonstration's dense model: the task of ``config`` and a model trained on it.

    Builds the :class:`Task` and the model (:func:`build_model`, seeded by ``seed``) and trains
    the model with dense attention for ``config["steps_dense"]`` steps at ``config["lr"]``.
    Returns ``(task, model, losses, step times in s)``; ``bench/reuse_on_model.py`` trains its
    model with this too.
    """
    task = Task(torch, config, device, seed)
    model = build_model(torch, config, device, seed)
    parameters = sum(p.numel() for p in model.parameters())
    clock.say(f"model: {parameters / 1e6:.2f} M parameters; dense training "
              f"{config['steps_dense']} steps")
    losses, times, _ = train(task, model, config["steps_dense"], config["lr"], clock, "dense",
                             sync=sync)
    return task, model, losses, times


def evaluate(task, model, reference=None):
    """Held-out denoising loss, and the output (kept for the error against the dense model)."""
    torch = task.torch
    noisy, timestep, target = task.eval_batch
    with torch.no_grad():
        out = task.predict(model, noisy, timestep).float()
    result = dict(loss=float(torch.nn.functional.mse_loss(out, target)))
    if reference is not None:
        result["rel_l2_vs_dense"] = float((out - reference).norm() / reference.norm())
    return result, out


def median_ms(times, skip=3):
    """Median step time in ms, without the first ``skip`` steps (compilation, warm-up)."""
    kept = sorted(times[skip:] if len(times) > skip + 2 else times)
    return 1e3 * kept[len(kept) // 2] if kept else None


def run(args, clock):
    torch = _needs("torch", "torch")
    _needs("diffusers", "diffusers")
    import pysparse_attn.torch  # noqa: F401  (registers the operators before the clock runs)
    from pysparse_attn.diffusers import apply_sparse_attention

    config = dict(PRESETS["smoke" if args.smoke else "gpu"])
    for name in ("frames", "height", "width", "steps_dense", "steps_finetune", "time_budget",
                 "layers", "batch", "lr_finetune"):
        value = getattr(args, name)
        if value is not None:
            config[name] = value
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    tokens = config["frames"] * (config["height"] // 2) * (config["width"] // 2)
    bq, bk = config["block"]
    nk = math.ceil(tokens / bk)
    critical_tiles = max(1, math.floor(args.critical * nk))
    clock.say(f"device {device}, {tokens} tokens ({nk} key tiles of {bk}; {critical_tiles} "
              f"critical per query tile = {1 - critical_tiles / nk:.1%} sparsity), "
              f"{config['layers']} layers x {config['heads']} heads x {config['head_dim']}")

    task, model, dense_losses, dense_times = train_dense(torch, config, device, args.seed,
                                                         clock, sync=sync)
    parameters = sum(p.numel() for p in model.parameters())
    dense_model = copy.deepcopy(model).eval()
    dense_eval, dense_out = evaluate(task, dense_model)
    clock.say(f"dense model: held-out loss {dense_eval['loss']:.4f}")

    options = dict(block=tuple(config["block"]))
    if device.type == "cuda":
        # float32 model, bf16 tensor cores inside attention (the GPU backend's precision opt-in).
        options["precision"] = "bf16"
    sparse = apply_sparse_attention(
        model, sla=dict(critical=args.critical, negligible=args.negligible), **options)
    before, _ = evaluate(task, model, dense_out)
    clock.say(f"SLA before fine-tuning: loss {before['loss']:.4f}, rel. L2 vs dense "
              f"{before['rel_l2_vs_dense']:.4f}")
    sla_losses, sla_times, steps_run = train(
        task, model, config["steps_finetune"], config["lr_finetune"], clock,
        f"SLA fine-tune ({args.objective})", time_budget=config["time_budget"], sync=sync,
        teacher=dense_model if args.objective == "distill" else None)
    after, _ = evaluate(task, model, dense_out)
    stats = sparse.stats()
    sparsity = [s.sparsity for s in stats.values() if s.sparsity is not None]
    weight_norm = sum(float(p.sparse_linear.weight.detach().norm())
                      for p in sparse.processors.values())
    clock.say(f"SLA after fine-tuning ({steps_run} steps): loss {after['loss']:.4f}, rel. L2 "
              f"vs dense {after['rel_l2_vs_dense']:.4f}")

    return dict(
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
        objective=args.objective, tokens=tokens, key_tiles=nk, critical=args.critical,
        negligible=args.negligible,
        tile_sparsity=1 - critical_tiles / nk,
        measured_sparsity=sum(sparsity) / len(sparsity) if sparsity else None,
        parameters=parameters, precision=options.get("precision"),
        dense=dict(train_loss_last=dense_losses[-1], eval_loss=dense_eval["loss"],
                   step_ms=median_ms(dense_times), steps=len(dense_losses)),
        sla_before=before, sla_after=after,
        finetune=dict(steps_run=steps_run, steps_asked=config["steps_finetune"],
                      train_loss_first=sla_losses[0] if sla_losses else None,
                      train_loss_last=sla_losses[-1] if sla_losses else None,
                      step_ms=median_ms(sla_times), sla_weight_norm=weight_norm),
        error_ratio=(after["rel_l2_vs_dense"] / before["rel_l2_vs_dense"]
                     if before["rel_l2_vs_dense"] > 0 else None),
        loss_curves=dict(dense=dense_losses, sla=sla_losses),
    )


def summary(record):
    r = record
    ratio = r["error_ratio"]
    target = ("met" if ratio is not None and ratio <= 0.5 else "not met")
    lines = [
        "# SLA fine-tuning demonstration",
        "",
        f"{r['device_name']}, {r['date']}, commit {r['commit']}",
        f"command: `{r['command']}`",
        "",
        f"Model: WanTransformer3DModel, {r['config']['layers']} layers, {r['config']['heads']} "
        f"heads of {r['config']['head_dim']}, {r['parameters'] / 1e6:.2f} M parameters, random "
        f"init. Task: flow-matching denoising of synthetic moving-blob latents, "
        f"{r['tokens']} tokens ({r['key_tiles']} key tiles). SLA: critical={r['critical']}, "
        f"negligible={r['negligible']} ({r['tile_sparsity']:.1%} of tiles not computed "
        f"exactly), block {tuple(r['config']['block'])}, precision {r['precision']}. "
        f"Fine-tuning objective: {r['objective']}.",
        "",
        "| | held-out loss | rel. L2 vs dense model |",
        "|---|---|---|",
        f"| dense ({r['dense']['steps']} steps) | {r['dense']['eval_loss']:.4f} | 0 |",
        f"| SLA before fine-tuning | {r['sla_before']['loss']:.4f} | "
        f"{r['sla_before']['rel_l2_vs_dense']:.4f} |",
        f"| SLA after {r['finetune']['steps_run']} steps | {r['sla_after']['loss']:.4f} | "
        f"{r['sla_after']['rel_l2_vs_dense']:.4f} |",
        "",
        f"Error after / before: {ratio:.3f} (target <= 0.5: {target})." if ratio is not None
        else "Error after / before: undefined (zero error before).",
        f"Step time: dense {r['dense']['step_ms']:.1f} ms, SLA {r['finetune']['step_ms']:.1f} ms.",
        f"Fine-tuning ran {r['finetune']['steps_run']} of {r['finetune']['steps_asked']} steps "
        f"(time budget {r['config']['time_budget']:.0f} s); measured SLA sparsity "
        f"{r['measured_sparsity']:.1%}." if r["measured_sparsity"] is not None else "",
        "",
        "Small and synthetic: this shows the training path and what a short fine-tune recovers "
        "on a toy task, not the quality of a fine-tuned video model.",
    ]
    return "\n".join(lines) + "\n"


def check_sizes(parser, args, counts):
    """``parser.error`` naming the option unless --height/--width are even (the model's 2x2
    patches) and every option of ``counts`` (attribute names) is at least 1; unset ones pass."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value < 2 or value % 2):
            parser.error(f"--{name} must be an even number >= 2 (patches of 2x2), got {value}")
    for name in counts:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU preset (seconds; what CI runs)")
    parser.add_argument("--steps-dense", type=int, help="dense training steps")
    parser.add_argument("--steps-finetune", type=int, help="SLA fine-tuning steps (at most)")
    parser.add_argument("--time-budget", type=float,
                        help="seconds after which fine-tuning stops early (steps run reported)")
    parser.add_argument("--frames", type=int, help="latent frames")
    parser.add_argument("--height", type=int, help="latent height (even)")
    parser.add_argument("--width", type=int, help="latent width (even)")
    parser.add_argument("--layers", type=int, help="transformer blocks")
    parser.add_argument("--batch", type=int, help="clips per training step")
    parser.add_argument("--lr-finetune", type=float, help="peak learning rate of the fine-tune")
    parser.add_argument("--critical", type=float, default=0.05,
                        help="SLA share of key tiles computed exactly (0.05: 95%% sparsity)")
    parser.add_argument("--negligible", type=float, default=0.10,
                        help="SLA share of key tiles dropped (the rest go to the linear branch)")
    parser.add_argument("--objective", choices=("distill", "denoise"), default="distill",
                        help="fine-tuning loss: distance to the dense model's prediction on "
                             "the same noisy input (default), or the denoising loss itself")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="folder for the JSON record and the markdown summary")
    args = parser.parse_args(argv)
    check_sizes(parser, args, ("steps_dense", "steps_finetune", "frames", "layers", "batch"))

    clock = Clock()
    record = run(args, clock)
    torch = sys.modules["torch"]
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU ({os.cpu_count()} cores)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    record = dict(device_name=device_name, date=stamp, commit=git_commit(),
                  command=" ".join(["bench/finetune_sla.py"] + (argv if argv is not None
                                                                else sys.argv[1:])),
                  wall_s=clock.elapsed(), **record)
    text = summary(record)
    print("\n" + text, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"finetune-sla-{stamp}.json").write_text(json.dumps(record, indent=1) + "\n")
        (out / f"finetune-sla-{stamp}.md").write_text(text)
        clock.say(f"wrote {out / f'finetune-sla-{stamp}.json'} and .md")
    return record


if __name__ == "__main__":
    main()
