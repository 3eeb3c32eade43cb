"""fopru (rank and row strategies) against a loop-based NumPy rendering of the authors' focal pruning."""

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


@pytest.mark.parametrize("strategy,keep", [("rank", 1), ("rank", 5), ("rank", 16), ("row", 1), ("row", 4),
                                           ("row", 6), ("row", 8), ("row", 16)])
def test_fopru_matches_numpy(strategy, keep):
  q, k = _qk(keep)
  x = np.random.default_rng(keep).standard_normal((3, N, 4)).astype(np.float32)
  out, aux = _run(f"fopru:keep={keep},strategy={strategy}", VISION, {"vision/qk/2": (q, k)}, x)
  chose_paid = []
  for i in range(3):
    scores, use_paid = np_significance(q[i], k[i])
    chose_paid.append(use_paid)
    np.testing.assert_allclose(np.asarray(aux["scores"][i]), scores, rtol=2e-5, atol=1e-9)
    ours = np.asarray(aux["index"][i])
    assert list(ours) == sorted(ours) and len(set(ours.tolist())) == keep  # original order, no repeats
    if strategy == "rank":
      H.tie_aware_equal(ours, np_rank(scores, keep), np.float32(scores), keep)
    elif keep % G == 0:  # whole rows: compare rows, tie-aware on the row totals
      totals = np.float32([scores[r * G:(r + 1) * G].sum() for r in range(G)])
      H.tie_aware_equal(sorted(set(ours // G)), sorted(set(np.array(np_rows(scores, keep)) // G)), totals, keep // G)
    else:
      assert ours.tolist() == np_rows(scores, keep)
    np.testing.assert_array_equal(np.asarray(out.x[i]), x[i][ours])
  assert np.asarray(aux["row_mean"]).tolist() == chose_paid == [False, True, False]


def test_row_ties_resolve_to_the_lowest_row():
  scores = np.zeros((1, N), np.float32)
  scores[0, [1, 2]] = scores[0, [2 * G + 1, 2 * G + 3]] = 0.25  # rows 0 and 2 tie for best
  assert np.asarray(row_indices(jnp.asarray(scores), 6, G))[0].tolist() == [0, 1, 2, 3, 9, 11]
  assert np.asarray(row_indices(jnp.asarray(scores), 2, G))[0].tolist() == [1, 2]


def test_siglip_uses_received_attention():
  rng = np.random.default_rng(3)
  received = rng.random((2, N)).astype(np.float32)
  x = rng.standard_normal((2, N, 4)).astype(np.float32)
  _, aux = _run("fopru:keep=6", SIGLIP, {"vision/received_attn/3": received}, x)
  _, aux_row = _run("fopru:keep=6,strategy=row", SIGLIP, {"vision/received_attn/3": received}, x)
  for i in range(2):
    assert np.asarray(aux["index"][i]).tolist() == np_rank(received[i], 6)
    assert np.asarray(aux_row["index"][i]).tolist() == np_rows(received[i], 6)


def test_errors():
  assert "keep=17 is larger than the 16 tokens" in H.plan_budget_errors("fopru:keep=17", 16)
  with pytest.raises(ReductionError, match="strategy='col' is not one of rank, row"):
    parse("fopru:keep=4,strategy=col")


# ---- generic contracts, end to end on a tiny model ------------------------------------------
def test_batch_equals_single():
  H.check_batch_equals_single("fopru:keep=6,strategy=row")


@pytest.mark.slow  # the SigLIP twin; the CLIP instance runs by default
def test_siglip_batch_equals_single():
  H.check_batch_equals_single("fopru:keep=5", kind="siglip")


def test_traces_once():
  H.check_traces_once("fopru:keep=5")


@pytest.mark.parametrize("spec", ["fopru:keep=16,strategy=row", "fopru:keep=1"])
def test_degenerate_inputs(spec):
  H.check_no_nan_on_degenerate(spec)
