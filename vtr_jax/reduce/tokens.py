"""The token pytree every reduction method consumes and returns."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class Tokens:
  """Visual tokens on their way to the language model.

  Attributes:
    x: float[B, N, D] features.
    positions: int32[B, N] index of the (first) original patch a token stands
      for, in raster order of the tower's grid (0..P-1; the class token, when
      kept, is -1 and goes first). The decoder's RoPE ids derive from these
      under the `keep` position policy.
    valid: bool[B, N] False for slots a data-dependent rule left empty
      (attention ignores them).
    size: float32[B, N] how many original patches a token stands for.
  """
  x: Array
  positions: Array
  valid: Array
  size: Array

  @property
  def count(self) -> int:
    return self.x.shape[1]

  @classmethod
  def full(cls, x: Array, first_position: int = 0) -> "Tokens":
    """All N tokens valid, positions first_position..first_position+N-1, size 1."""
    b, n = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) + first_position, (b, n))
    return cls(x, positions, jnp.ones((b, n), bool), jnp.ones((b, n), jnp.float32))

  def replace_x(self, x: Array) -> "Tokens":
    return self.replace(x=x)
