"""VisionZip: dominant tokens by [CLS] attention, the rest merged into contextual tokens.

Follows the authors' `visionzip/clip_encoder.py` on the block that produces
the features LLaVA reads (the penultimate layer):

  dominant    the class token's attention row summed over heads ranks the
              patches; the top (dominant - 1) patches plus the class token's
              own hidden state (`ctx.cls_feature`) are kept: class token first
              (position -1), then the patches in original order.
  contextual  the remaining R patches' head-mean keys, L2-normalised; targets
              are the remaining tokens at local indices 0, s, 2s, ... with
              s = max(1, R // contextual), the first `contextual` of them; every
              other remaining token joins its most cosine-similar target (ties:
              the first target); contextual token = target + mean of the tokens
              assigned to it (a plain mean, not size-weighted; just the target
              when none is assigned), in target order.

Output = dominant then contextual (order `method`); positions re-numbered.
A contextual token's position is its target's patch, its size the target's
plus the sizes merged into it. `aux["index"]` holds the dominant patches in
ascending order (the reference returns them in score order; the tokens go on
in position order either way).

Budget: `dominant` + `contextual` tokens in all (the class token counts as a
dominant token). `keep` (or `ratio`) alone splits as the paper does,
contextual = floor(keep * 10 / 64): 192 = 162 + 30, 128 = 108 + 20,
64 = 54 + 10; `dominant` or `contextual` may be given with it, or both alone.

Towers without a class token (SigLIP): the attention each patch receives
(mean over heads and query rows) ranks the patches, all `dominant` tokens are
patches, and no class token is added. A tower that already hands on its class
token (`keep_cls`) already hands the class token to the LLM; VisionZip then keeps
`dominant` patches and does not add it again (the LLM sees one token more
than the budget, as with every other method on such a tower).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import Method, ReductionError, register, resolve_budget
from vtr_jax.reduce.pre_llm.fastervlm import check_patch_scores, importance_extra
from vtr_jax.seams import Tokens


def dominant_scores(ctx) -> jax.Array:
  """float32[B, P]: [CLS] attention of the feature block summed over heads, or (no class token)
  the attention each patch receives."""
  if ctx.vision.has_cls:
    return ctx.extra("cls_attn", -1).sum(axis=1)[:, 1:]  # [B, N, T] -> [B, P]
  return ctx.extra("received_attn", -1)


def merge_contextual(tokens: Tokens, keys: jax.Array, rest: jax.Array, contextual: int) -> tuple[Tokens, dict]:
  """VisionZip's contextual tokens from the remaining tokens.

  Args:
    tokens: all N tokens; keys: float[B, N, H] their head-mean keys.
    rest: int32[B, R] the remaining tokens, ascending.
    contextual: static number of targets, 1 <= contextual <= R.
  Returns:
    (contextual Tokens [B, contextual], {"targets": int32[B, C], "assign": int32[B, R - C]}).
  """
  r = rest.shape[1]
  local = np.arange(0, r, max(1, r // contextual))[:contextual]
  targets = rest[:, local]
  others = rest[:, np.setdiff1d(np.arange(r), local)]
  merged = tokens.gather(targets)
  if r == contextual:  # every remaining token is a target: nothing to merge
    return merged, {"targets": targets, "assign": jnp.zeros_like(others)}
  assign, _ = P.nearest_centre(P.take(keys, others), P.take(keys, targets), metric="cosine")
  w = P.take(tokens.valid, others).astype(jnp.float32)
  sums, counts = P.scatter_sum(P.take(tokens.x, others) * w[..., None], w, assign, contextual)
  x = merged.x.astype(jnp.float32) + sums / jnp.maximum(counts, 1.0)[..., None]
  sizes, _ = P.scatter_sum((P.take(tokens.size, others) * w)[..., None], w, assign, contextual)
  merged = merged.replace(x=x.astype(tokens.x.dtype), size=merged.size + sizes[..., 0])
  return merged, {"targets": targets, "assign": assign}


@register
@dataclasses.dataclass(frozen=True)
class VisionZip(Method):
  """VisionZip: dominant tokens ([CLS] first, then top-attention patches in original order)
  followed by contextual tokens merged by key similarity (see the module docstring)."""
  name = "visionzip"
  stages = ("vision",)
  order = "method"
  summary = "dominant tokens by [CLS] attention + contextual tokens merged by key similarity"
  keep: int | None = None
  ratio: float | None = None
  dominant: int | None = None
  contextual: int | None = None

  def split(self, n: int) -> tuple[int, int]:
    """(dominant, contextual) for n incoming tokens (raises on impossible budgets)."""
    d, c = self.dominant, self.contextual
    if self.keep is None and self.ratio is None:
      if d is None or c is None:
        raise ReductionError("visionzip: needs a budget: keep=<tokens>, ratio=<fraction kept>, "
                             "or dominant=<tokens>,contextual=<tokens>")
      total = d + c
      if total > n:
        raise ReductionError(f"visionzip: budget dominant+contextual={d}+{c}={total} is larger than the "
                             f"{n} tokens it receives")
    else:
      total = resolve_budget(self.name, self.keep, self.ratio, n)
      if d is None and c is None:
        c = total * 10 // 64
      d = total - c if d is None else d
      c = total - d if c is None else c
      if d + c != total:
        raise ReductionError(f"visionzip: dominant={d} + contextual={c} must add up to the budget {total}")
    if d < 1 or c < 0:
      raise ReductionError(f"visionzip: dominant={d} must be >= 1 and contextual={c} >= 0")
    return d, c

  def kept(self, n: int) -> int:
    return sum(self.split(n))

  def vision_extras(self, vision):
    return frozenset({importance_extra(vision, -1), ("keys", -1)})

  def reduce(self, tokens: Tokens, ctx):
    vision = ctx.vision
    adds_cls = vision.has_cls and not vision.keep_cls  # a keep_cls tower hands the class token on itself
    scores = dominant_scores(ctx)
    check_patch_scores(self.name, tokens, scores)
    n = tokens.count
    dominant, contextual = self.split(n)
    idx = P.topk_indices(scores, dominant - int(adds_cls), tokens.valid)
    parts = [tokens.gather(idx)]
    if adds_cls:
      b = tokens.x.shape[0]
      cls = ctx.cls_feature.astype(tokens.x.dtype)[:, None]  # [B, D] -> [B, 1, D]
      parts.insert(0, Tokens(cls, jnp.full((b, 1), -1, jnp.int32), jnp.ones((b, 1), bool),
                             jnp.ones((b, 1), jnp.float32)))
    aux = {"index": idx, "scores": scores}
    if contextual:
      keys = ctx.extra("keys", -1)[:, int(vision.has_cls):]  # [B, T, H] -> [B, P, H]
      merged, merge_aux = merge_contextual(tokens, keys, P.complement(idx, n), contextual)
      parts.append(merged)
      aux.update(merge_aux)
    out = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=1), *parts)
    return out, aux
