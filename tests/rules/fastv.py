"""fastv: the last prompt token's head-mean attention row at layer K-1 ranks the visual tokens; top k go on."""

from __future__ import annotations

import numpy as np

import reduce_harness as H
from rules import rule
from rules._llm import kept_patches, np_qk, np_row_attention, np_top_visual, patch_scores, run_recorded

KEEP_ALL = "fastv:layer=2,keep=16"
MASKED = "fastv:layer=2,keep=5"
ERRORS = [("fastv:layer=0,keep=3", r"layer=0 must be in 1\.\.3"), ("fastv:layer=4,keep=3", r"layer=4 must be in 1\.\.3"),
          ("fastv:layer=2", "fastv: needs a budget"), ("fastv:keep=3,ratio=0.5", "give keep= or ratio=, not both")]


@rule("clip", "siglip")
def last_token_row_at_layer_k_minus_1(kind):
  aux, params, cfg = run_recorded("fastv:layer=2,keep=5", kind)
  for i in range(4):
    x, pos, val = (aux[f"llm/rec_in/1/{k}"][i] for k in ("x", "positions", "valid"))
    vis, patch = aux["llm/rec_in/1/visual"][i], aux["llm/rec_in/1/patch"][i]
    q, k = np_qk(params, 1, x.astype(np.float64), pos, cfg)
    scores = np_row_attention(q, k, len(x) - 1, val)
    expect = patch[np_top_visual(scores, vis, val, 5)]
    H.tie_aware_equal(kept_patches(aux, "out", 3, i), expect, patch_scores(patch, scores), 5)
    # original position ids (gaps) on the tokens that go on
    after = aux["llm/rec_out/2/valid"][i]
    kept_pos = aux["llm/rec_out/2/positions"][i][after]
    assert set(kept_pos.tolist()) <= set(pos[val].tolist()) and list(kept_pos) == sorted(kept_pos)
