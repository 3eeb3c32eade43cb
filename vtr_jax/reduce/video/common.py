"""Frame-structured Tokens for video methods.

A clip is Tokens whose N = F * P tokens are frame-major, with `frame`, `row`,
`col` filled and `valid` False on absent frames. Methods derive F and the grid
from `frame` / shapes (F = N // P with P = grid_h * grid_w).
"""

from __future__ import annotations

import jax.numpy as jnp

from vtr_jax.reduce.api import ReductionError
from vtr_jax.seams import Tokens, unit_structure


def frame_tokens(x, grid: tuple[int, int], frames_valid=None) -> Tokens:
  """Tokens of a clip.

  Args:
    x: float[B, F, P, D] per-frame features, P = grid[0] * grid[1] in raster order.
    grid: (rows, cols) of each frame's patch grid.
    frames_valid: int32[B] number of present frames per sample (None: all F).
  Returns:
    Tokens with N = F * P, positions 0..N-1, frame/row/col filled, input 0.
  """
  b, f, p, d = x.shape
  gh, gw = grid
  if gh * gw != p:
    raise ReductionError(f"frame_tokens: grid {grid} has {gh * gw} cells but frames have {p} tokens; "
                         "pass the frame's patch grid")
  n = f * p
  count = jnp.full((b,), f, jnp.int32) if frames_valid is None else jnp.asarray(frames_valid, jnp.int32)
  frames = jnp.broadcast_to(jnp.arange(f, dtype=jnp.int32), (b, f))
  s = unit_structure(jnp.zeros((b, f), jnp.int32), frames, frames < count[:, None], grid)
  return Tokens(x.reshape(b, n, d), jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), s["valid"],
                jnp.ones((b, n), jnp.float32), input=s["input"], frame=s["frame"], row=s["row"], col=s["col"])
