"""
Fine-tune SLA in a Wan transformer
==================================

SLA (sparse + linear attention) computes the top few key tiles of each query tile exactly and
sends most of the others through a linear-attention branch whose output is projected by a
trainable ``W`` and ``b`` (``O = O_s + O_l W^T + b``). ``W`` and ``b`` start at zero, so a model
switched to SLA first behaves like sparse-only attention; a short fine-tune teaches the branch
(and the model around it) what the dropped exact attention used to contribute.

This page does that on a tiny, randomly initialised ``WanTransformer3DModel`` from diffusers,
on CPU, in seconds: dense training on a synthetic denoising task, the switch to SLA with
:func:`pysparse_attn.diffusers.apply_sparse_attention`, then fine-tuning against the dense
model. ``bench/finetune_sla.py`` runs the same recipe at a few thousand tokens on a GPU.
Everything here is small and synthetic: it shows the mechanics, not the quality of a
fine-tuned video model.
"""

import copy

import matplotlib.pyplot as plt
import torch
from diffusers import WanTransformer3DModel

from pysparse_attn.diffusers import apply_sparse_attention
from pysparse_attn.workloads import moving_patterns

torch.manual_seed(0)
model = WanTransformer3DModel(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
    out_channels=4, text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32)
text = torch.randn(1, 8, 16)  # one fixed "prompt": the task is unconditional


def noisy_batch(seed, size=2):
    """Flow matching, as Wan trains: x_t = (1 - t) x_0 + t noise, target noise - x_0."""
    clean = torch.from_numpy(moving_patterns(size, 4, frames=4, height=16, width=16, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(clean.shape, generator=generator)
    t = torch.rand(size, generator=generator).view(-1, 1, 1, 1, 1)
    return (1 - t) * clean + t * noise, 1000 * t.flatten(), noise - clean


def predict(model, noisy, timestep):
    return model(noisy, timestep, text.expand(len(noisy), -1, -1), return_dict=False)[0]


# %%
# Dense training
# --------------
# 256 video tokens (4 frames of 8 x 8 patches); diffusers' own attention.

optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
for step in range(40):
    noisy, timestep, target = noisy_batch(seed=step)
    loss = torch.nn.functional.mse_loss(predict(model, noisy, timestep), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
dense = copy.deepcopy(model).eval()  # the reference the SLA model should stay close to

# %%
# Switch to SLA
# -------------
# 16 key tiles of 16 tokens per query tile: ``critical=0.05`` keeps one of them exact (94%
# sparsity), ``negligible=0.1`` drops one, the other 14 go to the linear branch. Each
# self-attention layer gets its own ``W`` and ``b``, registered as model parameters.

sparse = apply_sparse_attention(model, sla=dict(critical=0.05, negligible=0.1), block=(16, 16))
layer = sparse.processors["blocks.0.attn1"].sparse_linear
print(layer)
print("trainable parameters:", sum(p.numel() for p in model.parameters()))

held_out = noisy_batch(seed=10_000, size=4)
with torch.no_grad():
    reference = predict(dense, *held_out[:2])


def error_vs_dense():
    with torch.no_grad():
        return float((predict(model, *held_out[:2]) - reference).norm() / reference.norm())


print(f"relative error vs the dense model before fine-tuning: {error_vs_dense():.3f}")

# %%
# Fine-tune
# ---------
# Everything trains: the model and every layer's ``W`` and ``b``. The loss is the distance to
# the dense model's prediction on the same noisy input (the denoising loss works too, but then
# the model also keeps learning the task and drifts from the dense reference).

optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
errors = [error_vs_dense()]
for step in range(60):
    noisy, timestep, _ = noisy_batch(seed=1000 + step)
    with torch.no_grad():
        target = predict(dense, noisy, timestep)
    loss = torch.nn.functional.mse_loss(predict(model, noisy, timestep), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 10 == 9:
        errors.append(error_vs_dense())

print(f"relative error vs the dense model after fine-tuning: {errors[-1]:.3f}")
print(f"|W| of the first layer: {float(layer.weight.detach().norm()):.3f} (it started at 0)")
print(f"tile sparsity seen: {sparse.stats()['blocks.0.attn1'].sparsity:.1%}")

fig, ax = plt.subplots(figsize=(5, 3), constrained_layout=True)
ax.plot(range(0, 61, 10), errors, marker="o")
ax.set_xlabel("fine-tuning step")
ax.set_ylabel("relative L2 error vs dense")
ax.set_title("SLA model's output error, held-out batch")
plt.show()

# %%
# Saving and loading
# ------------------
# ``W`` and ``b`` are in the model's ``state_dict`` (under
# ``blocks.N.attn1.processor.sparse_linear``). Save the fine-tuned model with
# ``model.state_dict()``; to load it, build the model, call ``apply_sparse_attention`` with
# the same ``sla=`` settings, then ``load_state_dict``.

names = [name for name in model.state_dict() if "sparse_linear" in name]
print(names[:2])
