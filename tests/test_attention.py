"""vtr_jax.models.attention: every implementation equals a float64 NumPy loop and the reference.

Cases: left padding and pruned (invalid) slots under a causal prefill, a
decode step at a traced cache offset, a per-key bias (ToMe's log-size),
grouped-query heads. `pallas` (splash attention) runs in Pallas interpret
mode; `cudnn` needs a GPU (benchmarks/device_check.py checks it there).
Outputs of padding rows are only checked to be finite: implementations may
differ on them (see the module docstring).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtr_jax.models import attention as attn
from vtr_jax.models.decoder import DecoderConfig
from vtr_jax.models.vit import VisionConfig
from vtr_jax.models.vlm import VLM, VLMConfig, generate, pad_prompts

IMAGE = 60


def np_attention(q, k, v, key_valid=None, bias=None, offset=None, causal=False):
  """float64[B, T, N, H]: per sample, head and query a softmax over the visible keys (loops)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  out = np.zeros((b, t, n, h))
  for bi in range(b):
    base = 0 if offset is None else int(np.broadcast_to(offset, (b,))[bi])
    for ti in range(t):
      me = base + ti
      keys = [si for si in range(s) if (key_valid is None or key_valid[bi, si]) and (not causal or si <= me)]
      if causal and me not in keys:
        keys.append(me)
      if not keys:
        continue
      for ni in range(n):
        kv = ni // (n // kh)
        logits = k[bi, keys, kv] @ q[bi, ti, ni] / np.sqrt(h)
        if bias is not None:
          logits = logits + np.asarray(bias, np.float64)[bi, keys]
        p = np.exp(logits - logits.max())
        out[bi, ti, ni] = (p / p.sum()) @ v[bi, keys, kv]
  return out


def _qkv(seed, b=2, t=37, s=None, n=4, kh=2, h=16, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  s = t if s is None else s
  q = rng.normal(size=(b, t, n, h))
  k = rng.normal(size=(b, s, kh, h))
  v = rng.normal(size=(b, s, kh, h))
  return rng, *(jnp.asarray(a, dtype) for a in (q, k, v))


def _padded_and_pruned(b, t):
  valid = np.ones((b, t), bool)
  valid[0, :7] = False  # left padding
  valid[1, 12:20] = False  # pruned slots in the middle
  return valid


# `chunked` with small blocks: several query and key blocks, ragged last ones.
IMPLS = {
    "xla": functools.partial(attn.attend, implementation="xla"),
    "chunked": lambda q, k, v, m: attn.chunked(q, k, v, m, block_q=16, block_kv=8),
    "chunked_default_blocks": functools.partial(attn.attend, implementation="chunked"),
    "pallas": functools.partial(attn.attend, implementation="pallas", interpret=True),
}
NO_BIAS = ("pallas",)


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("case", ["causal_prefill", "bias", "key_valid_bias", "mha"])
def test_prefill_matches_numpy_and_reference(impl, case):
  if impl in NO_BIAS and "bias" in case:
    pytest.skip("splash attention takes no per-key bias (auto picks xla there)")
  b, t = 2, 37
  rng, q, k, v = _qkv(0, kh=4 if case == "mha" else 2)
  valid = _padded_and_pruned(b, t)
  bias = rng.normal(size=(b, t)).astype(np.float32)
  kw = {"causal_prefill": dict(key_valid=valid, causal=True), "mha": dict(key_valid=valid, causal=True),
        "bias": dict(bias=bias), "key_valid_bias": dict(key_valid=valid, bias=bias)}[case]
  mask = attn.Mask(key_valid=None if kw.get("key_valid") is None else jnp.asarray(kw["key_valid"]),
                   key_bias=None if kw.get("bias") is None else jnp.asarray(kw["bias"]), causal=kw.get("causal", False))
  got = IMPLS[impl](q, k, v, mask)
  ref = attn.attend(q, k, v, mask, implementation="reference")
  want = np_attention(q, k, v, **kw)
  rows = valid if mask.causal else np.ones((b, t), bool)  # padding rows: unused outputs, finite
  assert got.shape == q.shape and got.dtype == q.dtype and np.all(np.isfinite(got))
  np.testing.assert_allclose(np.asarray(ref)[rows], want[rows], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(ref)[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_decode_at_a_traced_offset(impl):
  b, s = 2, 40
  _, q, k, v = _qkv(1, t=2, s=s)  # two new tokens written at slots end, end + 1
  filled = np.zeros((b, s), bool)
  filled[:, :27] = True
  filled[0, :5] = False
  filled[1, 10:14] = False  # a pruned prefill's empty slots
  end = 25
  filled[:, end:end + 2] = True

  @jax.jit
  def run(q, k, v, key_valid, end):
    mask = attn.Mask.decode(key_valid, end)
    return IMPLS[impl](q, k, v, mask), attn.reference(q, k, v, mask)

  got, ref = run(q, k, v, jnp.asarray(filled), jnp.asarray(end, jnp.int32))
  want = np_attention(q, k, v, key_valid=filled, offset=end, causal=True)
  np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_gradients_equal_the_reference(impl):
  b, t = 2, 37
  rng, q, k, v = _qkv(2)
  valid = jnp.asarray(_padded_and_pruned(b, t))
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * valid[:, :, None, None]  # valid rows only
  bias = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)

  def loss(fn, with_bias, q, k, v, bias):
    mask = attn.Mask(key_valid=valid, key_bias=bias if with_bias else None, causal=True)
    return jnp.sum(w * fn(q, k, v, mask))

  for with_bias in ([False] if impl in NO_BIAS else [False, True]):
    got = jax.grad(functools.partial(loss, IMPLS[impl], with_bias), (0, 1, 2, 3))(q, k, v, bias)
    want = jax.grad(functools.partial(loss, attn.reference, with_bias), (0, 1, 2, 3))(q, k, v, bias)
    for g, r in zip(got, want):
      assert np.all(np.isfinite(g))
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=2e-5)


def test_bf16_chunked_accumulates_in_f32():
  _, q, k, v = _qkv(3, t=300, h=64, dtype=jnp.bfloat16)
  mask = attn.Mask.causal_prefill(jnp.ones((2, 300), bool))
  got = attn.chunked(q, k, v, mask, block_q=64, block_kv=64)
  want = np_attention(np.asarray(q, np.float32), np.asarray(k, np.float32), np.asarray(v, np.float32), causal=True)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)  # bf16 output rounding


def _largest_intermediate(fn, *args) -> int:
  """Elements of the largest array any equation of fn's jaxpr (sub-jaxprs included) produces."""
  def walk(jaxpr):
    best = 0
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        best = max(best, int(np.prod(getattr(var.aval, "shape", ()), dtype=np.int64)))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        best = max(best, walk(sub))
    return best
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_chunked_never_materialises_query_by_key():
  b, t, n = 1, 1024, 4
  _, q, k, v = _qkv(4, b=b, t=t, n=n, kh=2, h=8)
  mask = attn.Mask(key_valid=jnp.ones((b, t), bool), key_bias=jnp.zeros((b, t)), causal=True)
  tile = b * n * 128 * 128
  fwd_bwd = jax.grad(lambda q, k, v: jnp.sum(attn.chunked(q, k, v, mask, block_q=128, block_kv=128)), (0, 1, 2))
  assert _largest_intermediate(fwd_bwd, q, k, v) <= tile
  ref = jax.grad(lambda q, k, v: jnp.sum(attn.reference(q, k, v, mask)), (0, 1, 2))
  assert _largest_intermediate(ref, q, k, v) >= b * n * t * t


def test_auto_picks_per_backend_and_length(monkeypatch):
  small, long = jnp.zeros((1, 16, 4, 16)), jnp.zeros((1, 2048, 4, 16))
  bias = attn.Mask(key_bias=jnp.zeros((1, 16)))
  decode = attn.Mask.decode(jnp.ones((1, 16), bool), jnp.asarray(3))
  assert jax.default_backend() == "cpu"
  assert attn.choose("auto", small, small, attn.Mask()) == "reference"
  assert attn.choose("auto", long, long, attn.Mask()) == "chunked"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attn.choose("auto", small, small, attn.Mask()) == "pallas"
  assert attn.choose("auto", small, small, bias) == "xla"
  assert attn.choose("auto", small[:, :1], small, decode) == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attn.choose("auto", small.astype(jnp.bfloat16), small, attn.Mask()) == "cudnn"
  assert attn.choose("auto", small, small, attn.Mask()) == "xla"  # float32: cuDNN's flash kernel cannot
  assert attn.choose("auto", long, long, attn.Mask()) == "chunked"


def test_errors_name_the_values():
  _, q, k, v = _qkv(5, t=8)
  with pytest.raises(attn.AttentionError, match="unknown attention implementation 'flash'"):
    attn.attend(q, k, v, implementation="flash")
  with pytest.raises(attn.AttentionError, match="no per-key bias"):
    attn.attend(q, k, v, attn.Mask(key_bias=jnp.zeros((2, 8))), implementation="pallas", interpret=True)
  with pytest.raises(attn.AttentionError, match="compiles for TPU only"):
    attn.attend(q, k, v, implementation="pallas")
  with pytest.raises(attn.AttentionError, match="takes bfloat16/float16, got float32"):
    attn.attend(q, k, v, implementation="cudnn")
  with pytest.raises(attn.AttentionError, match=r"mask.key_valid must have shape \(2, 8\), got \(2, 7\)"):
    attn.attend(q, k, v, attn.Mask(key_valid=jnp.ones((2, 7), bool)))
  with pytest.raises(attn.AttentionError, match="T=3, S=8"):
    attn.attend(q[:, :3], k, v, attn.Mask(causal=True))
  with pytest.raises(ValueError, match="DecoderConfig.attention 'flash'"):
    DecoderConfig(attention="flash")
  with pytest.raises(ValueError, match="VisionConfig.attention 'flash'"):
    VisionConfig(attention="flash")


# ---- wired into the models -------------------------------------------------------------------------
def _vlm(attention: str) -> VLM:
  vision = VisionConfig(kind="clip", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=3,
                        num_heads=4, feature_layers=(-2,), attention=attention)
  text = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                       num_kv_heads=2, attention=attention)
  return VLM(VLMConfig(vision=vision, text=text, image_token_id=IMAGE, pad_token_id=0, eos_token_ids=()))


@pytest.fixture(scope="module")
def vlm_run():
  """run(attention, reduction) -> (prefill logits, valid slots, greedy generation with its logits), cached."""
  import flax.linen as nn
  toks, valid = pad_prompts([[1, IMAGE, 5], [1, 7, 8, 9, IMAGE, 5, 4, 3]], 0)
  params = nn.unbox(jax.jit(_vlm("reference").init)(jax.random.key(0), jnp.zeros((len(toks), 32, 32, 3)), toks,
                                                     valid))
  pixels = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  cache = {}

  def run(attention, reduction):
    if (attention, reduction) not in cache:
      model = _vlm(attention)
      logits, _, aux = jax.jit(functools.partial(model.apply, reduction=reduction, method=VLM.prefill))(
          params, pixels, toks, valid)
      gen = generate(model, params, pixels, toks, valid, max_new_tokens=3, reduction=reduction, return_logits=True)
      cache[attention, reduction] = (np.asarray(logits), np.asarray(aux["llm/valid"]), gen)
    return cache[attention, reduction]
  return run


@pytest.mark.parametrize("impl,reduction", [("chunked", None), ("chunked", "fastv:layer=1,keep=5"),
                                            ("chunked", "tome:keep=8"),
                                            pytest.param("xla", "tome:keep=8", marks=pytest.mark.slow)])
def test_models_equal_the_reference(vlm_run, impl, reduction):
  """Prefill (padding; FastV's pruned caches; ToMe's proportional-attention bias in the tower) and
  greedy decoding give the reference's logits and tokens."""
  ref, rows, ref_gen = vlm_run("reference", reduction)
  got, _, got_gen = vlm_run(impl, reduction)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got[rows], ref[rows], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_gen.logits, ref_gen.logits, rtol=1e-5, atol=1e-5)  # decode steps
  np.testing.assert_array_equal(got_gen.tokens, ref_gen.tokens)


def test_pallas_lowers_to_mosaic_tpu(monkeypatch):
  """Splash attention's forward and backward lower for TPU (jax.export, no TPU needed) at LLaVA's prefill
  shape with grouped heads (640 tokens: five 128-blocks, the block that pads least). Mosaic's own compile
  needs a TPU."""
  from jax import export
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  sd = jax.ShapeDtypeStruct
  args = (sd((2, 640, 32, 128), jnp.bfloat16), sd((2, 640, 8, 128), jnp.bfloat16),
          sd((2, 640, 8, 128), jnp.bfloat16), sd((2, 640), bool))

  def out(q, k, v, valid):
    return attn.attend(q, k, v, attn.Mask.causal_prefill(valid), implementation="pallas")

  grad = jax.grad(lambda *a: jnp.sum(out(*a).astype(jnp.float32)), (0, 1, 2))
  assert export.export(jax.jit(out), platforms=["tpu"])(*args).mlir_module().count("tpu_custom_call") == 1
  assert export.export(jax.jit(grad), platforms=["tpu"])(*args).mlir_module().count("tpu_custom_call") == 3
