"""DART: keep visual tokens that duplicate the pivots least (no attention maps needed)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vtr_jax.kernels.similarity import normalize
from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import ReductionError, register, resolve_budget, scaled_layer, target_tokens
from vtr_jax.reduce.in_llm import common as C


def dart_select(h, key_norm, visual, valid, text_after, n_image_pivots: int, n_text_pivots: int,
                per_pivot: int) -> jax.Array:
  """DART's pivot loop for one batch: bool[B, T] of the visual tokens kept.

  Args:
    h: float[B, T, D] hidden states entering layer K, through the final norm.
    key_norm: float32[B, T] L1 norm of layer K-1's keys (heads concatenated).
    visual, valid: bool[B, T]; text_after: bool[B, T] text after the image.
    per_pivot: least-similar candidates each pivot adds.
  Pivots: the image tokens, then the text-after-image tokens, with the largest
  key norm, each group in descending norm. For each pivot in turn the
  `per_pivot` remaining candidates (visual, not an image pivot, not yet
  kept) least cosine-similar to it join the kept set. When candidates run
  out a pivot adds only what is left; missing text pivots (short prompts)
  hand their quota to the remaining candidates with the largest key norm, so
  every sample keeps the same static count.
  """
  b, t = valid.shape
  vis = visual & valid
  img_piv = P.topk_indices(jnp.where(vis, key_norm, -jnp.inf), n_image_pivots, vis, sort=False)
  txt_ok = text_after & valid
  txt_piv = P.topk_indices(jnp.where(txt_ok, key_norm, -jnp.inf), n_text_pivots, txt_ok, sort=False)
  pivots = jnp.concatenate([img_piv, txt_piv], axis=1)  # [B, P] visiting order
  pivot_ok = jnp.concatenate([P.take(vis, img_piv), P.take(txt_ok, txt_piv)], axis=1)
  hn = normalize(h.astype(jnp.float32))
  kept = P.chosen_mask(img_piv, t) & vis
  candidates = vis & ~kept
  missing = jnp.sum(~pivot_ok[:, :n_image_pivots], axis=1).astype(jnp.int32)  # absent image pivots
  rows = jnp.arange(b)

  def visit(i, carry):
    kept, candidates, missing = carry
    sim = jnp.einsum("btd,bd->bt", hn, hn[rows, pivots[:, i]], precision=jax.lax.Precision.HIGHEST)
    pick = P.topk_indices(jnp.where(candidates, -sim, -jnp.inf), per_pivot, candidates, sort=False)
    ok = P.take(candidates, pick) & pivot_ok[:, i][:, None]
    chosen = jnp.zeros((b, t), bool).at[rows[:, None], pick].max(ok)
    missing = missing + jnp.where(pivot_ok[:, i], 0, per_pivot)
    return kept | chosen, candidates & ~chosen, missing

  if per_pivot:
    kept, candidates, missing = jax.lax.fori_loop(0, pivots.shape[1], visit, (kept, candidates, missing))
  # quota of missing pivots: candidates with the largest key norm
  fill_rank = jnp.argsort(jnp.argsort(jnp.where(candidates, -key_norm, jnp.inf), axis=1), axis=1)
  kept = kept | (candidates & (fill_rank < missing[:, None]))
  return kept


@register
@dataclasses.dataclass(frozen=True)
class DART(C.SingleDrop):
  """DART (Wen et al. 2025): duplication instead of importance, once before decoder layer K.

  Pivots: 4 image and 4 text-after-image tokens with the largest L1 norm of
  their layer-(K-1) keys (all heads concatenated, after RoPE). On the hidden
  states entering layer K passed through the final norm, each pivot in turn
  adds the per-pivot count of remaining image tokens *least* cosine-similar
  to it; the kept set is the image pivots plus those (about keep tokens), in
  original order with original position ids (gaps). The per-pivot count is
  the reference's floor(N * ratio / 8) for `ratio=` (N(1-r)/8 with r the
  reduction: N=576 at r=0.7778 keeps 4 + 8 * 15 = 124) and floor(keep / 8)
  for `keep=`. Deviation: the reference visits pivots in a Python set's
  order; here image pivots then text pivots, each by descending key norm. See
  `dart_select` for the guards. A class token handed on by the tower is kept
  and not counted (never a pivot).

  Attributes:
    layer: K >= 1 (reference: 2).
    keep / ratio: the visual-token budget that sets the count per pivot.
    pivots: image and text pivots each (reference: 4).
    mask: hide dropped tokens instead of removing them (checking variant).
  """
  name = "dart"
  positions = "keep"
  summary = "keep tokens least similar to key-norm pivots (duplication-aware)"
  keep: int | None = None
  ratio: float | None = None
  pivots: int = 4

  def _per_pivot(self, n: int) -> int:
    if self.pivots < 1:
      raise ReductionError(f"dart: pivots={self.pivots} must be >= 1")
    resolve_budget(self.name, self.keep, self.ratio, n)  # validates the budget
    if self.ratio is not None:  # the reference's int(N (1 - r) / 8): N * ratio is never rounded first
      return int(n * self.ratio / (2 * self.pivots))
    return self.keep // (2 * self.pivots)

  def kept(self, n: int) -> int:
    return min(n, min(self.pivots, n) + 2 * self.pivots * self._per_pivot(n))

  @classmethod
  def for_budget(cls, fraction, model):
    """K=2 of 32 layers moved to the model's depth; `keep` = the share of the visual tokens."""
    layers = model.text.num_layers
    return cls(layer=scaled_layer(2, 32, layers, lo=1, hi=layers - 1), keep=target_tokens(cls.name, fraction, model))

  def score(self, stage, state, access):
    _, k = access.qk(self.layer - 1, state.x, state.positions)  # [B, T, K, H] after RoPE
    return jnp.sum(jnp.abs(k.astype(jnp.float32)), axis=(2, 3))

  def select(self, stage, keep, merged, state, score, access):
    n = state.n_patches
    kept = dart_select(access.final_norm(state.x), score, state.droppable, state.valid, C.text_after_image(state),
                       min(self.pivots, n), self.pivots, self._per_pivot(n))
    return self.drop(state, kept.astype(jnp.float32), keep, mask=self.mask)[0]
