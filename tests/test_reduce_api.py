"""The reduction API: config strings, registry, budgets, errors, primitives."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from reduce_harness import batch_inputs, tiny_model
from vtr_jax import reduce
from vtr_jax.models.vlm import VLM, pad_prompts
from vtr_jax.reduce import ReductionError, parse, primitives as P


def test_parse_round_trip_and_stage_order():
  plan = parse("random@embed:ratio=0.5,seed=3+fastervlm:keep=64")
  assert [m.name for m in plan.methods] == ["fastervlm", "random"]  # sorted by stage
  assert plan.methods[1].stage == "embed" and plan.methods[1].ratio == 0.5 and plan.methods[1].seed == 3
  assert parse(plan.spec) == plan
  assert parse("none") == parse("") == parse(None) and not parse("none")


@pytest.mark.parametrize("spec, message", [
    ("fastvv:keep=3", r"unknown reduction method 'fastvv'; known: .*fastervlm.*random"),
    ("fastervlm:kep=3", r"unknown setting 'kep'; known settings: keep, ratio"),
    ("fastervlm:keep", r"malformed setting 'keep'; write key=value"),
    ("fastervlm:keep=abc", r"keep='abc' is not a valid int"),
    ("fastervlm:keep=3,keep=4", r"setting 'keep' given twice"),
    ("fastervlm:keep=3++random:keep=2", r"empty method"),
    ("fastervlm@embed:keep=3", r"cannot act at stage 'embed'; it supports: vision"),
    ("fastervlm@gpu:keep=3", r"cannot act at stage 'gpu'"),
    ("random:keep=3,ratio=0.5", None),  # parses; fails when the budget is resolved
])
def test_config_string_errors(spec, message):
  if message is None:
    m = parse(spec).methods[0]
    with pytest.raises(ReductionError, match="give keep= or ratio=, not both"):
      m.kept(16)
    return
  with pytest.raises(ReductionError, match=message):
    parse(spec)


def test_budget_errors_name_values():
  with pytest.raises(ReductionError, match="budget keep=20 is larger than the 16 tokens"):
    parse("random:keep=20").methods[0].kept(16)
  with pytest.raises(ReductionError, match=r"ratio=1.5 must be in \(0, 1\]"):
    parse("random:ratio=1.5").methods[0].kept(16)
  with pytest.raises(ReductionError, match="needs a budget"):
    parse("random").methods[0].kept(16)
  assert parse("random:ratio=0.01").methods[0].kept(16) == 1


def test_budget_too_big_raises_inside_model():
  model, params = tiny_model("clip")
  prompts, pixels = batch_inputs()
  toks, valid = pad_prompts(prompts, 0)
  with pytest.raises(ReductionError, match="budget keep=17 is larger than the 16 tokens"):
    model.apply(params, pixels, toks, valid, reduction="fastervlm:keep=17", method=VLM.prefill)


def test_every_method_has_a_summary_line():
  lines = reduce.describe().splitlines()
  assert len(lines) == len(reduce.registry()) and all(len(line.split()) >= 4 for line in lines)


def test_topk_indices_ties_and_validity():
  scores = jnp.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
  idx = P.topk_indices(scores, 2)
  assert idx.tolist() == [[1, 2], [0, 1]]  # ties -> lowest index, then sorted
  valid = jnp.array([[True, False, True, True, True], [False, False, True, False, True]])
  assert P.topk_indices(scores, 3, valid).tolist() == [[2, 3, 4], [0, 2, 4]]
  nan = jnp.array([[jnp.nan, 1.0, -jnp.inf, 0.5]])
  assert P.topk_indices(nan, 2, sort=False).tolist() == [[1, 3]]
  assert P.topk_indices(jnp.array([[-jnp.inf, 2.0, 1.0]]), 2, jnp.array([[True, False, True]])).tolist() == [[0, 2]]


def test_scatter_merge_matches_loop():
  rng = np.random.default_rng(0)
  dst, dw = rng.standard_normal((2, 3, 4)), rng.random((2, 3))
  src, sw = rng.standard_normal((2, 5, 4)), rng.random((2, 5))
  assign = rng.integers(0, 3, (2, 5))
  out = np.asarray(P.scatter_merge(jnp.asarray(dst), jnp.asarray(dw), jnp.asarray(src), jnp.asarray(sw),
                                   jnp.asarray(assign)))
  for b in range(2):
    for m in range(3):
      num, den = dst[b, m] * dw[b, m], dw[b, m]
      for n in range(5):
        if assign[b, n] == m:
          num, den = num + src[b, n] * sw[b, n], den + sw[b, n]
      np.testing.assert_allclose(out[b, m], num / den, rtol=1e-5)


def numpy_greedy_max_min(dist: np.ndarray, k: int) -> list[int]:
  n = len(dist)
  nearest = [min(dist[i, j] for j in range(n) if j != i) for i in range(n)]
  chosen = [int(np.argmax(nearest))]
  while len(chosen) < k:
    best, best_i = -np.inf, None
    for i in range(n):
      if i in chosen:
        continue
      d = min(dist[c, i] for c in chosen)
      if d > best:
        best, best_i = d, i
    chosen.append(best_i)
  return chosen


def test_greedy_max_min_matches_loop_and_never_repeats():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 12, 5))
  dist = np.linalg.norm(x[:, :, None] - x[:, None], axis=-1).astype(np.float32)
  out = np.asarray(P.greedy_max_min(jnp.asarray(dist), 6))
  for b in range(3):
    assert out[b].tolist() == numpy_greedy_max_min(dist[b], 6)
  same = jnp.zeros((1, 6, 6)) + 1e-7 * jnp.eye(6)  # all tokens equal, a non-zero diagonal
  picked = np.asarray(P.greedy_max_min(same, 6))[0]
  assert sorted(picked.tolist()) == list(range(6))


def test_complement_and_sample_keys():
  idx = jnp.array([[4, 1], [0, 3]])
  assert P.complement(idx, 5).tolist() == [[0, 2, 3], [1, 2, 4]]
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 2)), jnp.float32)
  keys = P.sample_keys(0, P.fingerprint(x))
  keys_one = P.sample_keys(0, P.fingerprint(x[1:2]))
  import jax
  assert jax.random.key_data(keys[1]).tolist() == jax.random.key_data(keys_one[0]).tolist()
