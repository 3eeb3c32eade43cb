"""VisPruner: important tokens by [CLS] attention, then diverse tokens by similarity pruning.

Follows the authors' `llava_arch.encode_images` / `clip_encoder.feature_select`:

  important  head-mean [CLS] row of the feature block ranks the patches; the
             top T_imp = int(T * important_ratio) are kept.
  diverse    the residual in descending-attention order, with L2-normalised
             features; until R = T_div tokens remain: r = min(8, R - T_div),
             a = even places, b = odd places, drop the r a-tokens with the
             highest max cosine to b; residual = kept a (in descending max-cosine
             order, as the reference's argsort leaves them), then b.

Output: the kept tokens in original order (positions renumbered downstream).
Differences from the reference: odd R is handled (a takes the extra token;
the reference fails there); invalid tokens rank last. SigLIP: the attention
each patch receives ranks the patches.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vtr_jax.reduce.api import ReductionError, register
from vtr_jax.reduce.pre_llm.fastervlm import FeatureLayerScored
from vtr_jax.seams import Tokens


@register
@dataclasses.dataclass(frozen=True)
class VisPruner(FeatureLayerScored):
  """VisPruner: important (top [CLS] attention) + diverse (iterative similarity pruning) tokens,
  original order (see the module docstring)."""
  name = "vispruner"
  stages = ("vision",)
  summary = "important tokens by [CLS] attention + diverse tokens by similarity pruning"
  important_ratio: float = 0.5

  def reduce(self, tokens: Tokens, ctx):
    if not 0.0 <= self.important_ratio <= 1.0:
      raise ReductionError(f"vispruner: important_ratio={self.important_ratio} must be in [0, 1]")
    scores = self.importance(tokens, ctx)
    n, t = tokens.count, self.kept(tokens.count)
    t_imp = int(t * self.important_ratio)
    t_div = t - t_imp
    ranked = jnp.where(tokens.valid, scores.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-ranked, axis=1, stable=True).astype(jnp.int32)
    important, residual = order[:, :t_imp], order[:, t_imp:]
    x = tokens.x.astype(jnp.float32)
    unit = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    r_len = n - t_imp
    while r_len > t_div:  # static loop: the count is known at trace time
      r = min(8, r_len - t_div)
      a, b = residual[:, ::2], residual[:, 1::2]
      if b.shape[1]:
        ua = jnp.take_along_axis(unit, a[..., None], axis=1)
        ub = jnp.take_along_axis(unit, b[..., None], axis=1)
        sim = jnp.einsum("bad,bcd->bac", ua, ub).max(axis=-1)
      else:
        sim = jnp.zeros(a.shape, jnp.float32)
      keep_a = jnp.argsort(-sim, axis=1, stable=True)[:, r:]
      residual = jnp.concatenate([jnp.take_along_axis(a, keep_a, axis=1), b], axis=1)
      r_len = residual.shape[1]
    idx = jnp.sort(jnp.concatenate([important, residual], axis=1), axis=1)
    return tokens.gather(idx), {"index": idx, "scores": scores}
