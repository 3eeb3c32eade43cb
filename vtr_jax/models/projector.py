"""Vision-to-language projectors: LLaVA's `mlp2x_gelu` and `linear`."""

from __future__ import annotations

import flax.linen as nn
import jax

from vtr_jax.models import common as c

PROJECTOR_KINDS = ("mlp2x_gelu", "linear")


class Projector(nn.Module):
  """float[B, N, Dv] -> float[B, N, D] applied per token.

  Attributes:
    kind: `mlp2x_gelu` (Linear, exact GELU, Linear, as LLaVA-1.5) or `linear`.
    out_dim: the language model's width D.
  """
  kind: str
  out_dim: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind not in PROJECTOR_KINDS:
      raise ValueError(f"unknown projector {self.kind!r}; known: {', '.join(PROJECTOR_KINDS)}")
    # The hidden width is named `mlp` (tensor-parallel), the ends `embed`.
    dense = lambda name, axes: nn.Dense(
        self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=c.param_axes(c.dense_init(), axes),
        bias_init=c.param_axes(nn.initializers.zeros, axes[1:]))
    x = dense("linear_1", (c.EMBED, c.MLP))(x)
    if self.kind == "mlp2x_gelu":
      x = jax.nn.gelu(x, approximate=False)
      x = dense("linear_2", (c.MLP, c.EMBED))(x)
    return x
