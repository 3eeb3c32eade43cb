"""pdrop: at each stage boundary the last instruction token's attention (layer l's own q/k) ranks the visual
tokens; int(N ratio^i) go on, positions renumbered; in training mode the rows before the answers are averaged."""

from __future__ import annotations

import functools

import jax
import numpy as np

import reduce_harness as H
from rules import rule
from rules._llm import (RecordIn, RecordOut, kept_patches, np_qk, np_row_attention, np_top_visual, patch_scores,
                        run_recorded)
from vtr_jax.models.vlm import VLM, pad_prompts
from vtr_jax.reduce import Plan, parse

KEEP_ALL = "pdrop:layers=1/2/3,ratio=1.0"
MASKED = "pdrop:layers=1/3,ratio=0.5"
ERRORS = [("pdrop:layers=2/1", "strictly increasing"), ("pdrop:layers=1/4", r"layer=4 must be in 1\.\.3"),
          ("pdrop:layers=1/2,ratio=0", r"ratio=0.0 must be in \(0, 1\]"), ("pdrop:layers=0/2", r"layer=0 must be in 1\.\.3")]


@rule()
def last_instruction_row_per_stage():
  aux, params, cfg = run_recorded("pdrop:layers=1/3,ratio=0.5")
  for i in range(4):
    for layer, keep in ((1, 8), (3, 4)):
      x, pos, val, vis, patch = (aux[f"llm/rec_in/{layer}/{k}"][i]
                                 for k in ("x", "positions", "valid", "visual", "patch"))
      q, k = np_qk(params, layer, x.astype(np.float64), pos, cfg)
      scores = np_row_attention(q, k, len(x) - 1, val)
      expect = patch[np_top_visual(scores, vis, val, keep)]
      after = kept_patches(aux, "out", layer, i)
      H.tie_aware_equal(after, expect, patch_scores(patch, scores), keep)
      pos_after = aux[f"llm/rec_out/{layer}/positions"][i][aux[f"llm/rec_out/{layer}/valid"][i]]
      assert pos_after.tolist() == list(range(len(pos_after)))  # re-numbered contiguously


@functools.partial(jax.jit, static_argnames=("model", "plan"))
def _training_prefill(model, params, pixels, toks, valid, query, prompt, plan):
  return model.apply(params, pixels, toks, valid, reduction=plan, llm_extras={"query": query, "prompt": prompt},
                     method=VLM.prefill)[2]


@rule()
def training_rows_before_the_answers():
  """Training mode (tokens["query"]): the score is the attention of the query rows (the tokens just before each
  answer span), averaged over those rows, each causal over its own prefix."""
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs(9)
  rng = np.random.default_rng(9)
  answers = [list(rng.integers(2, 50, size=n)) for n in (2, 3, 1, 2)]
  toks, valid = pad_prompts([p + a for p, a in zip(prompts, answers)], 0)
  t = toks.shape[1]
  query = np.zeros((4, t), bool)
  prompt = np.zeros((4, t), bool)
  for i, (p, a) in enumerate(zip(prompts, answers)):
    start = t - len(p) - len(a)
    query[i, t - len(a) - 1] = True  # the last prompt token predicts the first answer token
    query[i, t - 2] |= len(a) > 1  # and a second query row inside the answer
    prompt[i, start:t - len(a)] = True
  plan = Plan((RecordIn(), *parse("pdrop:layers=2,ratio=0.5").methods, RecordOut()))
  aux = {k: np.asarray(v) for k, v in _training_prefill(model, params, pixels, toks, valid, query, prompt,
                                                        plan).items()}
  cfg = model.config.text
  for i in range(4):
    x, pos, val, vis, patch = (aux[f"llm/rec_in/2/{k}"][i] for k in ("x", "positions", "valid", "visual", "patch"))
    q, k = np_qk(params, 2, x.astype(np.float64), pos, cfg)
    # the query rows sit after the image: prompt slot s is slot s - 1 + 16 once the 16 visual tokens replace
    # the placeholder (the same offset as len(x) - t)
    rows = [s + len(x) - t for s in range(t) if query[i, s]]
    scores = np.mean([np_row_attention(q, k, r, val) for r in rows], axis=0)
    expect = patch[np_top_visual(scores, vis, val, 8)]
    H.tie_aware_equal(kept_patches(aux, "out", 2, i), expect, patch_scores(patch, scores), 8)
