"""LLaVolta: average pooling of the visual tokens at an early decoder layer, for staged training."""

from __future__ import annotations

import dataclasses
import math
import jax.numpy as jnp

from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import ReductionError, check_fraction, register, scaled_layer
from vtr_jax.reduce.in_llm import common as C
from vtr_jax.seams import LLMState


def grid_side(method: str, n_patches: int) -> int:
  """The side g of the g x g patch grid that n_patches visual tokens (class token aside) form."""
  g = math.isqrt(n_patches)
  if g < 1 or g * g != n_patches:
    raise ReductionError(f"{method}: pools the full patch grid, but {n_patches} visual tokens (class token aside) "
                         "enter the LLM, not a square; put it before other reductions")
  return g


def pool_visual(state: LLMState, stride: int, *, mask: bool, method: str = "llavolta") -> LLMState:
  """Average-pools each sample's visual grid with window and stride s (`primitives.grid_windows`).

  Every sample's visual tokens form one block of slots: the class token (when
  `state.n_cls`, kept as it is) then a g x g patch grid in raster order. Each
  pooled token is the mean of its window's valid tokens (valid when any is),
  takes the per-token entries of the window's top-left slot (`patch`: its
  top-left patch) and position id floor(mean of the window's valid ids).
  Text tokens are untouched.

  Args:
    state: the decoder boundary state.
    stride: window side and stride s >= 1.
    mask: keep every slot, the pooled token at its window's top-left slot
      and the rest of the window hidden (valid=False), instead of removing them.
  Returns:
    the new state; n_visual becomes (class token +) ceil(g/s)^2 unless `mask`.
  """
  n_cls = state.n_cls
  g = grid_side(method, state.n_patches)
  window, first = P.grid_windows(g, stride)  # [g*g], [M]
  m = len(first)
  x, positions, valid = state.x, state.positions, state.valid
  start = jnp.argmax(state.visual, axis=1).astype(jnp.int32)  # [B] first visual slot
  grid_slots = start[:, None] + n_cls + jnp.arange(g * g, dtype=jnp.int32)[None]  # [B, g*g]
  w = P.take(valid, grid_slots).astype(jnp.float32)
  pooled_x, count = P.window_mean(P.take(x, grid_slots), w, window, m)  # [B, M, D], [B, M]
  mean_pos, _ = P.window_mean(P.take(positions, grid_slots).astype(jnp.float32)[..., None], w, window, m)
  pooled_pos = jnp.floor(mean_pos[..., 0]).astype(positions.dtype)  # [B, M]
  pooled_valid = count > 0
  cell_slots = grid_slots[:, first]  # [B, M] top-left slot of each window
  if mask:
    rows = jnp.arange(x.shape[0])[:, None]
    return state.replace(x=x.at[rows, cell_slots].set(pooled_x),
                         positions=positions.at[rows, cell_slots].set(pooled_pos),
                         valid=valid.at[rows, grid_slots].set(False).at[rows, cell_slots].set(pooled_valid))
  pooled = state.slots(cell_slots)  # the top-left slot's entries, then the pooled values
  pooled.update(x=pooled_x, positions=pooled_pos, valid=pooled_valid)
  return state.splice(start + n_cls, g * g, pooled, n_cls + m)


@register
@dataclasses.dataclass(frozen=True)
class LLaVolta(C.LLMMethod):
  """LLaVolta (Chen et al. 2024): average-pool the visual tokens before decoder layer K.

  The visual context compressor of LLaVolta, trained with a schedule that
  relaxes the compression as training proceeds (the reference's 4-stage
  recipe: layer 2 stride 8, layer 2 stride 2, layer 16 stride 2, then none);
  write the schedule in `train.reduction`, e.g.
  `2000:llavolta:layer=2,stride=4|4000:llavolta:layer=2,stride=2|none`.

  At the boundary before layer K the visual grid is average-pooled with an
  s x s window and stride s (`pool_visual`): g x g patches become
  ceil(g/s)^2 tokens; a class token stays as it is. Layers >= K run on, and
  cache, only the pooled tokens.

  Positions follow the reference code (Beckschen/LLaVolta, `visual_operating`
  in llava_llama.py): text keeps its original position ids (gaps remain, so a
  model trained with compression sees the same text positions as without
  it, which the last, uncompressed stage relies on) and a pooled token's id
  is the floor of the mean id of its window. Deviation: the reference pools
  1-D over the raster sequence (`avgpool1d`, a window of s consecutive
  tokens); here the window is s x s over the grid, the 2-D pooling
  METHODS.md and the paper describe, sharing its math with `pool`.

  Attributes:
    layer: K, the boundary before decoder layer K (0 = on the LLM input).
    stride: s >= 1 (1 keeps every token).
    mask: keep every slot and hide the pooled-away ones with `valid` (the
      checking variant: same results, no speed-up).
  """
  name = "llavolta"
  positions = "keep"
  summary = "average-pool the visual grid before decoder layer K (LLaVolta's staged training)"
  layer: int = 2
  stride: int = 2
  mask: bool = False

  def __post_init__(self):
    super().__post_init__()
    if self.stride < 1:
      raise ReductionError(f"{self.name}: stride={self.stride} must be >= 1")

  def kept(self, n: int) -> int:
    return math.ceil(grid_side(self.name, n) / self.stride) ** 2

  def layer_counts(self, n: int, num_layers: int, n_cls: int = 0) -> list[int]:
    C.check_layer(self.name, self.layer, num_layers)
    if self.mask:  # the checking variant keeps every slot: no saving
      return [n + n_cls] * num_layers
    k = self.kept(n) + n_cls
    return [n + n_cls if i < self.layer else k for i in range(num_layers)]

  @classmethod
  def for_budget(cls, fraction, model):
    """Pooled before the reference's layer 2 of 32 moved to the model's depth, with the stride whose
    token count is nearest the share (None above 1/4: stride 2 is the mildest pooling)."""
    fraction = check_fraction(cls.name, fraction)
    if int(round(1 / math.sqrt(fraction))) < 2:
      return None
    n, layers = model.reducible_tokens, model.text.num_layers
    g = grid_side(cls.name, n)
    stride = min(range(2, g + 1), key=lambda s: abs(math.ceil(g / s) ** 2 - fraction * n))
    return cls(layer=scaled_layer(2, 32, layers, lo=1, hi=layers - 1), stride=stride)

  def boundaries(self, num_layers):
    C.check_layer(self.name, self.layer, num_layers)
    return (self.layer,)

  def at_boundary(self, layer, state, access):
    return pool_visual(state, self.stride, mask=self.mask, method=self.name)
