"""The float64 reference: the exact semantics every backend is checked against.

Everything here computes in float64 on NumPy arrays in canonical ``(B, H, N, D)`` form. The
in-loop skip rules need a sequential tile loop; it is one Python function that Numba compiles
when Numba is importable and that runs as plain NumPy otherwise (same code, same results).
"""

from __future__ import annotations

import math

import numpy as np

import functools

from ._plan import tile_count
from ._rules import check_rule, rule_margin

__all__ = [
    "forward",
    "tile_loop",
    "masked_attention",
    "decision_slack",
    "linear_branch",
    "feature_map_forward",
    "attention_backward",
    "linear_backward",
    "recall_of_kept",
]


def _maybe_njit(function):
    try:
        import numba
    except ImportError:  # the plain NumPy path has the same semantics, only slower
        return function
    return numba.njit(cache=True)(function)


def _tile_loop_py(q, k, v, row_offsets, row_indices, scale, block_q, block_k, margin_of,
                  can_skip, skip_at_zero, exact_mass, params, forced, out, lse, kept, visited,
                  bound, slack):
    """Online softmax over each query tile's CSR visit list with an optional skip rule.

    ``margin_of(tile_max, m, l, u, added, param)`` is the rule's margin (``_rules``) and
    ``params[h]`` its parameter for query head ``h``; the row may skip the tile when the
    smallest margin over its valid rows is positive (``>= 0`` when ``skip_at_zero``).
    ``exact_mass`` makes ``added`` the tile's exact row mass instead of the bound
    ``n_J exp(max - m)``. A query tile with no visited tile gets O = 0, LSE = -inf and recall
    bound 1.

    When ``forced`` has a nonzero size, the keep/skip decision of every visited tile is taken
    from it (a backend's reported kept set) instead of the rule, and ``slack`` receives, per
    visited tile after the first, the rule's margin in natural-log units.
    """
    n_batch, n_heads, n_q, dim = q.shape
    n_k = k.shape[2]
    group = n_heads // k.shape[1]
    n_qtiles = row_offsets.shape[2] - 1
    use_forced = forced.size > 0
    for b in range(n_batch):
        for h in range(n_heads):
            hk = h // group
            param = params[h]
            for qt in range(n_qtiles):
                r0 = qt * block_q
                r1 = min(r0 + block_q, n_q)
                rows = r1 - r0
                start = row_offsets[b, h, qt]
                count = row_offsets[b, h, qt + 1] - start
                if count == 0:
                    out[b, h, r0:r1, :] = 0.0
                    lse[b, h, r0:r1] = -np.inf
                    bound[b, h, r0:r1] = 1.0
                    continue
                qi = np.ascontiguousarray(q[b, h, r0:r1, :])
                m = np.full(rows, -np.inf)
                l = np.zeros(rows)
                u = np.zeros(rows)
                acc = np.zeros((rows, dim))
                for t in range(count):
                    kt = row_indices[b, h, start + t]
                    c0 = kt * block_k
                    c1 = min(c0 + block_k, n_k)
                    keys = c1 - c0
                    s = (qi @ np.ascontiguousarray(k[b, hk, c0:c1, :]).T) * scale
                    visited[b, h, qt, kt] = True
                    tile_max = np.empty(rows)
                    for i in range(rows):
                        tile_max[i] = s[i].max()
                    added = np.empty(rows)
                    if t > 0:
                        for i in range(rows):
                            if exact_mass:
                                added[i] = np.exp(s[i] - m[i]).sum()
                            else:
                                added[i] = keys * math.exp(tile_max[i] - m[i])
                    skip = False
                    if t > 0 and (can_skip or use_forced):
                        margin = np.inf
                        for i in range(rows):
                            margin = min(margin, margin_of(tile_max[i], m[i], l[i], u[i],
                                                           added[i], param))
                        if use_forced:
                            slack[b, h, qt, kt] = margin
                            skip = not forced[b, h, qt, kt]
                        elif skip_at_zero:
                            skip = margin >= 0.0
                        else:
                            skip = margin > 0.0
                    if skip:
                        u += added
                        continue
                    kept[b, h, qt, kt] = True
                    m_new = np.maximum(m, tile_max)
                    alpha = np.exp(m - m_new)
                    p = np.exp(s - m_new.reshape(rows, 1))
                    l = l * alpha + p.sum(axis=1)
                    u = u * alpha
                    values = np.ascontiguousarray(v[b, hk, c0:c1, :])
                    acc = acc * alpha.reshape(rows, 1) + p @ values
                    m = m_new
                out[b, h, r0:r1, :] = acc / l.reshape(rows, 1)
                lse[b, h, r0:r1] = m + np.log(l)
                bound[b, h, r0:r1] = l / (l + u)


tile_loop = _maybe_njit(_tile_loop_py)


@functools.lru_cache(maxsize=None)
def _compiled_margin(margin):
    """The rule margin as the tile loop takes it: with Numba, a C callback of one fixed
    signature, so the loop is compiled (and cached on disk) once for every rule."""
    try:
        import numba
    except ImportError:
        return margin
    real = numba.float64
    return numba.cfunc(real(real, real, real, real, real, real), cache=True)(margin)


def _f64(x):
    return np.ascontiguousarray(np.asarray(x, dtype=np.float64))


def _plan_csr(plan, shape):
    """The plan's CSR arrays as contiguous int32 host arrays, shape-checked for ``shape``."""
    B, H, nq, _ = shape
    offsets = np.ascontiguousarray(plan.row_offsets, dtype=np.int32)
    indices = np.ascontiguousarray(plan.row_indices, dtype=np.int32)
    if offsets.shape != (B, H, nq + 1) or indices.ndim != 3 or indices.shape[:2] != (B, H):
        raise ValueError(f"plan has row_offsets {offsets.shape} and row_indices "
                         f"{indices.shape}; these inputs need {(B, H, nq + 1)} and "
                         f"{(B, H)} + (capacity,)")
    return offsets, indices


def _run_tile_loop(q, k, v, plan, rule, scale, forced):
    rule = check_rule(rule)
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, H, Nq, D = q.shape
    block_q, block_k = int(plan.block[0]), int(plan.block[1])
    shape = (B, H, tile_count(Nq, block_q), tile_count(k.shape[2], block_k))
    offsets, indices = _plan_csr(plan, shape)
    params = np.zeros(H) if rule is None else rule.kernel_params(H)
    out = np.empty((B, H, Nq, D))
    lse = np.empty((B, H, Nq))
    bound = np.empty((B, H, Nq))
    kept = np.zeros(shape, dtype=np.bool_)
    visited = np.zeros(shape, dtype=np.bool_)
    slack = np.full(shape, np.nan)
    tile_loop(q, k, v, offsets, indices, float(scale), block_q, block_k,
              _compiled_margin(rule_margin(rule)), rule is not None,
              bool(rule is not None and rule.skip_at_zero),
              bool(rule is not None and rule.exact_mass), np.ascontiguousarray(params, np.float64),
              forced, out, lse, kept, visited, bound, slack)
    return out, lse, kept, visited, bound, slack


def forward(q, k, v, plan, rule, scale, want_stats=True):
    """Reference forward pass: ``(out, lse, kept, visited, recall_bound)``, all float64.

    ``rule`` is a :class:`~pysparse_attn.SkipRule` (scalar or per-head parameter) or None.
    See ``docs/internals.rst`` for the contract; stats are always computed here.
    """
    out, lse, kept, visited, bound, _ = _run_tile_loop(
        q, k, v, plan, rule, scale, np.zeros((0, 0, 0, 0), dtype=np.bool_))
    return out, lse, kept, visited, bound


def decision_slack(q, k, v, plan, kept, rule, scale):
    """Replay a plan with the decisions of ``kept`` and return each decision's rule margin.

    Returns a float64 array ``(B, H, nq, nk)``: NaN where no decision was taken (tile not
    visited, or first of its list); otherwise the rule's slack in natural-log units (positive:
    the rule allows the skip; ``Recall`` also allows it at exactly 0), with the parameter of
    each query head. A backend whose kept set is ``kept`` followed the rule within a margin
    ``eps`` iff every skipped tile has slack ``>= -eps`` and every kept tile has slack
    ``<= eps``.
    """
    forced = np.ascontiguousarray(np.asarray(kept, dtype=np.bool_))
    return _run_tile_loop(q, k, v, plan, rule, scale, forced)[5]


def _expand_tiles(tiles, n_rows, n_cols, block):
    """Element mask ``(..., n_rows, n_cols)`` of a tile mask ``(..., nq, nk)``."""
    rows = np.repeat(tiles, block[0], axis=-2)[..., :n_rows, :]
    return np.repeat(rows, block[1], axis=-1)[..., :n_cols]


def _kv_for_queries(x, n_heads):
    return np.repeat(x, n_heads // x.shape[1], axis=1)


def masked_attention(q, k, v, kept, block, scale):
    """Exact float64 attention restricted to the key tiles of ``kept`` ``(B, H, nq, nk)``.

    Returns ``(out, lse)``. This is the oracle for any backend's output given the kept set it
    reports. Rows whose query tile keeps no tile get NaN.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, H, Nq, D = q.shape
    k, v = _kv_for_queries(k, H), _kv_for_queries(v, H)
    Nk = k.shape[2]
    out = np.empty((B, H, Nq, D))
    lse = np.empty((B, H, Nq))
    kept = np.asarray(kept, dtype=bool)
    for b in range(B):
        for h in range(H):
            s = scale * (q[b, h] @ k[b, h].T)
            s = np.where(_expand_tiles(kept[b, h], Nq, Nk, block), s, -np.inf)
            m = s.max(axis=1, keepdims=True)
            with np.errstate(invalid="ignore"):
                p = np.exp(s - m)
                l = p.sum(axis=1, keepdims=True)
                out[b, h] = (p @ v[b, h]) / l
            lse[b, h] = (m + np.log(l))[:, 0]
    return out, lse


def recall_of_kept(q, k, kept, block, scale):
    """Exact share of each row's softmax mass that lies in the tiles of ``kept``."""
    q, k = _f64(q), _f64(k)
    B, H, Nq, _ = q.shape
    k = _kv_for_queries(k, H)
    Nk = k.shape[2]
    result = np.empty((B, H, Nq))
    kept = np.asarray(kept, dtype=bool)
    for b in range(B):
        for h in range(H):
            s = scale * (q[b, h] @ k[b, h].T)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            mask = _expand_tiles(kept[b, h], Nq, Nk, block)
            result[b, h] = (p * mask).sum(axis=1) / p.sum(axis=1)
    return result


# ---------------------------------------------------------------------------------------------
# SLA linear branch


FEATURE_MAPS = ("softmax", "elu1", "relu")


def feature_map_forward(x, name, xp=np):
    """phi(x) along the last axis: ``softmax``, ``elu1`` (elu + 1) or ``relu``.

    ``xp`` is the array namespace of ``x`` (NumPy here; the GPU backend passes CuPy).
    """
    if name == "softmax":
        e = xp.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if name == "elu1":
        return xp.where(x > 0, x + 1.0, xp.exp(xp.minimum(x, 0.0)))
    if name == "relu":
        return xp.maximum(x, 0.0)
    raise ValueError(f"feature_map must be 'softmax', 'elu1' or 'relu', got {name!r}")


def _feature_map_vjp(x, phi, name, d_phi):
    if name == "softmax":
        return phi * (d_phi - (d_phi * phi).sum(axis=-1, keepdims=True))
    if name == "elu1":
        return d_phi * np.where(x > 0, 1.0, phi)
    return d_phi * (x > 0)


def _per_key_tile_sums(phi_k, v, block_k):
    """Per key tile ``J``: ``phi(K_J)^T V_J`` ``(B, H, nk, D, D)`` and ``phi(K_J)^T 1``."""
    B, H, Nk, D = phi_k.shape
    nk = tile_count(Nk, block_k)
    pad = nk * block_k - Nk
    phi_k = np.pad(phi_k, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B, H, nk, block_k, D)
    v = np.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B, H, nk, block_k, -1)
    return np.einsum("bhjka,bhjkc->bhjac", phi_k, v), phi_k.sum(axis=3)


def _linear_state(q, k, v, marginal, block, feature_map, method):
    q, k, v = _f64(q), _f64(k), _f64(v)
    H = q.shape[1]
    phi_q = feature_map_forward(q, feature_map)
    phi_k = feature_map_forward(k, feature_map)
    tile_h, tile_z = _per_key_tile_sums(phi_k, v, block[1])
    tile_h, tile_z = _kv_for_queries(tile_h, H), _kv_for_queries(tile_z, H)
    marginal = np.asarray(marginal, dtype=np.float64)
    if method == "direct":
        h_sum = np.einsum("bhij,bhjac->bhiac", marginal, tile_h)
        z_sum = np.einsum("bhij,bhja->bhia", marginal, tile_z)
    elif method == "total_minus_rest":
        rest = 1.0 - marginal
        h_sum = tile_h.sum(axis=2)[:, :, None] - np.einsum("bhij,bhjac->bhiac", rest, tile_h)
        z_sum = tile_z.sum(axis=2)[:, :, None] - np.einsum("bhij,bhja->bhia", rest, tile_z)
    else:
        raise ValueError(f"method must be 'direct' or 'total_minus_rest', got {method!r}")
    return q, k, v, phi_q, phi_k, h_sum, z_sum


def _rows_of_tiles(x, n_rows, block_q):
    """Broadcast per-query-tile values ``(B, H, nq, ...)`` to rows ``(B, H, n_rows, ...)``."""
    return np.repeat(x, block_q, axis=2)[:, :, :n_rows]


def linear_branch(q, k, v, marginal, block, feature_map="softmax", eps=0.0,
                  method="direct"):
    """SLA linear branch ``O_l = phi(q) H_I / (phi(q) . Z_I + eps)`` in float64.

    ``method="total_minus_rest"`` forms ``H_I`` and ``Z_I`` as the all-tiles sum minus the
    non-marginal tiles; ``"direct"`` sums the marginal tiles. Rows of query tiles with no
    marginal tile, or whose denominator is exactly zero, are zero.
    """
    q, _, _, phi_q, _, h_sum, z_sum = _linear_state(q, k, v, marginal, block, feature_map, method)
    Nq = q.shape[2]
    h_rows = _rows_of_tiles(h_sum, Nq, block[0])
    z_rows = _rows_of_tiles(z_sum, Nq, block[0])
    numerator = np.einsum("bhia,bhiac->bhic", phi_q, h_rows)
    denominator = np.einsum("bhia,bhia->bhi", phi_q, z_rows) + eps
    has_marginal = _rows_of_tiles(np.asarray(marginal).any(axis=-1), Nq, block[0])
    usable = has_marginal & (denominator != 0.0)
    safe = np.where(usable, denominator, 1.0)
    return np.where(usable[..., None], numerator / safe[..., None], 0.0)


# ---------------------------------------------------------------------------------------------
# Gradients (plan and kept set held fixed)


def _sum_groups(x, n_kv_heads):
    B, H = x.shape[:2]
    return x.reshape(B, n_kv_heads, H // n_kv_heads, *x.shape[2:]).sum(axis=2)


def attention_backward(q, k, v, do, kept, block, scale):
    """Gradients ``(dq, dk, dv)`` of attention restricted to the tiles of ``kept``, float64."""
    q, k, v, do = _f64(q), _f64(k), _f64(v), _f64(do)
    B, H, Nq, D = q.shape
    Hkv = k.shape[1]
    kq, vq = _kv_for_queries(k, H), _kv_for_queries(v, H)
    Nk = k.shape[2]
    dq = np.empty_like(q)
    dk = np.empty((B, H, Nk, D))
    dv = np.empty((B, H, Nk, D))
    kept = np.asarray(kept, dtype=bool)
    for b in range(B):
        for h in range(H):
            s = scale * (q[b, h] @ kq[b, h].T)
            s = np.where(_expand_tiles(kept[b, h], Nq, Nk, block), s, -np.inf)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            out = p @ vq[b, h]
            dp = do[b, h] @ vq[b, h].T
            ds = p * (dp - (do[b, h] * out).sum(axis=1, keepdims=True))
            dq[b, h] = scale * (ds @ kq[b, h])
            dk[b, h] = scale * (ds.T @ q[b, h])
            dv[b, h] = p.T @ do[b, h]
    return dq, _sum_groups(dk, Hkv), _sum_groups(dv, Hkv)


def linear_backward(q, k, v, marginal, block, feature_map, eps, d_linear):
    """Gradients ``(dq, dk, dv)`` of :func:`linear_branch` given ``dL/dO_l``, float64."""
    q, k, v, phi_q, phi_k, h_sum, z_sum = _linear_state(
        q, k, v, marginal, block, feature_map, "direct")
    g = _f64(d_linear)
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    block_q, block_k = block
    h_rows = _rows_of_tiles(h_sum, Nq, block_q)
    z_rows = _rows_of_tiles(z_sum, Nq, block_q)
    numerator = np.einsum("bhia,bhiac->bhic", phi_q, h_rows)
    denominator = np.einsum("bhia,bhia->bhi", phi_q, z_rows) + eps
    has_marginal = _rows_of_tiles(np.asarray(marginal).any(axis=-1), Nq, block_q)
    usable = has_marginal & (denominator != 0.0)
    safe = np.where(usable, denominator, 1.0)
    out = numerator / safe[..., None]
    d_num = np.where(usable[..., None], g / safe[..., None], 0.0)
    d_den = np.where(usable, -(g * out).sum(axis=-1) / safe, 0.0)
    d_phi_q = np.einsum("bhiac,bhic->bhia", h_rows, d_num) + z_rows * d_den[..., None]
    dq = _feature_map_vjp(q, phi_q, feature_map, d_phi_q)

    # Per query tile, dH_I and dZ_I; each marginal key tile J receives the sum over I.
    nq = tile_count(Nq, block_q)
    pad = nq * block_q - Nq
    tiles = lambda x: np.pad(x, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 3)) \
        .reshape(B, H, nq, block_q, *x.shape[3:])
    d_h_tiles = np.einsum("bhira,bhirc->bhiac", tiles(phi_q), tiles(d_num))
    d_z_tiles = np.einsum("bhira,bhir->bhia", tiles(phi_q), tiles(d_den))
    marginal = np.asarray(marginal, dtype=np.float64)
    d_h_keys = _sum_groups(np.einsum("bhij,bhiac->bhjac", marginal, d_h_tiles), Hkv)
    d_z_keys = _sum_groups(np.einsum("bhij,bhia->bhja", marginal, d_z_tiles), Hkv)
    d_h_rows = _rows_of_tiles(d_h_keys, Nk, block_k)
    d_z_rows = _rows_of_tiles(d_z_keys, Nk, block_k)
    d_phi_k = np.einsum("bhjac,bhjc->bhja", d_h_rows, v) + d_z_rows
    dv = np.einsum("bhja,bhjac->bhjc", phi_k, d_h_rows)
    dk = _feature_map_vjp(k, phi_k, feature_map, d_phi_k)
    return dq, dk, dv
