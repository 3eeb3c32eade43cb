"""Structured visual inputs (several images / clips per prompt) and their token structure."""

import numpy as np
import pytest

from vtr_jax.models.visual_inputs import VisualInputs, token_structure


def _units(f, rng):
  return rng.standard_normal((f, 4, 4, 3)).astype(np.float32)


def test_mixed_batch_structure():
  rng = np.random.default_rng(0)
  vis = VisualInputs.from_lists([[_units(3, rng)], [_units(1, rng), _units(1, rng)]], max_units=4)
  assert vis.pixels.shape == (2, 4, 4, 4, 3)
  np.testing.assert_array_equal(vis.unit_input, [[0, 0, 0, -1], [0, 1, -1, -1]])
  np.testing.assert_array_equal(vis.unit_frame, [[0, 1, 2, 0], [0, 0, 0, 0]])
  s = token_structure(vis, (2, 3))
  assert s["input"].shape == (2, 24)
  # loop rendering
  for b in range(2):
    for t in range(24):
      u, k = divmod(t, 6)
      assert s["input"][b, t] == vis.unit_input[b, u]
      assert s["frame"][b, t] == vis.unit_frame[b, u]
      assert (s["row"][b, t], s["col"][b, t]) == divmod(k, 3)
      assert s["valid"][b, t] == vis.unit_valid[b, u]


def test_bad_inputs_named():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="F>=1"):
    VisualInputs.from_lists([[np.zeros((0, 4, 4, 3), np.float32)], [_units(1, rng)]])
  with pytest.raises(ValueError, match="one shape"):
    VisualInputs.from_lists([[_units(1, rng)], [rng.standard_normal((1, 5, 4, 3))]])
  with pytest.raises(ValueError, match="max_units"):
    VisualInputs.from_lists([[_units(3, rng)]], max_units=2)
