"""Visual-token exit: every visual token leaves the sequence at one decoder layer."""

from __future__ import annotations

import dataclasses

from vtr_jax.reduce.api import check_fraction, register
from vtr_jax.reduce.in_llm import common as C


@register
@dataclasses.dataclass(frozen=True)
class VisualExit(C.SingleDrop):
  """Rule-based visual-token exit (the training-free baseline of DyVTE, Sun et al. 2024).

  Before decoder layer `layer` all visual tokens leave the sequence and the
  caches of later layers, the class token too (the LLM runs on text alone
  from there); text tokens keep their position ids (a gap where the image
  was). DyVTE learns the exit layer with small hyper-networks that read the
  text tokens' states; that learned gate belongs with training.

  Attributes:
    layer: the first layer that runs without visual tokens (>= 1).
    mask: hide the visual tokens instead of removing them (checking variant).
  """
  name = "exit"
  positions = "keep"
  summary = "all visual tokens leave the LLM at a fixed layer (DyVTE's rule)"
  removes_class_token = True
  scored = False
  layer: int = 8

  def kept(self, n: int) -> int:
    return 0

  @classmethod
  def for_budget(cls, fraction, model):
    """The exit layer whose layer-averaged visual tokens are about `fraction`: 2 x fraction x depth
    (every visual token stays for `layer` of the layers; the average counts the dense half twice)."""
    layers = model.text.num_layers
    return cls(layer=int(min(layers - 1, max(1, round(2 * check_fraction(cls.name, fraction) * layers)))))
