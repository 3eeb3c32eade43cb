"""Shared pieces of the tome rules (moved from tests/test_reduce_tome.py)."""

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

__all__ = ["CLIP", "H", "ReductionError", "SIGLIP", "VisionConfig", "VisionTower", "bipartite_merge", "check_hook", "check_tower_run", "jax", "jnp", "make_state", "merge_schedule", "nn", "np", "np_merge", "np_semantic", "parse", "pytest", "run_hook"]


CLIP = VisionConfig(image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2, intermediate_size=8)


SIGLIP = VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_size=8, num_layers=4, num_heads=2,
                      intermediate_size=8, feature_layers=(-1,))


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


def check_tower_run(spec):
  """A 2-block tower with the method's hook against `np_merge` applied block by block."""
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
