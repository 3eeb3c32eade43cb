"""Attention mass: the softmax attention each key receives from a set of query rows.

For query rows Q (last prompt token, SparseVLM raters, a CLS token, all text)
against keys K with grouped-query heads, returns the softmax attention every
key receives, averaged over heads and over the valid rows. Used by FastV,
PyramidDrop, SparseVLM, FasterVLM / VTC-CLS (the CLS row) and received-
attention scoring. The reference materialises [B, N, R, S]; the kernel
computes it flash-style without doing so.

Semantics: logits = q . k * scale (scale defaults to 1/sqrt(H)); key s is
visible to row r when key_valid[b, s] and (if causal) s <= q_slots[b, r]; each
row's softmax runs over its visible keys only; rows with row_valid False or
with no visible key contribute nothing; the mean is over heads and over the
rows that contribute (all zeros when none does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mass_reference(q: jax.Array, k: jax.Array, *, key_valid: jax.Array | None = None,
                             row_valid: jax.Array | None = None, q_slots: jax.Array | None = None,
                             scale: float | None = None) -> jax.Array:
  """Mean softmax attention per key.

  Args:
    q: float[B, N, R, H] query rows (N heads).
    k: float[B, K, S, H] keys (K kv heads, N % K == 0).
    key_valid: bool[B, S]. row_valid: bool[B, R].
    q_slots: int32[B, R] sequence slot of each row; given -> causal masking.
    scale: logit scale (default H ** -0.5).
  Returns:
    float32[B, S].
  """
  b, n, r, h = q.shape
  kh, s = k.shape[1], k.shape[2]
  if n % kh:
    raise ValueError(f"query heads {n} must be a multiple of kv heads {kh}")
  scale = h ** -0.5 if scale is None else scale
  qg = q.astype(jnp.float32).reshape(b, kh, n // kh, r, h)  # [B, N, R, H] -> [B, K, G, R, H]
  logits = jnp.einsum("bkgrh,bksh->bkgrs", qg, k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * scale
  visible = jnp.ones((b, r, s), bool)
  if key_valid is not None:
    visible = visible & key_valid[:, None, :]
  if q_slots is not None:
    visible = visible & (jnp.arange(s)[None, None, :] <= q_slots[:, :, None])
  if row_valid is not None:
    visible = visible & row_valid[:, :, None]
  mask = visible[:, None, None]  # [B, 1, 1, R, S]
  logits = jnp.where(mask, logits, -jnp.inf)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  probs = e / jnp.where(denom > 0, denom, 1.0)  # [B, K, G, R, S]
  rows = jnp.any(visible, axis=-1)  # [B, R] rows that contribute
  total = jnp.sum(probs, axis=(1, 2, 3))  # [B, S]
  count = jnp.sum(rows, axis=-1).astype(jnp.float32) * n  # heads x contributing rows
  return total / jnp.where(count > 0, count, 1.0)[:, None]
