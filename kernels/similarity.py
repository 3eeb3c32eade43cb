"""Fused similarity reduction: per row of X, the best (max or min) similarity over Y and its index.

Used by ToMe's bipartite matching, VisionZip's nearest-target assignment and
DART-style duplicate checks. The reference below materialises [B, N, M]; the
Pallas kernel (same module, when present) streams Y in blocks and never does.

Semantics shared by every implementation:
  - metric `cosine` (rows L2-normalised, zero rows give similarity 0), `dot`,
    or `neg_sq_euclidean` (-|x - y|^2);
  - invalid Y columns never win; a row whose Y is fully masked gets the fill
    value (float32 min for `max`, max for `min`) and index 0;
  - ties resolve to the lowest index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METRICS = ("cosine", "dot", "neg_sq_euclidean")


def pairwise(x: jax.Array, y: jax.Array, metric: str) -> jax.Array:
  """float[B, N, D], float[B, M, D] -> float32[B, N, M]."""
  if metric not in METRICS:
    raise ValueError(f"unknown similarity metric {metric!r}; known: {', '.join(METRICS)}")
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  if metric == "cosine":
    x = normalize(x)
    y = normalize(y)
  s = jnp.einsum("bnd,bmd->bnm", x, y, precision=jax.lax.Precision.HIGHEST)
  if metric == "neg_sq_euclidean":
    s = 2 * s - jnp.sum(x * x, -1)[..., None] - jnp.sum(y * y, -1)[:, None, :]
  return s


def normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm; zero rows stay zero (no NaN)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.where(norm > 0, norm, 1.0)


def max_similarity_reference(x: jax.Array, y: jax.Array, *, metric: str = "cosine", mode: str = "max",
                             x_valid: jax.Array | None = None, y_valid: jax.Array | None = None):
  """Per row of x the best similarity over y.

  Args:
    x: float[B, N, D]; y: float[B, M, D].
    metric: see module docstring. mode: `max` or `min`.
    x_valid: bool[B, N] (rows marked False get the fill value and index 0).
    y_valid: bool[B, M] (False columns never win).
  Returns:
    (values float32[B, N], index int32[B, N]).
  """
  if mode not in ("max", "min"):
    raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
  s = pairwise(x, y, metric)
  fill = jnp.finfo(jnp.float32).min if mode == "max" else jnp.finfo(jnp.float32).max
  if y_valid is not None:
    s = jnp.where(y_valid[:, None, :], s, fill)
  idx = (jnp.argmax(s, axis=-1) if mode == "max" else jnp.argmin(s, axis=-1)).astype(jnp.int32)
  val = jnp.take_along_axis(s, idx[..., None], axis=-1)[..., 0]
  has_any = jnp.ones(s.shape[:2], bool) if y_valid is None else jnp.any(y_valid, axis=-1)[:, None]
  if x_valid is not None:
    has_any = has_any & x_valid
  return jnp.where(has_any, val, fill), jnp.where(has_any, idx, 0)
