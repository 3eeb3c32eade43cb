"""Frame-structured Tokens for video methods.

A clip is Tokens whose N = F * P tokens are frame-major, with `frame`, `row`,
`col` filled and `valid` False on absent frames. Methods derive F and the grid
from `frame` / shapes (F = N // P with P = grid_h * grid_w).
"""

from __future__ import annotations

import jax.numpy as jnp

from vtr_jax.reduce.api import ReductionError
from vtr_jax.seams import Tokens


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
  idx = jnp.arange(n, dtype=jnp.int32)
  frame = jnp.broadcast_to(idx // p, (b, n))
  row = jnp.broadcast_to((idx % p) // gw, (b, n))
  col = jnp.broadcast_to(idx % gw, (b, n))
  count = jnp.full((b,), f, jnp.int32) if frames_valid is None else jnp.asarray(frames_valid, jnp.int32)
  valid = frame < count[:, None]
  return Tokens(x.reshape(b, n, d), jnp.broadcast_to(idx, (b, n)), valid, jnp.ones((b, n), jnp.float32),
                input=jnp.zeros((b, n), jnp.int32), frame=frame, row=row, col=col)
