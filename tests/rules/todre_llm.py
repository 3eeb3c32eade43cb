"""todre_llm: from the first layer >= start where the prompt's text after the image pays the visual tokens less
attention mass than the threshold, the sample's visual tokens are hidden."""

from __future__ import annotations

import numpy as np

from rules import rule
from rules._llm import np_qk, np_row_attention, run_recorded

KEEP_ALL = "todre_llm:start=1,threshold=0"
ERRORS = [("todre_llm:start=0", r"layer=0 must be in 1\.\.3"), ("todre_llm:threshold=1.5", r"threshold=1.5 must be in")]
EXAMPLES = ("todre_llm:start=1,threshold=0.7",)


@rule()
def relevance_and_exit():
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
