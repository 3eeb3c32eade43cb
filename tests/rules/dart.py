"""dart: pivots by the L1 norm of layer K-1's keys; on the hidden states entering layer K through the final norm,
each pivot in turn keeps the floor(budget / 8) remaining image tokens least similar to it."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from rules import rule
from rules._llm import np_qk, np_rms, run_recorded
from vtr_jax.reduce import parse
from vtr_jax.reduce.in_llm.dart import dart_select

KEEP_ALL = "dart:layer=2,keep=16"
MASKED = "dart:layer=2,keep=8"
ERRORS = [("dart:layer=0,keep=8", r"layer=0 must be in 1\.\.3"), ("dart:keep=8,pivots=0", "pivots=0 must be >= 1")]


def np_dart(h, key_norm, visual, text, n_img, n_txt, per):
  hn = h / np.linalg.norm(h, axis=-1, keepdims=True)
  vis = [s for s in range(len(h)) if visual[s]]
  img_p = sorted(vis, key=lambda s: (-key_norm[s], s))[:n_img]
  txt = [s for s in range(len(h)) if text[s]]
  txt_p = sorted(txt, key=lambda s: (-key_norm[s], s))[:n_txt]
  kept, cands = set(img_p), [s for s in vis if s not in img_p]
  for p in img_p + txt_p:
    sims = {c: hn[p] @ hn[c] for c in cands}
    pick = sorted(cands, key=lambda c: (sims[c], c))[:per]  # least similar first
    kept |= set(pick)
    cands = [c for c in cands if c not in pick]
  # pivots a short prompt lacks hand their quota to the remaining candidates with the largest key norm
  missing = (n_img - len(img_p) + n_txt - len(txt_p)) * per
  kept |= set(sorted(cands, key=lambda c: (-key_norm[c], c))[:missing])
  return kept


@rule()
def pivot_loop():
  rng = np.random.default_rng(4)
  b, t = 3, 30
  h = rng.standard_normal((b, t, 8)).astype(np.float32)
  norm = rng.random((b, t)).astype(np.float32)
  visual = np.zeros((b, t), bool)
  visual[:, 5:21] = True
  text = np.zeros((b, t), bool)
  text[:, 21:] = True
  valid = np.ones((b, t), bool)
  kept = np.asarray(dart_select(jnp.asarray(h), jnp.asarray(norm), jnp.asarray(visual), jnp.asarray(valid),
                                jnp.asarray(text), 4, 4, 1))
  for i in range(b):
    assert set(np.nonzero(kept[i])[0].tolist()) == np_dart(h[i].astype(np.float64), norm[i], visual[i],
                                                              text[i], 4, 4, 1)


@rule()
def in_the_model():
  """Key norms from layer 1's keys (heads concatenated, after RoPE), hidden states entering layer 2 through the
  final norm, the text pivots among the prompt tokens after the image; 4 + 8 * floor(8 / 8) = 12 kept."""
  aux, params, cfg = run_recorded("dart:layer=2,keep=8")
  final = np.asarray(params["params"]["decoder"]["norm"]["weight"])
  for i in range(4):
    x1, pos1, val = (aux[f"llm/rec_in/1/{k}"][i] for k in ("x", "positions", "valid"))
    _, k = np_qk(params, 1, x1.astype(np.float64), pos1, cfg)
    key_norm = np.abs(k).sum(axis=(1, 2))
    x2, vis, patch = (aux[f"llm/rec_in/2/{k}"][i] for k in ("x", "visual", "patch"))
    h = np_rms(x2.astype(np.float64), final, cfg.rms_norm_eps)
    last_vis = max(s for s in range(len(x2)) if vis[s])
    text = np.array([val[s] and not vis[s] and s > last_vis for s in range(len(x2))])
    expect = np_dart(h, key_norm, vis & val, text, 4, 4, 1)
    got = aux["llm/rec_out/2/patch"][i][aux["llm/rec_out/2/visual"][i] & aux["llm/rec_out/2/valid"][i]]
    assert sorted(got.tolist()) == sorted(patch[sorted(expect)].tolist())


@rule()
def reference_budget_arithmetic():
  """The reference's int(N (1 - r) / 8) per pivot: LightCompress's N=576 at r=0.7778 keeps 4 + 8 * 15 = 124."""
  assert parse(f"dart:ratio={1 - 0.7778}").methods[0].kept(576) == 124
  assert parse("dart:keep=128").methods[0].kept(576) == 132
  assert parse("dart:keep=7").methods[0].kept(16) == 4  # no candidate per pivot: the image pivots alone
