"""vispruner: top int(T*important_ratio) patches by head-mean [CLS] attention, then the residual pruned by
dropping, up to 8 at a time, the even-place tokens most cosine-similar to the odd-place ones."""

from __future__ import annotations

from rules import rule
from rules._baselines import *  # noqa: F401,F403

KEEP_ALL = "vispruner:keep=16"
ERRORS = [("vispruner:keep=3,ratio=0.5", "give keep= or ratio=, not both"),
          ("vispruner:keep=4,important_ratio=1.5", "important_ratio=1.5 must be in")]


def np_vispruner(scores, x, t, ratio):
  n = len(scores)
  order = sorted(range(n), key=lambda i: (-scores[i], i))
  t_imp = int(t * ratio)
  important, residual = order[:t_imp], order[t_imp:]
  unit = [v / max(np.linalg.norm(v), 1e-12) for v in x.astype(np.float64)]
  while len(residual) > t - t_imp:
    r = min(8, len(residual) - (t - t_imp))
    a, b = residual[0::2], residual[1::2]
    sim = [max((float(unit[i] @ unit[j]) for j in b), default=0.0) for i in a]
    kept_a = sorted(range(len(a)), key=lambda k: (-sim[k], k))[r:]
    residual = [a[k] for k in kept_a] + b
  return sorted(important + residual)


@rule(*[(1, 0.5), (5, 0.5), (9, 0.25), (16, 0.5), (6, 0.0)])
def matches_numpy(keep, ratio):
  rng = np.random.default_rng(keep)
  b, n = 3, 16
  cls_attn = H.softmax_rows(rng, (b, 2, n + 1))
  ctx = H.method_context(VISION, {"vision/cls_attn/2": jnp.asarray(cls_attn)})
  tokens = H.random_tokens(rng, b, n, 4)
  out, aux = _run(f"vispruner:keep={keep},important_ratio={ratio}", tokens, ctx)
  for i in range(b):
    scores = np.float32([np.mean([cls_attn[i, h, 1 + p] for h in range(2)]) for p in range(n)])
    expected = np_vispruner(scores, np.asarray(tokens.x[i]), keep, ratio)
    assert np.asarray(aux["index"][i]).tolist() == expected
    np.testing.assert_array_equal(np.asarray(out.x[i]), np.asarray(tokens.x[i])[expected])
