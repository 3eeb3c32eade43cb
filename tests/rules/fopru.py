"""fopru: significance from the tower's attention (received or paid, by variance); rank = global top-k, row = whole
grid rows by total significance."""

from __future__ import annotations

from rules import rule
from rules._fopru import *  # noqa: F401,F403

KEEP_ALL = "fopru:keep=16"
EXAMPLES = ("fopru:keep=6,strategy=row",)
ERRORS = [("fopru:keep=4,strategy=col", "strategy='col' is not one of rank, row")]


@rule(*[("rank", 1), ("rank", 5), ("rank", 16), ("row", 1), ("row", 4),
                                           ("row", 6), ("row", 8), ("row", 16)])
def matches_numpy(strategy, keep):
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


@rule()
def row_ties_resolve_to_the_lowest_row():
  scores = np.zeros((1, N), np.float32)
  scores[0, [1, 2]] = scores[0, [2 * G + 1, 2 * G + 3]] = 0.25  # rows 0 and 2 tie for best
  assert np.asarray(row_indices(jnp.asarray(scores), 6, G))[0].tolist() == [0, 1, 2, 3, 9, 11]
  assert np.asarray(row_indices(jnp.asarray(scores), 2, G))[0].tolist() == [1, 2]


@rule()
def siglip_uses_received_attention():
  rng = np.random.default_rng(3)
  received = rng.random((2, N)).astype(np.float32)
  x = rng.standard_normal((2, N, 4)).astype(np.float32)
  _, aux = _run("fopru:keep=6", SIGLIP, {"vision/received_attn/3": received}, x)
  _, aux_row = _run("fopru:keep=6,strategy=row", SIGLIP, {"vision/received_attn/3": received}, x)
  for i in range(2):
    assert np.asarray(aux["index"][i]).tolist() == np_rank(received[i], 6)
    assert np.asarray(aux_row["index"][i]).tolist() == np_rows(received[i], 6)


@rule()
def errors():
  assert "keep=17 is larger than the 16 tokens" in H.plan_budget_errors("fopru:keep=17", 16)
  with pytest.raises(ReductionError, match="strategy='col' is not one of rank, row"):
    parse("fopru:keep=4,strategy=col")
