"""FastV: one drop of visual tokens inside the LLM, by the last token's attention."""

from __future__ import annotations

import dataclasses

from vtr_jax.reduce.api import Method, register, resolve_budget
from vtr_jax.reduce.in_llm import common as C


@register
@dataclasses.dataclass(frozen=True)
class FastV(Method):
  """FastV (Chen et al. 2024): drop visual tokens once, before decoder layer K.

  Score: the head-mean attention row of the *last prompt token* at layer K-1
  (the reference code's choice, not the paper's average over queries),
  computed from layer K-1's q of that one token against all keys; keep the
  top `keep` visual tokens (or `ratio` of them), in original order. Kept
  tokens keep their original position ids (gaps); decoding continues from
  the original length. Layers >= K run on, and cache, only the kept tokens.

  Attributes:
    layer: K >= 1 (paper: K=2, R=50%; common: K=3).
    keep / ratio: visual tokens kept after layer K.
    mask: FastV's attention-mask variant (full length, dropped tokens masked).
  """
  name = "fastv"
  stages = ("llm",)
  positions = "keep"
  summary = "drop at layer K by the last token's attention row at layer K-1"
  layer: int = 2
  keep: int | None = None
  ratio: float | None = None
  mask: bool = False

  def kept(self, n: int) -> int:
    return resolve_budget(self.name, self.keep, self.ratio, n)

  def layer_counts(self, n_visual: int, num_layers: int) -> list[int]:
    return C.single_drop_counts(self.name, self.layer, self.kept(n_visual), n_visual, num_layers, self.mask)

  def llm_hook(self, text):
    C.check_layer(self.name, self.layer, text.num_layers, first=1)

    def hook(layer, state, access):
      if layer == self.layer - 1:
        rows, row_valid = C.last_row(state)
        return {**state, "tok/fastv_score": C.attention_mass(access, layer, state, rows, row_valid)}
      if layer == self.layer:
        scores = state["tok/fastv_score"]
        state = {k: v for k, v in state.items() if k != "tok/fastv_score"}
        state, _ = C.keep_visual(state, scores, self.kept(state["n_visual"]), mask=self.mask,
                                 renumber_positions=False)
      return state

    return hook
