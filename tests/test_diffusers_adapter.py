"""pysparse_attn.diffusers on a real, tiny, randomly initialised WanTransformer3DModel (CPU).

The model is built from a config (2 layers, 2 heads of 16, 64 video tokens, 8 text tokens);
nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install .[torch])")
diffusers = pytest.importorskip("diffusers",
                                reason="diffusers is not installed (pip install .[diffusers])")

from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

import pysparse_attn as psa  # noqa: E402
from interop_snippets import run_interop_snippets  # noqa: E402
from pysparse_attn.diffusers import SparseWanAttnProcessor, apply_sparse_attention  # noqa: E402

BLOCK = (16, 16)
# Dense pysparse_attn (cpu backend, float32 accumulation) vs torch SDPA in float32: each
# attention output differs by a few ulps (~1e-7 relative); two blocks of norms, MLPs and
# residuals carry that to the output without amplifying it much.
FP32 = dict(rtol=1e-5, atol=1e-5)


def tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32)
    return model.to(dtype)


def inputs(dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 4, 8, 8, generator=generator).to(dtype)  # 4*4*4 = 64 tokens
    text = torch.randn(1, 8, 16, generator=generator).to(dtype)
    return latents, torch.tensor([500]), text


def run(model, latents, timestep, text):
    return model(latents, timestep, text, return_dict=False)[0]


def cross_processors(model):
    return {name: m.processor for name, m in model.named_modules() if name.endswith("attn2")}


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


def test_dense_settings_equal_the_stock_processor(model):
    latents, timestep, text = inputs()
    with torch.no_grad():
        expected = run(model, latents, timestep, text)
        cross = cross_processors(model)
        controller = apply_sparse_attention(model, block=BLOCK, measure_recall=True)
        try:
            assert all(isinstance(m.processor, SparseWanAttnProcessor)
                       for name, m in model.named_modules() if name.endswith("attn1"))
            assert cross_processors(model) == cross  # the very same objects: untouched
            out = run(model, latents, timestep, text)
        finally:
            controller.remove()
        torch.testing.assert_close(out, expected, **FP32)
    assert all(isinstance(m.processor, WanAttnProcessor) for _, m in model.named_modules()
               if hasattr(m, "processor"))


def test_dense_equality_with_fused_projections_and_in_bfloat16():
    model = tiny_model(seed=2).eval()
    latents, timestep, text = inputs(seed=3)
    with torch.no_grad():
        model.fuse_qkv_projections()
        expected = run(model, latents, timestep, text)
        controller = apply_sparse_attention(model, block=BLOCK)
        out = run(model, latents, timestep, text)
        torch.testing.assert_close(out, expected, **FP32)
        controller.remove()
        model.unfuse_qkv_projections()
        model.to(torch.bfloat16)
        low = inputs(torch.bfloat16, seed=3)
        expected = run(model, *low)
        controller = apply_sparse_attention(model, block=BLOCK)
        out = run(model, *low)
        controller.remove()
    # bf16 activations (8 mantissa bits) through two blocks; both sides round the same
    # projections, so they differ by the attention's rounding only.
    torch.testing.assert_close(out.float(), expected.float(), rtol=5e-2, atol=5e-2)


def test_a_skip_rule_changes_the_output_and_reports_sparsity_and_recall(model):
    latents, timestep, text = inputs(seed=4)
    with torch.no_grad():
        expected = run(model, latents, timestep, text)
        controller = apply_sparse_attention(model, select=psa.TopK(k=2), skip=psa.Recall(0.9),
                                            block=BLOCK, measure_recall=True)
        try:
            out = run(model, latents, timestep, text)
            stats = controller.stats()
        finally:
            controller.remove()
    assert not torch.allclose(out, expected, **FP32)
    assert set(stats) == {"blocks.0.attn1", "blocks.1.attn1"}
    for layer in stats.values():
        assert layer.sparse_calls == 1 and layer.dense_calls == 0
        assert 0.5 <= layer.sparsity < 1.0  # TopK keeps 2 of 4 key tiles, the rule maybe more
        assert 0.0 < layer.min_recall <= layer.recall <= 1.0


def test_dense_steps_and_the_pipeline_callback(model):
    latents, timestep, text = inputs(seed=5)
    with torch.no_grad():
        expected = run(model, latents, timestep, text)
        controller = apply_sparse_attention(model, select=psa.TopK(k=1), block=BLOCK,
                                            dense_steps=2)
        try:
            first = run(model, latents, timestep, text)
            torch.testing.assert_close(first, expected, rtol=0, atol=0)  # stock processor
            kwargs = controller.callback_on_step_end(None, 0, timestep, {"latents": latents})
            assert kwargs["latents"] is latents and controller.step == 1
            torch.testing.assert_close(run(model, latents, timestep, text), expected, rtol=0,
                                       atol=0)
            controller.advance()
            assert not controller.dense_now
            sparse = run(model, latents, timestep, text)
            stats = controller.stats()["blocks.0.attn1"]
            assert (stats.dense_calls, stats.sparse_calls) == (2, 1)
            assert stats.sparsity == pytest.approx(0.75)  # 1 of 4 key tiles kept
            assert stats.recall is None  # not measured unless asked
            controller.reset()
            assert controller.step == 0 and controller.stats()["blocks.0.attn1"].dense_calls == 0
        finally:
            controller.remove()
    assert not torch.allclose(sparse, expected, **FP32)


def test_sla_trains_w_b_and_the_model():
    model = tiny_model(seed=6)
    latents, timestep, text = inputs(seed=7)
    controller = apply_sparse_attention(model, sla={"critical": 0.25, "negligible": 0.25},
                                        block=BLOCK)
    names = [name for name, _ in model.named_parameters() if "sparse_linear" in name]
    assert names == [f"blocks.{i}.attn1.processor.sparse_linear.{p}" for i in (0, 1)
                     for p in ("weight", "bias")]
    assert all(name in model.state_dict() for name in names)
    out = run(model, latents, timestep, text)
    out.square().mean().backward()
    sla = model.blocks[0].attn1.processor.sparse_linear
    assert sla.weight.grad is not None and sla.weight.grad.abs().sum() > 0
    assert sla.bias.grad.abs().sum() > 0
    assert model.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn2.to_k.weight.grad.abs().sum() > 0
    assert controller.stats()["blocks.1.attn1"].sparsity == pytest.approx(0.75)
    model.to(torch.bfloat16)
    assert sla.weight.dtype == torch.float32  # master weights survive a model-wide cast
    controller.remove()


def test_bad_configuration():
    model = tiny_model(seed=8)
    with pytest.raises(ValueError, match="dense_steps"):
        apply_sparse_attention(model, dense_steps=-1)
    with pytest.raises(ValueError, match="select or sla, not both"):
        apply_sparse_attention(model, select=psa.TopK(k=1), sla={"critical": 0.5,
                                                                 "negligible": 0.1})
    controller = apply_sparse_attention(model, block=BLOCK)
    with pytest.raises(ValueError, match="already runs pysparse_attn"):
        apply_sparse_attention(model, block=BLOCK)
    controller.remove()
    with pytest.raises(ValueError, match="no Wan self-attention layer"):
        apply_sparse_attention(torch.nn.Linear(2, 2))


def test_interop_page_diffusers_snippet_runs():
    run_interop_snippets("diffusers")


# ---------------------------------------------------------------------------------------------
# A real WanPipeline (needs transformers, which WanPipeline imports for its text encoder; the
# prompt embeddings are given, so no tokenizer or text encoder is built or downloaded).

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_wan_pipeline_runs_sparse_after_its_dense_steps_through_the_step_callback(device):
    pytest.importorskip("transformers", reason="WanPipeline needs transformers (not installed)")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    # On the GPU: bf16 and 64-wide heads and tiles (what the GPU backend serves).
    dtype, head_dim, block = ((torch.bfloat16, 64, (64, 64)) if device == "cuda"
                              else (torch.float32, 16, BLOCK))
    torch.manual_seed(9)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32).to(device, dtype)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1,
                           temperal_downsample=[False], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4, scale_factor_temporal=1,
                           scale_factor_spatial=2).to(device)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    sparse = apply_sparse_attention(transformer, select=psa.TopK(ratio=0.25), block=block,
                                    dense_steps=2)
    generator = torch.Generator().manual_seed(10)
    embeds = [torch.randn(1, 8, 16, generator=generator).to(device, dtype) for _ in range(2)]
    sparse.reset()
    # WanPipeline makes num_frames // 1 * 1 + 1 = 5 frames (the VAE's temporal factor is 1),
    # latents of 5 x 16 x 16: 5 x 8 x 8 = 320 video tokens.
    video = pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=32, width=32,
                 num_frames=4, num_inference_steps=5, guidance_scale=2.0, output_type="np",
                 callback_on_step_end=sparse.callback_on_step_end).frames
    assert video.shape[:2] == (1, 5) and np.isfinite(video).all()
    key_tiles = -(-320 // block[1])
    sparsity = 1 - max(1, int(0.25 * key_tiles)) / key_tiles
    for name, stats in sparse.stats().items():
        # Guidance: two transformer calls per step; 2 dense steps, then 3 sparse ones.
        assert (stats.dense_calls, stats.sparse_calls) == (4, 6), (name, stats)
        assert stats.sparsity == pytest.approx(sparsity), name
    sparse.remove()
