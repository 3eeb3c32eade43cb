"""Streaming top-k neighbours: per row of X, the k most similar rows of Y and their scores.

Used by PruMerge's key-nearest-neighbour merge and DPC-KNN densities. The
reference materialises [B, N, M] and calls `lax.top_k`.

Semantics: metric as in `similarity.py`; results in descending score order,
ties by lowest index; invalid Y columns rank below every valid one (their
score is the float32 minimum); k must not exceed M.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vtr_jax.kernels.similarity import pairwise


def topk_similarity_reference(x: jax.Array, y: jax.Array, k: int, *, metric: str = "cosine",
                              y_valid: jax.Array | None = None):
  """float[B, N, D], float[B, M, D] -> (values float32[B, N, k], index int32[B, N, k])."""
  if not 0 < k <= y.shape[1]:
    raise ValueError(f"k={k} must be in 1..{y.shape[1]} (the number of rows of y)")
  s = pairwise(x, y, metric)
  if y_valid is not None:
    s = jnp.where(y_valid[:, None, :], s, jnp.finfo(jnp.float32).min)
  values, index = jax.lax.top_k(s, k)
  return values, index.astype(jnp.int32)
