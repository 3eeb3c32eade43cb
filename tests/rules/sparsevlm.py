"""sparsevlm: raters on the input embeddings; at each layer l the raters' mean attention (layer l's q/k) ranks the
visual tokens, layer l's output keeps the top keep[i]; the top 30 % (+1) pruned tokens are clustered by DPC-KNN
and each cluster's mean is inserted after the kept visual tokens; positions renumbered."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import reduce_harness as H
from rules import rule
from rules._llm import kept_patches, np_qk, np_row_attention, np_top_visual, patch_scores, run_recorded
from vtr_jax.reduce import parse
from vtr_jax.reduce.in_llm.sparsevlm import dpc_knn

KEEP_ALL = "sparsevlm:layers=0/1/2,keep=16/16/16"
MASKED = "sparsevlm:layers=0/2,keep=8/3,recycle=false"
EXAMPLES = ("sparsevlm:layers=0/2,keep=8/3",)
ERRORS = [("sparsevlm:layers=0/1,keep=3", "needs one budget per layer"),
          ("sparsevlm:layers=0/1/3,keep=3/2/1", r"layer=3 must be in 0\.\.2"),
          ("sparsevlm:layers=1/0,keep=3/2", "strictly increasing"),
          ("sparsevlm:layers=0/1,keep=3/2,mask=true", "mask=true needs recycle=false"),
          ("sparsevlm:layers=0/1/2,target=100", r"target=100 must be one of \[64, 128, 192\]"),
          ("sparsevlm:layers=0/1/2,keep=3/2/1,target=64", "give keep= or target=, not both")]


def np_raters(x, visual, text):
  v = [x[s] for s in range(len(x)) if visual[s]]
  t_idx = [s for s in range(len(x)) if text[s]]
  rel = np.zeros(len(t_idx))
  for vec in v:
    logits = np.array([vec @ x[s] for s in t_idx])
    e = np.exp(logits - logits.max())
    rel += e / e.sum() / len(v)
  chosen = {s for s, r in zip(t_idx, rel) if r > rel.mean()}
  return chosen or {len(x) - 1}  # fallback: the last prompt token rates alone


def np_dpc_knn(x, k):
  n, d = x.shape
  dist = np.array([[np.linalg.norm(x[i] - x[j]) / np.sqrt(d) for j in range(n)] for i in range(n)])
  density = np.array([np.exp(-np.mean(np.sort(dist[i])[:k] ** 2)) for i in range(n)])
  delta = np.zeros(n)
  for i in range(n):
    denser = [j for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
    delta[i] = min(dist[i, j] for j in denser) if denser else dist.max()
  score = delta * density
  centres = sorted(range(n), key=lambda i: (-score[i], i))[:k]
  assign = [int(np.argmin([dist[c, i] for c in centres])) for i in range(n)]
  for c_i, c in enumerate(centres):
    assign[c] = c_i
  return np.array(assign), np.array(centres)


def _rater_scores(aux, params, cfg, i, layer, rat, x0_len):
  x, pos, val = (aux[f"llm/rec_out/{layer}/{k}"][i] for k in ("x", "positions", "valid"))  # what layer l runs on
  q, k = np_qk(params, layer, x.astype(np.float64), pos, cfg)
  shift = x0_len - len(x)  # rater slots move with drops: the text after the visual block keeps its order
  return np.mean([np_row_attention(q, k, r - shift, val) for r in rat], axis=0)


def _raters(aux, i):
  x0, vis0, val0 = (aux[f"llm/rec_in/0/{k}"][i] for k in ("x", "visual", "valid"))
  last_vis = max(s for s in range(len(x0)) if vis0[s])
  text = np.array([val0[s] and not vis0[s] and s > last_vis for s in range(len(x0))])
  return np_raters(x0.astype(np.float64), vis0 & val0, text), len(x0)


@rule()
def raters_and_scores():
  aux, params, cfg = run_recorded("sparsevlm:layers=1/2,keep=8/4,recycle=false")
  for i in range(4):
    rat, x0_len = _raters(aux, i)
    for layer, keep in ((1, 8), (2, 4)):
      vis, val, patch = (aux[f"llm/rec_out/{layer}/{k}"][i] for k in ("visual", "valid", "patch"))
      scores = _rater_scores(aux, params, cfg, i, layer, rat, x0_len)
      expect = patch[np_top_visual(scores, vis, val, keep)]
      H.tie_aware_equal(kept_patches(aux, "out", layer + 1, i), expect, patch_scores(patch, scores), keep)


@rule()
def recycling_merges_the_best_pruned_tokens():
  """At layer 1's output: keep 6, recycle the top 30 % (+1) of the 10 pruned by score into 1 cluster mean per
  DPC-KNN cluster, inserted after the kept visual tokens; contiguous positions."""
  spec = "sparsevlm:layers=1,keep=6"
  keep, merged = parse(spec).methods[0].stage_keeps(16)[0]
  assert (keep, merged) == (6, 1)  # int(min(10, int(10 * 0.3) + 1)) // 10 + 1
  aux, params, cfg = run_recorded(spec)
  for i in range(4):
    rat, x0_len = _raters(aux, i)
    vis, val, patch = (aux[f"llm/rec_out/1/{k}"][i] for k in ("visual", "valid", "patch"))
    scores = _rater_scores(aux, params, cfg, i, 1, rat, x0_len)
    x = aux["llm/rec_in/2/x"][i]  # layer 1's output, where the drop happens (same slots)
    kept = np_top_visual(scores, vis, val, keep)
    pruned = [s for s in range(len(x)) if vis[s] and val[s] and s not in kept]
    recycled = sorted(pruned, key=lambda s: (-scores[s], s))[:min(len(pruned), int(len(pruned) * 0.3) + 1)]
    assign, _ = np_dpc_knn(x[recycled].astype(np.float64), merged)
    means = [np.mean(x[[s for s, a in zip(recycled, assign) if a == c]], axis=0) for c in range(merged)]
    out = {k: aux[f"llm/rec_out/2/{k}"][i] for k in ("x", "visual", "valid", "patch", "positions")}
    slots = np.nonzero(out["visual"] & out["valid"])[0]
    assert len(slots) == keep + merged and list(slots) == list(range(slots[0], slots[0] + keep + merged))
    assert out["patch"][slots[:keep]].tolist() == patch[kept].tolist()  # kept tokens in original order
    assert out["patch"][slots[keep:]].tolist() == [-3] * merged  # then the merged ones
    np.testing.assert_allclose(out["x"][slots[keep:]], np.array(means), atol=1e-5)
    assert out["positions"][out["valid"]].tolist() == list(range(int(out["valid"].sum())))


@rule(False, True)
def dpc_knn_loop(duplicates):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((3, 14, 6)).astype(np.float32)
  if duplicates:  # exact density ties
    x[:, 7:] = x[:, :7]
  assign, centres = dpc_knn(jnp.asarray(x), 3)
  for b in range(3):
    a_ref, c_ref = np_dpc_knn(x[b].astype(np.float64), 3)
    assert np.asarray(centres[b]).tolist() == c_ref.tolist()
    assert np.asarray(assign[b]).tolist() == a_ref.tolist()
