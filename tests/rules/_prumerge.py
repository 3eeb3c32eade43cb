"""Shared pieces of the prumerge rules (moved from tests/test_reduce_prumerge.py)."""

from __future__ import annotations
import jax
import numpy as np
import pytest
import reduce_harness as H
from vtr_jax.models.vit import VisionConfig
from vtr_jax.reduce import parse
from vtr_jax.seams import Tokens

__all__ = ["DIM", "H", "HEADS", "HEAD_DIM", "N", "SIGLIP", "Tokens", "VISION", "VisionConfig", "_qk", "_run", "check_prumerge", "jax", "np", "np_prumerge", "parse", "pytest"]


VISION = VisionConfig(image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2, intermediate_size=8)


SIGLIP = VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2,
                      intermediate_size=8, feature_layers=(-1,))


N, HEADS, HEAD_DIM, DIM = 16, 2, 4, 5


def np_prumerge(q, k, x, cap: int, neighbours: int, plus: bool):
  """One sample; q/k [T, heads, H] (class token first), x [P, D].

  Returns (kept patches in output order, output features incl. the extra token, cls_attn).
  """
  t = q.shape[0]
  qc, kc = q.reshape(t, -1), k.reshape(t, -1)  # all heads as one big head of width C
  logits = [float(np.dot(qc[0], kc[j])) * qc.shape[1] ** -0.5 for j in range(t)]
  e = np.exp(np.array(logits) - max(logits))
  cls_attn = (e / e.sum())[1:]  # softmax over every key, then the patches
  q1, q3 = np.percentile(cls_attn, 25), np.percentile(cls_attn, 75)
  outliers = [p for p in range(N) if cls_attn[p] > q3 + 1.5 * (q3 - q1)]
  chosen = sorted(outliers, key=lambda p: (-cls_attn[p], p))[:cap]
  if plus and chosen:
    step = int(1 / (len(chosen) / N))
    chosen = chosen + [p for p in range(0, N - 1, max(1, int(step / 3))) if p not in chosen]
  unit = [kc[1 + p] / np.linalg.norm(kc[1 + p]) for p in range(N)]
  out = []
  for i in chosen:
    others = sorted((j for j in range(N) if j != i), key=lambda j: (-float(np.dot(unit[i], unit[j])), j))
    out.append(x[i] + sum(cls_attn[j] * x[j] for j in others[:min(neighbours, N - 1)]))  # raw weights, no norm
  pruned = [j for j in range(N) if j not in chosen]
  if pruned:
    out.append(sum(cls_attn[j] * x[j] for j in pruned))
  return chosen, np.array(out), cls_attn


def _qk(seed: int, b: int = 3):
  """Random q/k whose class query aims at a few patches (so the IQR rule finds outliers)."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, N + 1, HEADS, HEAD_DIM)).astype(np.float32)
  k = rng.standard_normal((b, N + 1, HEADS, HEAD_DIM)).astype(np.float32)
  for i in range(b):
    targets = rng.choice(N, size=i + 1, replace=False)
    q[i, 0] = 3.0 * k[i, 1 + targets].sum(axis=0) / np.sqrt(i + 1)
  k[2, 1 + 9] = k[2, 1 + 4]  # sample 2: patches 4 and 9 are identical keys: exact ties
  return q, k


def _run(spec, q, k, x, vision=VISION):
  """The method's reduce() under jit on hand-made q/k (one compile instead of one per op)."""
  method = parse(spec).methods[0]
  layer = vision.layers_run if vision.layers_run < vision.num_layers else vision.layers_run - 1
  run = jax.jit(lambda q, k, x: method.reduce(Tokens.full(x), H.method_context(vision, {f"vision/qk/{layer}": (q, k)})))
  return run(q, k, x)


def check_prumerge(spec, seed, cap, neighbours, plus):
  """The method against `np_prumerge` on three samples of hand-made q/k (exact ties, different outlier counts)."""
  q, k = _qk(seed)
  x = np.random.default_rng(seed + 1).standard_normal((3, N, DIM)).astype(np.float32)
  out, aux = _run(spec, q, k, x)
  counts = np.asarray(aux["count"])
  for i in range(3):
    chosen, feats, cls_attn = np_prumerge(q[i], k[i], x[i], cap, neighbours, plus)
    np.testing.assert_allclose(np.asarray(aux["scores"][i]), cls_attn, rtol=1e-5)
    valid = np.asarray(out.valid[i])
    n_valid = int(valid.sum())
    assert n_valid == len(feats) and np.all(valid[:n_valid]) and out.count == parse(spec).methods[0].kept(N)
    ours = np.asarray(out.positions[i])[:len(chosen)]
    assert set(ours.tolist()) == set(chosen)  # same kept patches, in the same attention order up to exact ties
    np.testing.assert_array_equal(cls_attn[ours], cls_attn[chosen])
    np.testing.assert_allclose(np.asarray(out.x[i])[:n_valid], feats, atol=1e-5)
  uncapped = [len(np_prumerge(q[i], k[i], x[i], N, 1, False)[0]) for i in range(3)]
  assert min(counts) >= 1 and len(set(uncapped)) > 1  # outliers in every sample, counts differ
  assert (max(uncapped) > cap) == (cap < 8)  # the small caps bind: over-cap outliers go to the extra token
