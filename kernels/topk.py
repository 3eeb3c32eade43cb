"""Streaming top-k neighbours: per row of X, the k most similar rows of Y and their scores.

Used by PruMerge's key-nearest-neighbour merge and DPC-KNN densities. The
reference materialises [B, N, M] and calls `lax.top_k`.

There is no Pallas kernel: one was to be built only if it beat XLA's top_k
over a materialised block, and nothing shows that it would. Mosaic TPU has no
sort or top_k lowering (jax 0.10.2 lowers max/min and argmax/argmin
reductions only), so an exact fused top-k has to pull the k best out of every
score tile with k masked max passes and merge them into a running [rows, k]
list: k times the vector work of `similarity.max_similarity` per tile. No
accelerator was available to time such a kernel. The CPU proxy in
`benchmarks/kernels.py` (the same XLA ops on one materialised float32 score
block, k = 32; benchmarks/results/kernels_cpu.md, shared 2-core AMD EPYC at
load ~7, jax 0.10.2) measured lax.top_k vs the k passes at 39 vs 956 ms for
a [576, 16384] row block, and 7.7 vs 11.0 ms for a [576, 576] block (small
blocks are within this machine's run-to-run noise: earlier runs gave 3.8 vs
14.1 and 19.8 vs 6.6 ms). The passes' cost grows with k x M and top_k's does
not, so the reference stays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vtr_jax.kernels.similarity import pairwise


def topk_similarity_reference(x: jax.Array, y: jax.Array, k: int, *, metric: str = "cosine",
                              y_valid: jax.Array | None = None):
  """float[B, N, D], float[B, M, D] -> (values float32[B, N, k], index int32[B, N, k])."""
  if not 0 < k <= y.shape[1]:
    raise ValueError(f"k={k} must be in 1..{y.shape[1]} (the number of rows of y)")
  s = pairwise(x, y, metric)
  if y_valid is not None:
    s = jnp.where(y_valid[:, None, :], s, jnp.finfo(jnp.float32).min)
  values, index = jax.lax.top_k(s, k)
  return values, index.astype(jnp.int32)
