"""DivPrune: keep a maximally diverse subset of the visual tokens (greedy max-min, cosine distance).

Reference: vbdi/divprune (README only in the index) and its rule as ported
verbatim in ModelTC/llmc `token_reduction/divprune.py`: on the LLM input
embeddings of the image (the projected tokens), distance = 1 - cosine; the
first token is the one whose nearest other token is farthest (the second
smallest entry of its distance column), then repeatedly the token whose
minimum distance to the chosen set is largest (argmax: lowest index on ties);
budget = round(ratio * N); the chosen indices are sorted before gathering.

Deviation (METHODS.md, "quirky"): the reference's diagonal (1 - cos(x, x)) is
not exactly 0 in floating point, so its "second smallest" can be the
diagonal, and a chosen token can be chosen again when every remaining
distance is 0; here a token's own distance never counts and no token is
picked twice (`primitives.greedy_max_min`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vtr_jax.kernels.similarity import pairwise
from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import Method, register, resolve_budget
from vtr_jax.seams import Tokens

Array = jax.Array


def cosine_distance(x: Array) -> Array:
  """float[B, N, D] -> float32[B, N, N]: 1 - cosine similarity (zero vectors: distance 1 to all)."""
  return 1.0 - pairwise(x, x, "cosine")


def diverse_subset(tokens: Tokens, k: int, first: Array | None = None) -> Array:
  """k tokens chosen greedily by max-min cosine distance, in selection order: int32[B, k].

  Args:
    tokens: the candidates (invalid ones are chosen only after every valid one).
    k: static count.
    first: int32[B] the first centre; None: DivPrune's rule (the token whose
      nearest other token is farthest).
  """
  dist = cosine_distance(tokens.x)
  if first is None:
    return P.greedy_max_min(dist, k, tokens.valid)
  # With `first` the only valid entry, greedy_max_min starts there and then ranks every other token by
  # its running minimum distance alone; distances of truly invalid tokens become -1 (below any cosine
  # distance), so they still come last.
  both = tokens.valid[:, :, None] & tokens.valid[:, None, :]
  return P.greedy_max_min(jnp.where(both, dist, -1.0), k, P.chosen_mask(first[:, None], tokens.count))


@register
@dataclasses.dataclass(frozen=True)
class DivPrune(Method):
  """DivPrune: greedy max-min diversity selection of `keep` (or `ratio` x N) tokens.

  Acts on the projected tokens by default (`embed`, as the reference) or on
  the vision features (`divprune@vision`). Kept tokens in original order;
  positions re-numbered. aux: `index` int32[B, k] sorted kept indices,
  `selection` int32[B, k] the same in the order they were chosen.
  """
  name = "divprune"
  stages = ("embed", "vision")
  summary = "greedy max-min diversity (cosine distance) subset"
  keep: int | None = None
  ratio: float | None = None

  def kept(self, n: int) -> int:
    return resolve_budget(self.name, self.keep, self.ratio, n)

  def reduce(self, tokens: Tokens, ctx):
    selection = diverse_subset(tokens, self.kept(tokens.count))
    idx = jnp.sort(selection, axis=1)
    return tokens.gather(idx), {"index": idx, "selection": selection}
