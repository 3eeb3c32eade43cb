"""uniform: an s x s lattice of the grid when keep = s^2, else floor((i + 1/2) N / keep) in raster order."""

from __future__ import annotations

from rules import rule
from rules._baselines import *  # noqa: F401,F403

KEEP_ALL = "uniform:keep=16"
ERRORS = [("uniform:keep=0", "keep=0 must be a positive integer")]


@rule()
def lattice_and_raster():
  tokens = H.random_tokens(np.random.default_rng(2), 2, 16, 4)
  ctx = H.method_context(VISION, {})
  _, aux = _run("uniform:keep=4", tokens, ctx)
  assert np.asarray(aux["index"][0]).tolist() == [5, 7, 13, 15]  # rows/cols floor((i + .5) * 4 / 2) = 1, 3
  _, aux = _run("uniform:keep=5", tokens, ctx)
  assert np.asarray(aux["index"][1]).tolist() == [int(np.floor((i + 0.5) * 16 / 5)) for i in range(5)]
