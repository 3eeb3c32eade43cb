"""SparseVLM: text-guided pruning by rater tokens, with DPC-KNN recycling of pruned tokens."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import ReductionError, register, scaled_layer, target_tokens
from vtr_jax.reduce.in_llm import common as C
from vtr_jax.seams import MERGED

# The reference's per-layer visual-token budgets (for 576 tokens) behind its headline counts.
PUBLISHED_BUDGETS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
RECYCLE_FRACTION = 0.3


def raters(x, visual, valid, text, prompt) -> jax.Array:
  """bool[B, T]: the text tokens after the image whose relevance to the image is above their mean.

  Args:
    x: float[B, T, D] input embeddings; visual, valid: bool[B, T];
    text: bool[B, T] the prompt's text tokens after the image;
    prompt: bool[B, T] the prompt's tokens (the fallback rater is its last).

  M = V T^T (raw dot products of input embeddings: visual x text-after-image),
  softmax over the text axis, mean over visual tokens -> relevance per text
  token; raters are those above the mean relevance (a data-dependent set).
  When no token is above the mean (one text token, or all equal) the last
  prompt token rates alone (the reference would average over an empty set).
  """
  m = jnp.einsum("bvd,btd->bvt", x.astype(jnp.float32), x.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)  # [B, T, T], rows visual, cols text
  logits = jnp.where(text[:, None, :], m, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(text[:, None, :], probs, 0.0)
  n_vis = jnp.maximum(jnp.sum(visual & valid, axis=1), 1)[:, None]
  relevance = jnp.sum(jnp.where((visual & valid)[:, :, None], probs, 0.0), axis=1) / n_vis  # [B, T]
  n_text = jnp.maximum(jnp.sum(text, axis=1), 1)[:, None]
  mean = jnp.sum(jnp.where(text, relevance, 0.0), axis=1, keepdims=True) / n_text
  chosen = text & (relevance > mean)
  # none above the mean (e.g. a single text token): the last prompt token rates alone
  slots = jnp.arange(visual.shape[1])[None]
  last = slots == jnp.max(jnp.where(prompt, slots, -1), axis=1, keepdims=True)
  return jnp.where(jnp.any(chosen, axis=1, keepdims=True), chosen, last & prompt)


def dpc_knn(x: jax.Array, clusters: int) -> tuple[jax.Array, jax.Array]:
  """DPC-KNN clustering as SparseVLM's reference does it, with deterministic ties.

  Distances are Euclidean / sqrt(D); density = exp(-mean squared distance to
  the `clusters` nearest tokens, itself included); delta = distance to the
  nearest denser token (the largest distance in the set for the densest);
  centres = top `clusters` of delta * density; every token joins its nearest
  centre, centres join themselves. Density ties are broken by the lowest
  index (the reference adds random noise instead).

  Args:
    x: float[B, N, D]; clusters: static count <= N.
  Returns:
    (assignment int32[B, N] in 0..clusters-1, centre index int32[B, clusters]).
  """
  b, n, d = x.shape
  x = x.astype(jnp.float32)
  sq = jnp.sum(x * x, -1)
  d2 = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2 * jnp.einsum(
      "bnd,bmd->bnm", x, x, precision=jax.lax.Precision.HIGHEST), 0.0)
  dist = jnp.sqrt(d2) / jnp.sqrt(float(d))
  dist = jnp.where(jnp.eye(n, dtype=bool)[None], 0.0, dist)
  nearest = -jax.lax.top_k(-dist, clusters)[0]  # [B, N, k] smallest distances
  density = jnp.exp(-jnp.mean(nearest ** 2, axis=-1))  # [B, N]
  idx = jnp.arange(n)
  denser = (density[:, None, :] > density[:, :, None]) | (
      (density[:, None, :] == density[:, :, None]) & (idx[None, None, :] < idx[None, :, None]))  # [B, i, j]
  dist_max = jnp.max(dist.reshape(b, -1), axis=-1)[:, None]
  delta = jnp.min(jnp.where(denser, dist, dist_max[..., None]), axis=-1)
  centres = P.topk_indices(delta * density, clusters, sort=False)  # [B, k] score order
  to_centre = P.take(jnp.swapaxes(dist, 1, 2), centres)  # [B, k, N] distance centre -> token
  assign = jnp.argmin(to_centre, axis=1).astype(jnp.int32)  # [B, N]
  rows = jnp.arange(b)[:, None]
  assign = assign.at[rows, centres].set(jnp.broadcast_to(jnp.arange(clusters, dtype=jnp.int32), (b, clusters)))
  return assign, centres


@register
@dataclasses.dataclass(frozen=True)
class SparseVLM(C.ScheduledDrop):
  """SparseVLM (Zhang et al. 2024): text raters score visual tokens at a few layers; pruned
  tokens are partly recycled into merged tokens.

  Raters are chosen once on the input embeddings (`raters`). At each layer l
  in `layers` the score of a visual token is the head-mean attention of
  layer l (its own q/k on its input), averaged over the rater rows; the
  layer's *output* keeps the top `keep[i]` visual tokens, in original order
  (deviation: a budget >= the tokens present keeps them all, where the
  reference would still drop one). Recycling: of the tokens pruned there,
  the top 30 % (+1) by score are clustered with `dpc_knn` into
  floor(n/10) + 1 clusters, each cluster averaged, and the merged tokens are
  inserted right after the kept visual tokens. Positions are re-numbered
  contiguously (the reference truncates position ids; merged tokens get
  contiguous ids after the kept ones). A class token handed on by the tower
  is kept and not counted.

  Attributes:
    layers: decoder layers whose attention scores and whose output is pruned
      (0-indexed; reference 2/6/15 for 32 layers).
    keep: visual tokens kept at each of those layers (before recycling).
    target: 192, 128 or 64 selects the reference's budgets for 576 tokens
      (scaled by N/576 for other token counts) when `keep` is not given.
    recycle: add the merged tokens (the reference does).
    mask: hide dropped tokens instead of removing them (checking variant;
      requires recycle=false since merged tokens add slots).
  """
  name = "sparsevlm"
  positions = "renumber"
  summary = "text-rater attention at a few layers, DPC-KNN recycling"
  layers: tuple[int, ...] = (2, 6, 15)
  keep: tuple[int, ...] | None = None
  target: int | None = None
  recycle: bool = True

  def budgets(self, n_visual: int) -> tuple[int, ...]:
    if self.keep is not None and self.target is not None:
      raise ReductionError(f"sparsevlm: give keep= or target=, not both (keep={self.keep}, target={self.target})")
    if self.keep is not None:
      if len(self.keep) != len(self.layers):
        raise ReductionError(f"sparsevlm: keep={self.keep} needs one budget per layer in layers={self.layers}")
      return tuple(self.keep)
    target = 128 if self.target is None else self.target
    if target not in PUBLISHED_BUDGETS:
      raise ReductionError(f"sparsevlm: target={target} must be one of {sorted(PUBLISHED_BUDGETS)} "
                           "(or give keep=a/b/c)")
    if len(self.layers) != 3:
      raise ReductionError(f"sparsevlm: target= budgets are for three layers, got layers={self.layers}")
    return tuple(max(1, round(v * n_visual / 576)) for v in PUBLISHED_BUDGETS[target])

  def stage_keeps(self, n):
    """(kept, merged) visual tokens at each pruning layer, static."""
    out, current = [], n
    for budget in self.budgets(n):
      keep = current if budget >= current else max(0, budget)
      pruned = current - keep
      merged = 0
      if self.recycle and pruned > 0:
        merged = int(min(pruned, int(pruned * RECYCLE_FRACTION) + 1)) // 10 + 1
      out.append((keep, merged))
      current = keep + merged
    return tuple(out)

  def stage_layers(self, num_layers):
    C.check_increasing(self.name, self.layers)
    for layer in self.layers:
      C.check_layer(self.name, layer, num_layers - 1)  # the output of layer l feeds layer l + 1
    if self.mask and self.recycle:
      raise ReductionError("sparsevlm: mask=true needs recycle=false (merged tokens add new slots)")
    return tuple((layer, layer + 1) for layer in self.layers)

  @classmethod
  def for_budget(cls, fraction, model):
    """The reference's 2/6/15 of 32 layers moved to the model's depth; its 128-token schedule's shape
    (303/110/36) scaled so that the last stage keeps the share."""
    layers, n = model.text.num_layers, model.reducible_tokens
    k = target_tokens(cls.name, fraction, model)
    stages = sorted({scaled_layer(l, 32, layers, lo=0, hi=layers - 2) for l in (2, 6, 15)})
    shape = PUBLISHED_BUDGETS[128][-len(stages):]
    return cls(layers=tuple(stages), keep=tuple(min(n, max(1, round(v * k / shape[-1]))) for v in shape))

  def boundaries(self, num_layers):
    return tuple(sorted({0, *super().boundaries(num_layers)}))  # raters are chosen on the input embeddings

  def at_boundary(self, layer, state, access):
    if layer == 0:
      state = state.keep_mine(raters=raters(state.x, state.visual, state.valid, C.text_after_image(state),
                                            C.prompt_mask(state)))
    return super().at_boundary(layer, state, access)

  def score(self, stage, state, access):
    return C.attention_mass(access, self.layers[stage], state, C.all_rows(state), state.mine("raters"))

  def select(self, stage, keep, merged, state, score, access):
    new, chosen = self.drop(state, score, keep, mask=self.mask)
    if not merged:
      return new
    # recycle: the top 30 % (+1) pruned tokens by score, clustered and averaged
    pruned = state.droppable & state.valid & ~chosen
    n_pruned = state.n_patches - keep
    n_recycle = min(n_pruned, int(n_pruned * RECYCLE_FRACTION) + 1)
    rec_idx = P.topk_indices(jnp.where(pruned, score, -jnp.inf), n_recycle, pruned, sort=False)
    rec_x = P.take(state.x, rec_idx)  # [B, R, D]
    assign, _ = dpc_knn(rec_x, merged)
    w = jnp.ones(assign.shape, jnp.float32)
    num, den = P.scatter_sum(rec_x, w, assign, merged)
    merged_x = (num / jnp.maximum(den, 1.0)[..., None]).astype(state.x.dtype)  # [B, M, D]
    return insert_after_visual(new, merged_x)


def insert_after_visual(state, merged_x):
  """Inserts M merged visual tokens right after the last visual slot (`LLMState.splice`); re-numbers positions.

  A merged token takes the per-token entries of the last kept visual token (it
  is a visual prompt token like it), `patch` = MERGED, valid and visual True.
  """
  b, m = merged_x.shape[:2]
  last_vis = jnp.max(jnp.where(state.visual, jnp.arange(state.length)[None], -1), axis=1)  # [B]
  insert = state.slots(jnp.broadcast_to(jnp.maximum(last_vis, 0)[:, None], (b, m)))
  insert.update(x=merged_x, valid=jnp.ones((b, m), bool), visual=jnp.ones((b, m), bool))
  insert["tokens/patch"] = jnp.full((b, m), MERGED, jnp.int32)
  out = state.splice(last_vis + 1, 0, insert, state.n_visual + m)
  return out.replace(positions=C.renumber(out.valid))
