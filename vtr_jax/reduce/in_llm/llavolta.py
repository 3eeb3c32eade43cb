"""LLaVolta: average pooling of the visual tokens at an early decoder layer, for staged training."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import Method, ReductionError, register
from vtr_jax.reduce.in_llm import common as C


def split_grid(method: str, n_visual: int) -> tuple[int, int]:
  """(class tokens 0 or 1, grid side g) of n_visual tokens entering the LLM: g*g patches, maybe a class token first."""
  for n_cls in (0, 1):
    g = math.isqrt(n_visual - n_cls)
    if g > 0 and g * g == n_visual - n_cls:
      return n_cls, g
  raise ReductionError(f"{method}: pools the full patch grid, but {n_visual} visual tokens enter the LLM (neither a "
                       "square nor a square plus a class token); put it before other reductions")


def pool_visual(state: dict[str, Any], stride: int, *, mask: bool, method: str = "llavolta") -> dict[str, Any]:
  """Average-pools each sample's visual grid with window and stride s (`primitives.grid_windows`).

  Every sample's N visual tokens form one block of slots: an optional class
  token (kept as it is) then a g x g patch grid in raster order. Each pooled
  token is the mean of its window's valid tokens (valid when any is), takes
  the per-token entries of the window's top-left slot (`tok/patch`: its
  top-left patch) and position id floor(mean of the window's valid ids).
  Text tokens are untouched.

  Args:
    state: the decoder hook state (see `common`).
    stride: window side and stride s >= 1.
    mask: keep every slot, the pooled token at its window's top-left slot
      and the rest of the window hidden (valid=False), instead of removing them.
  Returns:
    the new state; n_visual becomes (class token +) ceil(g/s)^2 unless `mask`.
  """
  n = state["n_visual"]
  n_cls, g = split_grid(method, n)
  window, first = P.grid_windows(g, stride)  # [g*g], [M]
  m = len(first)
  x, positions, valid, visual = state["x"], state["positions"], state["valid"], state["visual"]
  start = jnp.argmax(visual, axis=1).astype(jnp.int32)[:, None]  # [B, 1] first visual slot
  grid_slots = start + n_cls + jnp.arange(g * g, dtype=jnp.int32)[None]  # [B, g*g]
  w = P.take(valid, grid_slots).astype(jnp.float32)
  pooled_x, count = P.window_mean(P.take(x, grid_slots), w, window, m)  # [B, M, D], [B, M]
  mean_pos, _ = P.window_mean(P.take(positions, grid_slots).astype(jnp.float32)[..., None], w, window, m)
  pooled_pos = jnp.floor(mean_pos[..., 0]).astype(positions.dtype)  # [B, M]
  pooled_valid = count > 0
  if mask:
    rows = jnp.arange(x.shape[0])[:, None]
    cell_slots = grid_slots[:, first]  # [B, M] top-left slot of each window
    new = dict(state)
    new["x"] = x.at[rows, cell_slots].set(pooled_x)
    new["positions"] = positions.at[rows, cell_slots].set(pooled_pos)
    new["valid"] = valid.at[rows, grid_slots].set(False).at[rows, cell_slots].set(pooled_valid)
    return new
  k = n_cls + m  # visual tokens afterwards
  t = x.shape[1]
  j = jnp.arange(t - n + k, dtype=jnp.int32)[None]  # [1, T'] output slots
  is_vis = (j >= start) & (j < start + k)
  vis_src = jnp.asarray(np.concatenate([np.arange(n_cls), n_cls + first]).astype(np.int32))  # [K] within the block
  v = jnp.clip(j - start, 0, k - 1)  # [B, T'] visual index of a visual output slot
  src = jnp.where(j < start, j, jnp.where(is_vis, start + vis_src[v], j - k + n))
  new = C.gather_state(state, src)
  cls = lambda a: P.take(a, start + jnp.arange(n_cls, dtype=jnp.int32)[None])  # [B, n_cls, ...]
  block_x = jnp.concatenate([cls(x), pooled_x], axis=1)  # [B, K, D]
  block_pos = jnp.concatenate([cls(positions), pooled_pos], axis=1)  # [B, K]
  block_valid = jnp.concatenate([cls(valid), pooled_valid], axis=1)
  new["x"] = jnp.where(is_vis[..., None], P.take(block_x, v), new["x"])
  new["positions"] = jnp.where(is_vis, P.take(block_pos, v), new["positions"])
  new["valid"] = jnp.where(is_vis, P.take(block_valid, v), new["valid"])
  new["n_visual"] = k
  return new


@register
@dataclasses.dataclass(frozen=True)
class LLaVolta(Method):
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
  stages = ("llm",)
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
    n_cls, g = split_grid(self.name, n)
    return n_cls + math.ceil(g / self.stride) ** 2

  def layer_counts(self, n_visual: int, num_layers: int) -> list[int]:
    C.check_layer(self.name, self.layer, num_layers)
    if self.mask:  # the checking variant keeps every slot: no saving
      return [n_visual] * num_layers
    k = self.kept(n_visual)
    return [n_visual if i < self.layer else k for i in range(num_layers)]

  def llm_hook(self, text):
    C.check_layer(self.name, self.layer, text.num_layers)

    def hook(layer, state, access):
      if layer != self.layer:
        return state
      return pool_visual(state, self.stride, mask=self.mask, method=self.name)

    return hook
