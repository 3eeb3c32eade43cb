"""Shared pieces of the diversity rules (moved from tests/test_reduce_divprune.py)."""

from __future__ import annotations
import jax.numpy as jnp
import numpy as np
import pytest
import reduce_harness as H
from vtr_jax.models.vit import VisionConfig
from vtr_jax.reduce import ReductionError, parse
from vtr_jax.seams import Tokens

__all__ = ["CLIP", "H", "ReductionError", "SIGLIP", "Tokens", "VisionConfig", "check_k_center", "jnp", "np", "parse", "pytest", "run", "tokens_with_ties"]


CLIP = VisionConfig(image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2, intermediate_size=8)


SIGLIP = VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2,
                      intermediate_size=8, feature_layers=(-1,))


def check_k_center(x: np.ndarray, selection, first: int | None = None, tol: float = 1e-6) -> None:
  """The published rule, step by step: distance 1 - cosine; first DivPrune's start (the token whose
  nearest other token is farthest) or the given `first`; then each pick maximises its minimum distance
  to the tokens already picked. Tie-aware: a pick may lose to the best score by `tol` only (the
  float32 and float64 distances of duplicate tokens differ by rounding)."""
  n = len(x)
  unit = [v / np.linalg.norm(v) if np.linalg.norm(v) > 0 else 0 * v for v in x.astype(np.float64)]
  dist = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
  chosen = []
  for step, pick in enumerate(np.asarray(selection).tolist()):
    rest = [i for i in range(n) if i not in chosen]
    assert pick in rest, f"token {pick} picked twice: {selection}"
    if step == 0 and first is not None:
      assert pick == first, f"first centre {pick}, expected {first}"
    else:
      score = {i: min(dist[i][j] for j in (chosen if step else range(n)) if j != i) for i in rest}
      best = max(score.values())
      assert score[pick] >= best - tol, f"step {step}: picked {pick} ({score[pick]}), best {best}: {selection}"
    chosen.append(pick)


def tokens_with_ties(rng, b: int, n: int, d: int = 6) -> Tokens:
  """Random tokens with exact duplicates (equal distances everywhere) and a zero vector."""
  x = rng.standard_normal((b, n, d)).astype(np.float32)
  x[:, 5] = x[:, 2]
  x[:, 9] = x[:, 11] = x[:, 4]
  x[:, 13] = 0.0
  return Tokens.full(jnp.asarray(x))


def run(spec, tokens, ctx=None):
  return parse(spec).methods[0].reduce(tokens, ctx)
