"""visionzip: dominant tokens ([CLS] + top patches by [CLS] attention summed over heads) then contextual tokens
(uniformly spaced targets + the mean of the remaining tokens most key-similar to each)."""

from __future__ import annotations

from rules import rule
from rules._visionzip import *  # noqa: F401,F403

KEEP_ALL = None
NO_KEEP_ALL = "the class token is added and the last tokens are merged into contextual tokens"
ERRORS = [("visionzip:dominant=4", "needs a budget"), ("visionzip:keep=8,dominant=4,contextual=2", "must add up to the budget 8")]


@rule(*[(8, None, None), (16, None, None), (7, 3, None), (None, 5, 4),
                                                      (1, None, None)])
def matches_numpy(keep, dominant, contextual):
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


@rule()
def ties_resolve_to_the_lowest_index():
  cls_attn, keys, x, cls_feature = _inputs(0)
  aux = {"vision/cls_attn/2": jnp.asarray(cls_attn), "vision/keys/2": jnp.asarray(keys),
         "vision/cls_feature": jnp.asarray(cls_feature)}
  _, maux = _run("visionzip:dominant=3,contextual=2", VISION, aux, x)
  assert np.asarray(maux["index"][0]).tolist() == [3, 8]  # three patches tie at the top for two places
  assert np.all(np.asarray(maux["assign"][1]) == 0)  # equal keys: every token joins the first target


@rule(*[(5, 3), (14, 2)])  # (14, 2): every remaining token a target
def siglip_uses_received_attention_and_no_class_token(dominant, contextual):
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


@rule()
def default_splits_and_errors():
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


@rule()
def keep_cls_tower_keeps_dominant_patches():
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
