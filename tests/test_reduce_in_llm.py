"""In-LLM methods: scoring rules vs NumPy loops, equivalence checks, decoding, FLOPs vs cache shapes."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reduce_harness as H
from vtr_jax import flops
from vtr_jax.models.vlm import VLM, generate, pad_prompts
from vtr_jax.reduce import Plan, ReductionError, parse
from vtr_jax.seams import LLMState
from vtr_jax.reduce.in_llm import common as C
from vtr_jax.reduce.in_llm.dart import dart_select
from vtr_jax.reduce.in_llm.sparsevlm import dpc_knn

N_VIS = 16  # tiny model: 16 visual tokens, 4 decoder layers


@dataclasses.dataclass(frozen=True)
class RecordIn(C.LLMMethod):
  """Test-only (unregistered): reports the state at every boundary as `llm/rec_in/<layer>/...`."""
  name = "rec_in"
  summary = "records"

  def boundaries(self, num_layers):
    return tuple(range(num_layers))

  def at_boundary(self, layer, state, access):
    return state.report(**{f"{layer}/{k}": v for k, v in (("x", state.x), ("positions", state.positions),
                                                          ("valid", state.valid), ("visual", state.visual),
                                                          ("patch", state.tokens["patch"]))})


@dataclasses.dataclass(frozen=True)
class RecordOut(RecordIn):
  """The same, after the methods of the plan (`llm/rec_out/<layer>/...`)."""
  name = "rec_out"


def run_recorded(spec: str, kind: str = "clip", seed: int = 0):
  """Prefill with recorders before and after the method; returns (aux, params, prompts)."""
  model, params = H.tiny_model(kind)
  prompts, pixels = H.batch_inputs(seed)
  toks, valid = pad_prompts(prompts, 0)
  plan = Plan((RecordIn(), *parse(spec).methods, RecordOut()))
  aux = _recorded_prefill(model, params, pixels, toks, valid, plan)
  return {k: np.asarray(v) for k, v in aux.items()}, params, model.config.text


@functools.partial(jax.jit, static_argnames=("model", "plan"))
def _recorded_prefill(model, params, pixels, toks, valid, plan):
  return model.apply(params, pixels, toks, valid, reduction=plan, method=VLM.prefill)[2]


# ---- NumPy renderings ------------------------------------------------------------------------
def np_rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def np_rope(x, pos, theta):
  h = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
  ang = pos[:, None] * inv[None]  # [T, H/2]
  ang = np.concatenate([ang, ang], -1)[:, None, :]
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  return x * np.cos(ang) + np.concatenate([-x2, x1], -1) * np.sin(ang)


def np_qk(params, layer, x, pos, cfg):
  """Layer `layer`'s roped q [T, N, H] and k [T, K, H] for one sample's hidden states x [T, D]."""
  p = jax.tree_util.tree_map(np.asarray, params["params"]["decoder"][f"layers_{layer}"])
  h = np_rms(x, p["input_layernorm"]["weight"], cfg.rms_norm_eps)
  q = np.einsum("td,dnh->tnh", h, p["self_attn"]["q_proj"]["kernel"])
  k = np.einsum("td,dnh->tnh", h, p["self_attn"]["k_proj"]["kernel"])
  if "bias" in p["self_attn"]["q_proj"]:
    q, k = q + p["self_attn"]["q_proj"]["bias"], k + p["self_attn"]["k_proj"]["bias"]
  return np_rope(q, pos, cfg.rope_theta), np_rope(k, pos, cfg.rope_theta)


def np_row_attention(q, k, row, valid):
  """Head-mean softmax attention of query slot `row` over keys 0..row (valid ones): [T]."""
  n, kh = q.shape[1], k.shape[1]
  out = np.zeros(k.shape[0])
  for head in range(n):
    kk = k[:, head // (n // kh)]
    logits = np.array([q[row, head] @ kk[s] / np.sqrt(q.shape[-1]) if (valid[s] and s <= row) else -np.inf
                       for s in range(k.shape[0])])
    e = np.exp(logits - logits.max())
    out += e / e.sum() / n
  return out


def np_top_visual(scores, visual, valid, keep):
  cands = [s for s in range(len(scores)) if visual[s] and valid[s]]
  return sorted(sorted(cands, key=lambda s: (-scores[s], s))[:keep])


def kept_patches(aux, tag, layer, i):
  v = aux[f"llm/rec_{tag}/{layer}/visual"][i] & aux[f"llm/rec_{tag}/{layer}/valid"][i]
  return aux[f"llm/rec_{tag}/{layer}/patch"][i][v]


# ---- scoring rules ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_fastv_rule_matches_numpy(kind):
  aux, params, cfg = run_recorded("fastv:layer=2,keep=5", kind)
  for i in range(4):
    x, pos, val = (aux[f"llm/rec_in/1/{k}"][i] for k in ("x", "positions", "valid"))
    vis, patch = aux["llm/rec_in/1/visual"][i], aux["llm/rec_in/1/patch"][i]
    q, k = np_qk(params, 1, x.astype(np.float64), pos, cfg)
    scores = np_row_attention(q, k, len(x) - 1, val)
    expect = patch[np_top_visual(scores, vis, val, 5)]
    H.tie_aware_equal(kept_patches(aux, "out", 3, i), expect, _patch_scores(patch, scores), 5)


def _patch_scores(patch, scores):
  out = np.full(patch.max() + 1, -np.inf)
  for p, s in zip(patch, scores):
    if p >= 0:
      out[p] = s
  return out


def test_pdrop_rule_matches_numpy():
  aux, params, cfg = run_recorded("pdrop:layers=1/3,ratio=0.5")
  for i in range(4):
    for layer, keep in ((1, 8), (3, 4)):
      x, pos, val, vis, patch = (aux[f"llm/rec_in/{layer}/{k}"][i]
                                 for k in ("x", "positions", "valid", "visual", "patch"))
      q, k = np_qk(params, layer, x.astype(np.float64), pos, cfg)
      scores = np_row_attention(q, k, len(x) - 1, val)
      expect = patch[np_top_visual(scores, vis, val, keep)]
      after = kept_patches(aux, "out", layer, i)
      H.tie_aware_equal(after, expect, _patch_scores(patch, scores), keep)
      pos_after = aux[f"llm/rec_out/{layer}/positions"][i][aux[f"llm/rec_out/{layer}/valid"][i]]
      assert pos_after.tolist() == list(range(len(pos_after)))  # re-numbered contiguously


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


def test_sparsevlm_raters_and_scores_match_numpy():
  aux, params, cfg = run_recorded("sparsevlm:layers=1/2,keep=8/4,recycle=false")
  for i in range(4):
    x0, vis0, val0 = (aux[f"llm/rec_in/0/{k}"][i] for k in ("x", "visual", "valid"))
    t = len(x0)
    last_vis = max(s for s in range(t) if vis0[s])
    text = np.array([val0[s] and not vis0[s] and s > last_vis for s in range(t)])
    rat = np_raters(x0.astype(np.float64), vis0 & val0, text)
    for layer, keep in ((1, 8), (2, 4)):
      x, pos, val, vis, patch = (aux[f"llm/rec_out/{layer}/{k}"][i]  # the state layer `layer` runs on
                                 for k in ("x", "positions", "valid", "visual", "patch"))
      q, k = np_qk(params, layer, x.astype(np.float64), pos, cfg)
      # rater slots move with drops: the text slots after the visual block keep their order
      shift = len(x0) - len(x)
      rows = [s - shift for s in rat]
      scores = np.mean([np_row_attention(q, k, r, val) for r in rows], axis=0)
      expect = patch[np_top_visual(scores, vis, val, keep)]
      H.tie_aware_equal(kept_patches(aux, "out", layer + 1, i), expect, _patch_scores(patch, scores), keep)


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


@pytest.mark.parametrize("duplicates", [False, True])
def test_dpc_knn_matches_numpy_loop(duplicates):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((3, 14, 6)).astype(np.float32)
  if duplicates:  # exact density ties
    x[:, 7:] = x[:, :7]
  assign, centres = dpc_knn(jnp.asarray(x), 3)
  for b in range(3):
    a_ref, c_ref = np_dpc_knn(x[b].astype(np.float64), 3)
    assert np.asarray(centres[b]).tolist() == c_ref.tolist()
    assert np.asarray(assign[b]).tolist() == a_ref.tolist()


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
  return kept


def test_dart_pivot_loop_matches_numpy():
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


def test_attention_mass_helper_matches_numpy():
  rng = np.random.default_rng(5)
  b, t, n, kh, hd = 2, 9, 4, 2, 8
  q = rng.standard_normal((b, t, n, hd)).astype(np.float32)
  k = rng.standard_normal((b, t, kh, hd)).astype(np.float32)
  valid = np.ones((b, t), bool)
  valid[0, :2] = False
  access = type("A", (), {"qk": staticmethod(lambda layer, x, pos: (jnp.asarray(q), jnp.asarray(k)))})
  state = LLMState(jnp.zeros((b, t, 4)), jnp.zeros((b, t), jnp.int32), jnp.asarray(valid), jnp.zeros((b, t), bool))
  rows = jnp.array([[4, 8], [6, 8]], jnp.int32)
  out = np.asarray(C.attention_mass(access, 0, state, rows, jnp.array([[True, True], [True, False]])))
  for i, (r_rows, r_ok) in enumerate([([4, 8], [True, True]), ([6, 8], [True, False])]):
    expect = np.mean([np_row_attention(q[i].astype(np.float64), k[i].astype(np.float64), r, valid[i])
                      for r, ok in zip(r_rows, r_ok) if ok], axis=0)
    np.testing.assert_allclose(out[i], expect, atol=1e-6)


def test_todre_llm_relevance_and_exit_match_numpy():
  threshold = 0.7  # on these inputs: samples 1 and 3 exit at layer 1, samples 0 and 2 never
  aux, params, cfg = run_recorded(f"todre_llm:start=1,threshold={threshold}")
  assert set(aux["llm/todre_llm/exit_layer"].tolist()) == {1, cfg.num_layers}
  for i in range(4):
    gone = False
    for layer in (1, 2, 3):
      x, pos, val, vis = (aux[f"llm/rec_in/{layer}/{k}"][i] for k in ("x", "positions", "valid", "visual"))
      q, k = np_qk(params, layer, x.astype(np.float64), pos, cfg)
      last_vis = max(s for s in range(len(x)) if vis[s])
      rows = [s for s in range(len(x)) if val[s] and not vis[s] and s > last_vis] or [len(x) - 1]
      mass = np.mean([np_row_attention(q, k, r, val) for r in rows], axis=0)
      relevance = mass[vis & val].sum()
      np.testing.assert_allclose(aux[f"llm/todre_llm/relevance/{layer}"][i], relevance, rtol=1e-4, atol=1e-6)
      if not gone and relevance < threshold:
        gone = True
        assert aux["llm/todre_llm/exit_layer"][i] == layer
      after = aux[f"llm/rec_out/{layer}/valid"][i] & aux[f"llm/rec_out/{layer}/visual"][i]
      assert after.any() != gone  # visual tokens are hidden exactly from the exit layer on
    if not gone:
      assert aux["llm/todre_llm/exit_layer"][i] == cfg.num_layers


# ---- equivalence checks -----------------------------------------------------------------------
KEEP_ALL = ["fastv:layer=2,keep=16", "pdrop:layers=1/2/3,ratio=1.0", "sparsevlm:layers=0/1/2,keep=16/16/16",
            "dart:layer=2,keep=16", "todre_llm:start=1,threshold=0"]


@functools.lru_cache(maxsize=None)
def _full_run(kind="clip"):
  model, params = H.tiny_model(kind)
  prompts, pixels = H.batch_inputs(6)
  toks, valid = pad_prompts(prompts, 0)
  logits = model.apply(params, pixels, toks, valid, method=VLM.prefill)[0]
  gen = generate(model, params, pixels, toks, valid, max_new_tokens=20)
  return np.asarray(logits), np.asarray(gen.tokens)


@pytest.mark.parametrize("spec", KEEP_ALL)
def test_budget_keeping_every_token_equals_unreduced(spec):
  """(a) `exit` is absent: it removes every visual token by definition."""
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs(6)
  toks, valid = pad_prompts(prompts, 0)
  full_logits, full_tokens = _full_run()
  logits = model.apply(params, pixels, toks, valid, reduction=spec, method=VLM.prefill)[0]
  np.testing.assert_allclose(np.asarray(logits), full_logits, atol=1e-5)
  gen = generate(model, params, pixels, toks, valid, max_new_tokens=20, reduction=spec)
  np.testing.assert_array_equal(np.asarray(gen.tokens), full_tokens)


MASKABLE = ["fastv:layer=2,keep=5", "pdrop:layers=1/3,ratio=0.5", "sparsevlm:layers=0/2,keep=8/3,recycle=false",
            "dart:layer=2,keep=8", "exit:layer=2"]


@pytest.mark.parametrize("spec", MASKABLE)
def test_drop_equals_mask_variant(spec):
  """(b) removing tokens == hiding them with the attention mask from that layer on (prefill and decode)."""
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs(7)
  toks, valid = pad_prompts(prompts, 0)
  masked = spec + ",mask=true"
  d_logits, _, d_aux = model.apply(params, pixels, toks, valid, reduction=spec, method=VLM.prefill)
  m_logits, _, m_aux = model.apply(params, pixels, toks, valid, reduction=masked, method=VLM.prefill)
  assert d_logits.shape[1] < m_logits.shape[1]
  for i in range(len(prompts)):
    d = np.asarray(d_logits[i])[np.asarray(d_aux["llm/valid"][i])]
    m = np.asarray(m_logits[i])[np.asarray(m_aux["llm/valid"][i])]
    np.testing.assert_allclose(d, m, atol=1e-4)
  d_gen = generate(model, params, pixels, toks, valid, max_new_tokens=5, reduction=spec, return_logits=True)
  m_gen = generate(model, params, pixels, toks, valid, max_new_tokens=5, reduction=masked, return_logits=True)
  np.testing.assert_allclose(np.asarray(d_gen.logits), np.asarray(m_gen.logits), atol=1e-4)


DECODE = ["fastv:layer=2,keep=5", "pdrop:layers=1/3,ratio=0.5", "sparsevlm:layers=0/2,keep=8/3",
          "dart:layer=2,keep=8", pytest.param("exit:layer=2", marks=pytest.mark.slow),
          pytest.param("todre_llm:start=1,threshold=0.7", marks=pytest.mark.slow),
          "fastervlm:keep=8+pdrop:layers=1/2,ratio=0.5"]


@pytest.mark.parametrize("spec", DECODE)
def test_decode_equals_rerun_prefill(spec):
  """(c) each decode step == a prefill of prompt + tokens so far with the same reduction."""
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs(8)
  toks, valid = pad_prompts(prompts, 0)
  steps = 4
  gen = generate(model, params, pixels, toks, valid, max_new_tokens=steps, reduction=spec, return_logits=True)
  length = toks.shape[1] + steps

  @jax.jit
  def rerun(t, v, prompt):
    return model.apply(params, pixels, t, v, reduction=spec, last_only=True, llm_extras={"prompt": prompt},
                       method=VLM.prefill)[0]

  for s in range(steps):
    grown = [p + [int(x) for x in gen.tokens[i, :s]] for i, p in enumerate(prompts)]
    gt, gv = pad_prompts(grown, 0, length=length)
    prompt_mask = np.zeros_like(gv)
    for i, p in enumerate(prompts):
      prompt_mask[i, length - len(grown[i]): length - len(grown[i]) + len(p)] = True
    np.testing.assert_allclose(np.asarray(rerun(gt, gv, prompt_mask)), np.asarray(gen.logits[:, s]), atol=5e-5,
                               err_msg=f"{spec}: step {s}")


# ---- generic contracts -----------------------------------------------------------------------
BATCH = ["fastv:layer=2,keep=5", "pdrop:layers=1/3,ratio=0.5", "sparsevlm:layers=0/2,keep=8/3",
         "dart:layer=2,keep=8", "exit:layer=2", "todre_llm:start=1,threshold=0.7"]


@pytest.mark.parametrize("spec", BATCH)
def test_batch_equals_single(spec):
  H.check_batch_equals_single(spec)


@pytest.mark.slow  # the SigLIP + Qwen2 twin; the CLIP instance runs by default
def test_siglip_qwen2_batch_equals_single():
  H.check_batch_equals_single("sparsevlm:layers=0/2,keep=8/3", kind="siglip")


@pytest.mark.parametrize("spec", ["fastv:layer=2,keep=5", "sparsevlm:layers=0/2,keep=8/3"])
def test_traces_once(spec):
  H.check_traces_once(spec)


@pytest.mark.parametrize("spec", ["fastv:layer=1,keep=1", "pdrop:layers=1/2/3,ratio=0.1", "dart:layer=1,keep=1",
                                  "sparsevlm:layers=0/1/2,keep=1/1/1", "exit:layer=1"])
def test_degenerate_inputs(spec):
  H.check_no_nan_on_degenerate(spec)


@pytest.mark.parametrize("spec, message", [
    ("fastv:layer=0,keep=3", r"layer=0 must be in 1\.\.3"),
    ("fastv:layer=4,keep=3", r"layer=4 must be in 1\.\.3"),
    ("pdrop:layers=2/1", "strictly increasing"),
    ("sparsevlm:layers=0/1,keep=3", r"needs one budget per layer"),
    ("sparsevlm:layers=0/1/3,keep=3/2/1", r"layer=3 must be in 0\.\.2"),
    ("fastv:layer=2,keep=17", "budget keep=17 is larger than the 16 tokens"),
])
def test_errors(spec, message):
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs()
  toks, valid = pad_prompts(prompts, 0)
  with pytest.raises(ReductionError, match=message):
    model.apply(params, pixels, toks, valid, reduction=spec, method=VLM.prefill)


# ---- FLOPs and KV sizes ----------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["none", "fastv:layer=2,keep=5", "pdrop:layers=1/3,ratio=0.5",
                                  "sparsevlm:layers=0/2,keep=8/3", "dart:layer=2,keep=8", "exit:layer=2",
                                  "fastervlm:keep=8+fastv:layer=1,ratio=0.5", "fastv:layer=2,keep=5,mask=true"])
def test_predicted_kv_slots_equal_cache_shapes(spec):
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs()
  toks, valid = pad_prompts(prompts, 0)
  _, cache, _ = model.apply(params, pixels, toks, valid, reduction=spec, cache_extra=0, method=VLM.prefill)
  cost = flops.prefill_cost(model.config, spec, text_tokens=toks.shape[1] - 1, batch=len(prompts),
                            bytes_per_element=4)
  assert [lc.k.shape[1] for lc in cache.layers] == list(cost.kv_slots)
  assert [2 * lc.k.size * lc.k.dtype.itemsize for lc in cache.layers] == list(cost.kv_bytes)


def test_fastv_flops_ratio_on_llava15_geometry():
  """FastV K=2, R=50 % on LLaVA-1.5-7B (576 visual + 64 text tokens): 57.2 % of the LLM's prefill FLOPs."""
  cfg = flops.llava15_7b()
  full = flops.prefill_cost(cfg, None, text_tokens=64)
  fastv = flops.prefill_cost(cfg, "fastv:layer=2,ratio=0.5", text_tokens=64)
  ratio = fastv.llm / full.llm
  assert 0.55 <= ratio <= 0.60, ratio
  assert abs(ratio - 0.572) < 0.005
