"""pysparse_attn.jax: custom_vjp over pure_callback under jit, grad and vmap.

Forward results must equal the core's; gradients must equal the core's vjp on the float64
reference with the forward's kept set replayed, and finite differences where the function is
differentiable as a whole (a fixed tile mask).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

# A GPU JAX would otherwise take 75% of the device's memory at its first use, from under the
# torch and CuPy tests of the other test processes.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install .[jax])")
jax.config.update("jax_enable_x64", True)  # float64 checks against the float64 reference

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import pysparse_attn as psa  # noqa: E402
import pysparse_attn.jax as pj  # noqa: E402

from interop_snippets import run_interop_snippets  # noqa: E402

BLOCK = (8, 8)
# float64 cpu backend vs the float64 reference: ~1e-14 apart (see test_torch_adapter).
TIGHT = dict(rtol=1e-10, atol=1e-10)


def arrays(shape=(1, 2, 40, 8), seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape).astype(dtype)) for _ in range(3)]


def host(*xs):
    return [np.asarray(x) for x in xs]


@pytest.mark.parametrize("skip", [None, psa.Recall(0.8), psa.Blasst(0.05)])
@pytest.mark.parametrize("select", [None, psa.TopK(k=2)])
def test_jit_grad_matches_the_reference_with_the_kept_set_replayed(skip, select):
    q, k, v = arrays(seed=1)
    q = q * 3.0
    do = arrays(seed=2)[0]
    options = dict(select=select, skip=skip, block=BLOCK)

    def loss(q, k, v):
        return jnp.sum(pj.attention(q, k, v, **options) * do)

    out, stats = jax.jit(lambda q, k, v: pj.attention(q, k, v, return_stats=True,
                                                      **options))(q, k, v)
    expected, core_stats = psa.attention(*host(q, k, v), return_stats=True, **options)
    np.testing.assert_allclose(np.asarray(out), expected, **TIGHT)
    np.testing.assert_array_equal(np.asarray(stats.kept), core_stats.kept)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    reference = psa.attention_vjp(*host(q, k, v, do), kept=core_stats.kept, block=BLOCK,
                                  backend="reference")
    for a, b in zip(grads, reference):
        np.testing.assert_allclose(np.asarray(a), b, **TIGHT)


def test_finite_differences_with_a_fixed_mask():
    q, k, v = arrays((1, 1, 20, 4), seed=3)
    mask = psa.BlockMask(np.array([[True, False, True], [False, True, True],
                                   [True, True, False]]))
    check_grads(lambda q, k, v: pj.attention(q, k, v, select=mask, block=BLOCK), (q, k, v),
                order=1, modes=["rev"], eps=1e-6)


def test_sla_grad_of_q_k_v_w_b_matches_sla_vjp_and_finite_differences():
    q, k, v = arrays((1, 1, 24, 4), seed=4)
    rng = np.random.default_rng(5)
    weight, bias = jnp.asarray(rng.standard_normal((4, 4))), jnp.asarray(rng.standard_normal(4))
    options = dict(critical=0.34, negligible=0.3, block=BLOCK, backend="reference")

    def f(q, k, v, w, b):
        return pj.sla_attention(q, k, v, proj_weight=w, proj_bias=b, **options)

    check_grads(f, (q, k, v, weight, bias), order=1, modes=["rev"], eps=1e-6)
    do = arrays((1, 1, 24, 4), seed=6)[0]
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * do), argnums=(0, 1, 2, 3, 4)))(
        q, k, v, weight, bias)
    reference = psa.sla_vjp(*host(q, k, v, do), proj_weight=np.asarray(weight),
                            proj_bias=np.asarray(bias), **options)
    for a, b in zip(grads, reference):
        np.testing.assert_allclose(np.asarray(a), b, **TIGHT)
    # W and b left None: zeros stand in, so their gradient at zero is there.
    zero_grads = jax.grad(lambda q: jnp.sum(pj.sla_attention(q, k, v, **options)))(q)
    assert zero_grads.shape == q.shape


def test_vmap_folds_mapped_axes_into_the_batch_and_matches_a_loop():
    q, k, v = arrays((1, 2, 40, 8), seed=7)
    stacked = jnp.stack([q, 0.5 * q, -q])
    rule = psa.Recall(0.9)
    mapped = jax.jit(jax.vmap(lambda q: pj.attention(q, k, v, skip=rule, block=BLOCK)))(stacked)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(mapped[i]),
                                   psa.attention(*host(stacked[i], k, v), skip=rule,
                                                 block=BLOCK), **TIGHT)
    per_example = jax.vmap(jax.grad(lambda q: pj.attention(q, k, v, block=BLOCK).sum()))(stacked)
    for i in range(3):
        single = jax.grad(lambda q: pj.attention(q, k, v, block=BLOCK).sum())(stacked[i])
        np.testing.assert_allclose(np.asarray(per_example[i]), np.asarray(single), **TIGHT)
    mask = psa.BlockMask(np.eye(5, dtype=bool) | np.eye(5, k=1, dtype=bool))
    masked = jax.vmap(lambda q: pj.attention(q, k, v, select=mask, block=BLOCK))(stacked)
    np.testing.assert_allclose(np.asarray(masked[2]),
                               psa.attention(*host(stacked[2], k, v), select=mask, block=BLOCK),
                               **TIGHT)


def test_vmap_of_sla_over_weights_gives_per_element_gradients():
    q, k, v = arrays((1, 1, 24, 4), seed=8)
    rng = np.random.default_rng(9)
    weights = jnp.asarray(rng.standard_normal((2, 4, 4)))
    options = dict(critical=0.34, negligible=0.3, block=BLOCK)

    def loss(w):
        return jnp.sum(pj.sla_attention(q, k, v, proj_weight=w, **options) ** 2)

    mapped = jax.vmap(jax.grad(loss))(weights)
    for i in range(2):
        np.testing.assert_allclose(np.asarray(mapped[i]), np.asarray(jax.grad(loss)(weights[i])),
                                   **TIGHT)


def test_layout_dtypes_and_stats():
    q, k, v = arrays((1, 40, 2, 8), seed=10, dtype=np.float32)
    out, stats = pj.attention(q, k, v, layout="bnhd", block=BLOCK, return_stats=True)
    expected, core = psa.attention(*host(q, k, v), layout="bnhd", block=BLOCK,
                                   return_stats=True)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=0)
    assert out.dtype == jnp.float32 and stats.lse.dtype == jnp.float32
    assert stats.lse.shape == (1, 40, 2) and stats.kept.shape == (1, 2, 5, 5)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out16 = jax.jit(lambda *a: pj.attention(*a, layout="bnhd", block=BLOCK))(*low)
    assert out16.dtype == jnp.bfloat16
    # bf16 inputs (8 mantissa bits) and output rounding.
    np.testing.assert_allclose(np.asarray(out16, dtype=np.float32), expected, rtol=3e-2,
                               atol=3e-2)


def test_bad_input():
    q, k, v = arrays(seed=11)
    with pytest.raises(TypeError, match="q must be float64"):
        pj.attention(q.astype(jnp.int32), k, v)
    with pytest.raises(TypeError, match="k must be a JAX or NumPy array"):
        pj.attention(q, [1.0], v)
    with pytest.raises(ValueError, match="layout must be one of"):
        pj.attention(q, k, v, layout="nhbd")
    with pytest.raises(TypeError, match="'layot' is not an option"):
        pj.attention(q, k, v, layot="bnhd")
    with pytest.raises(TypeError, match="must be concrete"):
        jax.jit(lambda m: pj.attention(q, k, v, select=psa.BlockMask(m), block=BLOCK))(
            jnp.ones((5, 5), bool))
    with pytest.raises(ValueError, match="proj_weight must have shape"):
        pj.sla_attention(q, k, v, critical=0.5, negligible=0.1, proj_weight=jnp.zeros((3, 3)))


# ---------------------------------------------------------------------------------------------
# The buffer_callback route (what GPU arrays take): the same core calls, run in place on XLA's
# buffers. It exists on the CPU too, so its folding, vmap and write-back are checked here by
# routing the CPU through it; the GPU test below checks the device side.

@pytest.fixture
def buffer_calls(monkeypatch):
    """The platforms of every buffer_callback body run (a list that grows as they run)."""
    calls = []
    in_place = pj._in_place

    def counted(run, platform):
        body = in_place(run, platform)

        def callback(*args):
            calls.append(platform)
            return body(*args)
        return callback

    monkeypatch.setattr(pj, "_in_place", counted)
    return calls


@pytest.fixture
def buffer_route_on_cpu(monkeypatch, buffer_calls):
    if pj._buffer_callback is None:
        pytest.skip(f"jax {jax.__version__} has no jax.experimental.buffer_callback")
    monkeypatch.setattr(pj, "_buffer_platforms", lambda: ("cpu",))
    return buffer_calls


def test_buffer_route_gives_the_host_route_results(buffer_route_on_cpu):
    q, k, v = arrays((1, 2, 40, 8), seed=12)
    stacked = jnp.stack([q, -0.5 * q])
    mask = psa.BlockMask(np.eye(5, dtype=bool) | np.eye(5, k=2, dtype=bool))
    rule = psa.Recall(0.9)
    rng = np.random.default_rng(13)
    weights = jnp.asarray(rng.standard_normal((2, 8, 8)))
    sla = dict(critical=0.4, negligible=0.2, block=BLOCK)

    def forward(stacked):
        return jax.vmap(lambda q: pj.attention(q, k, v, select=mask, skip=rule, block=BLOCK,
                                               return_stats=True))(stacked)

    def grads(stacked):
        return jax.vmap(jax.grad(lambda q: pj.attention(q, k, v, skip=rule,
                                                        block=BLOCK).sum()))(stacked)

    def sla_grads(weights):
        return jax.vmap(jax.grad(lambda w, q: jnp.sum(pj.sla_attention(
            q, k, v, proj_weight=w, **sla) ** 2), argnums=(0, 1)), in_axes=(0, None))(weights, q)

    routed = [jax.jit(f)(x) for f, x in ((forward, stacked), (grads, stacked),
                                         (sla_grads, weights))]
    assert set(buffer_route_on_cpu) == {"cpu"} and len(buffer_route_on_cpu) >= 4
    pj_platforms = pj._buffer_platforms
    try:
        pj._buffer_platforms = lambda: ()
        hosted = [jax.jit(f)(x) for f, x in ((forward, stacked), (grads, stacked),
                                             (sla_grads, weights))]
    finally:
        pj._buffer_platforms = pj_platforms
    for a, b in zip(jax.tree_util.tree_leaves(routed), jax.tree_util.tree_leaves(hosted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_buffer_route_writes_bfloat16_and_bool_results(buffer_route_on_cpu):
    q, k, v = (x.astype(jnp.bfloat16) for x in arrays((1, 2, 40, 8), seed=14))
    out, stats = jax.jit(lambda *a: pj.attention(*a, skip=psa.Blasst(0.05), block=BLOCK,
                                                 return_stats=True))(q, k, v)
    expected, core = psa.attention(*host(q, k, v), skip=psa.Blasst(0.05), block=BLOCK,
                                   return_stats=True)
    assert buffer_route_on_cpu and out.dtype == jnp.bfloat16 and stats.kept.dtype == bool
    np.testing.assert_array_equal(np.asarray(out).view(np.uint16), expected.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(stats.kept), core.kept)


def test_device_route_is_none_without_a_gpu_backend():
    try:
        jax.devices("gpu")
    except RuntimeError:
        assert pj.device_route() is None
    else:
        pytest.skip("this JAX has a GPU backend (the GPU test covers the route)")


@pytest.mark.gpu
def test_gpu_arrays_stay_on_the_device_and_match_the_reference(buffer_calls):
    route = pj.device_route()
    if route is None:
        pytest.skip(f"no JAX device route here (jax {jax.__version__}: buffer_callback "
                    f"{'present' if pj._buffer_callback else 'missing'}, GPU backend or CuPy "
                    "missing)")
    gpu = jax.devices("gpu")[0]
    rng = np.random.default_rng(15)
    shapes = ((1, 4, 64 * 4 + 37, 64), (1, 2, 64 * 5 + 3, 64), (1, 2, 64 * 5 + 3, 64))
    q, k, v = (jax.device_put(jnp.asarray(rng.standard_normal(s), jnp.bfloat16), gpu)
               for s in shapes)
    q64, k64, v64 = (np.asarray(x).astype(np.float64) for x in (q, k, v))
    rule = psa.Recall(0.95)

    def f(q, k, v):
        return pj.attention(q, k, v, skip=rule, block=(64, 64), return_stats=True)

    out, stats = jax.jit(f)(q, k, v)
    assert out.dtype == jnp.bfloat16 and out.devices() == {gpu}
    assert buffer_calls and set(buffer_calls) == {"cuda"}, (
        f"the GPU call did not take the buffer_callback route (bodies run: {buffer_calls})")
    kept = np.asarray(stats.kept)
    expected = psa.attention(q64, k64, v64, select=psa.BlockMask(kept), block=(64, 64),
                             backend="reference")
    # bf16 tensor cores vs float64 on the same rounded inputs (see test_torch_adapter).
    np.testing.assert_allclose(np.asarray(out, dtype=np.float64), expected, rtol=2e-2,
                               atol=2e-2)
    do = jax.device_put(jnp.asarray(rng.standard_normal(shapes[0]), jnp.bfloat16), gpu)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
        pj.attention(q, k, v, skip=rule, block=(64, 64)).astype(jnp.float32)
        * do.astype(jnp.float32)), argnums=(0, 1, 2)))(q, k, v)
    reference = psa.attention_vjp(q64, k64, v64, np.asarray(do).astype(np.float64), kept=kept,
                                  block=(64, 64), backend="reference")
    for name, g, r in zip("qkv", grads, reference):
        assert g.devices() == {gpu}
        error = float(np.abs(np.asarray(g, dtype=np.float64) - r).max())
        assert error <= 3e-2 * float(np.abs(r).max()), f"d{name}: max error {error:.3g}"


def test_interop_page_jax_snippets_run():
    run_interop_snippets("jax")


def test_docstring_examples_run():
    import doctest

    results = doctest.testmod(pj, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0 and results.failed == 0
