"""Pieces shared by the Pallas kernels: block-size checks, the score-tile matmul, TPU compiler params.

The kernels accumulate across a sequential ("arbitrary") grid axis into an
output block that stays resident, the Mosaic TPU pipelining model. They run
compiled on TPU, and on any backend with `interpret=True` (the generic
interpreter) or `interpret=pltpu.InterpretParams(...)` (TPU interpret mode,
which simulates TPU memory and randomises the order of "parallel" grid axes).
GPU backends run every grid program concurrently, so this accumulation
pattern is not valid there: each kernel has a GPU form (`*_gpu.py`, Pallas'
Triton lowering) in which one program owns a block of rows and loops over
the other axis with `lax.fori_loop` inside the kernel; `ops.py` runs it on GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

SUBLANES = 8  # a block's second-to-last dimension: a multiple of this, or the full dimension
LANES = 128  # a block's last dimension: a multiple of this, or the full dimension


def check_block(name: str, value: int, multiple: int) -> None:
  """Raise ValueError unless value is a positive int divisible by multiple."""
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple:
    raise ValueError(f"{name}={value!r} must be a positive multiple of {multiple}")


def check_power_of_two(name: str, value: int, minimum: int) -> None:
  """Raise ValueError unless value is a power of two >= minimum (Triton tiles)."""
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum or value & (value - 1):
    raise ValueError(f"{name}={value!r} must be a power of two >= {minimum}")


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def next_power_of_two(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b.T with float32 accumulation: float[P, D], float[Q, D] -> float32[P, Q].

  float32 operands use Precision.HIGHEST (on TPU the default would round them
  to bfloat16 passes); bfloat16 products are exact in float32 either way.
  """
  exact = jnp.float32 in (a.dtype, b.dtype)
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST if exact else None)


def compiler_params(*semantics: str) -> pltpu.CompilerParams:
  """Mosaic TPU params: one "parallel" / "arbitrary" entry per grid axis."""
  return pltpu.CompilerParams(dimension_semantics=semantics)


def row_ids(shape: tuple[int, int], start) -> jax.Array:
  """int32[P, Q]: the global row index of each entry of a tile whose first row is `start`."""
  return jax.lax.broadcasted_iota(jnp.int32, shape, 0) + start


def col_ids(shape: tuple[int, int], start) -> jax.Array:
  """int32[P, Q]: the global column index of each entry of a tile whose first column is `start`."""
  return jax.lax.broadcasted_iota(jnp.int32, shape, 1) + start
