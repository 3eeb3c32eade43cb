"""FoPru (Focal Pruning): keep the tokens the vision encoder's own attention marks as significant.

Significance follows the authors' `focal_prunning`: the attention map of the
block that produces the features (softmax over every key, the class token's
column included), restricted to patch rows and patch columns and averaged
over heads, read two ways per sample:

  received[j] = mean over patch rows i of A[i, j]   (attention patch j receives)
  paid[i]     = mean over patch columns j of A[i, j] = (1 - A[i, cls]) / P

and the one whose variance over the patches is larger is the significance
(`received` only on a strictly larger variance, as in the reference). Towers
without a class token (SigLIP) have rows that sum to 1 over the patches, so
`paid` is constant and the significance is the attention each patch receives
(the tower's `received_attn` extra).

Strategies:
  rank  the `keep` most significant patches (global view).
  row   whole rows of the patch grid with the largest total significance
        (local continuity). The reference keeps floor(g * ratio) rows of a
        g x g grid; here the budget is a token count: keep = r * g + s keeps
        the r best rows whole plus the s most significant patches of the
        (r+1)-th best row, so every budget hands on exactly `keep` tokens and a
        multiple of g is the reference's rule.

Kept tokens go on in original (raster) order; positions are re-numbered.
Ties resolve to the lowest patch (or row) index.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vtr_jax.kernels import ops
from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import Method, ReductionError, register, resolve_budget
from vtr_jax.reduce.pre_llm.fastervlm import check_patch_scores
from vtr_jax.seams import Tokens

STRATEGIES = ("rank", "row")


def _mass_on_first_key(q: jax.Array, k: jax.Array) -> jax.Array:
  """Head-mean softmax attention each query row pays to key 0.

  Needs each row's softmax normaliser, so it forms the [B, N, R, T] logits
  (`ops.attention_mass` averages over rows and cannot give per-row values).

  Args:
    q: float[B, R, N, H] query rows; k: float[B, T, N, H] keys.
  Returns:
    float32[B, R].
  """
  logits = jnp.einsum("brnh,btnh->bnrt", q.astype(jnp.float32), k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * q.shape[-1] ** -0.5  # [B, N, R, T]
  return jnp.mean(jnp.exp(logits[..., 0] - jax.nn.logsumexp(logits, axis=-1)), axis=1)


def significance(ctx) -> tuple[jax.Array, jax.Array]:
  """(float32[B, P] significance, bool[B] True where the row mean `paid` was chosen)."""
  if not ctx.vision.has_cls:
    received = ctx.extra("received_attn", -1)
    return received, jnp.zeros(received.shape[:1], bool)
  q, k = ctx.extra("qk", -1)  # [B, T, N, H], class token first
  n_patches = q.shape[1] - 1
  rows = jnp.swapaxes(q[:, 1:], 1, 2)  # [B, P, N, H] -> [B, N, P, H]
  received = ops.attention_mass(rows, jnp.swapaxes(k, 1, 2))[:, 1:]  # [B, T] -> [B, P]
  paid = (1.0 - _mass_on_first_key(q[:, 1:], k)) / n_patches
  use_paid = ~(jnp.var(received, axis=1) > jnp.var(paid, axis=1))
  return jnp.where(use_paid[:, None], paid, received), use_paid


def row_indices(scores: jax.Array, k: int, grid: int) -> jax.Array:
  """int32[B, k] ascending: the k // g best grid rows whole, then the k % g best patches of the next row.

  Args:
    scores: float32[B, P] per-patch significance, P = grid * grid in raster order.
  """
  b, n = scores.shape
  full, partial = divmod(k, grid)
  row_total = scores.reshape(b, grid, grid).sum(axis=-1)  # [B, P] -> [B, g, g] -> [B, g]
  row_rank = jnp.argsort(P.topk_indices(row_total, grid, sort=False), axis=1)  # [B, g] 0 = best row
  patch_rank = jnp.repeat(row_rank, grid, axis=1)  # [B, g] -> [B, P]
  parts = []
  if full:
    parts.append(P.topk_indices((patch_rank < full).astype(jnp.float32), full * grid))
  if partial:
    parts.append(P.topk_indices(jnp.where(patch_rank == full, scores, -jnp.inf), partial))
  return jnp.sort(jnp.concatenate(parts, axis=1), axis=1)


@register
@dataclasses.dataclass(frozen=True)
class FoPru(Method):
  """FoPru: attention significance from the vision encoder; `strategy=rank` (global top-k) or
  `strategy=row` (whole grid rows); original order (see the module docstring).

  Reads the feature block's q/k (class-token towers) or its received attention (SigLIP).
  """
  name = "fopru"
  stages = ("vision",)
  summary = "vision-encoder attention significance: global top-k (rank) or whole grid rows (row)"
  keep: int | None = None
  ratio: float | None = None
  strategy: str = "rank"

  def __post_init__(self):
    super().__post_init__()
    if self.strategy not in STRATEGIES:
      raise ReductionError(f"fopru: strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")

  def kept(self, n: int) -> int:
    return resolve_budget(self.name, self.keep, self.ratio, n)

  def vision_extras(self, vision):
    return frozenset({("qk", -1) if vision.has_cls else ("received_attn", -1)})

  def reduce(self, tokens: Tokens, ctx):
    scores, use_paid = significance(ctx)
    check_patch_scores(self.name, tokens, scores)
    k = self.kept(tokens.count)
    if self.strategy == "rank":
      idx = P.topk_indices(scores, k, tokens.valid)
    else:  # the scores cover the tower's full grid (checked above)
      idx = row_indices(scores, k, ctx.vision.grid)
    return tokens.gather(idx), {"index": idx, "scores": scores, "row_mean": use_paid}
