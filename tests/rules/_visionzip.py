"""Shared pieces of the visionzip rules (moved from tests/test_reduce_visionzip.py)."""

from __future__ import annotations
import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reduce_harness as H
from vtr_jax.models.vit import VisionConfig
from vtr_jax.reduce import ReductionError, parse
from vtr_jax.seams import Tokens

__all__ = ["DIM", "H", "HEADS", "KEY_DIM", "N", "ReductionError", "SIGLIP", "Tokens", "VISION", "VisionConfig", "_inputs", "_run", "dataclasses", "jax", "jnp", "np", "np_visionzip", "parse", "pytest"]


VISION = VisionConfig(image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2, intermediate_size=8)


SIGLIP = VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2,
                      intermediate_size=8, feature_layers=(-1,))


N, HEADS, KEY_DIM, DIM = 16, 2, 3, 5


def _run(spec: str, vision, aux: dict, x):
  """The method's reduce() under jit (one compile instead of one per op) on hand-made extras."""
  method = parse(spec).methods[0]
  return jax.jit(lambda aux, x: method.reduce(Tokens.full(x), H.method_context(vision, aux)))(aux, jnp.asarray(x))


def np_visionzip(scores, keys, x, cls_feature, n_patches: int, contextual: int, dominant=None):
  """Loop-based rule for one sample. scores/keys/x index the N patches; cls_feature None for SigLIP.

  Returns (dominant patches ascending, output features, output positions).
  """
  n = len(scores)
  if dominant is None:
    dominant = sorted(sorted(range(n), key=lambda p: (-scores[p], p))[:n_patches])
  out = ([cls_feature] if cls_feature is not None else []) + [x[p] for p in dominant]
  positions = ([-1] if cls_feature is not None else []) + list(dominant)
  rest = [p for p in range(n) if p not in dominant]
  if contextual:
    step = max(1, len(rest) // contextual)
    local = list(range(0, len(rest), step))[:contextual]
    targets = [rest[i] for i in local]
    unit = {p: keys[p] / np.linalg.norm(keys[p]) for p in rest}
    groups = {t: [] for t in targets}
    for i, p in enumerate(rest):
      if i in local:
        continue
      sims = [float(np.dot(unit[p], unit[t])) for t in targets]
      groups[targets[sims.index(max(sims))]].append(p)  # ties: the first target
    for t in targets:
      mean = np.mean([x[p] for p in groups[t]], axis=0) if groups[t] else 0.0
      out.append(x[t] + mean)
      positions.append(t)
  return dominant, np.array(out), positions


def _inputs(seed: int, b: int = 3):
  rng = np.random.default_rng(seed)
  cls_attn = H.softmax_rows(rng, (b, HEADS, N + 1))
  cls_attn[0, :, 4] = cls_attn[0, :, 9] = cls_attn[0, :, 11] = 0.5  # patches 3, 8, 10 tie at the top
  keys = rng.standard_normal((b, N + 1, KEY_DIM)).astype(np.float32)
  keys[1, :] = keys[1, 0]  # every key equal: all similarities tie
  x = rng.standard_normal((b, N, DIM)).astype(np.float32)
  cls_feature = rng.standard_normal((b, DIM)).astype(np.float32)
  return cls_attn, keys, x, cls_feature
