"""GPU form of the fused similarity reduction (`similarity.py`): one program per row block.

Same semantics, results and gradient as `similarity.max_similarity` (the
module docstring there). The TPU kernel keeps its running (best, index) in an
output block resident across a sequential grid axis; GPU programs of one
grid run concurrently, so here each program owns a block of `block_n` rows of
X and loops over Y in blocks of `block_m` with `lax.fori_loop` inside the
kernel, carrying the running (best, lowest arg-best) in registers. Grid:
`(B, cdiv(N, block_n))`; refs are whole arrays indexed by the program ids
(Pallas' Triton lowering; `interpret=True` runs it on any backend).

Triton wants power-of-two tiles: the wrapper pads N and M to multiples of
the blocks (padded columns never win, padded rows are cut off) and the
feature dim D to a power of two >= 16 (zero features change no score; the
per-row metric terms are computed before padding).

Attributes:
  BlockSizes: tile sizes and Triton launch settings.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vtr_jax.kernels import common, similarity


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the GPU similarity kernel (powers of two >= 16, Triton's dot minimum).

  Attributes:
    block_n: rows of X per program.
    block_m: rows of Y per loop step.
    num_warps, num_stages: Triton launch settings.
  """
  block_n: int = 64
  block_m: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_n", "block_m"):
      common.check_power_of_two(name, getattr(self, name), 16)


@functools.partial(jax.jit, static_argnames=("metric", "mode", "block_sizes", "interpret"))
def max_similarity(x: jax.Array, y: jax.Array, *, metric: str = "cosine", mode: str = "max",
                   x_valid: jax.Array | None = None, y_valid: jax.Array | None = None,
                   block_sizes: BlockSizes = BlockSizes(), interpret: bool = False):
  """GPU Pallas kernel for `similarity.max_similarity_reference` (same arguments and results).

  Returns:
    (values float32[B, N], index int32[B, N]); differentiable in x and y
    (the reference's gradient, shared with the TPU form).
  """
  call = functools.partial(_best_call, block_sizes=block_sizes, interpret=interpret)
  return similarity.run_kernel(call, x, y, metric, mode, x_valid, y_valid)


def _best_call(x, y, y_valid, metric, mode, *, block_sizes: BlockSizes, interpret):
  b, n, d = x.shape
  m = y.shape[1]
  bn, bm = block_sizes.block_n, block_sizes.block_m
  n_pad, m_pad, d_pad = common.round_up(n, bn), common.round_up(m, bm), common.next_power_of_two(d, 16)
  x_terms = jnp.pad(similarity.metric_terms(x, metric), ((0, 0), (0, n_pad - n)))  # [B, N']
  y_terms = jnp.pad(similarity.metric_terms(y, metric), ((0, 0), (0, m_pad - m)))  # [B, M']
  y_ok = jnp.ones((b, m), jnp.int32) if y_valid is None else y_valid.astype(jnp.int32)
  y_ok = jnp.pad(y_ok, ((0, 0), (0, m_pad - m)))
  xp = jnp.pad(x, ((0, 0), (0, n_pad - n), (0, d_pad - d)))
  yp = jnp.pad(y, ((0, 0), (0, m_pad - m), (0, d_pad - d)))
  kernel = functools.partial(_kernel, metric=metric, sign=1.0 if mode == "max" else -1.0, m_total=m,
                             masked=y_valid is not None, block_n=bn, block_m=bm)
  itemsize = jnp.dtype(x.dtype).itemsize
  val, idx = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, n_pad), jnp.float32), jax.ShapeDtypeStruct((b, n_pad), jnp.int32)),
      grid=(b, n_pad // bn),
      compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      cost_estimate=pl.CostEstimate(flops=2 * b * n * m * d, transcendentals=0,
                                    bytes_accessed=itemsize * b * d * (n + m * (n_pad // bn)) + 16 * b * (n + m)),
      interpret=interpret,
      name="max_similarity_gpu",
  )(xp, yp, x_terms, y_terms, y_ok)
  val = val[:, :n] if mode == "max" else -val[:, :n]
  return val, idx[:, :n]


def _kernel(x_ref, y_ref, x_terms_ref, y_terms_ref, y_ok_ref, val_ref, idx_ref, *, metric, sign, m_total, masked,
            block_n, block_m):
  """Program (sample b, row block i): the best (sign * score, lowest index) of its rows over every Y block.

  Refs (whole arrays): x [B, N', D'], y [B, M', D'], x_terms float32[B, N'],
  y_terms float32[B, M'], y_ok int32[B, M']; outputs value float32[B, N'],
  index int32[B, N'].
  """
  bi, i = pl.program_id(0), pl.program_id(1)
  rows = pl.ds(i * block_n, block_n)
  x = x_ref[bi, rows, :]  # [bn, D']
  x_terms = x_terms_ref[bi, rows][:, None]  # [bn, 1]

  def step(j, carry):
    best_val, best_idx = carry
    cols = pl.ds(j * block_m, block_m)
    s = common.dot_nt(x, y_ref[bi, cols, :])  # [bn, bm]
    y_terms = y_terms_ref[bi, cols][None, :]
    if metric == "cosine":
      s = s * x_terms * y_terms
    elif metric == "neg_sq_euclidean":
      s = 2 * s - x_terms - y_terms
    s = sign * s
    if masked:  # masked columns score the fill value, as in the reference
      s = jnp.where(y_ok_ref[bi, cols][None, :] != 0, s, jnp.finfo(jnp.float32).min)
    col = j * block_m + jnp.arange(block_m, dtype=jnp.int32)[None, :]
    s = jnp.where(col < m_total, s, -jnp.inf)  # padding past M never wins
    blk = jnp.max(s, axis=1)  # [bn]
    arg = jnp.min(jnp.where(s == blk[:, None], col, jnp.iinfo(jnp.int32).max), axis=1)
    better = blk > best_val  # strictly: an earlier block keeps its (lower) index on ties
    return jnp.where(better, blk, best_val), jnp.where(better, arg, best_idx)

  init = (jnp.full((block_n,), -jnp.inf, jnp.float32), jnp.zeros((block_n,), jnp.int32))
  best_val, best_idx = jax.lax.fori_loop(0, y_ref.shape[1] // block_m, step, init)
  val_ref[bi, rows] = best_val
  idx_ref[bi, rows] = best_idx
