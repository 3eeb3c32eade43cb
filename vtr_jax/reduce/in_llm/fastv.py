"""FastV: one drop of visual tokens inside the LLM, by the last token's attention."""

from __future__ import annotations

import dataclasses

from vtr_jax.reduce.api import register, resolve_budget, scaled_layer, target_tokens
from vtr_jax.reduce.in_llm import common as C


@register
@dataclasses.dataclass(frozen=True)
class FastV(C.SingleDrop):
  """FastV (Chen et al. 2024): drop visual tokens once, before decoder layer K.

  Score: the head-mean attention row of the *last prompt token* at layer K-1
  (the reference code's choice, not the paper's average over queries),
  computed from layer K-1's q of that one token against all keys; keep the
  top `keep` visual tokens (or `ratio` of them), in original order. Kept
  tokens keep their original position ids (gaps); decoding continues from
  the original length. Layers >= K run on, and cache, only the kept tokens.
  A class token handed on by the tower is kept and not counted.

  Attributes:
    layer: K >= 1 (paper: K=2, R=50%; common: K=3).
    keep / ratio: visual tokens kept after layer K.
    mask: FastV's attention-mask variant (full length, dropped tokens masked).
  """
  name = "fastv"
  positions = "keep"
  summary = "drop at layer K by the last prompt token's attention row at layer K-1"
  keep: int | None = None
  ratio: float | None = None

  def kept(self, n: int) -> int:
    return resolve_budget(self.name, self.keep, self.ratio, n)

  @classmethod
  def for_budget(cls, fraction, model):
    """K=2 of 32 layers moved to the model's depth; `keep` = the share of the visual tokens."""
    layers = model.text.num_layers
    return cls(layer=scaled_layer(2, 32, layers, lo=1, hi=layers - 1), keep=target_tokens(cls.name, fraction, model))

  def score(self, stage, state, access):
    rows, row_valid = C.last_row(state)
    return C.attention_mass(access, self.layer - 1, state, rows, row_valid)
