"""Public entry points of vtr_jax.kernels: each dispatches to a Pallas kernel or its jnp reference.

`impl=None` picks automatically: the Mosaic TPU kernel on TPU (`pallas`), its
GPU form on GPU (`pallas_gpu`: one program per block looping inside the
kernel, Pallas' Triton lowering; the TPU kernels accumulate across a
sequential grid axis, which GPU grids do not run in order, see
`kernels/common.py`), and the reference on CPU (XLA is faster there).
`impl="reference"`, `"pallas"` or `"pallas_gpu"` force a path; a kernel with
`interpret=True` (or, for `pallas`, a `pltpu.InterpretParams`) runs on any
backend, slowly. `block_sizes` (the chosen form's `BlockSizes`) only affects
the kernel. Shapes and options are validated before dispatch, so every path
raises the same ValueErrors. `topk_similarity` has no kernel (see
`kernels/topk.py` for why).

Under a device mesh (`jax.set_mesh` with `vtr_jax.sharding` rules) each op
runs inside `jax.shard_map`: every device scores its own samples (and, for
`attention_mass`, its own kv heads, summed across the `tensor` axis), so XLA
never gathers the operands to run a kernel it cannot partition.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from vtr_jax import sharding
from vtr_jax.kernels import attention_mass_gpu, similarity, similarity_gpu
from vtr_jax.kernels.attention_mass import BlockSizes as MassBlockSizes
from vtr_jax.kernels.attention_mass import attention_mass as attention_mass_kernel
from vtr_jax.kernels.attention_mass import attention_mass_reference
from vtr_jax.kernels.attention_mass import check_shapes as check_mass_shapes
from vtr_jax.kernels.topk import topk_similarity_reference
from vtr_jax import axes

IMPLS = ("reference", "pallas", "pallas_gpu")
KERNEL_BACKEND = {"pallas": "tpu", "pallas_gpu": "gpu"}


def choose(impl: str | None, *, has_kernel: bool, interpret) -> str:
  """The path an op takes: `"pallas"`, `"pallas_gpu"` or `"reference"` (see the module docstring)."""
  backend = jax.default_backend()
  if impl is None:
    auto = {"tpu": "pallas", "gpu": "pallas_gpu"}.get(backend, "reference")
    return auto if has_kernel else "reference"
  if impl not in IMPLS:
    raise ValueError(f"unknown kernel impl {impl!r}; known: {', '.join(IMPLS)}")
  if impl in KERNEL_BACKEND:
    if not has_kernel:
      raise ValueError("no Pallas kernel exists for this op; use impl='reference'")
    if not interpret and backend != KERNEL_BACKEND[impl]:
      raise ValueError(f"impl={impl!r} compiles for {KERNEL_BACKEND[impl].upper()} only, this backend is "
                       f"{backend!r}; pass interpret=True or use impl='reference'")
  return impl


def _blocks(impl: str, block_sizes, kinds: dict):
  """The BlockSizes the chosen kernel form takes (its defaults for None); ValueError for another form's."""
  kind = kinds[impl]
  if block_sizes is None:
    return kind()
  if not isinstance(block_sizes, kind):
    raise ValueError(f"impl={impl!r} takes {kind.__module__}.{kind.__qualname__}, got {type(block_sizes).__name__} "
                     f"from {type(block_sizes).__module__}")
  return block_sizes


def max_similarity(x, y, *, metric: str = "cosine", mode: str = "max", x_valid=None, y_valid=None,
                   impl: str | None = None, interpret=False, block_sizes=None):
  """See `kernels/similarity.py`: (values float32[B, N], index int32[B, N])."""
  similarity.check_options(metric, mode)
  similarity.check_shapes(x, y, x_valid, y_valid)
  path = choose(impl, has_kernel=True, interpret=interpret)
  if path == "reference":
    fn = functools.partial(similarity.max_similarity_reference, metric=metric, mode=mode)
  else:
    kernel = {"pallas": similarity.max_similarity, "pallas_gpu": similarity_gpu.max_similarity}[path]
    blocks = _blocks(path, block_sizes, {"pallas": similarity.BlockSizes, "pallas_gpu": similarity_gpu.BlockSizes})
    fn = functools.partial(kernel, metric=metric, mode=mode, block_sizes=blocks, interpret=interpret)
  return sharding.per_sample(fn)(x, y, x_valid=x_valid, y_valid=y_valid)


def topk_similarity(x, y, k: int, *, metric: str = "cosine", y_valid=None, impl: str | None = None,
                    interpret=False):
  """See `kernels/topk.py`: (values float32[B, N, k], index int32[B, N, k])."""
  choose(impl, has_kernel=False, interpret=interpret)
  return sharding.per_sample(functools.partial(topk_similarity_reference, k=k, metric=metric))(x, y, y_valid=y_valid)


def attention_mass(q, k, *, key_valid=None, row_valid=None, q_slots=None, scale=None, impl: str | None = None,
                   interpret=False, block_sizes=None):
  """See `kernels/attention_mass.py`: float32[B, S]. On the kernel paths `scale` must be a Python float."""
  check_mass_shapes(q, k, key_valid, row_valid, q_slots)
  path = choose(impl, has_kernel=True, interpret=interpret)
  if path == "reference":
    fn = functools.partial(attention_mass_reference, scale=scale)
  else:
    kernel = {"pallas": attention_mass_kernel, "pallas_gpu": attention_mass_gpu.attention_mass}[path]
    blocks = _blocks(path, block_sizes, {"pallas": MassBlockSizes, "pallas_gpu": attention_mass_gpu.BlockSizes})
    fn = functools.partial(kernel, scale=scale, block_sizes=blocks, interpret=interpret)
  masks = {name: a for name, a in (("key_valid", key_valid), ("row_valid", row_valid), ("q_slots", q_slots))
           if a is not None}
  return _mass_on_devices(fn, q, k, masks)


def _mass_on_devices(fn, q, k, masks):
  """fn(q, k, **masks) -> float32[B, S], each device on its samples and kv heads under the active mesh.

  q float[B, N, R, H] and k float[B, K, S, H] split their batch over the
  batch axes and their kv heads (q's heads in the same groups) over the
  `activation_heads` axes; a device's mean over its heads is weighted by its
  share of the heads and summed over those axes.
  """
  b, n = q.shape[:2]
  batch = sharding.split_axes(axes.ACT_BATCH, b)
  heads = sharding.split_axes(axes.ACT_HEADS, k.shape[1], exclude=batch)
  if not batch and not heads:
    return fn(q, k, **masks)

  def body(q, k, masks):
    mass = fn(q, k, **masks)
    return jax.lax.psum(mass * (q.shape[1] / n), heads) if heads else mass

  per_sample = P(batch or None)
  per_head = P(batch or None, heads or None)
  return jax.shard_map(body, in_specs=(per_head, per_head, per_sample), out_specs=per_sample,
                       axis_names=frozenset(batch + heads), check_vma=False)(q, k, masks)  # Pallas: no vma types
