"""Attention mass: the softmax attention each key receives from a set of query rows.

For query rows Q (last prompt token, SparseVLM raters, a CLS token, all text)
against keys K with grouped-query heads, returns the softmax attention every
key receives, averaged over heads and over the valid rows. Used by FastV,
PyramidDrop, SparseVLM, FasterVLM / VTC-CLS (the CLS row) and received-
attention scoring. The reference materialises [B, N, R, S]; the kernel
computes it flash-style without doing so.

Letters: B batch, N query heads, K kv heads (N % K == 0, G = N // K heads
share a kv head), R query rows, S keys, H head dim.

Semantics: logits = q . k * scale (scale defaults to 1/sqrt(H)); key s is
visible to row r when key_valid[b, s] and (if causal) s <= q_slots[b, r]; each
row's softmax runs over its visible keys only; rows with row_valid False or
with no visible key contribute nothing; the mean is over heads and over the
rows that contribute (all zeros when none does).

Kernel (`attention_mass`): the G query heads of a kv head are stacked as
G * R rows ([B, N, R, H] -> [B, K, G*R, H], a free reshape), so each key
block is read once per kv head. Two Pallas passes:
  1. statistics, grid (B, K, row blocks, key blocks), key axis sequential:
     the online row max m and rescaled sum l of exp(logit - m) over visible
     keys (flash attention's forward without the value matmul);
  2. mass, grid (B, key blocks, K, row blocks), the last two sequential:
     exp(logit - logsumexp) summed over rows and heads into each key block.
Memory beyond the inputs is O(B N R + B S); nothing of size [R, S] is
stored. Row masks, causality and the bounds of a ragged last key block fold
into one int32 limit per row (the last visible slot; -1 for a masked row).
The backward pass (custom_vjp) is the reference's gradient; it materialises
[B, N, R, S] (R query rows, not S x S).

Existing alternatives checked: `jax.nn.dot_product_attention` and tokamax's
`dot_product_attention` return attention outputs (and tokamax internally the
logsumexp residual), never per-key column sums of the probabilities; the
column sums equal dV of a flash backward with dO = 1 and a width-1 V, which
would also compute dQ and dK. Neither offers this reduction directly.

Attributes:
  BlockSizes: tile sizes of the kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from vtr_jax.kernels import common


def attention_mass_reference(q: jax.Array, k: jax.Array, *, key_valid: jax.Array | None = None,
                             row_valid: jax.Array | None = None, q_slots: jax.Array | None = None,
                             scale: float | None = None) -> jax.Array:
  """Mean softmax attention per key.

  Args:
    q: float[B, N, R, H] query rows (N heads).
    k: float[B, K, S, H] keys (K kv heads, N % K == 0).
    key_valid: bool[B, S]. row_valid: bool[B, R].
    q_slots: int32[B, R] sequence slot of each row; given -> causal masking.
    scale: logit scale (default H ** -0.5).
  Returns:
    float32[B, S].
  """
  b, n, r, h = q.shape
  kh, s = k.shape[1], k.shape[2]
  if n % kh:
    raise ValueError(f"query heads {n} must be a multiple of kv heads {kh}")
  scale = h ** -0.5 if scale is None else scale
  qg = q.astype(jnp.float32).reshape(b, kh, n // kh, r, h)  # [B, N, R, H] -> [B, K, G, R, H]
  logits = jnp.einsum("bkgrh,bksh->bkgrs", qg, k.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST) * scale
  visible = jnp.ones((b, r, s), bool)
  if key_valid is not None:
    visible = visible & key_valid[:, None, :]
  if q_slots is not None:
    visible = visible & (jnp.arange(s)[None, None, :] <= q_slots[:, :, None])
  if row_valid is not None:
    visible = visible & row_valid[:, :, None]
  mask = visible[:, None, None]  # [B, 1, 1, R, S]
  logits = jnp.where(mask, logits, -jnp.inf)
  peak = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  probs = e / jnp.where(denom > 0, denom, 1.0)  # [B, K, G, R, S]
  rows = jnp.any(visible, axis=-1)  # [B, R] rows that contribute
  total = jnp.sum(probs, axis=(1, 2, 3))  # [B, S]
  count = jnp.sum(rows, axis=-1).astype(jnp.float32) * n  # heads x contributing rows
  return total / jnp.where(count > 0, count, 1.0)[:, None]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the attention-mass kernel; each is clamped to its dimension by `clamp`.

  Attributes:
    block_rows: stacked query rows (G * R axis) per grid step (a multiple of 8).
    block_keys: keys per grid step; the lane dimension of the score tile (a multiple of 128).
  """
  block_rows: int = 128
  block_keys: int = 512

  def __post_init__(self):
    common.check_block("block_rows", self.block_rows, common.SUBLANES)
    common.check_block("block_keys", self.block_keys, common.LANES)

  def clamp(self, rows: int, keys: int) -> tuple[int, int]:
    """(block_rows, block_keys) for a problem: never larger than the dimension (a full one is always legal)."""
    return min(self.block_rows, rows), min(self.block_keys, keys)


def check_shapes(q: jax.Array, k: jax.Array, key_valid: jax.Array | None, row_valid: jax.Array | None,
                 q_slots: jax.Array | None) -> None:
  """Raise ValueError naming the shapes when q, k and the masks do not fit together."""
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"q and k must be float[B, N, R, H] and float[B, K, S, H]; got shapes {q.shape} and {k.shape}")
  b, n, r, h = q.shape
  if k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"q {q.shape} and k {k.shape} must share batch B and head dim H")
  if n % k.shape[1]:
    raise ValueError(f"query heads {n} must be a multiple of kv heads {k.shape[1]}")
  if r < 1 or k.shape[2] < 1:
    raise ValueError(f"q {q.shape} and k {k.shape} need at least one row and one key")
  for name, a in (("q", q), ("k", k)):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got {a.dtype}")
  for name, a, shape in (("key_valid", key_valid, (b, k.shape[2])), ("row_valid", row_valid, (b, r)),
                         ("q_slots", q_slots, (b, r))):
    if a is not None and a.shape != shape:
      raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
  if q_slots is not None and not jnp.issubdtype(q_slots.dtype, jnp.integer):
    raise ValueError(f"q_slots must be integer slots, got {q_slots.dtype}")


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def attention_mass(q: jax.Array, k: jax.Array, *, key_valid: jax.Array | None = None,
                   row_valid: jax.Array | None = None, q_slots: jax.Array | None = None,
                   scale: float | None = None, block_sizes: BlockSizes = BlockSizes(), interpret=False) -> jax.Array:
  """Pallas kernel for `attention_mass_reference` (same arguments and result).

  Args:
    q: float[B, N, R, H]; k: float[B, K, S, H] (bfloat16 is read as is; logits accumulate in float32).
    key_valid, row_valid, q_slots: as in `attention_mass_reference`.
    scale: Python float logit scale (static; default H ** -0.5).
    block_sizes: tile sizes (static).
    interpret: False (compiled, Mosaic TPU), True (generic interpreter, any
      backend) or a `pltpu.InterpretParams` (TPU interpret mode); static.
  Returns:
    float32[B, S]; differentiable in q and k (the reference's gradient).
  """
  call = functools.partial(_mass_call, block_sizes=block_sizes, interpret=interpret)
  return run_kernel(call, q, k, key_valid, row_valid, q_slots, scale)


def run_kernel(call, q, k, key_valid, row_valid, q_slots, scale):
  """What every kernel form shares: checks, the per-row limits, dtype promotion and the custom_vjp.

  `call(q, k, limit, key_valid, scale) -> float32[B, S]` is the form's kernel
  (`_mass_call` here, `attention_mass_gpu` on GPU).
  """
  check_shapes(q, k, key_valid, row_valid, q_slots)
  b, _, r, h = q.shape
  s = k.shape[2]
  scale = h ** -0.5 if scale is None else float(scale)
  # the last visible slot of each row: causal limit, key range, row mask in one int32[B, R]
  limit = jnp.full((b, r), s - 1, jnp.int32)
  if q_slots is not None:
    limit = jnp.minimum(limit, q_slots.astype(jnp.int32))
  if row_valid is not None:
    limit = jnp.where(row_valid, limit, -1)
  dtype = jnp.promote_types(q.dtype, k.dtype)
  return _mass(q.astype(dtype), k.astype(dtype), limit, key_valid, scale, call)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _mass(q, k, limit, key_valid, scale, call):
  return call(q, k, limit, key_valid, scale)


def _mass_fwd(q, k, limit, key_valid, scale, call):
  return call(q, k, limit, key_valid, scale), (q, k, limit, key_valid)


def _mass_bwd(scale, call, res, g):
  """The reference's gradient (limit is exactly a q_slots that also encodes the row mask)."""
  del call
  q, k, limit, key_valid = res
  _, pull = jax.vjp(lambda q, k: attention_mass_reference(q, k, key_valid=key_valid, q_slots=limit, scale=scale),
                    q, k)
  dq, dk = pull(g)
  return dq, dk, None, None


_mass.defvjp(_mass_fwd, _mass_bwd)


def _mass_call(q, k, limit, key_valid, scale, *, block_sizes, interpret):
  b, n, r, h = q.shape
  kh, s = k.shape[1], k.shape[2]
  rows = (n // kh) * r
  br, bs = block_sizes.clamp(rows, s)
  n_rows, n_keys = pl.cdiv(rows, br), pl.cdiv(s, bs)
  q_rows = q.reshape(b, kh, rows, h)  # [B, N, R, H] -> [B, K, G*R, H]
  row_limit = jnp.tile(limit, (1, n // kh))[..., None]  # [B, R] -> [B, G*R, 1], row g*R + r -> limit[r]
  masked = key_valid is not None
  itemsize = jnp.dtype(q.dtype).itemsize
  flops = 2 * b * n * r * s * h

  def specs(order):
    """BlockSpecs of (q_rows, k, row_limit[, key_valid]) for a grid whose axes are named by `order`."""
    def at(fn):
      return lambda *ids: fn(**dict(zip(order, ids)))
    out = [pl.BlockSpec((None, None, br, h), at(lambda b, kv, i, j: (b, kv, i, 0))),
           pl.BlockSpec((None, None, bs, h), at(lambda b, kv, i, j: (b, kv, j, 0))),
           pl.BlockSpec((None, br, 1), at(lambda b, kv, i, j: (b, i, 0)))]
    if masked:
      out.append(pl.BlockSpec((None, 1, bs), at(lambda b, kv, i, j: (b, 0, j))))
    return out

  inputs = [q_rows, k, row_limit]
  if masked:
    inputs.append(key_valid.astype(jnp.int32)[:, None, :])  # [B, S] -> [B, 1, S]

  stats_order = ("b", "kv", "i", "j")
  stat_spec = pl.BlockSpec((None, None, br, 1), lambda b_, kv, i, j: (b_, kv, i, 0))
  row_max, row_sum = pl.pallas_call(
      functools.partial(_stats_kernel, scale=scale, masked=masked),
      out_shape=(jax.ShapeDtypeStruct((b, kh, rows, 1), jnp.float32),) * 2,
      grid=(b, kh, n_rows, n_keys),
      in_specs=specs(stats_order),
      out_specs=(stat_spec, stat_spec),
      compiler_params=common.compiler_params("parallel", "parallel", "parallel", "arbitrary"),
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=b * n * r * s,
                                    bytes_accessed=itemsize * b * kh * (rows + s * n_rows) * h),
      interpret=interpret,
      name="attention_mass_stats",
  )(*inputs)
  lse = jnp.where(row_sum > 0, row_max + jnp.log(jnp.where(row_sum > 0, row_sum, 1.0)), 0.0)  # [B, K, G*R, 1]

  mass_order = ("b", "j", "kv", "i")
  total = pl.pallas_call(
      functools.partial(_mass_kernel, scale=scale, masked=masked, rows_total=rows),
      out_shape=jax.ShapeDtypeStruct((b, 1, s), jnp.float32),
      grid=(b, n_keys, kh, n_rows),
      in_specs=specs(mass_order) + [pl.BlockSpec((None, None, br, 1), lambda b_, j, kv, i: (b_, kv, i, 0))],
      out_specs=pl.BlockSpec((None, 1, bs), lambda b_, j, kv, i: (b_, 0, j)),
      compiler_params=common.compiler_params("parallel", "parallel", "arbitrary", "arbitrary"),
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=b * n * r * s,
                                    bytes_accessed=itemsize * b * kh * (rows * n_keys + s) * h),
      interpret=interpret,
      name="attention_mass",
  )(*inputs, lse)[:, 0, :]  # [B, 1, S] -> [B, S]
  contributing = jnp.sum(row_sum[:, 0, :r, 0] > 0, axis=-1)  # [B]: rows with a visible key (head 0's block)
  count = (contributing * n).astype(jnp.float32)
  return total / jnp.where(count > 0, count, 1.0)[:, None]


def _visible(shape, limit_ref, key_valid_ref, key_start):
  """bool[br, bs]: key visible to row (the row limit also excludes keys past S)."""
  visible = common.col_ids(shape, key_start) <= limit_ref[...]
  if key_valid_ref is not None:
    visible = visible & (key_valid_ref[...] != 0)
  return visible


def _stats_kernel(q_ref, k_ref, limit_ref, *refs, scale, masked):
  """Online max and sum of exp over key blocks. Refs: q [br, H], k [bs, H], limit int32[br, 1],
  (key_valid int32[1, bs]), outputs max and sum float32[br, 1] (resident across the key axis)."""
  key_valid_ref, max_ref, sum_ref = refs if masked else (None, *refs)
  j = pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
    sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)

  logits = common.dot_nt(q_ref[...], k_ref[...]) * scale  # [br, bs]
  logits = jnp.where(_visible(logits.shape, limit_ref, key_valid_ref, j * k_ref.shape[0]), logits, -jnp.inf)
  prev = max_ref[...]
  new = jnp.maximum(prev, jnp.max(logits, axis=1, keepdims=True))
  shift = jnp.where(new == -jnp.inf, 0.0, new)  # no visible key yet: keep exp(-inf) = 0, never inf - inf
  sum_ref[...] = sum_ref[...] * jnp.exp(prev - shift) + jnp.sum(jnp.exp(logits - shift), axis=1, keepdims=True)
  max_ref[...] = new


def _mass_kernel(q_ref, k_ref, limit_ref, *refs, scale, masked, rows_total):
  """Probabilities summed over rows into the key block. Refs: as `_stats_kernel`'s inputs, then
  lse float32[br, 1], output float32[1, bs] (resident across the kv-head and row axes)."""
  key_valid_ref, lse_ref, out_ref = refs if masked else (None, *refs)
  j, kv, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)

  @pl.when((kv == 0) & (i == 0))
  def _init():
    out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)

  logits = common.dot_nt(q_ref[...], k_ref[...]) * scale  # [br, bs]
  visible = _visible(logits.shape, limit_ref, key_valid_ref, j * k_ref.shape[0])
  visible = visible & (common.row_ids(logits.shape, i * q_ref.shape[0]) < rows_total)  # ragged last row block
  probs = jnp.where(visible, jnp.exp(logits - lse_ref[...]), 0.0)
  out_ref[...] += jnp.sum(probs, axis=0, keepdims=True)
