"""Class-token attention scoring: FasterVLM and VTC-CLS.

Both rank patches by the attention the tower's class token pays them and
keep the top `keep` in original order. Towers without a class token
(SigLIP) use the attention each patch *receives* (mean over heads and query
rows), as the later literature does.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import Method, ReductionError, register, resolve_budget
from vtr_jax.seams import Tokens


def patch_importance(ctx, layer: int) -> jnp.ndarray:
  """float32[B, P]: head-mean CLS attention over patches of block `layer`, or (no class token)
  the attention each patch receives."""
  if ctx.vision.has_cls:
    return ctx.extra("cls_attn", layer).mean(axis=1)[:, 1:]  # [B, N, T] -> [B, P]
  return ctx.extra("received_attn", layer)


def importance_extra(vision, layer: int) -> tuple[str, int]:
  return ("cls_attn" if vision.has_cls else "received_attn", layer)


def check_patch_scores(method: str, tokens: Tokens, scores) -> None:
  """Raises unless the per-patch scores (float[B, P]) line up with the tokens the method receives."""
  if scores.shape[1] != tokens.count:
    raise ReductionError(f"{method} scores the tower's {scores.shape[1]} patches but receives {tokens.count} "
                         "tokens; put it before methods that change the token count")


@dataclasses.dataclass(frozen=True)
class FeatureLayerScored(Method):
  """Base (unregistered) of the methods that start from the per-patch importance of the feature
  block (`patch_importance(ctx, -1)`) and keep a budget of `keep` tokens or a `ratio`."""
  keep: int | None = None
  ratio: float | None = None

  def kept(self, n: int) -> int:
    return resolve_budget(self.name, self.keep, self.ratio, n)

  def vision_extras(self, vision):
    return frozenset({importance_extra(vision, -1)})

  def importance(self, tokens: Tokens, ctx) -> jnp.ndarray:
    """float32[B, P], checked against the tokens this method receives."""
    scores = patch_importance(ctx, -1)
    check_patch_scores(self.name, tokens, scores)
    return scores


@register
@dataclasses.dataclass(frozen=True)
class FasterVLM(FeatureLayerScored):
  """FasterVLM: keep the patches with the highest head-mean [CLS] attention of the block that
  produces the features LLaVA reads (the penultimate layer); original order. SigLIP: the
  attention each patch receives instead."""
  name = "fastervlm"
  stages = ("vision",)
  summary = "[CLS] attention of the feature layer, top-k"

  def reduce(self, tokens: Tokens, ctx):
    scores = self.importance(tokens, ctx)
    idx = P.topk_indices(scores, self.kept(tokens.count), tokens.valid)
    return tokens.gather(idx), {"index": idx, "scores": scores}


@register
@dataclasses.dataclass(frozen=True)
class VTCCLS(Method):
  """VTC-CLS: like FasterVLM, but the score is the sum over blocks `start` .. last-run-block - 1
  (up to, not including, the block that produces the features) of the head-mean CLS rows.
  `start` is an absolute block index; negative values count back from the blocks run.
  SigLIP: the attention each patch receives, summed over the same blocks."""
  name = "vtc_cls"
  stages = ("vision",)
  summary = "[CLS] attention summed over several ViT layers, top-k"
  keep: int | None = None
  ratio: float | None = None
  start: int = 0

  def kept(self, n: int) -> int:
    return resolve_budget(self.name, self.keep, self.ratio, n)

  def _layers(self, vision) -> range:
    run = vision.layers_run
    start = self.start if self.start >= 0 else run + self.start
    if not 0 <= start < run - 1:
      raise ReductionError(f"vtc_cls: start={self.start} must leave at least one block before the last "
                           f"of the {run} blocks run (0..{run - 2})")
    return range(start, run - 1)

  def vision_extras(self, vision):
    return frozenset(importance_extra(vision, layer) for layer in self._layers(vision))

  def reduce(self, tokens: Tokens, ctx):
    scores = sum(patch_importance(ctx, layer) for layer in self._layers(ctx.vision))
    check_patch_scores(self.name, tokens, scores)
    idx = P.topk_indices(scores, self.kept(tokens.count), tokens.valid)
    return tokens.gather(idx), {"index": idx, "scores": scores}
