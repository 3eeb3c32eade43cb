"""llavolta: before layer K the visual grid is average-pooled s x s (the class token stays); a pooled token takes
its window's top-left slot's entries and the floor of the mean position; text untouched."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import reduce_harness as H
from rules import rule
from vtr_jax import flops
from vtr_jax.models.vlm import VLM, pad_prompts
from vtr_jax.reduce import parse
from vtr_jax.reduce.in_llm.llavolta import pool_visual
from vtr_jax.seams import LLMState

KEEP_ALL = "llavolta:layer=1,stride=1"
MASKED = "llavolta:layer=1,stride=2"
ERRORS = [("llavolta:stride=0", "llavolta: stride=0 must be >= 1"), ("llavolta:layer=4", r"layer=4 must be in 0\.\.3"),
          ("visionzip:keep=7+llavolta:layer=1", "llavolta: pools the full patch grid, but 7 visual tokens")]

def _pool_state(n_cls: int, g: int):
  """Two samples with text around one visual block at different offsets, position gaps, an invalid patch."""
  rng = np.random.default_rng(g)
  n = n_cls + g * g
  before, t = (5, 2), 8 + n  # text slots before the visual block (the rest follow it)
  x = rng.standard_normal((2, t, 4)).astype(np.float32)
  visual = np.zeros((2, t), bool)
  for i in range(2):
    visual[i, before[i]:before[i] + n] = True
  valid = np.ones((2, t), bool)
  valid[0, :2] = False  # left padding
  valid[1, before[1] + n_cls + 5] = False  # a hidden patch
  positions = np.cumsum(rng.integers(1, 3, (2, t)), axis=1).astype(np.int32)
  patch = np.where(visual, np.cumsum(visual, axis=1) - 1 - n_cls, -2).astype(np.int32)
  target = rng.integers(0, 50, (2, t)).astype(np.int32)
  return LLMState(jnp.asarray(x), jnp.asarray(positions), jnp.asarray(valid), jnp.asarray(visual),
                  tokens={"patch": jnp.asarray(patch), "target": jnp.asarray(target)}, n_visual=n, n_cls=n_cls)


def np_llavolta(state, i, s, n_cls, g):
  """The published rule for sample i, as lists of (x, position, valid, patch, target) in slot order."""
  x, pos, valid, visual = (np.asarray(a[i]) for a in (state.x, state.positions, state.valid, state.visual))
  patch, target = np.asarray(state.tokens["patch"][i]), np.asarray(state.tokens["target"][i])
  start = int(np.argmax(visual))
  out = [(x[j], pos[j], valid[j], patch[j], target[j]) for j in range(start + n_cls)]
  m = -(-g // s)
  for wr in range(m):
    for wc in range(m):
      slots = [start + n_cls + r * g + c for r in range(wr * s, min(g, wr * s + s))
               for c in range(wc * s, min(g, wc * s + s))]
      live = [j for j in slots if valid[j]]
      if not live:  # every patch of the window hidden: the pooled token is hidden too
        out.append((None, None, False, None, None))
        continue
      mean = np.mean([x[j] for j in live], axis=0)
      out.append((mean, math.floor(np.mean([pos[j] for j in live])), True, patch[slots[0]], target[slots[0]]))
  out += [(x[j], pos[j], valid[j], patch[j], target[j]) for j in range(start + n_cls + g * g, len(x))]
  return out


def _slots(state, i, rows):
  return [(np.asarray(state.x[i, j]), int(state.positions[i, j]), bool(state.valid[i, j]),
           int(state.tokens["patch"][i, j]), int(state.tokens["target"][i, j])) for j in rows]


def _assert_same(got, want):
  """Slots agree: valid flags everywhere; features, position, patch and target where valid."""
  assert len(got) == len(want)
  for (gx, gp, gv, gpa, gt), (wx, wp, wv, wpa, wt) in zip(got, want):
    assert gv == wv
    if wv:
      assert (gp, gpa, gt) == (wp, wpa, wt)
      np.testing.assert_allclose(gx, wx, atol=1e-6)


@rule((0, 4, 2), (1, 5, 3), (0, 3, 1))
def pooling(n_cls, g, s):
  state = _pool_state(n_cls, g)
  pool = jax.jit(lambda st, mask: pool_visual(st, s, mask=mask), static_argnums=1)
  dropped, masked = pool(state, False), pool(state, True)
  assert dropped.n_visual == n_cls + math.ceil(g / s) ** 2 == n_cls + parse(f"llavolta:stride={s}").methods[0].kept(
      g * g)
  assert masked.x.shape == state.x.shape
  for i in range(2):
    want = np_llavolta(state, i, s, n_cls, g)
    _assert_same(_slots(dropped, i, range(dropped.length)), want)
    # the mask variant: the same tokens, in the same order, among its valid slots
    rows = np.nonzero(np.asarray(masked.valid[i]))[0]
    _assert_same(_slots(masked, i, rows), [w for w in want if w[2]])



@rule()
def counts_in_the_model():
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs()
  toks, valid = pad_prompts(prompts, 0)
  _, _, a = jax.jit(lambda p: model.apply(p, pixels, toks, valid, reduction="llavolta:layer=1,stride=2",
                                          method=VLM.prefill))(params)
  for i in range(4):
    assert int(np.sum(np.asarray(a["llm/visual"][i]) & np.asarray(a["llm/valid"][i]))) == 4
  cfg = model.config
  assert flops.prefill_cost(cfg, "llavolta:layer=1,stride=2", text_tokens=8).visual_tokens == (16, 4, 4, 4)
  assert flops.prefill_cost(cfg, "llavolta:layer=0,stride=3", text_tokens=8).visual_tokens == (4, 4, 4, 4)
  assert flops.prefill_cost(cfg, "llavolta:layer=1,mask=true", text_tokens=8).visual_tokens == (16,) * 4
