"""Video: frame-structured Tokens (the video methods of issue 14 are not built yet)."""

import numpy as np
import pytest

from vtr_jax.reduce import ReductionError
from vtr_jax.reduce.video.common import frame_tokens


def test_frame_tokens_layout_against_loops():
  x = np.random.default_rng(0).normal(size=(2, 3, 6, 4)).astype(np.float32)
  t = frame_tokens(x, (2, 3), frames_valid=[3, 1])
  for b in range(2):
    for f in range(3):
      for r in range(2):
        for c in range(3):
          i = f * 6 + r * 3 + c
          assert (int(t.frame[b, i]), int(t.row[b, i]), int(t.col[b, i])) == (f, r, c)
          np.testing.assert_array_equal(np.asarray(t.x[b, i]), x[b, f, r * 3 + c])
          assert bool(t.valid[b, i]) == (f < [3, 1][b])


def test_frame_tokens_bad_grid():
  with pytest.raises(ReductionError, match="grid"):
    frame_tokens(np.zeros((1, 2, 6, 4), np.float32), (2, 2))
