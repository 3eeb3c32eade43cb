"""Shared pieces of the baselines rules (moved from tests/test_reduce_cls_and_baselines.py)."""

from __future__ import annotations
import jax.numpy as jnp
import numpy as np
import pytest
import reduce_harness as H
from vtr_jax.models.vit import VisionConfig
from vtr_jax.reduce import ReductionError, parse

__all__ = ["H", "ReductionError", "SIGLIP", "VISION", "VisionConfig", "_run", "jnp", "np", "np_pool", "np_topk_sorted", "parse", "pytest"]


VISION = VisionConfig(image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2, intermediate_size=8)


SIGLIP = VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2,
                      intermediate_size=8, feature_layers=(-1,))


def _run(spec, tokens, ctx):
  m = parse(spec).methods[0]
  return m.reduce(tokens, ctx)


def np_topk_sorted(scores: np.ndarray, k: int) -> list[int]:
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # best first, ties -> lowest index
  return sorted(order[:k])


def np_pool(x: np.ndarray, g: int, s: int):
  m = -(-g // s)
  out, pos, size = [], [], []
  for wr in range(m):
    for wc in range(m):
      members = [r * g + c for r in range(wr * s, min(g, wr * s + s)) for c in range(wc * s, min(g, wc * s + s))]
      out.append(np.mean([x[i] for i in members], axis=0))
      pos.append(members[0])
      size.append(len(members))
  return np.array(out), pos, size


