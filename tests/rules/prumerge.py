"""prumerge: [CLS]-attention outliers above Q3 + 1.5 IQR (per sample, capped), each merged with its key
neighbours weighted by raw attention, plus one summary token of the pruned."""

from __future__ import annotations

from rules import rule
from rules._prumerge import *  # noqa: F401,F403

KEEP_ALL = None
NO_KEEP_ALL = "every kept token is merged with its key neighbours, and a summary token is added"
EXAMPLES = ("prumerge:keep=4",)
ERRORS = [("prumerge:neighbours=0", "neighbours=0 must be >= 1")]


@rule(("prumerge:keep=8,neighbours=4", 0, 8, 4, False),
      ("prumerge:keep=2,neighbours=4", 3, 2, 4, False),  # cap below some outlier counts
      ("prumerge:keep=8", 1, 8, 32, False))  # 32 neighbours clamp to the 15 others
def matches_numpy(spec, seed, cap, neighbours, plus):
  check_prumerge(spec, seed, cap, neighbours, plus)


@rule()
def ties_resolve_to_the_lowest_index():
  q, k = _qk(0)
  q[2, 0] = 2.0 * k[2, 1 + 4]  # patches 4 and 9 (equal keys) and 1 stand out
  x = np.random.default_rng(2).standard_normal((3, N, DIM)).astype(np.float32)
  out, aux = _run("prumerge:keep=8,neighbours=1", q, k, x)
  attn = np.asarray(aux["scores"][2])
  assert attn[4] == attn[9]
  assert np.asarray(out.positions[2])[:3].tolist() == [1, 4, 9]  # equal attention: the lower index first
  _, feats, _ = np_prumerge(q[2], k[2], x[2], 8, 1, False)
  np.testing.assert_allclose(np.asarray(out.x[2])[:len(feats)], feats, atol=1e-5)  # 4 and 9: each other's neighbour


@rule()
def per_sample_iqr():
  q, k = _qk(8)
  x = np.random.default_rng(3).standard_normal((3, N, DIM)).astype(np.float32)
  for spec in ("prumerge:keep=6,neighbours=4", "prumerge_plus:keep=6"):
    batch, aux = _run(spec, q, k, x)
    assert len(set(np.asarray(aux["count"]).tolist())) > 1
    for i in range(3):
      single, _ = _run(spec, q[i:i + 1], k[i:i + 1], x[i:i + 1])
      np.testing.assert_array_equal(np.asarray(batch.positions[i]), np.asarray(single.positions[0]))
      np.testing.assert_allclose(np.asarray(batch.x[i]), np.asarray(single.x[0]), atol=1e-6)


@rule()
def siglip_uses_received_attention():
  q, k = _qk(4)
  q, k = q[:, 1:], k[:, 1:]  # no class token
  x = np.random.default_rng(4).standard_normal((3, N, DIM)).astype(np.float32)
  _, aux = _run("prumerge:keep=4", q, k, x, vision=SIGLIP)  # features from the last block: its own q/k
  for i in range(3):
    qc, kc = q[i].reshape(N, -1), k[i].reshape(N, -1)
    received = np.zeros(N)
    for r in range(N):
      logits = np.array([float(np.dot(qc[r], kc[j])) for j in range(N)]) * qc.shape[1] ** -0.5
      e = np.exp(logits - logits.max())
      received += e / e.sum() / N
    np.testing.assert_allclose(np.asarray(aux["scores"][i]), received, rtol=1e-5)


@rule()
def budgets_and_errors():
  assert parse("prumerge").methods[0].kept(576) == 73  # cap 576 // 8 outliers + the extra token
  assert parse("prumerge_plus").methods[0].kept(576) == 72 + 288 + 1  # stride (576 // 72) // 3 = 2
  assert parse("prumerge_plus:keep=32").methods[0].kept(576) == 32 + 96 + 1  # stride 6
  assert parse("prumerge_plus:keep=16").methods[0].kept(16) == 17
  assert "keep=20 is larger than the 16 tokens" in H.plan_budget_errors("prumerge:keep=20", 16)
  assert "keep=17 is larger than the 16 tokens" in H.plan_budget_errors("prumerge_plus:keep=17", 16)
  assert parse("prumerge").methods[0].vision_extras(VISION) == {("qk", 3)}  # the block after the features
  assert parse("prumerge").methods[0].vision_extras(SIGLIP) == {("qk", -1)}  # none after: the feature block
