"""prumerge / prumerge_plus against a loop-based NumPy rendering of the authors' token_prune_merge_advanced(_plus)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import reduce_harness as H
from vtr_jax.models.vit import VisionConfig
from vtr_jax.reduce import parse
from vtr_jax.seams import Tokens

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


@pytest.mark.parametrize("spec,seed,cap,neighbours,plus", [
    ("prumerge:keep=8,neighbours=4", 0, 8, 4, False),
    ("prumerge:keep=2,neighbours=4", 3, 2, 4, False),  # cap below some outlier counts
    ("prumerge:keep=8", 1, 8, 32, False),  # 32 neighbours clamp to the 15 others
    ("prumerge_plus:keep=8,neighbours=3", 11, 8, 3, True),
    ("prumerge_plus:keep=3,neighbours=5", 0, 3, 5, True),  # the stride uses the capped count
    ("prumerge_plus:keep=2,neighbours=4", 15, 2, 4, True),  # one outlier: stride 5 reaches P - 1, excluded
])
def test_prumerge_matches_numpy(spec, seed, cap, neighbours, plus):
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


def test_ties_resolve_to_the_lowest_index():
  q, k = _qk(0)
  q[2, 0] = 2.0 * k[2, 1 + 4]  # patches 4 and 9 (equal keys) and 1 stand out
  x = np.random.default_rng(2).standard_normal((3, N, DIM)).astype(np.float32)
  out, aux = _run("prumerge:keep=8,neighbours=1", q, k, x)
  attn = np.asarray(aux["scores"][2])
  assert attn[4] == attn[9]
  assert np.asarray(out.positions[2])[:3].tolist() == [1, 4, 9]  # equal attention: the lower index first
  _, feats, _ = np_prumerge(q[2], k[2], x[2], 8, 1, False)
  np.testing.assert_allclose(np.asarray(out.x[2])[:len(feats)], feats, atol=1e-5)  # 4 and 9: each other's neighbour


def test_per_sample_iqr_batch_equals_single():
  q, k = _qk(8)
  x = np.random.default_rng(3).standard_normal((3, N, DIM)).astype(np.float32)
  for spec in ("prumerge:keep=6,neighbours=4", "prumerge_plus:keep=6"):
    batch, aux = _run(spec, q, k, x)
    assert len(set(np.asarray(aux["count"]).tolist())) > 1
    for i in range(3):
      single, _ = _run(spec, q[i:i + 1], k[i:i + 1], x[i:i + 1])
      np.testing.assert_array_equal(np.asarray(batch.positions[i]), np.asarray(single.positions[0]))
      np.testing.assert_allclose(np.asarray(batch.x[i]), np.asarray(single.x[0]), atol=1e-6)


def test_siglip_uses_received_attention():
  q, k = _qk(4)
  q, k = q[:, 1:], k[:, 1:]  # no class token
  x = np.random.default_rng(4).standard_normal((3, N, DIM)).astype(np.float32)
  _, aux = _run("prumerge:keep=4", q, k, x, vision=SIGLIP)  # features from the last block: its own q/k
  for i in range(3):
    qc, kc = q[i].reshape(N, -1), k[i].reshape(N, -1)
    received = np.zeros(N)
    for r in range(N):
      logits = np.array([float(np.dot(qc[r], kc[j])) for j in range(N)]) * qc.shape[1] ** -0.5
      e = np.exp(logits - logits.max())
      received += e / e.sum() / N
    np.testing.assert_allclose(np.asarray(aux["scores"][i]), received, rtol=1e-5)


def test_budgets_and_errors():
  assert parse("prumerge").methods[0].kept(576) == 73  # cap 576 // 8 outliers + the extra token
  assert parse("prumerge_plus").methods[0].kept(576) == 72 + 288 + 1  # stride (576 // 72) // 3 = 2
  assert parse("prumerge_plus:keep=32").methods[0].kept(576) == 32 + 96 + 1  # stride 6
  assert parse("prumerge_plus:keep=16").methods[0].kept(16) == 17
  assert "keep=20 is larger than the 16 tokens" in H.plan_budget_errors("prumerge:keep=20", 16)
  assert "keep=17 is larger than the 16 tokens" in H.plan_budget_errors("prumerge_plus:keep=17", 16)
  assert parse("prumerge").methods[0].vision_extras(VISION) == {("qk", 3)}  # the block after the features
  assert parse("prumerge").methods[0].vision_extras(SIGLIP) == {("qk", -1)}  # none after: the feature block


# ---- generic contracts, end to end on a tiny model ------------------------------------------
def test_batch_equals_single():
  H.check_batch_equals_single("prumerge_plus:keep=4,neighbours=4")


@pytest.mark.slow  # the SigLIP twin; the CLIP instance runs by default
def test_siglip_batch_equals_single():
  H.check_batch_equals_single("prumerge:keep=4", kind="siglip")


def test_traces_once():
  H.check_traces_once("prumerge_plus:keep=3")


@pytest.mark.parametrize("spec", ["prumerge:keep=16", "prumerge_plus:keep=1"])
def test_degenerate_inputs(spec):
  H.check_no_nan_on_degenerate(spec)
