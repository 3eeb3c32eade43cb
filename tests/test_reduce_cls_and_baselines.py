"""random / uniform / pool / fastervlm / vtc_cls against loop-based NumPy renderings of their rules."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import reduce_harness as H
from vtr_jax.models.vit import VisionConfig
from vtr_jax.reduce import ReductionError, parse

VISION = VisionConfig(image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2, intermediate_size=8)
SIGLIP = VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2,
                      intermediate_size=8, feature_layers=(-1,))


def _run(spec, tokens, ctx):
  m = parse(spec).methods[0]
  return m.reduce(tokens, ctx)


# ---- NumPy renderings ------------------------------------------------------------------------
def np_topk_sorted(scores: np.ndarray, k: int) -> list[int]:
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # best first, ties -> lowest index
  return sorted(order[:k])


def np_pool(x: np.ndarray, g: int, s: int):
  m = -(-g // s)
  out, pos, size = [], [], []
  for wr in range(m):
    for wc in range(m):
      members = [r * g + c for r in range(wr * s, min(g, wr * s + s)) for c in range(wc * s, min(g, wc * s + s))]
      out.append(np.mean([x[i] for i in members], axis=0))
      pos.append(members[0])
      size.append(len(members))
  return np.array(out), pos, size


# ---- rules ----------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [1, 5, 16])
def test_fastervlm_matches_numpy(keep):
  rng = np.random.default_rng(keep)
  b, n = 3, 16
  cls_attn = H.softmax_rows(rng, (b, 2, n + 1))  # [B, heads, 1 + P]
  cls_attn[0, :, 3] = cls_attn[0, :, 7] = cls_attn[0, :, 9] = 0.05  # exact ties at the boundary
  ctx = H.method_context(VISION, {"vision/cls_attn/2": jnp.asarray(cls_attn)})
  tokens = H.random_tokens(rng, b, n, 4)
  out, aux = _run(f"fastervlm:keep={keep}", tokens, ctx)
  for i in range(b):
    scores = [float(np.mean([cls_attn[i, h, 1 + p] for h in range(2)])) for p in range(n)]
    H.tie_aware_equal(np.asarray(aux["index"][i]), np_topk_sorted(np.float32(scores), keep), np.float32(scores), keep)
    np.testing.assert_array_equal(np.asarray(out.x[i]), np.asarray(tokens.x[i])[np.asarray(aux["index"][i])])
    assert list(np.asarray(out.positions[i])) == sorted(np.asarray(out.positions[i]))


def test_fastervlm_siglip_uses_received_attention():
  rng = np.random.default_rng(0)
  received = rng.random((2, 16)).astype(np.float32)
  ctx = H.method_context(SIGLIP, {"vision/received_attn/3": jnp.asarray(received)})
  out, aux = _run("fastervlm:keep=4", H.random_tokens(rng, 2, 16, 4), ctx)
  for i in range(2):
    assert np.asarray(aux["index"][i]).tolist() == np_topk_sorted(received[i], 4)


def test_vtc_cls_sums_layers_before_the_last():
  rng = np.random.default_rng(1)
  b, n = 2, 16
  attn = {l: H.softmax_rows(rng, (b, 2, n + 1)) for l in range(3)}
  ctx = H.method_context(VISION, {f"vision/cls_attn/{l}": jnp.asarray(a) for l, a in attn.items()})
  out, aux = _run("vtc_cls:keep=6,start=0", H.random_tokens(rng, b, n, 4), ctx)
  for i in range(b):
    scores = np.zeros(n, np.float32)
    for l in (0, 1):  # blocks start .. last-run-block - 1 (the tower runs 3 blocks for layer -2)
      for p in range(n):
        scores[p] += np.float32(np.mean(attn[l][i, :, 1 + p]))
    H.tie_aware_equal(np.asarray(aux["index"][i]), np_topk_sorted(scores, 6), scores, 6)
  with pytest.raises(ReductionError, match="start=2 must leave at least one block"):
    parse("vtc_cls:keep=3,start=2").methods[0].vision_extras(VISION)


def test_uniform_lattice_and_raster():
  tokens = H.random_tokens(np.random.default_rng(2), 2, 16, 4)
  ctx = H.method_context(VISION, {})
  _, aux = _run("uniform:keep=4", tokens, ctx)
  assert np.asarray(aux["index"][0]).tolist() == [5, 7, 13, 15]  # rows/cols floor((i + .5) * 4 / 2) = 1, 3
  _, aux = _run("uniform:keep=5", tokens, ctx)
  assert np.asarray(aux["index"][1]).tolist() == [int(np.floor((i + 0.5) * 16 / 5)) for i in range(5)]


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_pool_matches_numpy(stride):
  rng = np.random.default_rng(stride)
  tokens = H.random_tokens(rng, 2, 16, 4)
  out, _ = _run(f"pool:stride={stride}", tokens, H.method_context(VISION, {}))
  for i in range(2):
    x, pos, size = np_pool(np.asarray(tokens.x[i]), 4, stride)
    np.testing.assert_allclose(np.asarray(out.x[i]), x, rtol=1e-5, atol=1e-6)
    assert np.asarray(out.positions[i]).tolist() == pos and np.asarray(out.size[i]).tolist() == size


def test_pool_needs_the_grid():
  with pytest.raises(ReductionError, match="pool needs the full 4x4 patch grid"):
    _run("pool:stride=2", H.random_tokens(np.random.default_rng(0), 1, 9, 4), H.method_context(VISION, {}))


def test_random_is_a_seeded_sorted_subset():
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


# ---- generic contracts, end to end on a tiny model ------------------------------------------
SPECS = ["random:keep=5", "uniform:keep=4", "pool:stride=2", "fastervlm:keep=5", "vtc_cls:keep=5,start=0",
         "random@embed:ratio=0.5", "fastervlm:keep=8+uniform@embed:keep=4"]


@pytest.mark.parametrize("spec", SPECS)
def test_batch_equals_single(spec):
  H.check_batch_equals_single(spec)


@pytest.mark.slow  # the SigLIP twin; the CLIP instance runs by default
@pytest.mark.parametrize("spec", ["fastervlm:keep=5", "random:keep=5", "pool:stride=2", "vtc_cls:keep=3"])
def test_siglip_batch_equals_single(spec):
  H.check_batch_equals_single(spec, kind="siglip")


@pytest.mark.parametrize("spec", ["random:keep=5", "fastervlm:keep=5", "pool:stride=2"])
def test_traces_once(spec):
  H.check_traces_once(spec)


@pytest.mark.parametrize("spec", ["random:keep=16", "random:keep=1", "fastervlm:keep=16", "fastervlm:keep=1",
                                  "vtc_cls:keep=1", "uniform:keep=1", "pool:stride=4"])
def test_degenerate_inputs(spec):
  H.check_no_nan_on_degenerate(spec)
