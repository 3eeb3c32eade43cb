"""ToDRE, first stage: greedy k-center (diversity) selection of the visual tokens before the LLM.

ToDRE (arXiv 2505.18757 v1, "Visual Token Pruning via Diversity and Task
Awareness") has two stages: (1) after the vision encoder, a greedy k-center
selection keeps a small diverse subset of the visual tokens; (2) inside the
LLM, every visual token is dropped after the layer where text-to-image
attention has faded. This module is stage (1) only, registered as `todre`.
Stage (2) acts at the `llm` stage with its own settings; it is meant to be a
separate method `todre_llm`, composed as `todre:ratio=0.1+todre_llm:...`.

Rule (k-center as in the paper; the authors' code is not in the reference
index): the first centre is the token the class token attends to most (the
head-mean [CLS] attention of the block LLaVA reads, as FasterVLM); then,
repeatedly, the token farthest from its nearest chosen centre, distance =
1 - cosine of the token features (the greedy loop shared with DivPrune, which
differs only in its first pick). Towers without a class token (SigLIP) take
the token that receives the most attention (mean over query rows and heads)
as the first centre.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import register
from vtr_jax.reduce.pre_llm.divprune import diverse_subset
from vtr_jax.reduce.pre_llm.fastervlm import FeatureLayerScored
from vtr_jax.seams import Tokens


@register
@dataclasses.dataclass(frozen=True)
class ToDREDiversity(FeatureLayerScored):
  """ToDRE's diversity stage: greedy k-center selection of `keep` (or `ratio` x N) tokens, first
  centre = the patch with the highest [CLS] attention (SigLIP: most attention received).

  Acts on the vision features by default ("after the vision encoder"), or on
  the projected tokens (`todre@embed`); either way it must see the tower's
  full patch set (the scores index patches). Kept tokens in original order;
  positions re-numbered. aux: `index` int32[B, k] sorted kept indices,
  `selection` int32[B, k] in the order chosen, `scores` float32[B, P] the
  first-centre scores. The in-LLM stage of ToDRE is the separate `todre_llm`.
  """
  name = "todre"
  stages = ("vision", "embed")
  summary = "ToDRE stage 1: greedy k-center diversity, first centre by [CLS] attention"

  def reduce(self, tokens: Tokens, ctx):
    scores = self.importance(tokens, ctx)
    first = P.topk_indices(scores, 1, tokens.valid)[:, 0]
    selection = diverse_subset(tokens, self.kept(tokens.count), first)
    idx = jnp.sort(selection, axis=1)
    return tokens.gather(idx), {"index": idx, "selection": selection, "scores": scores}
