"""PruMerge and PruMerge+: adaptive [CLS]-attention outliers, key-neighbour merging, one summary token.

Follows the authors' `token_prune_merge_advanced` / `_plus` (LLaVA-PruMerge,
`llava/model/multimodal_encoder/clip_encoder.py`):

  attention  q and k of the CLIP block right after the feature layer, applied
             to the features (the reference hooks layer 23 of 24, whose input
             is the penultimate hidden states LLaVA reads), with all heads
             concatenated into one head of width C and logits scaled by
             C ** -0.5; cls_attn = the class token's softmax row over the
             patches (the softmax includes the class token's own column, so the
             values do not sum to 1). When the features come from the tower's
             last block there is no next block: the feature block's own q/k
             (computed on its input) are used instead.
  outliers   patches whose cls_attn exceeds Q3 + 1.5 IQR, the quartiles taken
             as NumPy's `percentile` does (linear interpolation), kept in
             descending attention order (ties: lowest index first).
  merge      each kept token adds the features of its `neighbours` (32) most
             key-similar other tokens (cosine of the one-head keys, over all
             other patches, kept or not; the token itself is never its own
             neighbour), each weighted by its raw cls_attn, with no
             normalisation: x_i + sum_j cls_attn_j x_j.
  extra      one more token: sum over the pruned patches of cls_attn_j x_j.

PruMerge+ adds spatially uniform patches to the outliers before merging: with
c outliers out of P patches, stride = max(1, (P // c) // 3) and the patches
0, stride, 2 stride, ... below P - 1 (the reference's hard-coded 575 for 576
patches) that are not outliers, in ascending order after the outliers. They
are merged like the outliers, and the extra token sums what neither kept.

Output (order `method`): the kept tokens in the reference's order, then the
extra token. The count is data-dependent, so the output has a static number
of slots, `kept(P)`, with the valid tokens first (`Tokens.valid`); positions
are re-numbered over the valid tokens. A kept token's position is its patch,
its size 1 + the neighbours merged into it (neighbourhoods overlap, so sizes
do not sum to P); the extra token's position is the first pruned patch, its
size the number of pruned patches.

Deviations from the reference, all for static shapes and per-sample results:
  - the IQR cut is computed per sample (the reference pools the whole batch,
    so one image changes another's selection);
  - `keep` / `ratio` caps the outliers kept (default P // 8, the reference's
    non-adaptive ratio 1/8); outliers beyond the cap join the extra token and
    PruMerge+'s stride uses the capped count;
  - with no outlier PruMerge+ adds no spatial patches (the reference divides
    by zero), and when nothing is left to prune the extra token (a zero
    vector in the reference) is marked invalid;
  - a token has at most P - 1 neighbours (the reference requires P > 32).

Towers without a class token (SigLIP): cls_attn is replaced by the attention
each patch receives (mean over the query rows of the same one-head softmax).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from vtr_jax.kernels import ops
from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import Method, ReductionError, register, resolve_budget, target_tokens
from vtr_jax.reduce.pre_llm.fastervlm import check_patch_scores
from vtr_jax.seams import Tokens


def qk_extra(vision) -> tuple[str, int]:
  """The block after the features (applied to them), or the feature block when none follows."""
  return ("qk", vision.layers_run if vision.layers_run < vision.num_layers else -1)


def one_head_attention(ctx) -> tuple[jax.Array, jax.Array]:
  """(cls_attn float32[B, P], keys float[B, P, C]): all heads concatenated into one."""
  q, k = ctx.extra(*qk_extra(ctx.vision))
  b, t = q.shape[:2]
  q = q.reshape(b, 1, t, -1)  # [B, T, N, H] -> [B, 1, T, C]
  k = k.reshape(b, 1, t, -1)
  scale = q.shape[-1] ** -0.5
  if ctx.vision.has_cls:
    return ops.attention_mass(q[:, :, :1], k, scale=scale)[:, 1:], k[:, 0, 1:]  # the CLS row over patches
  return ops.attention_mass(q, k, scale=scale), k[:, 0]


def _percentile(sorted_x: jax.Array, q: float) -> jax.Array:
  """NumPy's default (linear) percentile of each row of an ascending float[B, N]."""
  pos = q * (sorted_x.shape[1] - 1)
  lo = math.floor(pos)
  hi = min(lo + 1, sorted_x.shape[1] - 1)
  a, b, t = sorted_x[:, lo], sorted_x[:, hi], pos - lo
  return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t  # numpy's two-sided lerp


def iqr_outliers(scores: jax.Array) -> jax.Array:
  """bool[B, N]: scores above Q3 + 1.5 IQR of the sample's own scores."""
  s = jnp.sort(scores, axis=1)
  q1, q3 = _percentile(s, 0.25), _percentile(s, 0.75)
  return scores > (q3 + 1.5 * (q3 - q1))[:, None]


def spatial_slots(n: int, cap: int) -> int:
  """Most spatial patches PruMerge+ can add with at most `cap` outliers (the stride is smallest at cap)."""
  return len(range(0, n - 1, max(1, n // cap // 3)))


def _slot_mask(idx: jax.Array, slot_valid: jax.Array, n: int) -> jax.Array:
  """bool[B, n]: True at the patches that valid slots (idx int32[B, M], slot_valid bool[B, M]) hold."""
  return jnp.zeros((idx.shape[0], n), bool).at[jnp.arange(idx.shape[0])[:, None], idx].max(slot_valid)


def merge_into_kept(tokens: Tokens, attn: jax.Array, keys: jax.Array, idx: jax.Array, slot_valid: jax.Array,
                    neighbours: int) -> Tokens:
  """The kept patches with their key neighbours added, then the extra token; valid tokens first.

  Args:
    tokens: the N patches; attn: float32[B, N] merge weights; keys: float[B, N, C].
    idx: int32[B, M] slots in output order; slot_valid: bool[B, M] which slots hold a kept patch.
    neighbours: static, clamped to N - 1.
  Returns:
    Tokens [B, M + 1]: the slots, then the extra token, reordered (stably) so
    that the valid ones come first.
  """
  b, n = attn.shape
  m = idx.shape[1]
  nb = min(neighbours, n - 1)
  _, near = ops.topk_similarity(P.take(keys, idx), keys, nb + 1, metric="cosine")  # [B, M, nb + 1]
  is_self = near == idx[..., None]
  use = ~is_self & ((jnp.arange(nb + 1) < nb) | jnp.any(is_self, axis=-1, keepdims=True))  # nb others each
  w = jnp.where(use, P.take(attn, near.reshape(b, -1)).reshape(b, m, nb + 1), 0.0)  # raw attention
  slots = jnp.arange(m)[None, :, None]
  neighbour_w = jnp.zeros((b, m, n), jnp.float32).at[jnp.arange(b)[:, None, None], slots, near].set(w)
  pruned = ~_slot_mask(idx, slot_valid, n)  # [B, N]
  weights = jnp.concatenate([neighbour_w, jnp.where(pruned, attn, 0.0)[:, None]], axis=1)  # [B, M + 1, N]
  own = jnp.concatenate([P.take(tokens.x, idx), jnp.zeros_like(tokens.x[:, :1])], axis=1)  # extra: no own term
  x = own.astype(jnp.float32) + jnp.einsum("bmn,bnd->bmd", weights, tokens.x.astype(jnp.float32),
                                           precision=jax.lax.Precision.HIGHEST)
  valid = jnp.concatenate([slot_valid, jnp.any(pruned, axis=1, keepdims=True)], axis=1)
  first_pruned = jnp.argmax(pruned, axis=1)[:, None]
  positions = P.take(tokens.positions, jnp.concatenate([idx, first_pruned], axis=1))
  size = jnp.concatenate([jnp.full((b, m), 1.0 + nb, jnp.float32),
                          jnp.sum(pruned, axis=1, keepdims=True).astype(jnp.float32)], axis=1)
  out = Tokens(jnp.where(valid[..., None], x, 0.0).astype(tokens.x.dtype), positions, valid, size)
  return out.gather(jnp.argsort(~valid, axis=1, stable=True).astype(jnp.int32))


@register
@dataclasses.dataclass(frozen=True)
class PruMerge(Method):
  """PruMerge: IQR outliers of the one-head [CLS] attention, each merged with its key neighbours,
  plus one token summarising the pruned patches; attention order (see the module docstring).

  `keep` / `ratio` is the static cap on outliers (default P // 8); the output has cap + 1 slots.
  """
  name = "prumerge"
  stages = ("vision",)
  order = "method"
  summary = "adaptive [CLS]-attention outliers (IQR), key-neighbour merge, one summary token"
  keep: int | None = None
  ratio: float | None = None
  neighbours: int = 32

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.neighbours, bool) or self.neighbours < 1:
      raise ReductionError(f"{self.name}: neighbours={self.neighbours} must be >= 1 (key neighbours merged into each "
                           "kept token; the reference uses 32)")

  def cap(self, n: int) -> int:
    """Most outliers kept out of n patches."""
    return resolve_budget(self.name, self.keep, self.ratio, n, default=max(1, n // 8))

  def kept(self, n: int) -> int:
    return self.cap(n) + 1

  def vision_extras(self, vision):
    return frozenset({qk_extra(vision)})

  def candidates(self, idx: jax.Array, slot_valid: jax.Array, count: jax.Array, n: int
                 ) -> tuple[jax.Array, jax.Array]:
    """The slots to merge into, (int32[B, M], bool[B, M]), from the outlier slots idx int32[B, cap]
    (descending attention), their validity bool[B, cap] and the outlier count int32[B]."""
    return idx, slot_valid

  def reduce(self, tokens: Tokens, ctx):
    attn, keys = one_head_attention(ctx)
    check_patch_scores(self.name, tokens, attn)
    n = tokens.count
    cap = self.cap(n)
    count = jnp.minimum(jnp.sum(iqr_outliers(attn) & tokens.valid, axis=1), cap)  # int32[B]
    idx = P.topk_indices(attn, cap, tokens.valid, sort=False)  # [B, cap] descending attention
    idx, slot_valid = self.candidates(idx, jnp.arange(cap)[None] < count[:, None], count, n)
    out = merge_into_kept(tokens, attn, keys, idx, slot_valid, self.neighbours)
    out = jax.tree_util.tree_map(lambda a: a[:, :self.kept(n)], out)  # only padding lies beyond
    return out, {"index": idx, "index_valid": slot_valid, "count": count, "scores": attn}


@register
@dataclasses.dataclass(frozen=True)
class PruMergePlus(PruMerge):
  """PruMerge+: PruMerge's outliers plus spatially uniform patches (stride (P // c) // 3 over the
  raster order, skipping outliers), all merged with their key neighbours, then the summary token.

  The static slot count is min(cap + spatial_slots(P, cap), P) + 1; choose `keep` near the
  expected outlier count (about 32 of 576) to keep it small.
  """
  name = "prumerge_plus"
  summary = "PruMerge + spatially uniform patches (~25% of the tokens)"

  def kept(self, n: int) -> int:
    cap = self.cap(n)
    return min(cap + spatial_slots(n, cap), n) + 1

  @classmethod
  def for_budget(cls, fraction, model):
    """The outlier cap at a quarter of the share: each outlier brings about three spatial tokens."""
    return cls(keep=max(1, round(target_tokens(cls.name, fraction, model) / 4)))

  def candidates(self, idx, slot_valid, count, n):
    stride = jnp.maximum(n // jnp.maximum(count, 1) // 3, 1)  # int32[B]
    grid = jnp.arange(spatial_slots(n, idx.shape[1]))[None] * stride[:, None]  # [B, S]
    ok = (grid < n - 1) & (count[:, None] > 0)
    grid = jnp.where(ok, grid, 0).astype(jnp.int32)
    ok = ok & ~P.take(_slot_mask(idx, slot_valid, n), grid)
    return jnp.concatenate([idx, grid], axis=1), jnp.concatenate([slot_valid, ok], axis=1)
