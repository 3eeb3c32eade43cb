"""todre (stage 1): greedy k-center diversity whose first centre is the patch with the highest [CLS] attention."""

from __future__ import annotations

from rules import rule
from rules._diversity import *  # noqa: F401,F403

KEEP_ALL = "todre:keep=16"
ERRORS = [("todre", "todre: needs a budget")]


@rule(*[1, 7, 16])
def matches_numpy(keep):
  rng = np.random.default_rng(keep)
  b, n = 3, 16
  cls_attn = H.softmax_rows(rng, (b, 2, n + 1))  # [B, heads, 1 + P], block 2 is the one the features come from
  cls_attn[1, :, 1 + 3] = cls_attn[1, :, 1 + 10] = 0.9  # an exact tie for the first centre: lowest index wins
  ctx = H.method_context(CLIP, {"vision/cls_attn/2": jnp.asarray(cls_attn)})
  tokens = tokens_with_ties(rng, b, n)
  out, aux = run(f"todre:keep={keep}", tokens, ctx)
  for i in range(b):
    scores = cls_attn[i, :, 1:].mean(axis=0)
    first = max(range(n), key=lambda p: (scores[p], -p))
    selection = np.asarray(aux["selection"][i])
    check_k_center(np.asarray(tokens.x[i]), selection, first)
    np.testing.assert_array_equal(np.asarray(out.x[i]), np.asarray(tokens.x[i])[sorted(selection)])
  assert int(aux["selection"][1][0]) == 3


@rule()
def siglip_starts_from_received_attention():
  rng = np.random.default_rng(0)
  received = rng.random((2, 16)).astype(np.float32)
  ctx = H.method_context(SIGLIP, {"vision/received_attn/3": jnp.asarray(received)})
  tokens = H.random_tokens(rng, 2, 16, 4)
  _, aux = run("todre:keep=5", tokens, ctx)
  for i in range(2):
    check_k_center(np.asarray(tokens.x[i]), aux["selection"][i], int(np.argmax(received[i])))
