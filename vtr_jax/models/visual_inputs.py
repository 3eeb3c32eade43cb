"""Structured visual inputs: several images / videos per prompt, static maxima.

A batch carries at most M visual units (an image, a video frame or an anyres
tile) per sample; `unit_input` says which placeholder (visual input) each unit
belongs to and `unit_frame` its frame / tile index inside that input. Padding
units have `unit_valid=False` (and input -1), so one compiled program serves
mixed batches (a 7-frame clip next to two images).

Not yet wired into `VLM.prefill` (which still takes one base image per
sample); `token_structure` gives the `Tokens.input/frame/row/col` fields for
the tower tokens of every unit, in unit-major, raster order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.seams import unit_structure

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisualInputs:
  """Attributes:
    pixels: float[B, M, H, W, C] every unit's pixels (zeros for padding).
    unit_input: int32[B, M] placeholder index (0-based) of each unit, -1 for padding.
    unit_frame: int32[B, M] frame (video) or tile (anyres) index within its input.
    unit_valid: bool[B, M] False for padding units.
  """
  pixels: Array
  unit_input: Array
  unit_frame: Array
  unit_valid: Array

  @classmethod
  def from_lists(cls, samples: list[list[np.ndarray]], max_units: int | None = None) -> "VisualInputs":
    """samples[b][i]: float[F, H, W, C] the units (frames or tiles; an image is F=1) of input i."""
    shapes = {u.shape[1:] for s in samples for inp in s for u in [np.asarray(inp)]}
    if len(shapes) != 1:
      raise ValueError(f"every frame/tile must have one shape [H, W, C]; got {sorted(shapes)}: resize first")
    for b, s in enumerate(samples):
      for i, inp in enumerate(s):
        if np.asarray(inp).ndim != 4 or len(inp) == 0:
          raise ValueError(f"sample {b} input {i}: need float[F>=1, H, W, C], got shape {np.shape(inp)}")
    counts = [sum(len(inp) for inp in s) for s in samples]
    m = max(counts) if max_units is None else max_units
    if max(counts) > m:
      raise ValueError(f"a sample holds {max(counts)} units > max_units={m}; raise max_units")
    shape = shapes.pop()
    bsz = len(samples)
    pix = np.zeros((bsz, m, *shape), np.float32)
    inp_id = np.full((bsz, m), -1, np.int32)
    frame = np.zeros((bsz, m), np.int32)
    for b, s in enumerate(samples):
      j = 0
      for i, inp in enumerate(s):
        f = len(inp)
        pix[b, j:j + f] = inp
        inp_id[b, j:j + f] = i
        frame[b, j:j + f] = np.arange(f)
        j += f
    return cls(jnp.asarray(pix), jnp.asarray(inp_id), jnp.asarray(frame), jnp.asarray(inp_id >= 0))

  @property
  def max_units(self) -> int:
    return self.pixels.shape[1]


def token_structure(vis: VisualInputs, grid: tuple[int, int]) -> dict[str, Array]:
  """Per-token structure for the tower tokens of every unit (unit-major, raster): `seams.unit_structure`.

  Args:
    vis: the batch's units (M per sample).
    grid: (rows, cols) of one unit's patch grid (P = rows * cols tokens).
  Returns:
    dict input/frame/row/col int32[B, M * P] and valid bool[B, M * P], the
    names of `seams.Tokens`' structure fields.
  """
  return unit_structure(vis.unit_input, vis.unit_frame, vis.unit_valid, grid)
