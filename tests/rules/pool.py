"""pool: average pooling with window and stride s over the patch grid; position = the window's top-left patch."""

from __future__ import annotations

from rules import rule
from rules._baselines import *  # noqa: F401,F403

KEEP_ALL = "pool:stride=1"
ERRORS = [("pool:stride=0", "pool: stride=0 must be >= 1"), ("random:keep=9+pool@embed:stride=2", "pool needs the full 4x4 patch grid")]


@rule(*[1, 2, 3])
def matches_numpy(stride):
  rng = np.random.default_rng(stride)
  tokens = H.random_tokens(rng, 2, 16, 4)
  out, _ = _run(f"pool:stride={stride}", tokens, H.method_context(VISION, {}))
  for i in range(2):
    x, pos, size = np_pool(np.asarray(tokens.x[i]), 4, stride)
    np.testing.assert_allclose(np.asarray(out.x[i]), x, rtol=1e-5, atol=1e-6)
    assert np.asarray(out.positions[i]).tolist() == pos and np.asarray(out.size[i]).tolist() == size


@rule()
def needs_the_grid():
  with pytest.raises(ReductionError, match="pool needs the full 4x4 patch grid"):
    _run("pool:stride=2", H.random_tokens(np.random.default_rng(0), 1, 9, 4), H.method_context(VISION, {}))
