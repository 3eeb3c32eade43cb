"""Static-shape building blocks shared by the reduction methods.

Every selection is a `lax.top_k` over scores with invalid entries ranked
last, ties broken by the lowest index, followed by a sorted gather: one
compiled program serves every input.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.kernels import ops
from vtr_jax.seams import splice, take  # noqa: F401  (the sequence edits, shared with the models)

Array = jax.Array
NEG = -jnp.inf


def topk_indices(scores: Array, k: int, valid: Array | None = None, *, sort: bool = True) -> Array:
  """Indices of the k best scores per row.

  Args:
    scores: float[B, N] (NaN counts as the worst score).
    k: static count, 1 <= k <= N.
    valid: bool[B, N]; invalid entries are chosen only after every valid one.
    sort: return indices in ascending (original) order, else in score order.
  Returns:
    int32[B, k]. Ties resolve to the lowest index (lax.top_k's rule).
  """
  s = jnp.where(jnp.isnan(scores), NEG, scores.astype(jnp.float32))
  if valid is not None:  # valid entries (even at -inf) always outrank invalid ones
    s = jnp.where(valid, jnp.maximum(s, jnp.finfo(jnp.float32).min), NEG)
  _, idx = jax.lax.top_k(s, k)
  idx = idx.astype(jnp.int32)
  return jnp.sort(idx, axis=-1) if sort else idx


def chosen_mask(idx: Array, n: int) -> Array:
  """bool[B, n]: True where an index in idx (int[B, k]) points."""
  return jnp.zeros((idx.shape[0], n), bool).at[jnp.arange(idx.shape[0])[:, None], idx].set(True)


def complement(idx: Array, n: int) -> Array:
  """The n - k indices not in idx, ascending: int32[B, n - k]."""
  mask = chosen_mask(idx, n)
  order = jnp.argsort(mask, axis=1, stable=True)  # unchosen first, each group ascending
  return order[:, : n - idx.shape[1]].astype(jnp.int32)


def scatter_merge(dst_x: Array, dst_w: Array, src_x: Array, src_w: Array, assign: Array) -> Array:
  """Weighted average of each destination with the sources assigned to it.

  out[b, m] = (dst_w[b, m] dst_x[b, m] + sum_{n: assign[b, n] = m} src_w[b, n] src_x[b, n])
              / (dst_w[b, m] + sum_{n: assign[b, n] = m} src_w[b, n])

  Args:
    dst_x: float[B, M, D]; dst_w: float[B, M].
    src_x: float[B, N, D]; src_w: float[B, N] (0 for sources that must not count).
    assign: int32[B, N] destination index of each source.
  Returns:
    float[B, M, D] (a destination with zero total weight keeps dst_x).
  """
  num, den = scatter_sum(src_x * src_w[..., None], src_w, assign, dst_x.shape[1])
  num = num + dst_x.astype(jnp.float32) * dst_w[..., None]
  den = den + dst_w
  out = num / jnp.where(den > 0, den, 1.0)[..., None]
  return jnp.where((den > 0)[..., None], out, dst_x).astype(dst_x.dtype)


def scatter_sum(src_x: Array, src_w: Array, assign: Array, m: int) -> tuple[Array, Array]:
  """Per destination: (sum of src_x float32[B, M, D], sum of src_w float32[B, M])."""
  b = src_x.shape[0]
  rows = jnp.arange(b)[:, None]
  num = jnp.zeros((b, m, src_x.shape[-1]), jnp.float32).at[rows, assign].add(src_x.astype(jnp.float32))
  den = jnp.zeros((b, m), jnp.float32).at[rows, assign].add(src_w.astype(jnp.float32))
  return num, den


def grid_windows(grid: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
  """Average-pooling windows (size and stride s) over a g x g grid in raster order.

  The pooled grid is ceil(g/s) x ceil(g/s); windows at the border cover only
  the cells inside the grid.

  Returns:
    (window int32[g*g]: the pooled cell of each grid cell, raster order;
     first int32[M]: each pooled cell's top-left grid cell), M = ceil(g/s)^2.
  """
  side = math.ceil(grid / stride)
  cells = np.arange(grid * grid)
  window = (cells // grid // stride) * side + (cells % grid) // stride
  first = np.array([np.min(np.nonzero(window == j)[0]) for j in range(side * side)])
  return window.astype(np.int32), first.astype(np.int32)


def window_mean(x: Array, weight: Array, window: np.ndarray, m: int) -> tuple[Array, Array]:
  """Weighted mean of x over static windows.

  Args:
    x: float[B, N, D]; weight: float[B, N] (0 leaves a token out).
    window: int[N] the window of each token; m: number of windows.
  Returns:
    (mean float[B, m, D] in x's dtype (0 where a window has no weight),
     total weight float32[B, m]).
  """
  assign = jnp.broadcast_to(jnp.asarray(window, jnp.int32), weight.shape)
  num, den = scatter_sum(x * weight[..., None], weight, assign, m)
  return (num / jnp.where(den > 0, den, 1.0)[..., None]).astype(x.dtype), den


def nearest_centre(x: Array, centres: Array, *, metric: str = "cosine", centre_valid: Array | None = None):
  """Each row of x joins its most similar centre: (index int32[B, N], similarity float32[B, N])."""
  sim, idx = ops.max_similarity(x, centres, metric=metric, mode="max", y_valid=centre_valid)
  return idx, sim


def greedy_max_min(dist: Array, k: int, valid: Array | None = None) -> Array:
  """Greedy max-min (farthest-point) selection over a distance matrix.

  First the token whose nearest other token is farthest; then, repeatedly,
  the token whose minimum distance to the chosen set is largest (a running
  minimum vector, O(k N)). A token is never picked twice, whatever the
  diagonal holds; invalid tokens are picked only when no valid one is left.

  Args:
    dist: float[B, N, N] symmetric distances.
    k: static count.
    valid: bool[B, N].
  Returns:
    int32[B, k] in selection order.
  """
  b, n, _ = dist.shape
  dist = dist.astype(jnp.float32)
  valid = jnp.ones((b, n), bool) if valid is None else valid
  eye = jnp.eye(n, dtype=bool)[None]
  pair_ok = valid[:, None, :] & ~eye
  nearest = jnp.min(jnp.where(pair_ok, dist, jnp.inf), axis=2)  # [B, N] distance to nearest other
  nearest = jnp.where(jnp.isinf(nearest), jnp.finfo(jnp.float32).max, nearest)  # a lone valid token
  first = _argmax_valid(nearest, valid, jnp.zeros((b, n), bool))
  rows = jnp.arange(b)

  def body(i, carry):
    chosen, running, out = carry
    pick = _argmax_valid(running, valid, chosen)
    out = out.at[:, i].set(pick)
    chosen = chosen.at[rows, pick].set(True)
    running = jnp.minimum(running, dist[rows, pick])
    return chosen, running, out

  chosen = jnp.zeros((b, n), bool).at[rows, first].set(True)
  out = jnp.zeros((b, k), jnp.int32).at[:, 0].set(first)
  running = dist[rows, first]
  _, _, out = jax.lax.fori_loop(1, k, body, (chosen, running, out))
  return out


def _argmax_valid(score: Array, valid: Array, chosen: Array) -> Array:
  """argmax over unchosen entries, valid ones before invalid ones, lowest index on ties."""
  tier = jnp.where(chosen, 0, jnp.where(valid, 2, 1))
  best_tier = jnp.max(tier, axis=1, keepdims=True)
  s = jnp.where(tier == best_tier, jnp.where(jnp.isnan(score), -jnp.inf, score), -jnp.inf)
  # all candidates could be -inf: fall back to the first index of the best tier
  fallback = jnp.argmax(tier == best_tier, axis=1)
  idx = jnp.argmax(s, axis=1)
  ok = jnp.any(s > -jnp.inf, axis=1)
  return jnp.where(ok, idx, fallback).astype(jnp.int32)


def fingerprint(x: Array) -> Array:
  """uint32[B]: an exact integer hash of each sample's bits (same alone or in a batch)."""
  b = x.shape[0]
  flat = x.reshape(b, -1)
  if flat.dtype.itemsize != 4:
    flat = flat.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(flat, jnp.uint32)
  mult = (jnp.arange(bits.shape[1], dtype=jnp.uint32) * 2 + 1) * jnp.uint32(2654435761)
  return jnp.sum(bits * mult, axis=1, dtype=jnp.uint32)  # integer arithmetic: exact in any order


def sample_keys(seed: int, fingerprints: Array) -> Array:
  """One PRNG key per sample from a seed and the sample's fingerprint (uint32[B]).

  Keys depend on a sample's content only (never its batch position), so
  seeded random methods give the same result for a sample alone or in a batch.
  """
  base = jax.random.key(seed)
  return jax.vmap(lambda f: jax.random.fold_in(base, f))(fingerprints)
