"""What the in-LLM methods share: attention rows from Q/K (vs NumPy), the class-token rule, FLOPs on the LLaVA-1.5
geometry. Each method's own rule and contracts are in tests/rules/ and tests/test_contracts.py."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import reduce_harness as H
from rules._llm import np_row_attention
from vtr_jax import flops
from vtr_jax.models.vlm import VLM, pad_prompts
from vtr_jax.reduce import registry
from vtr_jax.reduce.in_llm import common as C
from vtr_jax.seams import LLMState


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



LLM = [n for n in registry() if registry()[n].stages[0] == "llm"]


@pytest.mark.parametrize("name", LLM)
def test_a_kept_class_token_is_never_dropped_nor_counted(name):
  """On a tower that hands its class token on, in-LLM budgets count the patches only and the class token
  reaches the last layer -- as before the LLM, where methods never see it -- except for the methods whose rule
  removes every visual token (exit, todre_llm)."""
  model, params = H.tiny_model("clip", keep_cls=True)
  cfg = model.config
  assert cfg.image_class_tokens == 1 and cfg.reducible_tokens == 16
  cls = registry()[name]
  m = cls.for_budget(0.25, cfg) or cls.unbudgeted(cfg)
  prompts, pixels = H.batch_inputs()
  toks, valid = pad_prompts(prompts, 0)
  _, _, aux = model.apply(params, pixels, toks, valid, reduction=m, method=VLM.prefill)
  patch = np.asarray(aux["llm/tok/patch"])
  live = np.asarray(aux["llm/visual"]) & np.asarray(aux["llm/valid"])
  counts = m.layer_counts(16, cfg.text.num_layers, 1)
  for i in range(len(prompts)):
    if cls.removes_class_token:
      assert counts[-1] == 0 or name == "todre_llm"
      continue
    assert (patch[i][live[i]] == -1).sum() == 1, f"{m.spec()}: sample {i} lost its class token"
    assert live[i].sum() == counts[-1] == m.kept(16) + 1, f"{m.spec()}: {live[i].sum()} visual tokens at the end"


def test_fastv_flops_ratio_on_llava15_geometry():
  """FastV K=2, R=50 % on LLaVA-1.5-7B (576 visual + 64 text tokens): 57.2 % of the LLM's prefill FLOPs."""
  cfg = flops.llava15_7b()
  full = flops.prefill_cost(cfg, None, text_tokens=64)
  fastv = flops.prefill_cost(cfg, "fastv:layer=2,ratio=0.5", text_tokens=64)
  ratio = fastv.llm / full.llm
  assert 0.55 <= ratio <= 0.60, ratio
  assert abs(ratio - 0.572) < 0.005
