"""A small, readable float64 oracle written independently of the library.

Nothing here imports ``pysparse_attn``: these functions restate docs/design.rst in the plainest NumPy
so that the library's reference can be checked against something it does not share code with.
Everything works on canonical ``(B, H, N, D)`` arrays; key/value heads are repeated for GQA.
"""

from __future__ import annotations

import math

import numpy as np


def n_tiles(n, size):
    return -(-n // size)


def tile_ranges(n, size):
    """``[(start, stop), ...]`` of the tiles of ``size`` covering ``n`` items."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def expand_kv(x, query_heads):
    """Repeat key/value heads so that query head ``h`` reads kv head ``h // group``."""
    return np.repeat(np.asarray(x, dtype=np.float64), query_heads // x.shape[1], axis=1)


def element_mask(tile_mask, n_queries, n_keys, block):
    """``(B, H, Nq, Nk)`` bool mask of a ``(B, H, nq, nk)`` tile mask."""
    tile_mask = np.asarray(tile_mask, dtype=bool)
    rows = np.repeat(tile_mask, block[0], axis=2)[:, :, :n_queries]
    return np.repeat(rows, block[1], axis=3)[:, :, :, :n_keys]


def logits(q, k, scale=None):
    """Scaled logits ``(B, H, Nq, Nk)`` in float64."""
    q = np.asarray(q, dtype=np.float64)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return scale * np.einsum("bhid,bhjd->bhij", q, expand_kv(k, q.shape[1]))


def attention_ref(q, k, v, scale=None, tile_mask=None, block=None):
    """Exact ``softmax(scale Q K^T) V`` in float64, optionally over the keys of a tile mask.

    Returns ``(out, lse)`` with ``out (B, H, Nq, D)`` and ``lse (B, H, Nq)``. Rows with no
    allowed key are NaN.
    """
    s = logits(q, k, scale)
    if tile_mask is not None:
        s = np.where(element_mask(tile_mask, s.shape[2], s.shape[3], block), s, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        row_max = s.max(axis=-1, keepdims=True)
        weights = np.exp(s - row_max)
        total = weights.sum(axis=-1, keepdims=True)
        out = np.einsum("bhij,bhjd->bhid", weights / total, expand_kv(v, s.shape[1]))
        lse = (row_max + np.log(total))[..., 0]
    return out, lse


def softmax_probabilities(q, k, scale=None):
    s = logits(q, k, scale)
    weights = np.exp(s - s.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def recall_ref(q, k, tile_mask, block, scale=None):
    """Share of each row's softmax mass in the tiles of ``tile_mask``: ``(B, H, Nq)``."""
    p = softmax_probabilities(q, k, scale)
    mask = element_mask(tile_mask, p.shape[2], p.shape[3], block)
    return (p * mask).sum(axis=-1)


def mass_share(q, k, part, whole, block, scale=None):
    """Share of the softmax mass over the tiles ``whole`` that lies in the tiles ``part``.

    Both sums are taken relative to the largest logit of ``whole``, so the share stays exact
    even when ``whole`` holds a vanishing fraction of the full row.
    """
    s = logits(q, k, scale)
    inside_whole = element_mask(whole, s.shape[2], s.shape[3], block)
    inside_part = element_mask(part, s.shape[2], s.shape[3], block) & inside_whole
    s_whole = np.where(inside_whole, s, -np.inf)
    weights = np.exp(s_whole - s_whole.max(axis=-1, keepdims=True))
    return (weights * inside_part).sum(axis=-1) / weights.sum(axis=-1)


def block_scores_ref(q, k, block, scale=None):
    """docs/design.rst section 3, tile by tile: ``scale * qbar_I . (kbar_J - mean_J kbar_J)``."""
    q = np.asarray(q, dtype=np.float64)
    k = expand_kv(k, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qbar = np.stack([q[:, :, a:b].mean(axis=2) for a, b in tile_ranges(q.shape[2], block[0])],
                    axis=2)
    kbar = np.stack([k[:, :, a:b].mean(axis=2) for a, b in tile_ranges(k.shape[2], block[1])],
                    axis=2)
    kbar_centred = kbar - kbar.mean(axis=2, keepdims=True)
    return scale * np.einsum("bhid,bhjd->bhij", qbar, kbar_centred)


def descending(scores_row):
    """Tile indices by descending score, ties to the lower index."""
    return sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], j))


def visit_order_ref(scores_row, kept_tiles, order, peak=4):
    """docs/design.rst section 4's visit order of the tiles ``kept_tiles`` of one query tile."""
    kept_tiles = set(int(j) for j in kept_tiles)
    if order == "natural":
        return sorted(kept_tiles)
    by_score = [j for j in descending(scores_row) if j in kept_tiles]
    if order == "score":
        return by_score
    head, tail = by_score[:peak], by_score[peak:]
    return head + tail[::-1]


# ---------------------------------------------------------------------------------------------
# Replay of in-loop skip decisions


def rule_margins(name, threshold, tile_max, m, l, u, added):
    """Per-row margin of a skip rule: ``>= 0`` (Recall) / ``> 0`` (others) allows a skip.

    Blasst and Cef margins are in logit units; the Recall margin is relative to the sizes
    of the two sides so that one tolerance fits every scale.
    """
    if name == "blasst":
        return math.log(threshold) - (tile_max - m)
    if name == "cef":
        return threshold - (tile_max - (m + np.log(l)))
    allowed = (1.0 - threshold) / threshold * l
    spent = u + added
    size = np.maximum(allowed + spent, np.finfo(np.float64).tiny)
    with np.errstate(invalid="ignore"):
        relative = (allowed - spent) / size
    # A tile whose logits exceed the running max by > 709 overflows the bound: never skippable.
    return np.where(np.isinf(spent), -1.0, relative)


def replay_skip_decisions(q, k, visit_lists, kept, rule_name, threshold, block, scale=None,
                          tol=1e-9):
    """Replay the online-softmax state along each visit list and judge every decision.

    The state (m, l and the skipped-mass bound u) follows the decisions of ``kept``; for each
    visited tile after the first, a skipped tile must be allowed by the rule for every valid row,
    and a kept tile must be refused by at least one row, each within ``tol``.

    Parameters
    ----------
    visit_lists : nested list ``[b][h][I]`` of tile-index lists, in visit order.
    kept : bool array ``(B, H, nq, nk)``.
    rule_name : ``"blasst"``, ``"cef"``, ``"recall"`` or ``"recall_exact"``.

    Returns
    -------
    problems : list of str
        One line per wrong decision (empty when every decision obeys the rule).
    skipped : int
        Number of tiles skipped in the loop (to tell a vacuous replay from a real one).
    """
    s_all = logits(q, k, scale)
    B, H, Nq, Nk = s_all.shape
    problems, skipped = [], 0
    for b in range(B):
        for h in range(H):
            for tile_q, (r0, r1) in enumerate(tile_ranges(Nq, block[0])):
                order = visit_lists[b][h][tile_q]
                m = np.full(r1 - r0, -np.inf)
                l = np.zeros(r1 - r0)
                u = np.zeros(r1 - r0)
                for position, tile_k in enumerate(order):
                    c0, c1 = tile_k * block[1], min((tile_k + 1) * block[1], Nk)
                    s = s_all[b, h, r0:r1, c0:c1]
                    tile_max = s.max(axis=1)
                    where = f"(b={b}, h={h}, I={tile_q}, J={tile_k}, position {position})"
                    if position == 0:
                        if not kept[b, h, tile_q, tile_k]:
                            problems.append(f"first visited tile skipped {where}")
                    else:
                        with np.errstate(over="ignore"):
                            if rule_name == "recall_exact":
                                added = np.exp(s - m[:, None]).sum(axis=1)
                            else:
                                added = (c1 - c0) * np.exp(tile_max - m)
                        margin = rule_margins(rule_name, threshold, tile_max, m, l, u, added)
                        if np.isnan(margin).any():
                            problems.append(f"replay produced NaN margins {where}")
                        worst = float(margin.min())
                        if not kept[b, h, tile_q, tile_k]:
                            skipped += 1
                            if worst < -tol:
                                problems.append(f"skipped against the rule {where}: "
                                                f"worst row margin {worst:.3e}")
                            u = u + added
                            continue
                        # Every rule keeps a tile when some row refuses; a kept tile whose
                        # worst row still clears the threshold by tol is a wrong decision.
                        if worst > tol:
                            problems.append(f"kept although every row may skip {where}: "
                                            f"worst row margin {worst:.3e}")
                    new_m = np.maximum(m, tile_max)
                    rescale = np.exp(m - new_m)
                    l = l * rescale + np.exp(s - new_m[:, None]).sum(axis=1)
                    u = u * rescale
                    m = new_m
    return problems, skipped


# ---------------------------------------------------------------------------------------------
# SLA linear branch, straight from the definition


def feature_map_ref(x, name):
    x = np.asarray(x, dtype=np.float64)
    if name == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if name == "elu1":
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    if name == "relu":
        return np.maximum(x, 0.0)
    raise AssertionError(name)


def linear_branch_ref(q, k, v, marginal, block, feature_map="softmax", eps=0.0):
    """``O_l`` of docs/design.rst section 6 by the direct sum over each query tile's marginal keys.

    For query tile I: ``H = phi(K_M)^T V_M`` and ``Z = phi(K_M)^T 1`` over the keys ``M`` of its
    marginal tiles; ``O_l,i = phi(q_i) H / (phi(q_i) . Z + eps)``; rows are zero when the tile
    has no marginal key or the denominator is exactly zero.
    """
    q = np.asarray(q, dtype=np.float64)
    B, H, Nq, D = q.shape
    k, v = expand_kv(k, H), expand_kv(v, H)
    Nk = k.shape[2]
    key_tiles = tile_ranges(Nk, block[1])
    out = np.zeros((B, H, Nq, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            for tile_q, (r0, r1) in enumerate(tile_ranges(Nq, block[0])):
                keys = [j for J, (c0, c1) in enumerate(key_tiles)
                        if marginal[b, h, tile_q, J] for j in range(c0, c1)]
                if not keys:
                    continue
                phi_k = feature_map_ref(k[b, h, keys], feature_map)
                state = phi_k.T @ v[b, h, keys]
                normaliser = phi_k.sum(axis=0)
                phi_q = feature_map_ref(q[b, h, r0:r1], feature_map)
                denominator = phi_q @ normaliser + eps
                nonzero = denominator != 0.0
                rows = np.zeros((r1 - r0, v.shape[-1]))
                rows[nonzero] = (phi_q[nonzero] @ state) / denominator[nonzero, None]
                out[b, h, r0:r1] = rows
    return out


def linear_branch_total_minus_rest_ref(q, k, v, marginal, block, feature_map="softmax",
                                       eps=0.0):
    """The same ``O_l`` with ``H`` and ``Z`` formed as all keys minus the non-marginal tiles."""
    q = np.asarray(q, dtype=np.float64)
    B, H, Nq, D = q.shape
    k, v = expand_kv(k, H), expand_kv(v, H)
    key_tiles = tile_ranges(k.shape[2], block[1])
    out = np.zeros((B, H, Nq, v.shape[-1]))
    for b in range(B):
        for h in range(H):
            phi_all = feature_map_ref(k[b, h], feature_map)
            state_all, normaliser_all = phi_all.T @ v[b, h], phi_all.sum(axis=0)
            for tile_q, (r0, r1) in enumerate(tile_ranges(Nq, block[0])):
                if not np.any(marginal[b, h, tile_q]):
                    continue
                state, normaliser = state_all.copy(), normaliser_all.copy()
                for J, (c0, c1) in enumerate(key_tiles):
                    if not marginal[b, h, tile_q, J]:
                        state -= phi_all[c0:c1].T @ v[b, h, c0:c1]
                        normaliser -= phi_all[c0:c1].sum(axis=0)
                phi_q = feature_map_ref(q[b, h, r0:r1], feature_map)
                denominator = phi_q @ normaliser + eps
                nonzero = denominator != 0.0
                rows = np.zeros((r1 - r0, v.shape[-1]))
                rows[nonzero] = (phi_q[nonzero] @ state) / denominator[nonzero, None]
                out[b, h, r0:r1] = rows
    return out


def linear_denominators(q, k, marginal, block, feature_map="softmax"):
    """Per row: ``phi(q_i) . Z_I`` over the marginal keys, and over all keys.

    The ratio tells how much cancellation "total minus the rest" suffers on that row.
    """
    q = np.asarray(q, dtype=np.float64)
    B, H, Nq, D = q.shape
    phi_q = feature_map_ref(q, feature_map)
    phi_k = feature_map_ref(expand_kv(k, H), feature_map)
    key_tiles = element_mask(marginal, Nq, phi_k.shape[2], block)  # (B, H, Nq, Nk)
    per_key = np.einsum("bhid,bhjd->bhij", phi_q, phi_k)
    return (per_key * key_tiles).sum(axis=-1), per_key.sum(axis=-1)
