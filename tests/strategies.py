"""Hypothesis strategies shared by the property tests.

A drawn :class:`Problem` holds fresh random float64 inputs in canonical ``(B, H, N, D)`` form
with small odd shapes (partial tiles are the common case, not the exception), GQA head pairs,
cross-attention lengths and tile sizes of 8, 16 or 32.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
from hypothesis import strategies as st

# (query heads, key/value heads): every GQA grouping with at most four query heads.
HEAD_PAIRS = [(1, 1), (2, 1), (2, 2), (3, 1), (3, 3), (4, 1), (4, 2), (4, 4)]
TILE_SIZES = [8, 16, 32]
ORDERS = ["natural", "score", "peak"]


@dataclass
class Problem:
    """One random attention problem (float64, canonical layout)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    block: tuple
    scale: Optional[float]
    seed: int
    recipe: str = ""  # the generator's shape parameters, for the falsifying-example report

    @property
    def shape(self):
        return self.q.shape

    @property
    def n_tiles(self):
        """``(nq, nk)`` for this problem's block."""
        return (-(-self.q.shape[2] // self.block[0]), -(-self.k.shape[2] // self.block[1]))

    @property
    def effective_scale(self):
        return self.scale if self.scale is not None else self.q.shape[-1] ** -0.5

    def rng(self, salt: int = 0) -> np.random.Generator:
        """A generator for further random data of this example (directions, masks, ...)."""
        return np.random.default_rng([self.seed, salt])

    def _repr_pretty_(self, printer, cycle):  # hypothesis' reports: shapes, not 40 kB of data
        printer.text(repr(self))

    def __repr__(self):
        B, H, Nq, D = self.q.shape
        return (f"Problem(B={B}, Hq={H}, Hkv={self.k.shape[1]}, Nq={Nq}, Nk={self.k.shape[2]}, "
                f"D={D}, block={self.block}, scale={self.scale}, seed={self.seed}"
                + (f", {self.recipe})" if self.recipe else ")"))


def random_qkv(rng, batch, heads, kv_heads, n_queries, n_keys, dim, sharpness=1.0,
               tile_gain_spread=0.0, block_k=16, focus=0.0):
    """Gaussian q, k, v; ``sharpness`` widens the logits, and a per-key-tile gain of spread
    ``tile_gain_spread`` (log-normal) makes some key tiles dominate, as in video attention,
    so that skip rules and selectors have something to decide.

    ``focus`` adds a direction shared by every query and, with a random signed weight c_J, by
    every key of tile J: each row's logits over tile J shift by about ``focus**2 * c_J`` (at
    the default scale), so whole tiles are negligible for *every* row of a query tile, which is
    what a skip rule needs (a tile is skipped only when all rows agree).
    """
    q = rng.standard_normal((batch, heads, n_queries, dim)) * sharpness
    k = rng.standard_normal((batch, kv_heads, n_keys, dim))
    if tile_gain_spread > 0.0:
        n_tiles = -(-n_keys // block_k)
        gains = np.exp(tile_gain_spread * rng.standard_normal((batch, kv_heads, n_tiles, 1)))
        k = k * np.repeat(gains, block_k, axis=2)[:, :, :n_keys]
    if focus > 0.0:  # drawn only when asked: callers without focus keep their random stream
        direction = rng.standard_normal(dim)
        direction *= focus * dim**0.25 / np.linalg.norm(direction)
        n_tiles = -(-n_keys // block_k)
        weights = rng.standard_normal((batch, kv_heads, n_tiles, 1))
        q = q + direction
        k = k + np.repeat(weights, block_k, axis=2)[:, :, :n_keys] * direction
    v = rng.standard_normal((batch, kv_heads, n_keys, dim))
    return q, k, v


@st.composite
def problems(draw, max_n=200, min_n=1, max_dim=32, same_length=False, scale=True,
             sharp=False, blocks=None):
    """Draw a :class:`Problem`.

    Parameters
    ----------
    max_n, min_n : int
        Range of ``Nq`` and ``Nk``.
    max_dim : int
        Largest head dimension (the smallest is 4).
    same_length : bool
        Force ``Nq == Nk`` (self-attention).
    scale : bool
        Sometimes pass an explicit ``scale`` instead of the default ``D**-0.5``.
    sharp : bool
        Draw peaked logits with dominant key tiles (for skip rules and selectors).
    blocks : list of tuple, optional
        Tile sizes to choose from; default every pair of 8, 16, 32.
    """
    batch = draw(st.integers(1, 2))
    heads, kv_heads = draw(st.sampled_from(HEAD_PAIRS))
    n_queries = draw(st.integers(min_n, max_n))
    n_keys = n_queries if same_length else draw(st.integers(min_n, max_n))
    dim = draw(st.integers(4, max_dim))
    if blocks is None:
        block = (draw(st.sampled_from(TILE_SIZES)), draw(st.sampled_from(TILE_SIZES)))
    else:
        block = draw(st.sampled_from(blocks))
    explicit_scale = draw(st.one_of(st.none(), st.floats(0.05, 1.5))) if scale else None
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if sharp:
        sharpness = draw(st.floats(1.0, 6.0))
        spread = draw(st.floats(0.0, 1.5))
        focus = draw(st.floats(0.0, 4.0))
    else:
        sharpness, spread, focus = 1.0, 0.0, 0.0
    q, k, v = random_qkv(rng, batch, heads, kv_heads, n_queries, n_keys, dim, sharpness,
                         spread, block[1], focus)
    recipe = f"sharpness={sharpness:g}, spread={spread:g}, focus={focus:g}" if sharp else ""
    return Problem(q=q, k=k, v=v, block=block, scale=explicit_scale, seed=seed, recipe=recipe)


def random_tile_mask(rng, shape, density):
    """A random ``(B, H, nq, nk)`` tile mask with at least one true tile per query tile."""
    mask = rng.random(shape) < density
    first_choice = rng.integers(0, shape[-1], size=shape[:-1])
    np.put_along_axis(mask, first_choice[..., None], True, axis=-1)
    return mask


RULE_THRESHOLDS = {
    "blasst": st.floats(1e-6, 1.0),
    "cef": st.floats(-14.0, 0.0),
    "recall": st.floats(0.5, 1.0),
    "recall_exact": st.floats(0.5, 1.0),
}
"""Threshold strategy of each skip rule, by the rule names of :func:`make_rule`."""

skip_rules_params = st.one_of(
    *(st.tuples(st.just(name), thresholds) for name, thresholds in RULE_THRESHOLDS.items()))
"""``(name, threshold)`` of a skip rule; build it with :func:`make_rule`."""


def make_rule(name, threshold):
    import pysparse_attn as psa

    if name == "blasst":
        return psa.Blasst(threshold)
    if name == "cef":
        return psa.Cef(threshold)
    if name == "recall":
        return psa.Recall(threshold)
    if name == "recall_exact":
        return psa.Recall(threshold, exact=True)
    raise AssertionError(name)


# Tolerances (rtol, atol) for comparing a result with the float64 oracle, keyed by the dtype
# of the result. Values of O are convex combinations of unit-variance v, so |O| <= ~4.
TOLERANCES = {
    # Two float64 evaluations that differ only in summation order (online softmax vs one pass):
    # rounding grows like N * 2**-52 ~ 5e-14 for N <= 200; 1e-10 leaves a wide margin.
    "float64": (1e-10, 1e-10),
    # float32 accumulation over <= 200 keys: ~sqrt(N) * 2**-24 * |logit| ~ 1e-5, plus the cast.
    "float32": (3e-5, 3e-5),
    # The result is rounded once to the output dtype (half an ulp, 2**-11), twice for margin,
    # times the magnitude of O.
    "float16": (2e-3, 4e-3),
    # Same for bfloat16 (8-bit significand, ulp 2**-7).
    "bfloat16": (1.6e-2, 3.2e-2),
}


class _PoisonedNumPy:
    """NumPy, except that ``empty`` and ``empty_like`` return poisoned memory: NaN for floats,
    the largest value for integers, True for bools. Anything the library allocates uninitialised
    and forgets to write then shows up in its results."""

    __name__ = "numpy"

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def _poison(array):
        if array.dtype.kind == "f":
            array.fill(np.nan)
        elif array.dtype.kind in "iu":
            array.fill(np.iinfo(array.dtype).max)
        elif array.dtype.kind == "b":
            array.fill(True)
        return array

    def empty(self, *args, **kwargs):
        return self._poison(np.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(np.empty_like(*args, **kwargs))


@contextmanager
def poisoned_allocations():
    """Within the block, the reference backend and the plan builder allocate poisoned memory."""
    import pysparse_attn._arrays
    import pysparse_attn._reference

    poisoned = _PoisonedNumPy()
    modules = (pysparse_attn._reference, pysparse_attn._arrays)
    saved = [module.np for module in modules]
    try:
        for module in modules:
            module.np = poisoned
        yield
    finally:
        for module, original in zip(modules, saved):
            module.np = original
