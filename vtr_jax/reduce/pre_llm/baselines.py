"""The baselines every comparison needs: seeded random, uniform grid subsample, average pooling.

All three act on the vision features (default) or the projected tokens
(`@embed`); kept tokens stay in original order; positions are re-numbered.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import Method, ReductionError, check_fraction, register, resolve_budget
from vtr_jax.seams import Tokens


@register
@dataclasses.dataclass(frozen=True)
class Random(Method):
  """Seeded random selection of `keep` tokens (UniPruneBench reports it as a strong baseline).

  Each sample's draw depends on the seed and an exact hash of that sample's
  image, so a sample gives the same selection alone or in a batch.
  """
  name = "random"
  stages = ("vision", "embed")
  summary = "seeded random subset of the visual tokens"
  keep: int | None = None
  ratio: float | None = None
  seed: int = 0

  def kept(self, n: int) -> int:
    return resolve_budget(self.name, self.keep, self.ratio, n)

  def reduce(self, tokens: Tokens, ctx):
    k = self.kept(tokens.count)
    fp = ctx.fingerprint if ctx is not None and ctx.fingerprint is not None else P.fingerprint(tokens.x)
    keys = P.sample_keys(self.seed, fp)
    scores = jax.vmap(lambda key: jax.random.uniform(key, (tokens.count,)))(keys)
    idx = P.topk_indices(scores, k, tokens.valid)
    return tokens.gather(idx), {"index": idx}


def uniform_indices(n: int, k: int, grid: int | None) -> np.ndarray:
  """k indices spread evenly: a s x s lattice of the grid when k = s^2, else even steps in raster order."""
  s = math.isqrt(k)
  if grid is not None and grid * grid == n and s * s == k:
    lines = np.floor((np.arange(s) + 0.5) * grid / s).astype(np.int64)
    return (lines[:, None] * grid + lines[None, :]).reshape(-1).astype(np.int32)
  return np.floor((np.arange(k) + 0.5) * n / k).astype(np.int32)


@register
@dataclasses.dataclass(frozen=True)
class Uniform(Method):
  """Uniform subsample: an s x s lattice of the patch grid when keep = s^2, else evenly
  spaced indices in raster order (floor((i + 1/2) N / keep))."""
  name = "uniform"
  stages = ("vision", "embed")
  summary = "evenly spaced grid subsample"
  keep: int | None = None
  ratio: float | None = None

  def kept(self, n: int) -> int:
    return resolve_budget(self.name, self.keep, self.ratio, n)

  def reduce(self, tokens: Tokens, ctx):
    n = tokens.count
    grid = ctx.vision.grid if ctx is not None else None
    idx = jnp.broadcast_to(jnp.asarray(uniform_indices(n, self.kept(n), grid)), (tokens.x.shape[0], self.kept(n)))
    return tokens.gather(idx), {"index": idx}


@register
@dataclasses.dataclass(frozen=True)
class Pool(Method):
  """Average pooling over the patch grid with window and stride s (LLaVolta's compressor).

  A g x g grid becomes ceil(g/s) x ceil(g/s) tokens; windows at the border
  average only the patches they cover. A pooled token's position is its
  window's top-left patch and its size the number of patches averaged.
  """
  name = "pool"
  stages = ("vision", "embed")
  summary = "average pooling over the patch grid (stride s)"
  stride: int = 2

  def _grid(self, n: int, vision) -> int:
    g = vision.grid
    if g * g != n:
      raise ReductionError(f"pool needs the full {g}x{g} patch grid ({g * g} tokens), got {n} tokens; "
                           "put it first in the plan")
    if self.stride < 1:
      raise ReductionError(f"pool: stride={self.stride} must be >= 1")
    return g

  def kept(self, n: int) -> int:
    g = math.isqrt(n)
    return math.ceil(g / self.stride) ** 2

  @classmethod
  def for_budget(cls, fraction, model):
    """The stride nearest 1 / sqrt(fraction) (None above about 1/4: stride 2 is the mildest pooling)."""
    stride = int(round(1 / math.sqrt(check_fraction(cls.name, fraction))))
    return cls(stride=stride) if stride >= 2 else None

  def reduce(self, tokens: Tokens, ctx):
    g = self._grid(tokens.count, ctx.vision)
    window, first = P.grid_windows(g, self.stride)  # [N] pooled cell of each patch, [M] top-left patches
    m = len(first)
    b = tokens.x.shape[0]
    assign = jnp.broadcast_to(jnp.asarray(window), (b, g * g))
    w = tokens.valid.astype(jnp.float32)
    x, den = P.window_mean(tokens.x, w, window, m)
    size, _ = P.scatter_sum(tokens.size[..., None] * w[..., None], w, assign, m)
    positions = P.take(tokens.positions, jnp.broadcast_to(jnp.asarray(first), (b, m)))
    return Tokens(x, positions, den > 0, size[..., 0]), {"assign": assign}
