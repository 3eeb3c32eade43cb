"""visionzip against a loop-based NumPy rendering of the authors' dominant + contextual rule."""

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


@pytest.mark.parametrize("keep,dominant,contextual", [(8, None, None), (16, None, None), (7, 3, None), (None, 5, 4),
                                                      (1, None, None)])
def test_visionzip_matches_numpy(keep, dominant, contextual):
  cls_attn, keys, x, cls_feature = _inputs(keep or 0)
  aux = {"vision/cls_attn/2": jnp.asarray(cls_attn), "vision/keys/2": jnp.asarray(keys),
         "vision/cls_feature": jnp.asarray(cls_feature)}
  settings = ",".join(f"{k}={v}" for k, v in (("keep", keep), ("dominant", dominant), ("contextual", contextual))
                      if v is not None)
  method = parse(f"visionzip:{settings}").methods[0]
  d, c = method.split(N)
  out, maux = _run(method.spec(), VISION, aux, x)
  assert out.count == d + c == method.kept(N)
  for i in range(3):
    scores = np.float32([sum(cls_attn[i, h, 1 + p] for h in range(HEADS)) for p in range(N)])  # sum, not mean
    np.testing.assert_allclose(np.asarray(maux["scores"][i]), scores, rtol=1e-6)
    expected, _, _ = np_visionzip(scores, keys[i, 1:], x[i], cls_feature[i], d - 1, c)
    ours = np.asarray(maux["index"][i]).tolist()
    H.tie_aware_equal(ours, expected, scores, d - 1)
    _, feats, positions = np_visionzip(scores, keys[i, 1:], x[i], cls_feature[i], d - 1, c, dominant=ours)
    assert np.asarray(out.positions[i]).tolist() == positions  # class token, dominant ascending, then targets
    np.testing.assert_allclose(np.asarray(out.x[i]), feats, atol=1e-5)
    assert np.all(np.asarray(out.valid[i]))
    if c:  # every patch stands in exactly one token, plus the class token
      assert float(out.size[i].sum()) == N + 1


def test_ties_resolve_to_the_lowest_index():
  cls_attn, keys, x, cls_feature = _inputs(0)
  aux = {"vision/cls_attn/2": jnp.asarray(cls_attn), "vision/keys/2": jnp.asarray(keys),
         "vision/cls_feature": jnp.asarray(cls_feature)}
  _, maux = _run("visionzip:dominant=3,contextual=2", VISION, aux, x)
  assert np.asarray(maux["index"][0]).tolist() == [3, 8]  # three patches tie at the top for two places
  assert np.all(np.asarray(maux["assign"][1]) == 0)  # equal keys: every token joins the first target


@pytest.mark.parametrize("dominant,contextual", [(5, 3), (14, 2)])  # (14, 2): every remaining token a target
def test_siglip_uses_received_attention_and_no_class_token(dominant, contextual):
  rng = np.random.default_rng(5)
  received = rng.random((2, N)).astype(np.float32)
  keys = rng.standard_normal((2, N, KEY_DIM)).astype(np.float32)
  x = rng.standard_normal((2, N, DIM)).astype(np.float32)
  aux = {"vision/received_attn/3": jnp.asarray(received), "vision/keys/3": jnp.asarray(keys)}
  out, _ = _run(f"visionzip:dominant={dominant},contextual={contextual}", SIGLIP, aux, x)
  for i in range(2):
    _, feats, positions = np_visionzip(received[i], keys[i], x[i], None, dominant, contextual)
    assert np.asarray(out.positions[i]).tolist() == positions
    np.testing.assert_allclose(np.asarray(out.x[i]), feats, atol=1e-5)


def test_default_splits_and_errors():
  assert [parse(f"visionzip:keep={k}").methods[0].split(576) for k in (192, 128, 64)] == [(162, 30), (108, 20),
                                                                                          (54, 10)]
  assert parse("visionzip:ratio=0.5").methods[0].split(16) == (7, 1)
  assert "keep=20 is larger than the 16 tokens" in H.plan_budget_errors("visionzip:keep=20", 16)
  assert "dominant+contextual=10+10=20 is larger than the 16 tokens" in H.plan_budget_errors(
      "visionzip:dominant=10,contextual=10", 16)
  with pytest.raises(ReductionError, match="needs a budget"):
    parse("visionzip:dominant=4").methods[0].kept(16)
  with pytest.raises(ReductionError, match="must add up to the budget 8"):
    parse("visionzip:keep=8,dominant=4,contextual=2").methods[0].kept(16)


def test_visionzip_on_a_keep_cls_tower_keeps_dominant_patches():
  """A tower that hands its class token on itself: no second class token, `dominant` patches."""
  cls_attn, keys, x, cls_feature = _inputs(5)
  aux = {"vision/cls_attn/2": jnp.asarray(cls_attn), "vision/keys/2": jnp.asarray(keys),
         "vision/cls_feature": jnp.asarray(cls_feature)}
  out, maux = _run("visionzip:keep=8", dataclasses.replace(VISION, keep_cls=True), aux, x)
  d, c = parse("visionzip:keep=8").methods[0].split(N)
  assert out.count == d + c and maux["index"].shape[1] == d
  assert np.all(np.asarray(out.positions) >= 0)
  for i in range(3):
    scores = np.float32([sum(cls_attn[i, h, 1 + p] for h in range(HEADS)) for p in range(N)])
    expected, _, _ = np_visionzip(scores, keys[i, 1:], x[i], None, d, c)
    H.tie_aware_equal(np.asarray(maux["index"][i]).tolist(), expected, scores, d)


# ---- generic contracts, end to end on a tiny model ------------------------------------------
def test_batch_equals_single():
  H.check_batch_equals_single("visionzip:keep=8")


@pytest.mark.slow  # the SigLIP twin; the CLIP instance runs by default
def test_siglip_batch_equals_single():
  H.check_batch_equals_single("visionzip:dominant=4,contextual=3", kind="siglip")


def test_traces_once():
  H.check_traces_once("visionzip:keep=8")


@pytest.mark.parametrize("spec", ["visionzip:keep=16", "visionzip:keep=1"])
def test_degenerate_inputs(spec):
  H.check_no_nan_on_degenerate(spec)
