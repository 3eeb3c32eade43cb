"""PyramidDrop: multi-stage dropping of visual tokens with contiguous re-numbering."""

from __future__ import annotations

import dataclasses

from vtr_jax.reduce.api import ReductionError, register, scaled_layer, target_tokens
from vtr_jax.reduce.in_llm import common as C


@register
@dataclasses.dataclass(frozen=True)
class PyramidDrop(C.ScheduledDrop):
  """PyramidDrop (Xing et al. 2024): drop visual tokens at several layer boundaries.

  At each boundary l in `layers` (before decoder layer l runs) the hidden
  states pass through layer l's input norm and q/k projections (with RoPE);
  the score of a visual token is the head-mean attention the *last
  instruction token* pays it (softmax over all keys, causal). Stage i keeps
  int(N * ratio^i) of the N visual tokens the LLM received (reference:
  50/25/12.5 % for ratio 0.5), in original order. Positions are re-numbered
  contiguously after each drop, so each layer's cache continues from its own
  re-numbered length when decoding (as the reference shifts position ids per
  stage). A class token handed on by the tower is kept and not counted.

  Training mode: when the state carries `tokens["query"]` (bool[B, T], the
  tokens just before answer spans), their rows are averaged instead of the
  last token's (the reference's training rule).

  Attributes:
    layers: boundaries (0-indexed decoder layers), default 8/16/24 (32 layers).
    ratio: fraction of visual tokens kept per stage (lambda).
    mask: hide dropped tokens instead of removing them (the checking variant).
  """
  name = "pdrop"
  positions = "renumber"
  summary = "multi-stage drop by the last instruction token's attention"
  layers: tuple[int, ...] = (8, 16, 24)
  ratio: float = 0.5

  def stage_layers(self, num_layers):
    C.check_increasing(self.name, self.layers)
    for layer in self.layers:
      C.check_layer(self.name, layer, num_layers, first=1)
    return tuple((layer, layer) for layer in self.layers)

  def stage_keeps(self, n):
    if not 0 < self.ratio <= 1:
      raise ReductionError(f"pdrop: ratio={self.ratio} must be in (0, 1]")
    return tuple((int(n * self.ratio ** (i + 1)), 0) for i in range(len(self.layers)))

  @classmethod
  def for_budget(cls, fraction, model):
    """The reference's 8/16/24 of 32 layers moved to the model's depth; the per-stage ratio whose last
    stage keeps the share: (k / N)^(1 / stages)."""
    layers, n = model.text.num_layers, model.reducible_tokens
    stages = sorted({scaled_layer(l, 32, layers, lo=1, hi=layers - 1) for l in (8, 16, 24)})
    ratio = (target_tokens(cls.name, fraction, model) / n) ** (1 / len(stages))
    return cls(layers=tuple(stages), ratio=round(ratio, 4))

  def score(self, stage, state, access):
    layer = self.layers[stage]
    if "query" in state.tokens:  # training: rows just before answer spans
      return C.attention_mass(access, layer, state, C.all_rows(state), state.tokens["query"] & state.valid)
    rows, row_valid = C.last_row(state)
    return C.attention_mass(access, layer, state, rows, row_valid)
