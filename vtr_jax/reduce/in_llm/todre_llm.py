"""ToDRE's second stage: visual tokens leave once their task relevance has faded."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vtr_jax.reduce.api import ReductionError, check_fraction, register
from vtr_jax.reduce.in_llm import common as C


def text_rows(state):
  """(rows int32[B, T], valid bool[B, T]): the prompt's text after the image, else its last token."""
  text = C.text_after_image(state)
  last, _ = C.last_row(state)
  fallback = jnp.arange(state.length)[None] == last
  return C.all_rows(state), jnp.where(jnp.any(text, axis=1, keepdims=True), text, fallback & state.valid)


@register
@dataclasses.dataclass(frozen=True)
class ToDRELLM(C.LLMMethod):
  """ToDRE's in-LLM stage (Li et al. 2025): after the layer where the text stops attending to
  the image, every visual token leaves.

  Task relevance at layer l = the attention mass that the prompt's text
  tokens after the image pay to all visual tokens (head-mean, averaged over
  those rows), computed from layer l's q/k on its input. From the first
  layer l >= `start` whose relevance falls below `threshold`, the sample's
  visual tokens (the class token too) are masked out of attention and of the
  caches of later layers. The exit layer is data-dependent and differs
  between the samples of a batch, so with static shapes the tokens stay in
  their slots, hidden: results are those of dropping them, but there is no
  FLOP saving (flops.py counts it dense); use `exit:layer=L` for a fixed
  layer that removes them. ToDRE's first stage (diversity) is the `todre`
  method: compose them as `todre:keep=64+todre_llm:start=2,threshold=0.1`.
  Reports (aux): `llm/todre_llm/exit_layer` int32[B] (the number of layers
  when a sample never exits) and `llm/todre_llm/relevance/<l>` float32[B].

  Attributes:
    start: the first layer checked (>= 1).
    threshold: relevance below which visual tokens leave (0 never).
  """
  name = "todre_llm"
  positions = "keep"
  summary = "ToDRE stage 2: visual tokens leave once text->image attention fades (masked)"
  removes_class_token = True
  start: int = 2
  threshold: float = 0.1

  def _check(self, num_layers: int) -> None:
    C.check_layer(self.name, self.start, num_layers, first=1)
    if not 0 <= self.threshold <= 1:
      raise ReductionError(f"todre_llm: threshold={self.threshold} must be in [0, 1] (a share of attention)")

  def kept(self, n: int) -> int:
    return n

  @classmethod
  def for_budget(cls, fraction, model):
    check_fraction(cls.name, fraction)
    return None  # the exit layer is decided by the data

  @classmethod
  def unbudgeted(cls, model):
    return cls(start=1, threshold=0.1)

  def layer_counts(self, n: int, num_layers: int, n_cls: int = 0) -> list[int]:
    self._check(num_layers)
    return [n + n_cls] * num_layers  # masked in place: every slot is still computed

  def boundaries(self, num_layers):
    self._check(num_layers)
    return tuple(range(self.start, num_layers))

  def at_boundary(self, layer, state, access):
    rows, row_valid = text_rows(state)
    mass = C.attention_mass(access, layer, state, rows, row_valid)  # [B, T]
    relevance = jnp.sum(jnp.where(state.visual & state.valid, mass, 0.0), axis=1)  # [B]
    exited = state.noted("exited", jnp.zeros(relevance.shape, bool))
    gone = exited | (relevance < self.threshold)
    exit_layer = jnp.where(gone & ~exited, layer,
                           state.noted("exit_layer", jnp.full(relevance.shape, access.num_layers, jnp.int32)))
    exit_layer = exit_layer.astype(jnp.int32)
    state = state.replace(valid=state.valid & ~(state.visual & gone[:, None]))
    state = state.note(exited=gone, exit_layer=exit_layer)
    return state.report(exit_layer=exit_layer, **{f"relevance/{layer}": relevance})
