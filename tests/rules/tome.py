"""tome: bipartite soft matching inside every tower block (size-weighted merges, proportional attention, the class
token never merged), r per block from an even schedule."""

from __future__ import annotations

from rules import rule
from rules._tome import *  # noqa: F401,F403

KEEP_ALL = "tome:keep=16"
ERRORS = [("tome:keep=1", "keep=1 cannot be reached from 16 patches in the 3 blocks")]


@rule()
def merge_schedule_spreads_evenly_within_half():
  s = merge_schedule("tome", 576, 192, 23)  # LLaVA-1.5: 24x24 patches, 23 blocks run
  assert s == (17,) * 16 + (16,) * 7 and sum(s) == 384
  assert merge_schedule("tome", 16, 2, 3) == (8, 4, 2)  # every block at its 50 % bound
  assert merge_schedule("tome", 16, 8, 3) == (3, 3, 2)
  assert merge_schedule("tome", 16, 16, 3) == (0, 0, 0)
  n = 576
  for r in merge_schedule("tome", 576, 64, 23):
    assert r <= n // 2
    n -= r
  assert n == 64


@rule()
def clear_errors():
  with pytest.raises(ReductionError, match=r"keep=1 cannot be reached from 16 patches in the 3 blocks.*r <= 50%.*at "
                                           r"least 2 remain"):
    parse("tome:keep=1").methods[0].block_hook(CLIP)
  with pytest.raises(ReductionError, match="keep=20 is larger than the 16 tokens"):
    parse("turbo:keep=20").methods[0].vision_counts(CLIP)
  assert "keep=20" in H.plan_budget_errors("tome:keep=20", 16)
  assert parse("tome:keep=1").methods[0].vision_counts(SIGLIP) == [16, 8, 4, 2]
  assert parse("tome:keep=8").methods[0].vision_counts(CLIP) == [17, 14, 11]
  with pytest.raises(ReductionError, match="at most half of the 16 patch tokens \\(8\\), got r=9"):
    bipartite_merge(make_state(np.random.default_rng(0), 1, 17), 9, has_cls=True)


@rule()
def full_budget_merges_nothing():
  state = make_state(np.random.default_rng(0), 2, 17, with_positions=False)
  m = parse("turbo:keep=16").methods[0]
  assert m.schedule(CLIP) == (0, 0, 0) and m.vision_counts(CLIP) == [17, 17, 17]
  out = run_hook("turbo:keep=16", CLIP, 0, state)
  np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(state["x"]))
  np.testing.assert_array_equal(np.asarray(out["positions"]), np.tile(np.arange(17), (2, 1)))
  assert bool(out["proportional"])


@rule()
def degenerate_states_stay_finite():
  """Equal hidden states and all-zero keys and queries (a blank image) through every block, class token kept."""
  state = {"x": jnp.ones((2, 17, 6)), "size": jnp.ones((2, 17))}
  for layer in range(3):
    zeros = jnp.zeros((2, state["x"].shape[1], 2, 4))
    state = run_hook("turbo:keep=2", CLIP, layer, {**state, "q": zeros, "k": zeros, "metric": zeros.mean(axis=2)})
  assert state["x"].shape == (2, 3, 6) and np.all(np.isfinite(np.asarray(state["x"])))
  for row in np.asarray(state["positions"]):
    assert row[0] == 0 and len(set(row.tolist())) == 3
  np.testing.assert_array_equal(np.asarray(state["size"]).sum(axis=1), [17, 17])


@rule(*[
    ("tome:keep=2", CLIP, 0, 17),  # r = 8, the 50 % bound, no positions yet (created on block 0)
    ("tome:keep=8", CLIP, 1, 14),  # r = 3 on a state that already carries positions
    ("tome:keep=5", SIGLIP, 2, 10),  # no class token, r = 3
])
def hook_matches_numpy(spec, vision, layer, t):
  state = make_state(np.random.default_rng(t), 2, t, with_positions=layer > 0)
  check_hook(spec, vision, layer, state)


@rule("tome:keep=6")
def tower_run_matches_numpy_merge(spec):
  check_tower_run(spec)
