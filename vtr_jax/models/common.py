"""Building blocks shared by the vision tower and the decoder.

Einsum letters used in this package (as in big_vision's gemma.py):
  B batch, T query length, S key/value length, N query heads, K kv heads,
  G query heads per kv head (N = K * G), H head dim, D model dim, F mlp dim.

Logical axis names live in `vtr_jax.axes` (re-exported here for the model
files); every parameter is created through `param_axes`, so `vtr_jax.sharding`
can map names to mesh axes from a config. Attention itself (every
implementation, and the reference einsum) is `vtr_jax.models.attention`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vtr_jax import sharding
from vtr_jax.axes import (ACT_BATCH, ACT_EMBED, ACT_HEADS, ACT_LENGTH, ACT_VOCAB, CHANNELS, EMBED, HEAD_DIM,  # noqa: F401
                          HEADS, KV_HEADS, MLP, NORM, PATCH, POSITIONS, VOCAB)


def param_axes(init: Callable, axes: Sequence[str]) -> Callable:
  """An initializer whose parameter carries logical axis names `axes`."""
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint by logical names (no-op outside a mesh with `vtr_jax.sharding` rules)."""
  return sharding.constrain(x, axes)


def dense_init(scale: float = 0.02) -> Callable:
  return nn.initializers.normal(stddev=scale)


def masked_softmax(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Softmax over the last axis in float32; masked entries get exactly 0.

  A fully masked row yields all zeros (never NaN).
  """
  logits = logits.astype(jnp.float32)
  if mask is None:
    return jax.nn.softmax(logits, axis=-1)
  big_neg = jnp.finfo(jnp.float32).min
  logits = jnp.where(mask, logits, big_neg)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.where(mask, jnp.exp(logits - jax.lax.stop_gradient(peak)), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(denom > 0, denom, 1.0)


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """Scaled logits with grouped-query heads.

  Args:
    q: float[B, T, N, H] queries.
    k: float[B, S, K, H] keys, N % K == 0.
  Returns:
    float32[B, N, T, S], scaled by 1/sqrt(H).
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, N, H] -> [B, T, K, G, H]
  logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (h ** -0.5)
  return logits.reshape(b, n, t, logits.shape[-1])  # [B, K, G, T, S] -> [B, N, T, S]
