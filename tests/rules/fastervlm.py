"""fastervlm: the head-mean [CLS] attention of the feature block ranks the patches; top k in original order
(SigLIP: the attention each patch receives)."""

from __future__ import annotations

from rules import rule
from rules._baselines import *  # noqa: F401,F403

KEEP_ALL = "fastervlm:keep=16"
ERRORS = [("fastervlm:keep=3,ratio=0.5", "give keep= or ratio=, not both"), ("fastervlm", "fastervlm: needs a budget")]


@rule(*[1, 5, 16])
def matches_numpy(keep):
  rng = np.random.default_rng(keep)
  b, n = 3, 16
  cls_attn = H.softmax_rows(rng, (b, 2, n + 1))  # [B, heads, 1 + P]
  cls_attn[0, :, 3] = cls_attn[0, :, 7] = cls_attn[0, :, 9] = 0.05  # exact ties at the boundary
  ctx = H.method_context(VISION, {"vision/cls_attn/2": jnp.asarray(cls_attn)})
  tokens = H.random_tokens(rng, b, n, 4)
  out, aux = _run(f"fastervlm:keep={keep}", tokens, ctx)
  for i in range(b):
    scores = [float(np.mean([cls_attn[i, h, 1 + p] for h in range(2)])) for p in range(n)]
    H.tie_aware_equal(np.asarray(aux["index"][i]), np_topk_sorted(np.float32(scores), keep), np.float32(scores), keep)
    np.testing.assert_array_equal(np.asarray(out.x[i]), np.asarray(tokens.x[i])[np.asarray(aux["index"][i])])
    assert list(np.asarray(out.positions[i])) == sorted(np.asarray(out.positions[i]))


@rule()
def siglip_uses_received_attention():
  rng = np.random.default_rng(0)
  received = rng.random((2, 16)).astype(np.float32)
  ctx = H.method_context(SIGLIP, {"vision/received_attn/3": jnp.asarray(received)})
  out, aux = _run("fastervlm:keep=4", H.random_tokens(rng, 2, 16, 4), ctx)
  for i in range(2):
    assert np.asarray(aux["index"][i]).tolist() == np_topk_sorted(received[i], 4)
