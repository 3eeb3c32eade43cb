"""Fused similarity reduction: per row of X, the best (max or min) similarity over Y and its index.

Used by ToMe's bipartite matching, VisionZip's nearest-target assignment and
DART-style duplicate checks. `max_similarity_reference` materialises the
[B, N, M] score matrix; the Pallas kernel `max_similarity` streams Y in
blocks of `block_m` rows against a resident block of `block_n` rows of X and
keeps only a running (best value, best index) per row, so its memory is
O(N + M) beyond the inputs.

Semantics shared by every implementation:
  - metric `cosine` (rows L2-normalised, zero rows give similarity 0), `dot`,
    or `neg_sq_euclidean` (-|x - y|^2);
  - invalid Y columns never win; a row whose Y is fully masked gets the fill
    value (float32 min for `max`, max for `min`) and index 0;
  - ties resolve to the lowest index.
The kernel additionally never lets a NaN score win (the reference's argmax
returns the first NaN); with finite inputs the two agree.

Kernel layout (grid `(B, cdiv(N, block_n), cdiv(M, block_m))`, last axis
sequential): each step computes the float32 score tile [block_n, block_m]
with one matmul, applies the per-row / per-column metric terms precomputed
outside the kernel (inverse norms for cosine, squared norms for
neg_sq_euclidean), masks invalid and padding columns, and merges the tile's
(max, lowest arg-max) into the running result; a later block replaces it only
when strictly better, which keeps the lowest index on ties across blocks.
`min` runs as `max` over negated scores (negation is exact).

Attributes:
  METRICS: the supported similarity metrics.
  BlockSizes: tile sizes of the kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from vtr_jax.kernels import common

METRICS = ("cosine", "dot", "neg_sq_euclidean")
MODES = ("max", "min")


def check_options(metric: str, mode: str) -> None:
  """Raise ValueError for an unknown metric or mode."""
  if metric not in METRICS:
    raise ValueError(f"unknown similarity metric {metric!r}; known: {', '.join(METRICS)}")
  if mode not in MODES:
    raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")


def fill_value(mode: str) -> float:
  """The value a row gets when no column of Y is valid for it."""
  return float(jnp.finfo(jnp.float32).min if mode == "max" else jnp.finfo(jnp.float32).max)


def pairwise(x: jax.Array, y: jax.Array, metric: str) -> jax.Array:
  """float[B, N, D], float[B, M, D] -> float32[B, N, M]."""
  check_options(metric, "max")
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  if metric == "cosine":
    x = normalize(x)
    y = normalize(y)
  s = jnp.einsum("bnd,bmd->bnm", x, y, precision=jax.lax.Precision.HIGHEST)
  if metric == "neg_sq_euclidean":
    s = 2 * s - jnp.sum(x * x, -1)[..., None] - jnp.sum(y * y, -1)[:, None, :]
  return s


def paired(x: jax.Array, y: jax.Array, metric: str) -> jax.Array:
  """Similarity of matching rows, as `pairwise` computes it: float[B, N, D] twice -> float32[B, N]."""
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  if metric == "cosine":
    x = normalize(x)
    y = normalize(y)
  s = jnp.sum(x * y, -1)
  if metric == "neg_sq_euclidean":
    s = 2 * s - jnp.sum(x * x, -1) - jnp.sum(y * y, -1)
  return s


def normalize(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm; zero rows stay zero (no NaN)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.where(norm > 0, norm, 1.0)


def max_similarity_reference(x: jax.Array, y: jax.Array, *, metric: str = "cosine", mode: str = "max",
                             x_valid: jax.Array | None = None, y_valid: jax.Array | None = None):
  """Per row of x the best similarity over y.

  Args:
    x: float[B, N, D]; y: float[B, M, D].
    metric: see module docstring. mode: `max` or `min`.
    x_valid: bool[B, N] (rows marked False get the fill value and index 0).
    y_valid: bool[B, M] (False columns never win).
  Returns:
    (values float32[B, N], index int32[B, N]).
  """
  check_options(metric, mode)
  s = pairwise(x, y, metric)
  fill = fill_value(mode)
  if y_valid is not None:
    s = jnp.where(y_valid[:, None, :], s, fill)
  idx = (jnp.argmax(s, axis=-1) if mode == "max" else jnp.argmin(s, axis=-1)).astype(jnp.int32)
  val = jnp.take_along_axis(s, idx[..., None], axis=-1)[..., 0]
  has_any = jnp.ones(s.shape[:2], bool) if y_valid is None else jnp.any(y_valid, axis=-1)[:, None]
  if x_valid is not None:
    has_any = has_any & x_valid
  return jnp.where(has_any, val, fill), jnp.where(has_any, idx, 0)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the similarity kernel; each is clamped to its dimension by `clamp`.

  Attributes:
    block_n: rows of X per grid step (a multiple of 8).
    block_m: rows of Y streamed per step; the lane dimension of the
      [block_n, block_m] score tile (a multiple of 128).
  """
  block_n: int = 256
  block_m: int = 512

  def __post_init__(self):
    common.check_block("block_n", self.block_n, common.SUBLANES)
    common.check_block("block_m", self.block_m, common.LANES)

  def clamp(self, n: int, m: int) -> tuple[int, int]:
    """(block_n, block_m) for an N x M problem: never larger than the dimension (a full one is always legal)."""
    return min(self.block_n, n), min(self.block_m, m)


def check_shapes(x: jax.Array, y: jax.Array, x_valid: jax.Array | None, y_valid: jax.Array | None) -> None:
  """Raise ValueError naming the shapes when x, y and the masks do not fit together."""
  if x.ndim != 3 or y.ndim != 3:
    raise ValueError(f"x and y must be float[B, N, D] and float[B, M, D]; got shapes {x.shape} and {y.shape}")
  if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
    raise ValueError(f"x {x.shape} and y {y.shape} must share batch B and feature dim D")
  if x.shape[1] < 1 or y.shape[1] < 1:
    raise ValueError(f"x {x.shape} and y {y.shape} need at least one row each")
  for name, a in (("x", x), ("y", y)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {a.dtype}")
  for name, mask, rows in (("x_valid", x_valid, x), ("y_valid", y_valid, y)):
    if mask is not None and mask.shape != rows.shape[:2]:
      raise ValueError(f"{name} must have shape {rows.shape[:2]}, got {mask.shape}")


@functools.partial(jax.jit, static_argnames=("metric", "mode", "block_sizes", "interpret"))
def max_similarity(x: jax.Array, y: jax.Array, *, metric: str = "cosine", mode: str = "max",
                   x_valid: jax.Array | None = None, y_valid: jax.Array | None = None,
                   block_sizes: BlockSizes = BlockSizes(), interpret=False):
  """Pallas kernel for `max_similarity_reference` (same arguments and results).

  Args:
    x: float[B, N, D]; y: float[B, M, D] (bfloat16 is read as is; scores accumulate in float32).
    metric, mode, x_valid, y_valid: as in `max_similarity_reference`.
    block_sizes: tile sizes (static).
    interpret: False (compiled, Mosaic TPU), True (generic interpreter, any
      backend) or a `pltpu.InterpretParams` (TPU interpret mode); static.
  Returns:
    (values float32[B, N], index int32[B, N]). Differentiable in x and y
    (the gradient of the reference: it flows through the chosen pair only).
  """
  call = functools.partial(_best_call, block_sizes=block_sizes, interpret=interpret)
  return run_kernel(call, x, y, metric, mode, x_valid, y_valid)


def run_kernel(call, x, y, metric, mode, x_valid, y_valid):
  """What every kernel form shares: checks, dtype promotion, the custom_vjp, the fully-masked-row fill.

  `call(x, y, y_valid, metric, mode) -> (values float32[B, N], index int32[B, N])`
  is the form's kernel (`_best_call` here, `similarity_gpu` on GPU).
  """
  check_options(metric, mode)
  check_shapes(x, y, x_valid, y_valid)
  dtype = jnp.promote_types(x.dtype, y.dtype)
  val, idx = _best(x.astype(dtype), y.astype(dtype), y_valid, metric, mode, call)
  has_any = jnp.ones(x.shape[:2], bool) if y_valid is None else jnp.any(y_valid, axis=-1)[:, None]
  if x_valid is not None:
    has_any = has_any & x_valid
  return jnp.where(has_any, val, fill_value(mode)), jnp.where(has_any, idx, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _best(x, y, y_valid, metric, mode, call):
  """(values float32[B, N], index int32[B, N]) before the fully-masked-row fill."""
  return call(x, y, y_valid, metric, mode)


def _best_fwd(x, y, y_valid, metric, mode, call):
  val, idx = call(x, y, y_valid, metric, mode)
  return (val, idx), (x, y, y_valid, idx)


def _best_bwd(metric, mode, call, res, cotangents):
  """The reference's gradient: only the chosen (row, column) score depends on x and y."""
  del mode, call
  x, y, y_valid, idx = res
  g_val, _ = cotangents
  if y_valid is not None:  # a masked column's score is the constant fill value
    g_val = jnp.where(jnp.take_along_axis(y_valid, idx, axis=1), g_val, 0.0)
  _, pull = jax.vjp(lambda x, y: paired(x, jnp.take_along_axis(y, idx[..., None], axis=1), metric), x, y)
  dx, dy = pull(g_val)
  return dx, dy, None


_best.defvjp(_best_fwd, _best_bwd)


def metric_terms(a: jax.Array, metric: str) -> jax.Array:
  """float32[B, L]: the per-row factor the kernel applies (inverse norm, squared norm, or unused zeros)."""
  a = a.astype(jnp.float32)
  sq = jnp.sum(a * a, axis=-1)
  if metric == "cosine":
    norm = jnp.sqrt(sq)
    return 1.0 / jnp.where(norm > 0, norm, 1.0)
  if metric == "neg_sq_euclidean":
    return sq
  return jnp.zeros_like(sq)


def _best_call(x, y, y_valid, metric, mode, block_sizes, interpret):
  b, n, d = x.shape
  m = y.shape[1]
  bn, bm = block_sizes.clamp(n, m)
  x_terms = metric_terms(x, metric)[..., None]  # [B, N] -> [B, N, 1]
  y_terms = metric_terms(y, metric)[:, None, :]  # [B, M] -> [B, 1, M]
  row_spec = pl.BlockSpec((None, bn, 1), lambda bi, i, j: (bi, i, 0))
  col_spec = pl.BlockSpec((None, 1, bm), lambda bi, i, j: (bi, 0, j))
  inputs = [x, y, x_terms, y_terms]
  in_specs = [pl.BlockSpec((None, bn, d), lambda bi, i, j: (bi, i, 0)),
              pl.BlockSpec((None, bm, d), lambda bi, i, j: (bi, j, 0)), row_spec, col_spec]
  if y_valid is not None:
    inputs.append(y_valid.astype(jnp.int32)[:, None, :])  # [B, M] -> [B, 1, M]
    in_specs.append(col_spec)
  kernel = functools.partial(_kernel, metric=metric, sign=1.0 if mode == "max" else -1.0, m_total=m,
                             masked=y_valid is not None)
  itemsize = jnp.dtype(x.dtype).itemsize
  val, idx = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, n, 1), jnp.float32), jax.ShapeDtypeStruct((b, n, 1), jnp.int32)),
      grid=(b, pl.cdiv(n, bn), pl.cdiv(m, bm)),
      in_specs=in_specs,
      out_specs=(row_spec, row_spec),
      compiler_params=common.compiler_params("parallel", "parallel", "arbitrary"),
      cost_estimate=pl.CostEstimate(flops=2 * b * n * m * d, transcendentals=0,
                                    bytes_accessed=itemsize * b * d * (n + m * pl.cdiv(n, bn)) + 16 * b * (n + m)),
      interpret=interpret,
      name="max_similarity",
  )(*inputs)
  val = val[..., 0] if mode == "max" else -val[..., 0]  # [B, N, 1] -> [B, N]
  return val, idx[..., 0]


def _kernel(x_ref, y_ref, x_terms_ref, y_terms_ref, *refs, metric, sign, m_total, masked):
  """One [block_n, block_m] tile: merge its (max, lowest arg-max) into the running result.

  Refs: x [bn, D], y [bm, D], x_terms [bn, 1], y_terms [1, bm],
  (y_valid int32[1, bm] when masked), outputs value float32[bn, 1] and
  index int32[bn, 1] (resident across the Y axis).
  """
  if masked:
    y_valid_ref, val_ref, idx_ref = refs
  else:
    val_ref, idx_ref = refs
  j = pl.program_id(2)
  block_m = y_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    val_ref[...] = jnp.full(val_ref.shape, -jnp.inf, jnp.float32)
    idx_ref[...] = jnp.zeros(idx_ref.shape, jnp.int32)

  s = common.dot_nt(x_ref[...], y_ref[...])  # [bn, bm]
  if metric == "cosine":
    s = s * x_terms_ref[...] * y_terms_ref[...]
  elif metric == "neg_sq_euclidean":
    s = 2 * s - x_terms_ref[...] - y_terms_ref[...]
  s = sign * s
  if masked:  # masked columns score the fill value, as in the reference
    s = jnp.where(y_valid_ref[...] != 0, s, jnp.finfo(jnp.float32).min)
  col = common.col_ids(s.shape, j * block_m)
  s = jnp.where(col < m_total, s, -jnp.inf)  # padding past M never wins
  best = jnp.max(s, axis=1, keepdims=True)  # [bn, 1]
  arg = jnp.min(jnp.where(s == best, col, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
  better = best > val_ref[...]  # strictly: an earlier block keeps its (lower) index on ties
  val_ref[...] = jnp.where(better, best, val_ref[...])
  idx_ref[...] = jnp.where(better, arg, idx_ref[...])
