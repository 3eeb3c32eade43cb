"""divprune: greedy max-min selection on 1 - cosine, first the token whose nearest other token is farthest."""

from __future__ import annotations

from rules import rule
from rules._diversity import *  # noqa: F401,F403

KEEP_ALL = "divprune:keep=16"
ERRORS = [("divprune:ratio=0", r"ratio=0.0 must be in \(0, 1\]")]


@rule(*[1, 6, 16])
def matches_numpy(keep):
  rng = np.random.default_rng(keep)
  tokens = tokens_with_ties(rng, 3, 16)
  out, aux = run(f"divprune:keep={keep}", tokens)
  for i in range(3):
    x, selection = np.asarray(tokens.x[i]), np.asarray(aux["selection"][i])
    check_k_center(x, selection)
    assert np.asarray(aux["index"][i]).tolist() == sorted(selection)
    np.testing.assert_array_equal(np.asarray(out.x[i]), x[sorted(selection)])
    assert np.asarray(out.positions[i]).tolist() == sorted(selection)


@rule()
def invalid_tokens_come_last():
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


@rule()
def identical_tokens_are_never_picked_twice():
  tokens = Tokens.full(jnp.ones((2, 16, 4)))
  ctx = H.method_context(CLIP, {"vision/cls_attn/2": jnp.full((2, 2, 17), 1 / 17)})
  for spec in ("divprune:keep=16", "todre:keep=16"):
    out, aux = run(spec, tokens, ctx)
    assert np.asarray(aux["index"]).tolist() == [list(range(16))] * 2
    assert np.all(np.isfinite(np.asarray(out.x)))


@rule()
def clear_errors():
  msg = H.plan_budget_errors("divprune:keep=20", 16)
  assert "keep=20" in msg and "16 tokens" in msg
  assert "keep=17" in H.plan_budget_errors("todre:keep=17", 16)
  ctx = H.method_context(CLIP, {"vision/cls_attn/2": jnp.ones((1, 2, 17)) / 17})
  with pytest.raises(ReductionError, match="todre scores the tower's 16 patches but receives 9 tokens"):
    run("todre:keep=4", H.random_tokens(np.random.default_rng(0), 1, 9, 4), ctx)
  assert parse("divprune").methods[0].stage == "embed" and parse("todre").methods[0].stage == "vision"
