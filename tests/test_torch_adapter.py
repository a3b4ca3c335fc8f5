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
    out, lse, kept, _ = torch.ops.pysparse_attn.sla_attention(q, k, v, weight, bias, sla)
    torch.library.opcheck(torch.ops.pysparse_attn.sla_backward.default,
                          (q, k, v, do, kept, weight, bias, out, lse, sla))


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


def test_docstring_examples_run():
    import doctest

    results = doctest.testmod(pt, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0 and results.failed == 0
