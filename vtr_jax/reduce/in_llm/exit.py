"""Visual-token exit: every visual token leaves the sequence at one decoder layer."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vtr_jax.reduce.api import Method, register
from vtr_jax.reduce.in_llm import common as C


@register
@dataclasses.dataclass(frozen=True)
class VisualExit(Method):
  """Rule-based visual-token exit (the training-free baseline of DyVTE, Sun et al. 2024).

  Before decoder layer `layer` all visual tokens leave the sequence and the
  caches of later layers; text tokens keep their position ids (a gap where
  the image was). DyVTE learns the exit layer with small hyper-networks that
  read the text tokens' states; that learned gate belongs with training.

  Attributes:
    layer: the first layer that runs without visual tokens (>= 1).
    mask: hide the visual tokens instead of removing them (checking variant).
  """
  name = "exit"
  stages = ("llm",)
  positions = "keep"
  summary = "all visual tokens leave the LLM at a fixed layer (DyVTE's rule)"
  layer: int = 8
  mask: bool = False

  def kept(self, n: int) -> int:
    return 0

  def layer_counts(self, n_visual: int, num_layers: int) -> list[int]:
    return C.single_drop_counts(self.name, self.layer, 0, n_visual, num_layers, self.mask)

  def llm_hook(self, text):
    C.check_layer(self.name, self.layer, text.num_layers, first=1)

    def hook(layer, state, access):
      if layer != self.layer:
        return state
      state, _ = C.keep_visual(state, jnp.zeros(state["valid"].shape, jnp.float32), 0, mask=self.mask,
                               renumber_positions=False)
      return state

    return hook
