"""tome / turbo (merging inside the ViT blocks) against a loop-based NumPy rendering of the rule."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduce_harness as H
from vtr_jax.models.vit import VisionConfig, VisionTower
from vtr_jax.reduce import ReductionError, parse
from vtr_jax.reduce.pre_llm.tome import bipartite_merge, merge_schedule

CLIP = VisionConfig(image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2, intermediate_size=8)
SIGLIP = VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2,
                      intermediate_size=8, feature_layers=(-1,))


# ---- NumPy renderings ------------------------------------------------------------------------
def np_semantic(q: np.ndarray, k: np.ndarray, size: np.ndarray, has_cls: bool) -> np.ndarray:
  """[T] softmax attention (logits q.k / sqrt(H) + log size) from the class token (or mean over all
  query rows), mean over heads. q, k: [T, N, H]."""
  t, n, h = q.shape
  rows = [0] if has_cls else range(t)
  out = np.zeros(t)
  for head in range(n):
    for i in rows:
      logits = np.array([q[i, head] @ k[j, head] / np.sqrt(h) + np.log(size[j]) for j in range(t)], np.float64)
      e = np.exp(logits - logits.max())
      out += e / e.sum()
  return out / (n * len(rows))


def np_merge(x, metric, size, pos, r, has_cls, penalty=None, merged=None):
  """One ToMe step on one sample. Returns (x, size, pos, merged A indices, A scores).

  `merged` forces the merged set (to compare features after a tie resolved differently)."""
  t = len(x)
  a_tok, b_tok = list(range(0, t, 2)), list(range(1, t, 2))
  unit = [m / np.linalg.norm(m) if np.linalg.norm(m) > 0 else 0 * m for m in metric.astype(np.float64)]
  scores, partner = [], []
  for n, i in enumerate(a_tok):
    sims = [float(unit[i] @ unit[j]) for j in b_tok]
    j = int(np.argmax(sims))  # first best on ties
    partner.append(j)
    if has_cls and n == 0:
      scores.append(-np.inf)
    else:
      scores.append(sims[j] - (0.0 if penalty is None else float(penalty[i])))
  scores = np.array(scores)
  if merged is None:
    merged = sorted(range(len(a_tok)), key=lambda n: (-scores[n], n))[:r]
  unmerged = [n for n in range(len(a_tok)) if n not in merged]
  tot = {j: x[b].astype(np.float64) * size[b] for j, b in enumerate(b_tok)}
  sz = {j: float(size[b]) for j, b in enumerate(b_tok)}
  for n in merged:
    tot[partner[n]] += x[a_tok[n]] * size[a_tok[n]]
    sz[partner[n]] += size[a_tok[n]]
  out_x = [x[a_tok[n]] for n in unmerged] + [tot[j] / sz[j] for j in range(len(b_tok))]
  out_size = [size[a_tok[n]] for n in unmerged] + [sz[j] for j in range(len(b_tok))]
  out_pos = [pos[a_tok[n]] for n in unmerged] + [pos[b] for b in b_tok]
  return np.array(out_x), np.array(out_size), np.array(out_pos), sorted(merged), scores


def make_state(rng, b, t, d=6, heads=2, hd=4, with_positions=True):
  """A hand-made hook state with exact ties: A tokens 1-4 and B token 1 share one key, so four A
  tokens tie for the best similarity (r = 3 splits the tie)."""
  q = rng.standard_normal((b, t, heads, hd)).astype(np.float32) * 2
  k = rng.standard_normal((b, t, heads, hd)).astype(np.float32)
  k[:, 2] = k[:, 4] = k[:, 6] = k[:, 8] = k[:, 3]
  size = rng.integers(1, 4, (b, t)).astype(np.float32)
  state = {"x": rng.standard_normal((b, t, d)).astype(np.float32), "q": q, "k": k, "metric": k.mean(axis=2),
           "size": size}
  if with_positions:
    state["positions"] = np.stack([rng.permutation(40)[:t] for _ in range(b)]).astype(np.int32)
  return {key: jnp.asarray(v) for key, v in state.items()}


def run_hook(spec, vision, layer, state):
  """The method's block hook on one state, jitted (one compile instead of many eager ones)."""
  hook = parse(spec).methods[0].block_hook(vision)
  return jax.jit(lambda s: hook.fn(layer, s))(state)


def check_hook(spec, vision, layer, state, alpha=None):
  r = parse(spec).methods[0].schedule(vision)[layer]
  out = run_hook(spec, vision, layer, state)
  has_cls = vision.has_cls
  assert bool(out["proportional"])
  b, t = state["x"].shape[:2]
  assert out["x"].shape == (b, t - r, state["x"].shape[2])
  chosen_sets = []
  for i in range(b):
    x, metric, size = (np.asarray(state[key][i]) for key in ("x", "metric", "size"))
    pos = np.asarray(state["positions"][i]) if "positions" in state else np.arange(t)
    penalty = None
    if alpha is not None:
      penalty = alpha * np_semantic(np.asarray(state["q"][i]), np.asarray(state["k"][i]), size, has_cls)
    _, _, _, expected, scores = np_merge(x, metric, size, pos, r, has_cls, penalty)
    slot_of = {int(p): s for s, p in enumerate(pos)}
    kept_a = {slot_of[int(p)] // 2 for p in np.asarray(out["positions"][i])[: (t + 1) // 2 - r]}
    chosen = sorted(set(range((t + 1) // 2)) - kept_a)
    H.tie_aware_equal(chosen, expected, scores, r)
    ref_x, ref_size, ref_pos, _, _ = np_merge(x, metric, size, pos, r, has_cls, penalty, merged=chosen)
    np.testing.assert_allclose(np.asarray(out["x"][i]), ref_x, atol=1e-5, err_msg=f"{spec}: merged features")
    np.testing.assert_allclose(np.asarray(out["size"][i]), ref_size, err_msg=f"{spec}: sizes")
    np.testing.assert_array_equal(np.asarray(out["positions"][i]), ref_pos, err_msg=f"{spec}: positions")
    if has_cls:
      assert int(out["positions"][i][0]) == int(pos[0]), "the class token must stay first"
    chosen_sets.append(chosen)
  return chosen_sets


# ---- the schedule ------------------------------------------------------------------------------
def test_merge_schedule_spreads_evenly_within_half():
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


def test_clear_errors():
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


def test_full_budget_merges_nothing():
  state = make_state(np.random.default_rng(0), 2, 17, with_positions=False)
  m = parse("turbo:keep=16").methods[0]
  assert m.schedule(CLIP) == (0, 0, 0) and m.vision_counts(CLIP) == [17, 17, 17]
  out = run_hook("turbo:keep=16", CLIP, 0, state)
  np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(state["x"]))
  np.testing.assert_array_equal(np.asarray(out["positions"]), np.tile(np.arange(17), (2, 1)))
  assert bool(out["proportional"])


def test_degenerate_states_stay_finite():
  """Equal hidden states and all-zero keys and queries (a blank image) through every block, class token kept."""
  state = {"x": jnp.ones((2, 17, 6)), "size": jnp.ones((2, 17))}
  for layer in range(3):
    zeros = jnp.zeros((2, state["x"].shape[1], 2, 4))
    state = run_hook("turbo:keep=2", CLIP, layer, {**state, "q": zeros, "k": zeros, "metric": zeros.mean(axis=2)})
  assert state["x"].shape == (2, 3, 6) and np.all(np.isfinite(np.asarray(state["x"])))
  for row in np.asarray(state["positions"]):
    assert row[0] == 0 and len(set(row.tolist())) == 3
  np.testing.assert_array_equal(np.asarray(state["size"]).sum(axis=1), [17, 17])


# ---- the rule, on hand-made hook states --------------------------------------------------------
@pytest.mark.parametrize("spec,vision,layer,t", [
    ("tome:keep=2", CLIP, 0, 17),  # r = 8, the 50 % bound, no positions yet (created on block 0)
    ("tome:keep=8", CLIP, 1, 14),  # r = 3 on a state that already carries positions
    ("tome:keep=5", SIGLIP, 2, 10),  # no class token, r = 3
])
def test_tome_hook_matches_numpy(spec, vision, layer, t):
  state = make_state(np.random.default_rng(t), 2, t, with_positions=layer > 0)
  check_hook(spec, vision, layer, state)


@pytest.mark.parametrize("vision,layer,t", [(CLIP, 1, 14), (SIGLIP, 2, 10)])
def test_turbo_hook_matches_numpy(vision, layer, t):
  state = make_state(np.random.default_rng(10 + t), 2, t)
  turbo = check_hook("turbo:keep=5,alpha=4", vision, layer, state, alpha=4.0)
  tome = check_hook("tome:keep=5", vision, layer, state)
  assert turbo != tome, "the semantic term changed nothing here; the test would not catch its absence"


# ---- a whole tower run vs NumPy merging between the module's own blocks ------------------------
@pytest.mark.parametrize("spec", ["tome:keep=6", "turbo:keep=6,alpha=3"])
def test_tower_run_matches_numpy_merge(spec):
  cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                     feature_layers=(2,))
  tower = VisionTower(cfg)
  pixels = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  params = nn.unbox(tower.init(jax.random.key(1), pixels))
  params = jax.tree_util.tree_map(lambda p: p * 4.0 if p.ndim >= 2 else p, params)  # sharper attention
  m = parse(spec).methods[0]
  hook = m.block_hook(cfg)
  feats, aux = jax.jit(lambda p, px: tower.apply(p, px, hook=hook))(params, pixels)

  def apply(fn, *args):  # one of the tower's own pieces, jitted
    return jax.jit(lambda p, *a: tower.apply(p, *a, method=fn))(params, *args)

  x = np.asarray(apply(VisionTower.embed, pixels))
  size, pos = np.ones(x.shape[:2]), np.tile(np.arange(x.shape[1]), (2, 1))
  for layer, r in enumerate(m.schedule(cfg)):
    bias = None if layer == 0 else jnp.log(jnp.asarray(size, jnp.float32))
    x, q, k = apply(lambda mod, h, bb, i=layer: mod.layers[i].attend(h, bb), jnp.asarray(x, jnp.float32), bias)
    q, k = np.asarray(q), np.asarray(k)
    merged = [np_merge(np.asarray(x[i]), k[i].mean(axis=1), size[i], pos[i], r, True,
                       None if m.name == "tome" else m.alpha * np_semantic(q[i], k[i], size[i], True))
              for i in range(2)]
    x, size, pos = (np.stack([out[j] for out in merged]) for j in range(3))
    x = apply(lambda mod, h, i=layer: mod.layers[i].feed_forward(h), jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(feats), np.asarray(x)[:, 1:], atol=1e-5, err_msg=f"{spec}: features")
  np.testing.assert_allclose(np.asarray(aux["vision/size"]), size, err_msg=f"{spec}: sizes")
  np.testing.assert_array_equal(np.asarray(aux["vision/hook/positions"]), pos, err_msg=f"{spec}: positions")
  assert feats.shape == (2, 6, 16) and np.all(size.sum(axis=1) == 17)


# ---- generic contracts, end to end on a tiny model ------------------------------------------
@pytest.mark.parametrize("spec,kind", [("tome:keep=5", "clip"), ("turbo:keep=3", "siglip")])
def test_batch_equals_single(spec, kind):
  H.check_batch_equals_single(spec, kind)


def test_traces_once():
  H.check_traces_once("turbo:keep=6")


# budget = 1 needs 4 blocks (SigLIP); budget = N merges nothing (test_full_budget_merges_nothing); the class-token
# path on degenerate input: test_degenerate_states_stay_finite
def test_degenerate_inputs():
  H.check_no_nan_on_degenerate("turbo:keep=1", "siglip")
