"""Shared pieces of the fopru rules (moved from tests/test_reduce_fopru.py)."""

from __future__ import annotations
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reduce_harness as H
from vtr_jax.models.vit import VisionConfig
from vtr_jax.reduce import ReductionError, parse
from vtr_jax.reduce.pre_llm.fopru import row_indices
from vtr_jax.seams import Tokens

__all__ = ["G", "H", "HEADS", "HEAD_DIM", "N", "ReductionError", "SIGLIP", "Tokens", "VISION", "VisionConfig", "_qk", "_run", "jax", "jnp", "np", "np_rank", "np_rows", "np_significance", "parse", "pytest", "row_indices"]


VISION = VisionConfig(image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2, intermediate_size=8)


SIGLIP = VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2,
                      intermediate_size=8, feature_layers=(-1,))


G, HEADS, HEAD_DIM = 4, 2, 4


N = G * G


def _run(spec: str, vision, aux: dict, x):
  """The method's reduce() under jit (one compile instead of one per op) on hand-made extras."""
  method = parse(spec).methods[0]
  return jax.jit(lambda aux, x: method.reduce(Tokens.full(x), H.method_context(vision, aux)))(aux, jnp.asarray(x))


def np_significance(q: np.ndarray, k: np.ndarray):
  """One sample, q/k [T, heads, H] with the class token first -> (significance [P], row mean chosen)."""
  t = q.shape[0]
  attn = np.zeros((HEADS, t, t))
  for h in range(HEADS):
    for i in range(t):
      logits = [float(np.dot(q[i, h], k[j, h])) / np.sqrt(HEAD_DIM) for j in range(t)]
      e = np.exp(np.array(logits) - max(logits))
      attn[h, i] = e / e.sum()  # softmax over every key, the class token's column included
  patches = attn[:, 1:, 1:].mean(axis=0)  # [P, P] head mean over patch rows and columns
  received = np.array([np.mean([patches[i, j] for i in range(N)]) for j in range(N)])
  paid = np.array([np.mean([patches[i, j] for j in range(N)]) for i in range(N)])
  use_paid = not np.var(received) > np.var(paid)
  return (paid if use_paid else received), use_paid


def np_rank(scores, k):
  return sorted(sorted(range(N), key=lambda p: (-scores[p], p))[:k])


def np_rows(scores, k):
  """Whole rows by total significance, best first; the remainder from the next row's best patches."""
  totals = [sum(scores[r * G + c] for c in range(G)) for r in range(G)]
  rows = sorted(range(G), key=lambda r: (-totals[r], r))
  chosen = [r * G + c for r in rows[:k // G] for c in range(G)]
  if k % G:
    nxt = rows[k // G]
    chosen += sorted([nxt * G + c for c in range(G)], key=lambda p: (-scores[p], p))[:k % G]
  return sorted(chosen)


def _qk(seed: int, b: int = 3):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, N + 1, HEADS, HEAD_DIM)).astype(np.float32)
  k = rng.standard_normal((b, N + 1, HEADS, HEAD_DIM)).astype(np.float32)
  # sample 1: patches share one key, so the received attention is nearly flat and the class-token
  # column varies: the row mean (attention paid to the patches) has the larger variance
  k[1, 1:] = k[1, 1] + 0.01 * rng.standard_normal((N, HEADS, HEAD_DIM))
  k[1, 0] *= 3.0
  # sample 2: patch 3 duplicates patch 7 and grid row 2 duplicates row 0: exact ties
  for src, dst in [(7, 3)] + [(c, 2 * G + c) for c in range(G)]:
    q[2, 1 + dst], k[2, 1 + dst] = q[2, 1 + src], k[2, 1 + src]
  return q, k
