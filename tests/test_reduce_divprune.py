"""divprune / todre (greedy max-min diversity selection) against a loop-based NumPy rendering."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import reduce_harness as H
from vtr_jax.models.vit import VisionConfig
from vtr_jax.reduce import ReductionError, parse
from vtr_jax.seams import Tokens

CLIP = VisionConfig(image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2, intermediate_size=8)
SIGLIP = VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2,
                      intermediate_size=8, feature_layers=(-1,))


# ---- NumPy rendering ---------------------------------------------------------------------------
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


# ---- the rules -------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [1, 6, 16])
def test_divprune_matches_numpy(keep):
  rng = np.random.default_rng(keep)
  tokens = tokens_with_ties(rng, 3, 16)
  out, aux = run(f"divprune:keep={keep}", tokens)
  for i in range(3):
    x, selection = np.asarray(tokens.x[i]), np.asarray(aux["selection"][i])
    check_k_center(x, selection)
    assert np.asarray(aux["index"][i]).tolist() == sorted(selection)
    np.testing.assert_array_equal(np.asarray(out.x[i]), x[sorted(selection)])
    assert np.asarray(out.positions[i]).tolist() == sorted(selection)


@pytest.mark.parametrize("keep", [1, 7, 16])
def test_todre_matches_numpy(keep):
  rng = np.random.default_rng(keep)
  b, n = 3, 16
  cls_attn = H.softmax_rows(rng, (b, 2, n + 1))  # [B, heads, 1 + P], block 2 is the one the features come from
  cls_attn[1, :, 1 + 3] = cls_attn[1, :, 1 + 10] = 0.9  # an exact tie for the first centre: lowest index wins
  ctx = H.method_context(CLIP, {"vision/cls_attn/2": jnp.asarray(cls_attn)})
  tokens = tokens_with_ties(rng, b, n)
  out, aux = run(f"todre:keep={keep}", tokens, ctx)
  for i in range(b):
    scores = cls_attn[i, :, 1:].mean(axis=0)
    first = max(range(n), key=lambda p: (scores[p], -p))
    selection = np.asarray(aux["selection"][i])
    check_k_center(np.asarray(tokens.x[i]), selection, first)
    np.testing.assert_array_equal(np.asarray(out.x[i]), np.asarray(tokens.x[i])[sorted(selection)])
  assert int(aux["selection"][1][0]) == 3


def test_todre_siglip_starts_from_received_attention():
  rng = np.random.default_rng(0)
  received = rng.random((2, 16)).astype(np.float32)
  ctx = H.method_context(SIGLIP, {"vision/received_attn/3": jnp.asarray(received)})
  tokens = H.random_tokens(rng, 2, 16, 4)
  _, aux = run("todre:keep=5", tokens, ctx)
  for i in range(2):
    check_k_center(np.asarray(tokens.x[i]), aux["selection"][i], int(np.argmax(received[i])))


def test_invalid_tokens_come_last():
  rng = np.random.default_rng(3)
  tokens = H.random_tokens(rng, 2, 10, 4)
  valid = np.ones((2, 10), bool)
  valid[:, [1, 4, 7]] = False
  tokens = tokens.replace(valid=jnp.asarray(valid))
  ctx = H.method_context(CLIP, {"vision/cls_attn/2": jnp.asarray(H.softmax_rows(rng, (2, 2, 11)))})
  for spec in ("divprune:keep=9", "todre:keep=9"):
    _, aux = run(spec, tokens, ctx)
    for row in np.asarray(aux["selection"]):
      assert set(row[:7].tolist()) == set(np.nonzero(valid[0])[0].tolist()), f"{spec}: {row}"
      assert len(set(row.tolist())) == 9


def test_identical_tokens_are_never_picked_twice():
  tokens = Tokens.full(jnp.ones((2, 16, 4)))
  ctx = H.method_context(CLIP, {"vision/cls_attn/2": jnp.full((2, 2, 17), 1 / 17)})
  for spec in ("divprune:keep=16", "todre:keep=16"):
    out, aux = run(spec, tokens, ctx)
    assert np.asarray(aux["index"]).tolist() == [list(range(16))] * 2
    assert np.all(np.isfinite(np.asarray(out.x)))


def test_clear_errors():
  msg = H.plan_budget_errors("divprune:keep=20", 16)
  assert "keep=20" in msg and "16 tokens" in msg
  assert "keep=17" in H.plan_budget_errors("todre:keep=17", 16)
  ctx = H.method_context(CLIP, {"vision/cls_attn/2": jnp.ones((1, 2, 17)) / 17})
  with pytest.raises(ReductionError, match="todre scores the tower's 16 patches but receives 9 tokens"):
    run("todre:keep=4", H.random_tokens(np.random.default_rng(0), 1, 9, 4), ctx)
  assert parse("divprune").methods[0].stage == "embed" and parse("todre").methods[0].stage == "vision"


# ---- generic contracts, end to end on a tiny model ------------------------------------------
@pytest.mark.parametrize("spec,kind", [("divprune:ratio=0.3", "clip"), ("todre:keep=5", "siglip")])
def test_batch_equals_single(spec, kind):
  H.check_batch_equals_single(spec, kind)


def test_traces_once():
  H.check_traces_once("todre@embed:keep=6")


@pytest.mark.parametrize("spec", ["divprune:keep=16", "todre:keep=1"])  # budget = N, budget = 1
def test_degenerate_inputs(spec):
  H.check_no_nan_on_degenerate(spec)
