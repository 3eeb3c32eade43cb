"""random: a seeded random subset per image (the draw depends on the image, not its batch position), sorted."""

from __future__ import annotations

from rules import rule
from rules._baselines import *  # noqa: F401,F403

KEEP_ALL = "random:keep=16"
ERRORS = [("random", "random: needs a budget")]


@rule()
def seeded_sorted_subset():
  rng = np.random.default_rng(3)
  tokens = H.random_tokens(rng, 3, 16, 4)
  ctx = H.method_context(VISION, {})
  _, a = _run("random:keep=6,seed=1", tokens, ctx)
  _, b = _run("random:keep=6,seed=1", tokens, ctx)
  _, c = _run("random:keep=6,seed=2", tokens, ctx)
  a, b, c = (np.asarray(v["index"]) for v in (a, b, c))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a[0], a[1])  # different images, different draws
  for row in a:
    assert len(set(row.tolist())) == 6 and list(row) == sorted(row)
