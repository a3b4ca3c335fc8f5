"""
Use it in a diffusers Wan pipeline
==================================

:func:`pysparse_attn.diffusers.apply_sparse_attention` swaps the self-attention processors of a
``WanTransformer3DModel``; the pipeline around it does not change. The returned controller
counts denoising steps (the first ``dense_steps`` stay dense) and collects per-layer sparsity.
With a real pipeline the whole integration is::

    pipe = WanPipeline.from_pretrained(...)              # Wan2.1 / Wan2.2
    sparse = apply_sparse_attention(pipe.transformer, skip=psa.Recall(0.95), dense_steps=5)
    sparse.reset()                                       # before each generation
    video = pipe(prompt, callback_on_step_end=sparse.callback_on_step_end).frames

This page runs the same thing at toy size on CPU, with nothing downloaded: a randomly
initialised transformer and VAE, diffusers' flow-matching scheduler, and the loop that
``WanPipeline.__call__`` runs (two transformer calls per step for classifier-free guidance,
then the scheduler step, then ``callback_on_step_end``), written out because ``WanPipeline``
itself also needs ``transformers`` for its text encoder. Random weights, so the "video" is
noise: what matters is where the attention runs and what the controller reports.
"""

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

import pysparse_attn as psa
from pysparse_attn.diffusers import apply_sparse_attention

torch.manual_seed(0)
transformer = WanTransformer3DModel(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
    out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                       temperal_downsample=[False], latents_mean=[0.0] * 4,
                       latents_std=[1.0] * 4)
scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
prompt_embeds, negative_embeds = torch.randn(1, 8, 16), torch.randn(1, 8, 16)

# %%
# Sparse self-attention, first steps dense
# ----------------------------------------
# With random weights every attention row is nearly uniform, so a certified rule such as
# ``skip=psa.Recall(0.95)`` rightly finds nothing to skip here; a ``TopK`` plan keeps a fixed
# 25% of the key tiles whatever the rows look like, and ``measure_recall=True`` measures the
# softmax mass it keeps (a float64 host computation, for small sizes only). Cross-attention
# (``attn2``) keeps diffusers' processor.

sparse = apply_sparse_attention(transformer, select=psa.TopK(ratio=0.25), block=(16, 16),
                                dense_steps=2, measure_recall=True)
print(sorted(sparse.processors))

# %%
# The sampling loop of ``WanPipeline``
# ------------------------------------
# 8 steps, guidance 3.0; latents of 4 frames x 16 x 16 (256 video tokens).


class Pipeline:  # what callback_on_step_end receives first (the pipeline object)
    pass


def generate(steps=8, guidance=3.0, seed=0):
    sparse.reset()
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 4, 16, 16, generator=generator)
    scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps):
        timestep = t.expand(latents.shape[0])
        with torch.no_grad():
            cond = transformer(latents, timestep, prompt_embeds, return_dict=False)[0]
            uncond = transformer(latents, timestep, negative_embeds, return_dict=False)[0]
        noise_pred = uncond + guidance * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        sparse.callback_on_step_end(Pipeline(), i, t, {"latents": latents})
    with torch.no_grad():
        return vae.decode(latents, return_dict=False)[0]


video = generate()
print("decoded video:", tuple(video.shape), "(batch, RGB, frames, height, width)")

# %%
# What each layer did
# -------------------
# Two dense steps (both guidance calls of a step count as one step) then six sparse ones:
# each layer ran 2 x 2 dense calls and 6 x 2 sparse calls.

for name, stats in sparse.stats().items():
    print(f"{name}: {stats.dense_calls} dense calls, {stats.sparse_calls} sparse calls, "
          f"tile sparsity {stats.sparsity:.1%}, recall {stats.recall:.4f} "
          f"(lowest row {stats.min_recall:.4f})")

# %%
# Remove it again: the stock processors come back, the model is as it was.

sparse.remove()
print(type(transformer.blocks[0].attn1.processor).__name__)
