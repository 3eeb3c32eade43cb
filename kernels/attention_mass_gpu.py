"""GPU form of the attention-mass kernel (`attention_mass.py`): programs own blocks, loops run inside.

Same semantics, result and gradient as `attention_mass.attention_mass` (the
module docstring there). The TPU kernel accumulates into output blocks that
stay resident across sequential grid axes; GPU programs of one grid run
concurrently, so each program here owns its output and loops with
`lax.fori_loop` inside the kernel (Pallas' Triton lowering; refs are whole
arrays indexed by the program ids; `interpret=True` runs on any backend):
  1. statistics, grid (B, K, row blocks): a program loads its block of
     stacked query rows (the G heads of a kv head times R rows) once and
     loops over key blocks, keeping the online row max and rescaled sum;
  2. mass, grid (B, key blocks): a program loads its key block once per kv
     head and loops over (kv head, row block), summing exp(logit - lse) over
     rows into its keys. No atomics: the result is deterministic.
Triton wants power-of-two tiles, so the wrapper pads rows and keys to their
blocks (padded rows get limit -1: they see no key; padded keys lie past every
row's limit) and the head dim to a power of two >= 16 (zero features add
nothing to a logit).

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

from vtr_jax.kernels import attention_mass as tpu_form
from vtr_jax.kernels import common


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the GPU attention-mass kernel (powers of two >= 16, Triton's dot minimum).

  Attributes:
    block_rows: stacked query rows (G * R axis) per tile.
    block_keys: keys per tile.
    num_warps, num_stages: Triton launch settings.
  """
  block_rows: int = 32
  block_keys: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_rows", "block_keys"):
      common.check_power_of_two(name, getattr(self, name), 16)


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def attention_mass(q: jax.Array, k: jax.Array, *, key_valid: jax.Array | None = None,
                   row_valid: jax.Array | None = None, q_slots: jax.Array | None = None,
                   scale: float | None = None, block_sizes: BlockSizes = BlockSizes(),
                   interpret: bool = False) -> jax.Array:
  """GPU Pallas kernel for `attention_mass_reference` (same arguments and result, float32[B, S]);
  differentiable in q and k (the reference's gradient, shared with the TPU form)."""
  call = functools.partial(_mass_call, block_sizes=block_sizes, interpret=interpret)
  return tpu_form.run_kernel(call, q, k, key_valid, row_valid, q_slots, scale)


def _mass_call(q, k, limit, key_valid, scale, *, block_sizes: BlockSizes, interpret):
  b, n, r, h = q.shape
  kh, s = k.shape[1], k.shape[2]
  rows = (n // kh) * r
  br, bs = block_sizes.block_rows, block_sizes.block_keys
  rows_pad, s_pad, h_pad = common.round_up(rows, br), common.round_up(s, bs), common.next_power_of_two(h, 16)
  q_rows = q.reshape(b, kh, rows, h)  # [B, N, R, H] -> [B, K, G*R, H]
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows_pad - rows), (0, h_pad - h)))
  kp = jnp.pad(k, ((0, 0), (0, 0), (0, s_pad - s), (0, h_pad - h)))
  row_limit = jnp.tile(limit, (1, n // kh))  # [B, R] -> [B, G*R], row g*R + r -> limit[r]
  row_limit = jnp.pad(row_limit, ((0, 0), (0, rows_pad - rows)), constant_values=-1)
  key_ok = jnp.ones((b, s), jnp.int32) if key_valid is None else key_valid.astype(jnp.int32)
  key_ok = jnp.pad(key_ok, ((0, 0), (0, s_pad - s)))
  params = plgpu.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages)
  itemsize = jnp.dtype(q.dtype).itemsize
  flops = 2 * b * n * r * s * h
  n_rows, n_keys = rows_pad // br, s_pad // bs

  row_max, row_sum = pl.pallas_call(
      functools.partial(_stats_kernel, scale=scale, block_rows=br, block_keys=bs),
      out_shape=(jax.ShapeDtypeStruct((b, kh, rows_pad), jnp.float32),) * 2,
      grid=(b, kh, n_rows),
      compiler_params=params,
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=b * n * r * s,
                                    bytes_accessed=itemsize * b * kh * (rows + s * n_rows) * h),
      interpret=interpret,
      name="attention_mass_stats_gpu",
  )(q_rows, kp, row_limit, key_ok)
  lse = jnp.where(row_sum > 0, row_max + jnp.log(jnp.where(row_sum > 0, row_sum, 1.0)), 0.0)  # [B, K, G*R']

  total = pl.pallas_call(
      functools.partial(_mass_kernel, scale=scale, block_rows=br, block_keys=bs),
      out_shape=jax.ShapeDtypeStruct((b, s_pad), jnp.float32),
      grid=(b, n_keys),
      compiler_params=params,
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=b * n * r * s,
                                    bytes_accessed=itemsize * b * kh * (rows * n_keys + s) * h),
      interpret=interpret,
      name="attention_mass_gpu",
  )(q_rows, kp, row_limit, key_ok, lse)[:, :s]
  contributing = jnp.sum(row_sum[:, 0, :r] > 0, axis=-1)  # [B]: rows with a visible key (head 0's block)
  count = (contributing * n).astype(jnp.float32)
  return total / jnp.where(count > 0, count, 1.0)[:, None]


def _logits(q_ref, k_ref, limit_ref, key_ok_ref, bi, kv, i, j, *, scale, block_rows, block_keys):
  """(float32[br, bs] logits, bool[br, bs] visible) of row block i and key block j of kv head kv."""
  rows, keys = pl.ds(i * block_rows, block_rows), pl.ds(j * block_keys, block_keys)
  logits = common.dot_nt(q_ref[bi, kv, rows, :], k_ref[bi, kv, keys, :]) * scale
  col = j * block_keys + jnp.arange(block_keys, dtype=jnp.int32)[None, :]
  visible = (col <= limit_ref[bi, rows][:, None]) & (key_ok_ref[bi, keys][None, :] != 0)
  return logits, visible


def _stats_kernel(q_ref, k_ref, limit_ref, key_ok_ref, max_ref, sum_ref, *, scale, block_rows, block_keys):
  """Program (b, kv, row block): online max and sum of exp over every key block.

  Refs (whole arrays): q [B, K, G*R', H'], k [B, K, S', H'], limit int32[B, G*R'],
  key_ok int32[B, S']; outputs max, sum float32[B, K, G*R'].
  """
  bi, kv, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tile = functools.partial(_logits, q_ref, k_ref, limit_ref, key_ok_ref, bi, kv, i, scale=scale,
                           block_rows=block_rows, block_keys=block_keys)

  def step(j, carry):
    peak, total = carry
    logits, visible = tile(j)
    logits = jnp.where(visible, logits, -jnp.inf)
    new = jnp.maximum(peak, jnp.max(logits, axis=1))
    shift = jnp.where(new == -jnp.inf, 0.0, new)  # no visible key yet: keep exp(-inf) = 0, never inf - inf
    total = total * jnp.exp(peak - shift) + jnp.sum(jnp.exp(logits - shift[:, None]), axis=1)
    return new, total

  init = (jnp.full((block_rows,), -jnp.inf, jnp.float32), jnp.zeros((block_rows,), jnp.float32))
  peak, total = jax.lax.fori_loop(0, k_ref.shape[2] // block_keys, step, init)
  rows = pl.ds(i * block_rows, block_rows)
  max_ref[bi, kv, rows] = peak
  sum_ref[bi, kv, rows] = total


def _mass_kernel(q_ref, k_ref, limit_ref, key_ok_ref, lse_ref, out_ref, *, scale, block_rows, block_keys):
  """Program (b, key block): probabilities summed over every (kv head, row block) into its keys.

  Refs: as `_stats_kernel`'s inputs, then lse float32[B, K, G*R']; output float32[B, S'].
  """
  bi, j = pl.program_id(0), pl.program_id(1)
  n_rows = q_ref.shape[2] // block_rows

  def head(kv, acc):
    def row_block(i, acc):
      logits, visible = _logits(q_ref, k_ref, limit_ref, key_ok_ref, bi, kv, i, j, scale=scale,
                                block_rows=block_rows, block_keys=block_keys)
      lse = lse_ref[bi, kv, pl.ds(i * block_rows, block_rows)][:, None]
      return acc + jnp.sum(jnp.where(visible, jnp.exp(logits - lse), 0.0), axis=0)
    return jax.lax.fori_loop(0, n_rows, row_block, acc)

  acc = jax.lax.fori_loop(0, q_ref.shape[1], head, jnp.zeros((block_keys,), jnp.float32))
  out_ref[bi, pl.ds(j * block_keys, block_keys)] = acc
