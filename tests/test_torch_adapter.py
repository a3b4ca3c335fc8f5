"""pysparse_attn.torch: custom ops, autograd, torch.compile, opcheck, SparseLinearAttention.

Gradients are checked three ways: dense attention against torch's own SDPA autograd, every
selector/rule against the core's vjp on the float64 reference given the adapter's kept set,
and ``torch.autograd.gradcheck`` (central finite differences, float64) where the function is
differentiable as a whole (a fixed tile mask: no decision can flip under a perturbation).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install .[torch])")

import pysparse_attn as psa  # noqa: E402
import pysparse_attn.torch as pt  # noqa: E402
from interop_snippets import run_interop_snippets  # noqa: E402

F64 = torch.float64
BLOCK = (8, 8)
# float64 on the cpu backend against float64 torch/reference code: both accumulate in float64
# over at most a few hundred terms, so they agree to ~1e-14; 1e-10 leaves room for the order
# of summation without hiding a wrong formula (which is off by O(1)).
TIGHT = dict(rtol=1e-10, atol=1e-10)


def tensors(shape_q=(1, 2, 40, 8), shape_kv=None, dtype=F64, seed=0, grad=True):
    generator = torch.Generator().manual_seed(seed)
    shape_kv = shape_kv or shape_q
    out = [torch.randn(s, dtype=dtype, generator=generator) for s in (shape_q, shape_kv,
                                                                      shape_kv)]
    return [x.requires_grad_(grad) for x in out]


def numpy_of(*xs):
    return [x.detach().numpy() for x in xs]


def grads_of(loss, *xs):
    return torch.autograd.grad(loss, xs)


# ---------------------------------------------------------------------------------------------
# Forward and gradients

@pytest.mark.parametrize("heads_kv", [2, 1])
def test_dense_matches_torch_sdpa_forward_and_gradients(heads_kv):
    q, k, v = tensors((1, 2, 40, 8), (1, heads_kv, 36, 8))
    do = torch.randn(q.shape, dtype=F64)
    out = pt.attention(q, k, v, block=BLOCK)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                enable_gqa=heads_kv != 2)
    torch.testing.assert_close(out, expected, **TIGHT)
    ours = grads_of((out * do).sum(), q, k, v)
    theirs = grads_of((expected * do).sum(), q, k, v)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TIGHT)


SELECTORS = {
    "dense": lambda nq, nk: None,
    "mask": lambda nq, nk: psa.BlockMask((np.arange(nq)[:, None] + np.arange(nk)) % 3 != 1),
    "topk": lambda nq, nk: psa.TopK(k=2),
    "topp": lambda nq, nk: psa.TopP(0.8),
}
RULES = {
    "none": None,
    "blasst": psa.Blasst(0.05),
    "cef": psa.Cef(-3.0),
    "recall": psa.Recall(0.8),
    "recall-exact": psa.Recall(0.8, exact=True),
}


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("rule", RULES)
def test_every_method_matches_the_reference_with_the_kept_set_replayed(selector, rule):
    q, k, v = tensors((1, 2, 40, 8), seed=1)
    q.data *= 3.0  # sharper rows, so that the rules skip something
    select, skip = SELECTORS[selector](5, 5), RULES[rule]
    out, stats = pt.attention(q, k, v, select=select, skip=skip, block=BLOCK, return_stats=True)
    expected, core_stats = psa.attention(*numpy_of(q, k, v), select=select, skip=skip,
                                         block=BLOCK, return_stats=True)
    np.testing.assert_array_equal(stats.kept.numpy(), core_stats.kept)
    np.testing.assert_allclose(out.detach().numpy(), expected, **TIGHT)
    np.testing.assert_allclose(stats.lse.numpy(), core_stats.lse, rtol=1e-6)
    do = torch.randn(q.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    ours = grads_of((out * do).sum(), q, k, v)
    reference = psa.attention_vjp(*numpy_of(q, k, v, do), kept=stats.kept.numpy(), block=BLOCK,
                                  backend="reference")
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a.numpy(), b, **TIGHT)


def test_gradcheck_finite_differences_with_a_fixed_mask():
    q, k, v = tensors((1, 2, 20, 4), seed=3)
    mask = psa.BlockMask(np.array([[True, False, True], [False, True, True], [True, True,
                                                                              False]]))
    assert torch.autograd.gradcheck(
        lambda q, k, v: pt.attention(q, k, v, select=mask, block=BLOCK), (q, k, v),
        fast_mode=True)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_sla_gradcheck_finite_differences_including_w_and_b(backend):
    q, k, v = tensors((1, 1, 24, 4), seed=4)
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(4, 4, dtype=F64, generator=generator).requires_grad_()
    bias = torch.randn(4, dtype=F64, generator=generator).requires_grad_()

    def f(q, k, v, weight, bias):
        return pt.sla_attention(q, k, v, critical=0.34, negligible=0.3, proj_weight=weight,
                                proj_bias=bias, block=BLOCK, backend=backend)

    if backend == "reference":
        assert torch.autograd.gradcheck(f, (q, k, v, weight, bias), fast_mode=True)
        return
    # The cpu backend computes the projection in float32 (as the core does): compare its
    # gradients with the reference's at float32 precision instead of finite differences.
    out = f(q, k, v, weight, bias)
    do = torch.randn(q.shape, dtype=F64, generator=generator)
    ours = grads_of((out * do).sum(), q, k, v, weight, bias)
    reference = psa.sla_vjp(*numpy_of(q, k, v, do), critical=0.34, negligible=0.3,
                            proj_weight=weight.detach().numpy(), proj_bias=bias.detach().numpy(),
                            block=BLOCK, backend="reference")
    for a, b in zip(ours, reference):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-5, atol=1e-5)


def test_bnhd_layout_equals_bhnd_on_transposed_views():
    q, k, v = tensors((1, 2, 40, 8), seed=6)
    rule = psa.Recall(0.9)
    out, stats = pt.attention(*(x.transpose(1, 2) for x in (q, k, v)), skip=rule, block=BLOCK,
                              layout="bnhd", return_stats=True)
    ref, ref_stats = pt.attention(q, k, v, skip=rule, block=BLOCK, return_stats=True)
    torch.testing.assert_close(out.transpose(1, 2), ref, rtol=0, atol=0)
    torch.testing.assert_close(stats.lse.transpose(1, 2), ref_stats.lse, rtol=0, atol=0)
    g_bnhd = grads_of(out.sum(), q)[0]
    g_bhnd = grads_of(ref.sum(), q)[0]
    torch.testing.assert_close(g_bnhd, g_bhnd, rtol=0, atol=0)


def test_bfloat16_and_float16_cpu_tensors_round_trip_without_numpy_bfloat16():
    q, k, v = tensors((1, 2, 40, 8), dtype=torch.float32, seed=7)
    full = pt.attention(q, k, v, block=BLOCK)
    for dtype in (torch.bfloat16, torch.float16):
        low = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = pt.attention(*low, block=BLOCK)
        assert out.dtype == dtype and out.shape == q.shape
        # Inputs rounded to 8 (bf16) or 11 (fp16) mantissa bits, output rounded once more.
        tolerance = 3e-2 if dtype == torch.bfloat16 else 4e-3
        torch.testing.assert_close(out.float(), full, rtol=tolerance, atol=tolerance)
        grads = grads_of(out.float().sum(), *low)
        assert all(g.dtype == dtype and torch.isfinite(g.float()).all() for g in grads)


def test_stats_and_non_differentiable_outputs():
    q, k, v = tensors(seed=8)
    out, stats = pt.attention(q, k, v, skip=psa.Recall(0.7), block=BLOCK, return_stats=True)
    assert stats.lse.dtype == F64 and stats.kept.dtype == torch.bool
    assert not stats.lse.requires_grad and stats.marginal is None
    assert 0.0 <= float(stats.sparsity) <= 1.0
    assert float(stats.density) == pytest.approx(stats.kept.double().mean().item())
    lse32 = pt.attention(*(x.float() for x in (q, k, v)), block=BLOCK, return_stats=True)[1].lse
    assert lse32.dtype == torch.float32
    _, sla_stats = pt.sla_attention(q, k, v, critical=0.4, negligible=0.2, block=BLOCK,
                                    return_stats=True)
    assert sla_stats.marginal.dtype == torch.bool
    assert not (sla_stats.marginal & sla_stats.kept).any()


def test_inputs_are_not_written_and_outputs_do_not_alias_them():
    q, k, v = tensors(seed=9)
    copies = [x.detach().clone() for x in (q, k, v)]
    out = pt.attention(q, k, v, block=BLOCK)
    out.sum().backward()
    for x, c in zip((q, k, v), copies):
        torch.testing.assert_close(x.detach(), c, rtol=0, atol=0)
        assert out.data_ptr() != x.data_ptr()


# ---------------------------------------------------------------------------------------------
# Operator machinery

def _spec(**options):
    return pt.spec("attention", block=BLOCK, **options)


def test_opcheck_forward_ops():
    q, k, v = tensors((1, 2, 24, 8), seed=10)
    mask = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
    torch.library.opcheck(torch.ops.pysparse_attn.attention.default,
                          (q, k, v, mask, _spec(select=psa.BlockMask(mask),
                                                skip=psa.Recall(0.9))))
    weight = torch.randn(8, 8, dtype=F64, requires_grad=True)
    bias = torch.randn(8, dtype=F64, requires_grad=True)
    sla = pt.spec("sla", critical=0.4, negligible=0.3, block=BLOCK)
    torch.library.opcheck(torch.ops.pysparse_attn.sla_attention.default,
                          (q, k, v, weight, bias, sla))
    # Without W and b (their grads are None): the autograd registration only.
    torch.library.opcheck(torch.ops.pysparse_attn.sla_attention.default,
                          (q, k, v, None, None, sla), test_utils="test_autograd_registration")


def test_opcheck_backward_ops():
    q, k, v = tensors((1, 2, 24, 8), seed=11, grad=False)
    spec = _spec()
    out, lse, kept = torch.ops.pysparse_attn.attention(q, k, v, None, spec)
    do = torch.randn_like(q)
    torch.library.opcheck(torch.ops.pysparse_attn.attention_backward.default,
                          (q, k, v, do, kept, None, out, lse, spec))
    sla = pt.spec("sla", critical=0.4, negligible=0.3, block=BLOCK)
    weight, bias = torch.randn(8, 8, dtype=F64), torch.randn(8, dtype=F64)
    out, lse, kept, marginal = torch.ops.pysparse_attn.sla_attention(q, k, v, weight, bias, sla)
    torch.library.opcheck(torch.ops.pysparse_attn.sla_backward.default,
                          (q, k, v, do, kept, marginal, weight, bias, out, lse, sla))


def test_fake_tensors_have_the_real_shapes_strides_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for dtype in (F64, torch.float32, torch.bfloat16):
        q, k, v = tensors((2, 4, 37, 8), (2, 2, 29, 8), dtype=dtype, seed=12, grad=False)
        spec = _spec(skip=psa.Blasst(0.01))
        real = torch.ops.pysparse_attn.attention(q, k, v, None, spec)
        with FakeTensorMode() as mode:
            fake = torch.ops.pysparse_attn.attention(*(mode.from_tensor(x) for x in (q, k, v)),
                                                     None, spec)
        for r, f in zip(real, fake):
            assert (r.shape, r.stride(), r.dtype, r.device) == (f.shape, f.stride(), f.dtype,
                                                                f.device)


def test_spec_is_canonical_and_decodes_to_the_same_options():
    from pysparse_attn import _adapters

    text = pt.spec("attention", select=psa.TopK(ratio=0.25), skip=psa.Recall(0.95),
                   block=[16, 16], order="peak", peak=4)
    # Defaults (peak=4) are left out; lists become arrays; keys sorted.
    assert text == ('{"keywords":[["block",[16,16]],["order","peak"]],"op":"attention",'
                    '"select":["TopK",[["k",null],["ratio",0.25]]],'
                    '"skip":["Recall",[["exact",false],["target",0.95]]]}')
    options = _adapters.decode(text)
    assert options.rule == psa.Recall(0.95) and options.selector == psa.TopK(ratio=0.25)
    assert options.block == (16, 16)
    per_head = pt.spec("attention", skip=psa.Blasst(lam=np.array([0.1, 0.2])))
    assert _adapters.decode(per_head).rule == psa.Blasst(lam=np.array([0.1, 0.2]))


# ---------------------------------------------------------------------------------------------
# torch.compile

def _compiled_matches_eager(function, inputs, backend):
    torch._dynamo.reset()
    compiled = torch.compile(function, fullgraph=True, backend=backend)
    eager_out = function(*inputs)
    eager_grads = grads_of(eager_out.sum(), *inputs)
    out = compiled(*inputs)
    grads = grads_of(out.sum(), *inputs)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_fullgraph_inductor_with_options_built_inside():
    q, k, v = tensors((1, 2, 40, 8), dtype=torch.float32, seed=13)

    def f(q, k, v):
        # Options built inside the compiled function are traced with their values.
        return pt.attention(q, k, v, select=psa.TopK(k=3), skip=psa.Recall(0.9), block=BLOCK)

    _compiled_matches_eager(f, (q, k, v), "inductor")


def test_torch_compile_fullgraph_sla_module_layout_and_shapes():
    q, k, v = tensors((1, 40, 2, 8), dtype=torch.float32, seed=14)
    module = pt.SparseLinearAttention(8, critical=0.4, negligible=0.2, block=BLOCK,
                                      layout="bnhd")
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    _compiled_matches_eager(lambda q, k, v: module(q, k, v), (q, k, v), "aot_eager")
    weight_grad = torch.autograd.grad(torch.compile(module, fullgraph=True,
                                                    backend="aot_eager")(q, k, v).sum(),
                                      module.weight)[0]
    eager = torch.autograd.grad(module(q, k, v).sum(), module.weight)[0]
    torch.testing.assert_close(weight_grad, eager, rtol=0, atol=0)
    # Another sequence length: the graph is reused or recompiled, never wrong.
    longer = tensors((1, 56, 2, 8), dtype=torch.float32, seed=15)
    compiled = torch.compile(lambda q, k, v: module(q, k, v), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(*longer), module(*longer), rtol=0, atol=0)


def test_torch_compile_reads_stored_rules_and_masks():
    q, k, v = tensors((1, 2, 24, 8), dtype=torch.float32, seed=16)
    rule = psa.Blasst(0.1)
    mask = psa.BlockMask(torch.tensor([[True, False, True], [True, True, False],
                                       [False, True, True]]))
    _compiled_matches_eager(lambda q, k, v: pt.attention(q, k, v, select=mask, skip=rule,
                                                         block=BLOCK), (q, k, v), "aot_eager")


# ---------------------------------------------------------------------------------------------
# SparseLinearAttention

def test_sparse_linear_attention_starts_at_sparse_only_and_trains():
    q, k, v = tensors((1, 2, 40, 8), dtype=torch.float32, seed=17)
    module = pt.SparseLinearAttention(8, critical=0.4, negligible=0.2, block=BLOCK)
    assert module.weight.dtype == torch.float32 and not module.weight.any()
    out = module(q, k, v)
    sparse_only = pt.sla_attention(q, k, v, critical=0.4, negligible=0.2, block=BLOCK)
    torch.testing.assert_close(out, sparse_only, rtol=0, atol=0)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(18))
    (out * do).sum().backward()
    reference = psa.sla_vjp(*numpy_of(q, k, v, do), critical=0.4, negligible=0.2, block=BLOCK)
    np.testing.assert_allclose(module.weight.grad.numpy(), reference[3], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(module.bias.grad.numpy(), reference[4], rtol=1e-6, atol=1e-6)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    optimizer.step()
    assert module.weight.any() and not torch.equal(module(q, k, v), out)


def test_sparse_linear_attention_keeps_float32_master_weights_under_a_cast():
    module = pt.SparseLinearAttention(8, critical=0.5, negligible=0.0, block=BLOCK)
    module.to(torch.bfloat16)
    assert module.weight.dtype == torch.float32 and module.bias.dtype == torch.float32
    q, k, v = tensors((1, 2, 16, 8), dtype=torch.bfloat16, seed=19)
    out = module(q, k, v)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert module.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# Bad input

def test_bad_input_names_the_argument():
    q, k, v = tensors(seed=20, grad=False)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        pt.attention(q, k.numpy(), v)
    with pytest.raises(TypeError, match="q must be float64, float32, float16 or bfloat16"):
        pt.attention(q.to(torch.int32), k, v)
    with pytest.raises(ValueError, match="v is on device meta"):
        pt.attention(q, k, v.to("meta"))
    with pytest.raises(TypeError, match="'layot' is not an option"):
        pt.attention(q, k, v, layot="bnhd")
    with pytest.raises(ValueError, match="layout must be one of"):
        pt.attention(q, k, v, layout="nhbd")
    with pytest.raises(TypeError, match="skip must be None or a skip rule"):
        pt.attention(q, k, v, skip="recall")
    with pytest.raises(TypeError, match="select must be None, BlockMask, TopK or TopP"):
        pt.attention(q, k, v, select=3)
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        pt.SparseLinearAttention(0, critical=0.5, negligible=0.1)
    with pytest.raises(ValueError, match="scale must be positive"):
        pt.attention(q, k, v, scale=-1.0)


def test_requires_grad_tensors_are_accepted():
    # The first symptom: a DLPack error on tensors that require grad.
    q, k, v = tensors(seed=21)
    assert pt.attention(q, k, v, block=BLOCK).requires_grad


# ---------------------------------------------------------------------------------------------
# The interop page's torch snippets run as written

def test_interop_page_torch_snippets_run():
    run_interop_snippets("torch")


# ---------------------------------------------------------------------------------------------
# CUDA (run by the lead on a GPU machine)

@pytest.mark.gpu
def test_cuda_tensors_run_on_the_current_stream_and_match_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    q, k, v = tensors((1, 2, 256, 64), dtype=torch.float32, seed=22, grad=False)
    cuda = [x.to("cuda", torch.bfloat16).requires_grad_() for x in (q, k, v)]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = pt.attention(*cuda, skip=psa.Recall(0.95), block=(64, 64))
        out.float().sum().backward()
    stream.synchronize()
    expected = pt.attention(*(x.to(torch.bfloat16) for x in (q, k, v)), skip=psa.Recall(0.95),
                            block=(64, 64))
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16
    # bf16 tensor cores vs the float32-accumulating CPU backend on bf16 inputs.
    torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=3e-2, atol=3e-2)
    assert all(x.grad is not None and x.grad.device.type == "cuda" for x in cuda)


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device (a CPU-only torch build, or no GPU)")


def _cuda_bf16(shape_q, shape_kv=None, seed=0, grad=True):
    """bf16 CUDA leaves and the float64 CPU copies of the same (rounded) values."""
    host = tensors(shape_q, shape_kv, dtype=torch.float32, seed=seed, grad=False)
    cuda = [x.to("cuda", torch.bfloat16).requires_grad_(grad) for x in host]
    return cuda, [x.detach().double().cpu() for x in cuda]


# bf16 CUDA against the float64 reference on the same bf16-rounded inputs and the same kept
# set: P is rounded to bf16 before P.V (relative 2^-8 per term) and the output is rounded to
# bf16 once more, so entries of O (|O| <= max|v| ~ 4) agree to ~2e-2; gradients go through the
# float32 host backward on bf16 inputs and are rounded to bf16: ~3e-2 of their scale.
BF16_OUT = dict(rtol=2e-2, atol=2e-2)


def _close_to_scale(actual, expected, share, what):
    scale = float(expected.abs().max())
    error = float((actual.double().cpu() - expected).abs().max())
    assert error <= share * scale, (f"{what}: max error {error:.3g} > {share} x max |ref| "
                                    f"{scale:.3g}")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dense", "topk", "recall"])
def test_cuda_forward_and_backward_match_the_reference_on_the_kept_set(method):
    _cuda_or_skip()
    options = {"dense": {}, "topk": dict(select=psa.TopK(ratio=0.25)),
               "recall": dict(skip=psa.Recall(0.95))}[method]
    # 5 query tiles (the last partial), GQA 4 -> 2 heads, D = 64: every GPU code path.
    (q, k, v), (q64, k64, v64) = _cuda_bf16((1, 4, 64 * 4 + 37, 64), (1, 2, 64 * 5 + 3, 64),
                                            seed=30)
    out, stats = pt.attention(q, k, v, block=(64, 64), return_stats=True, **options)
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16
    # Every row written (a row left unwritten would hold whatever the allocator gave).
    assert torch.isfinite(out.float()).all()
    kept = stats.kept.cpu().numpy()
    expected = psa.attention(*numpy_of(q64, k64, v64), select=psa.BlockMask(kept), block=(64, 64),
                             backend="reference")
    torch.testing.assert_close(out.double().cpu(), torch.from_numpy(expected), **BF16_OUT)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(31)).to("cuda",
                                                                           torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v), do)
    reference = psa.attention_vjp(*numpy_of(q64, k64, v64, do.double().cpu()), kept=kept,
                                  block=(64, 64), backend="reference")
    for name, g, r in zip("qkv", grads, reference):
        assert g.device.type == "cuda" and g.dtype == torch.bfloat16
        _close_to_scale(g, torch.from_numpy(r), 3e-2, f"d{name}")


@pytest.mark.gpu
def test_cuda_sla_module_forward_and_backward_match_the_reference():
    _cuda_or_skip()
    (q, k, v), (q64, k64, v64) = _cuda_bf16((1, 2, 64 * 6 + 11, 64), seed=32)
    sla = pt.SparseLinearAttention(64, critical=0.34, negligible=0.2, block=(64, 64),
                                   device="cuda")
    generator = torch.Generator().manual_seed(33)
    with torch.no_grad():
        sla.weight.copy_(torch.randn(64, 64, generator=generator) * 0.1)
        sla.bias.copy_(torch.randn(64, generator=generator) * 0.1)
    out, stats = sla(q, k, v, return_stats=True)
    kept = stats.kept.cpu().numpy()
    weight, bias = (p.detach().double().cpu().numpy() for p in (sla.weight, sla.bias))
    options = dict(critical=0.34, negligible=0.2, block=(64, 64), proj_weight=weight,
                   proj_bias=bias, backend="reference")
    expected = psa.sla_attention(*numpy_of(q64, k64, v64), **options)
    torch.testing.assert_close(out.double().cpu(), torch.from_numpy(expected), **BF16_OUT)
    do = torch.randn(q.shape, generator=generator).to("cuda", torch.bfloat16)
    grads = torch.autograd.grad(out, (q, k, v, sla.weight, sla.bias), do)
    reference = psa.sla_vjp(*numpy_of(q64, k64, v64, do.double().cpu()), kept=kept, **options)
    assert grads[3].dtype == torch.float32 and grads[3].device.type == "cuda"
    for name, g, r in zip(("dq", "dk", "dv", "dW", "db"), grads, reference):
        _close_to_scale(g, torch.from_numpy(r), 3e-2, name)


@pytest.mark.gpu
def test_cuda_op_queues_on_the_current_stream():
    """The op must read q after the caller's earlier work on its current stream.

    q is overwritten on a side stream behind a ~50 ms sleep; an op on any other stream (or one
    that does not wait) would read the old values.
    """
    _cuda_or_skip()
    (q, k, v), _ = _cuda_bf16((1, 2, 256, 64), seed=34, grad=False)
    (fresh_q, _, _), _ = _cuda_bf16((1, 2, 256, 64), seed=35, grad=False)
    expected = pt.attention(fresh_q, k, v, block=(64, 64))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time at ~2 GHz
        q.copy_(fresh_q)
        out = pt.attention(q, k, v, block=(64, 64))
    side.synchronize()
    assert torch.equal(out, expected), "the op did not run behind the caller's stream"


@pytest.mark.gpu
@pytest.mark.parametrize("select", [None, psa.TopK(ratio=0.5)])
def test_cuda_graph_capture_of_the_attention_op_replays_the_eager_result(select):
    """What is capturable: the forward of ``pt.attention`` (no host read inside).

    Not capturable: ``sla_attention``'s linear branch (CuPy refuses cuBLAS calls inside a
    capture) and any backward while the sparse backward runs on the host.
    """
    _cuda_or_skip()
    import cupy

    (q, k, v), _ = _cuda_bf16((1, 4, 64 * 5 + 17, 64), (1, 2, 64 * 5 + 17, 64), seed=36,
                              grad=False)
    eager = pt.attention(q, k, v, select=select, block=(64, 64))
    pool = cupy.cuda.MemoryPool()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with cupy.cuda.using_allocator(pool.malloc):
        with torch.cuda.stream(side):
            pt.attention(q, k, v, select=select, block=(64, 64))  # warm-up: compile, pool
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, capture_error_mode="relaxed"):
            captured = pt.attention(q, k, v, select=select, block=(64, 64))
    captured.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager), "the replay differs from the eager call"


@pytest.mark.gpu
def test_opcheck_on_cuda_tensors():
    _cuda_or_skip()
    (q, k, v), _ = _cuda_bf16((1, 2, 64 * 3 + 5, 64), seed=37)
    spec = pt.spec("attention", skip=psa.Recall(0.9), block=(64, 64))
    torch.library.opcheck(torch.ops.pysparse_attn.attention.default, (q, k, v, None, spec))
    sla = pt.spec("sla", critical=0.34, negligible=0.2, block=(64, 64))
    weight = torch.zeros(64, 64, device="cuda", requires_grad=True)
    bias = torch.zeros(64, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.pysparse_attn.sla_attention.default,
                          (q, k, v, weight, bias, sla))


def test_docstring_examples_run():
    import doctest

    results = doctest.testmod(pt, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0 and results.failed == 0
