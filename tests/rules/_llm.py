"""What the in-LLM rules share: recorders of the boundary states and NumPy renderings of the decoder's q/k."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

import reduce_harness as H
from vtr_jax.models.vlm import VLM, pad_prompts
from vtr_jax.reduce import Plan, parse
from vtr_jax.reduce.in_llm import common as C



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



def patch_scores(patch, scores):
  """Scores indexed by patch id (for tie-aware comparisons of kept patches)."""
  out = np.full(patch.max() + 1, -np.inf)
  for p, s in zip(patch, scores):
    if p >= 0:
      out[p] = s
  return out
