"""Public entry points of vtr_jax.kernels: each dispatches to a Pallas kernel or its jnp reference.

`impl=None` picks automatically: the reference on CPU (XLA is faster there),
the kernel on TPU / GPU once one exists for that op. `impl="reference"` or
`impl="pallas"` (with `interpret=True` on CPU) force a path.
"""

from __future__ import annotations

import jax

from vtr_jax.kernels.attention_mass import attention_mass_reference
from vtr_jax.kernels.similarity import max_similarity_reference
from vtr_jax.kernels.topk import topk_similarity_reference

IMPLS = ("reference", "pallas")


def _choose(impl: str | None, has_kernel: bool) -> str:
  if impl is None:
    return "pallas" if has_kernel and jax.default_backend() in ("tpu", "gpu") else "reference"
  if impl not in IMPLS:
    raise ValueError(f"unknown kernel impl {impl!r}; known: {', '.join(IMPLS)}")
  if impl == "pallas" and not has_kernel:
    raise ValueError("no Pallas kernel exists for this op yet; use impl='reference'")
  return impl


def max_similarity(x, y, *, metric: str = "cosine", mode: str = "max", x_valid=None, y_valid=None,
                   impl: str | None = None, interpret: bool = False):
  """See `kernels/similarity.py`: (values float32[B, N], index int32[B, N])."""
  _choose(impl, has_kernel=False)
  return max_similarity_reference(x, y, metric=metric, mode=mode, x_valid=x_valid, y_valid=y_valid)


def topk_similarity(x, y, k: int, *, metric: str = "cosine", y_valid=None, impl: str | None = None,
                    interpret: bool = False):
  """See `kernels/topk.py`: (values float32[B, N, k], index int32[B, N, k])."""
  _choose(impl, has_kernel=False)
  return topk_similarity_reference(x, y, k, metric=metric, y_valid=y_valid)


def attention_mass(q, k, *, key_valid=None, row_valid=None, q_slots=None, scale=None, impl: str | None = None,
                   interpret: bool = False):
  """See `kernels/attention_mass.py`: float32[B, S]."""
  _choose(impl, has_kernel=False)
  return attention_mass_reference(q, k, key_valid=key_valid, row_valid=row_valid, q_slots=q_slots, scale=scale)
