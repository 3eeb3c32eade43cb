"""vtc_cls: the head-mean [CLS] rows summed over blocks start .. last-run - 1 rank the patches; top k."""

from __future__ import annotations

from rules import rule
from rules._baselines import *  # noqa: F401,F403

KEEP_ALL = "vtc_cls:keep=16"
ERRORS = [("vtc_cls:keep=3,start=2", r"start=2 must leave at least one block before the last")]


@rule()
def sums_layers_before_the_last():
  rng = np.random.default_rng(1)
  b, n = 2, 16
  attn = {l: H.softmax_rows(rng, (b, 2, n + 1)) for l in range(3)}
  ctx = H.method_context(VISION, {f"vision/cls_attn/{l}": jnp.asarray(a) for l, a in attn.items()})
  out, aux = _run("vtc_cls:keep=6,start=0", H.random_tokens(rng, b, n, 4), ctx)
  for i in range(b):
    scores = np.zeros(n, np.float32)
    for l in (0, 1):  # blocks start .. last-run-block - 1 (the tower runs 3 blocks for layer -2)
      for p in range(n):
        scores[p] += np.float32(np.mean(attn[l][i, :, 1 + p]))
    H.tie_aware_equal(np.asarray(aux["index"][i]), np_topk_sorted(scores, 6), scores, 6)
  with pytest.raises(ReductionError, match="start=2 must leave at least one block"):
    parse("vtc_cls:keep=3,start=2").methods[0].vision_extras(VISION)
