"""PyramidDrop: multi-stage dropping of visual tokens with contiguous re-numbering."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vtr_jax.reduce.api import Method, ReductionError, register
from vtr_jax.reduce.in_llm import common as C


@register
@dataclasses.dataclass(frozen=True)
class PyramidDrop(Method):
  """PyramidDrop (Xing et al. 2024): drop visual tokens at several layer boundaries.

  At each boundary l in `layers` (before decoder layer l runs) the hidden
  states pass through layer l's input norm and q/k projections (with RoPE);
  the score of a visual token is the head-mean attention the *last
  instruction token* pays it (softmax over all keys, causal). Stage i keeps
  int(N * ratio^i) of the N visual tokens the LLM received (reference:
  50/25/12.5 % for ratio 0.5), in original order. Positions are re-numbered
  contiguously after each drop, so each layer's cache continues from its own
  re-numbered length when decoding (as the reference shifts position ids per
  stage).

  Training mode: when the state carries `tok/query` (bool[B, T], the tokens
  just before answer spans), their rows are averaged instead of the last
  token's (the reference's training rule).

  Attributes:
    layers: boundaries (0-indexed decoder layers), default 8/16/24 (32 layers).
    ratio: fraction of visual tokens kept per stage (lambda).
    mask: hide dropped tokens instead of removing them (the checking variant).
  """
  name = "pdrop"
  stages = ("llm",)
  positions = "renumber"
  summary = "multi-stage drop by the last instruction token's attention"
  layers: tuple[int, ...] = (8, 16, 24)
  ratio: float = 0.5
  mask: bool = False

  def _stage_keep(self, n_visual: int) -> list[int]:
    if not 0 < self.ratio <= 1:
      raise ReductionError(f"pdrop: ratio={self.ratio} must be in (0, 1]")
    return [int(n_visual * self.ratio ** (i + 1)) for i in range(len(self.layers))]

  def _check(self, num_layers: int) -> None:
    if list(self.layers) != sorted(set(self.layers)):
      raise ReductionError(f"pdrop: layers={self.layers} must be strictly increasing")
    for layer in self.layers:
      C.check_layer(self.name, layer, num_layers, first=1)

  def kept(self, n: int) -> int:
    return self._stage_keep(n)[-1]

  def layer_counts(self, n_visual: int, num_layers: int) -> list[int]:
    if self.mask:  # the checking variant keeps every slot: no saving
      return [n_visual] * num_layers
    self._check(num_layers)
    counts, current = [], n_visual
    keeps = dict(zip(self.layers, self._stage_keep(n_visual)))
    for i in range(num_layers):
      current = keeps.get(i, current)
      counts.append(current)
    return counts

  def llm_hook(self, text):
    self._check(text.num_layers)

    def hook(layer, state, access):
      if layer not in self.layers:
        return state
      stage = self.layers.index(layer)
      if stage == 0:
        state = {**state, "pdrop/n0": state["n_visual"]}
      keep = self._stage_keep(state["pdrop/n0"])[stage]
      if "tok/query" in state:  # training: rows just before answer spans
        rows = jnp.broadcast_to(jnp.arange(state["valid"].shape[1], dtype=jnp.int32), state["valid"].shape)
        row_valid = state["tok/query"] & state["valid"]
      else:
        rows, row_valid = C.last_row(state)
      scores = C.attention_mass(access, layer, state, rows, row_valid)
      state, _ = C.keep_visual(state, scores, keep, mask=self.mask, renumber_positions=True)
      return state

    return hook
