"""Model mechanics: input validation, logical axes, KV-cache decoding, the layer-boundary hook."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vtr_jax.models.decoder import DecoderConfig
from vtr_jax.models.vit import VisionConfig, VisionTower, preprocess
from vtr_jax.models.vlm import VLM, VLMConfig, assemble, check_pixels, check_prompts, generate, pad_prompts
from vtr_jax.seams import BoundaryHook, LLMState, Tokens

IMAGE = 60


def small_config(kind: str = "clip", decoder: str = "llama") -> VLMConfig:
  vision = VisionConfig(kind=kind, image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=3,
                        num_heads=4, feature_layers=(-2,) if kind == "clip" else (-1,), use_head=kind == "siglip")
  text = DecoderConfig(kind=decoder, vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                       num_heads=4, num_kv_heads=2)
  return VLMConfig(vision=vision, text=text, image_token_id=IMAGE, pad_token_id=0, eos_token_ids=())


@pytest.fixture(scope="module", params=["clip", "siglip"])
def model_and_params(request):
  cfg = small_config(request.param, "llama" if request.param == "clip" else "qwen2")
  model = VLM(cfg)
  toks, valid = pad_prompts([[1, IMAGE, 5]], 0)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), toks, valid)
  return model, variables


def _prompts(rng, lengths=(6, 10, 3)):
  out = []
  for n in lengths:
    p = [1] + [int(x) for x in rng.integers(2, IMAGE, size=n - 1)]
    p.insert(1 + n // 3, IMAGE)
    out.append(p)
  return out


def test_every_parameter_has_logical_axes(model_and_params):
  _, variables = model_and_params
  leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim


def test_wrong_image_size_and_channels(model_and_params):
  model, variables = model_and_params
  params = nn.unbox(variables)
  toks, valid = pad_prompts([[1, IMAGE, 5]], 0)
  with pytest.raises(ValueError, match=r"pixels must be float\[B, 32, 32, 3\].*got shape \(1, 30, 30, 3\)"):
    model.apply(params, jnp.zeros((1, 30, 30, 3)), toks, valid)
  with pytest.raises(ValueError, match=r"got shape \(1, 32, 32, 4\)"):
    generate(model, params, jnp.zeros((1, 32, 32, 4)), toks, valid, max_new_tokens=2)
  with pytest.raises(ValueError, match=r"\[B, h, w, 3\].*\(2, 3, 32, 32\)"):
    preprocess(np.zeros((2, 3, 32, 32), np.uint8), model.config.vision)


def test_prompt_placeholder_errors():
  toks, valid = pad_prompts([[1, IMAGE, 5], [1, 4, 5], [IMAGE, 2, IMAGE]], 0)
  with pytest.raises(ValueError, match=r"exactly one image placeholder \(id 60\); sample 1 has 0 .*\[1, 2\]"):
    check_prompts(toks, valid, IMAGE)


def test_generate_rejects_prompt_without_image(model_and_params):
  model, variables = model_and_params
  toks, valid = pad_prompts([[1, 4, 5]], 0)
  with pytest.raises(ValueError, match="sample 0 has 0"):
    generate(model, nn.unbox(variables), jnp.zeros((1, 32, 32, 3)), toks, valid, max_new_tokens=2)


def test_config_errors():
  with pytest.raises(ValueError, match="image_size 30 is not a multiple of patch_size 8"):
    VisionConfig(image_size=30, patch_size=8)
  with pytest.raises(ValueError, match="num_heads 6 is not a multiple of num_kv_heads 4"):
    DecoderConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="feature layer 9"):
    VisionConfig(num_layers=4, feature_layers=(9,))


def test_vision_extra_errors():
  siglip = VisionTower(small_config("siglip").vision)
  px = jnp.zeros((1, 32, 32, 3))
  params = siglip.init(jax.random.key(0), px)
  with pytest.raises(ValueError, match="has no class token; use 'received_attn'"):
    siglip.apply(params, px, extras=frozenset({("cls_attn", -1)}))
  with pytest.raises(ValueError, match="unknown vision extra 'attn'"):
    siglip.apply(params, px, extras=frozenset({("attn", -1)}))
  clip = VisionTower(small_config("clip").vision)
  cparams = clip.init(jax.random.key(0), px)
  with pytest.raises(ValueError, match=r"only blocks 0\.\.1 are available"):
    clip.apply(cparams, px, extras=frozenset({("keys", 2)}))
  _, aux = clip.apply(cparams, px, extras=frozenset({("qk", 2), ("keys", -1)}))
  assert aux["vision/qk/2"][0].shape == (1, 17, 4, 8) and aux["vision/keys/1"].shape == (1, 17, 8)


def test_decode_matches_prefill_on_growing_sequence(model_and_params):
  """Each decode step's logits equal a fresh prefill of the prompt plus the tokens so far."""
  model, variables = model_and_params
  params = nn.unbox(variables)
  rng = np.random.default_rng(0)
  prompts = _prompts(rng)
  px = jnp.asarray(rng.standard_normal((3, 32, 32, 3)), jnp.float32)
  toks, valid = pad_prompts(prompts, 0)
  gen = generate(model, params, px, toks, valid, max_new_tokens=5, return_logits=True)
  prefill = jax.jit(lambda t, v: model.apply(params, px, t, v, last_only=True, method=VLM.prefill)[0])
  for step in range(5):
    grown = [p + [int(t) for t in gen.tokens[i, :step]] for i, p in enumerate(prompts)]
    gtoks, gvalid = pad_prompts(grown, 0, length=toks.shape[1] + 5)  # one shape: one compile
    logits = prefill(gtoks, gvalid)
    np.testing.assert_allclose(np.asarray(gen.logits[:, step]), np.asarray(logits), atol=2e-5, rtol=1e-5)


def test_sampling_is_seeded(model_and_params):
  model, variables = model_and_params
  params = nn.unbox(variables)
  toks, valid = pad_prompts(_prompts(np.random.default_rng(1)), 0)
  px = jnp.ones((3, 32, 32, 3))
  a = generate(model, params, px, toks, valid, max_new_tokens=6, temperature=1.0, rng=jax.random.key(3))
  b = generate(model, params, px, toks, valid, max_new_tokens=6, temperature=1.0, rng=jax.random.key(3))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  with pytest.raises(ValueError, match="needs an rng"):
    generate(model, params, px, toks, valid, max_new_tokens=2, temperature=1.0)


def test_boundary_hook_sees_every_layer_and_can_shorten_caches(model_and_params):
  model, variables = model_and_params
  params = nn.unbox(variables)
  toks, valid = pad_prompts(_prompts(np.random.default_rng(2)), 0)
  px = jnp.ones((3, 32, 32, 3))
  seen = []

  def identity(layer, state, access):
    seen.append((layer, len(access.caches)))
    return state

  def vlm_prefill(hook):
    def fn(module, pixels, tokens, valid):
      vis, _ = module.encode_image(pixels)
      layout = module.layout(tokens, valid, vis, keep_positions=False)
      state = LLMState(layout.x, layout.positions, layout.valid, layout.visual, n_visual=vis.count)
      return module.decoder.prefill(state, cache_extra=2, hook=hook)
    return fn

  layers = model.config.text.num_layers
  base, cache0, _ = model.apply(params, px, toks, valid, cache_extra=2, method=VLM.prefill)
  out, cache1, _ = model.apply(params, px, toks, valid, method=vlm_prefill(BoundaryHook(frozenset(range(layers)),
                                                                                         identity)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(base), atol=1e-6)
  assert seen == [(i, i) for i in range(layers)]
  seen.clear()
  model.apply(params, px, toks, valid, method=vlm_prefill(BoundaryHook(frozenset({1}), identity)))
  assert seen == [(1, 1)]  # only the boundaries the hook names

  def drop_first_four(layer, state, access):
    return state.gather(jnp.broadcast_to(jnp.arange(4, state.length), (state.x.shape[0], state.length - 4)),
                        state.n_visual)

  _, cache2, _ = model.apply(params, px, toks, valid, method=vlm_prefill(BoundaryHook(frozenset({1}),
                                                                                       drop_first_four)))
  lengths = [lc.length for lc in cache2.layers]
  assert lengths[0] == cache0.layers[0].length and lengths[1:] == [lengths[0] - 4] * 2


def test_assemble_positions_keep_and_renumber():
  b, t, d = 2, 5, 3
  text = jnp.arange(b * t * d, dtype=jnp.float32).reshape(b, t, d)
  text_valid = jnp.array([[False, True, True, True, True], [True, True, True, True, True]])
  slot = jnp.array([2, 1])  # placeholder index per sample
  vis = Tokens(jnp.full((b, 3, d), -1.0), jnp.array([[0, 4, 7], [1, 2, 8]], jnp.int32),
               jnp.ones((b, 3), bool), jnp.ones((b, 3), jnp.float32))
  keep = assemble(text, text_valid, slot, vis, keep_positions=True, num_original=9)
  # sample 0: pad, t1, [v0 v4 v7], t3, t4 -> positions x, 0, 1+{0,4,7}, 1+9, 1+9+1
  assert keep.positions[0].tolist() == [0, 0, 1, 5, 8, 10, 11]
  assert keep.positions[1].tolist() == [0, 2, 3, 9, 10, 11, 12]
  assert keep.visual[0].tolist() == [False, False, True, True, True, False, False]
  renum = assemble(text, text_valid, slot, vis, keep_positions=False, num_original=9)
  assert renum.positions[0].tolist() == [0, 0, 1, 2, 3, 4, 5]
  np.testing.assert_array_equal(renum.x[1, 0], text[1, 0])
  np.testing.assert_array_equal(renum.x[1, 4], text[1, 2])


def test_preprocess_resizes_and_normalises():
  cfg = small_config("siglip").vision
  img = np.full((1, 50, 70, 3), 255, np.uint8)
  out = preprocess(img, cfg)
  assert out.shape == (1, 32, 32, 3)
  np.testing.assert_allclose(np.asarray(out), 1.0, atol=1e-5)  # (1 - 0.5) / 0.5
  check_pixels(cfg, out)


def test_batch_equals_single(model_and_params):
  model, variables = model_and_params
  params = nn.unbox(variables)
  rng = np.random.default_rng(5)
  prompts = _prompts(rng)
  px = jnp.asarray(rng.standard_normal((3, 32, 32, 3)), jnp.float32)
  toks, valid = pad_prompts(prompts, 0)
  batch = generate(model, params, px, toks, valid, max_new_tokens=6, return_logits=True)
  for i, p in enumerate(prompts):
    t1, v1 = pad_prompts([p], 0)
    one = generate(model, params, px[i:i + 1], t1, v1, max_new_tokens=6, return_logits=True)
    np.testing.assert_array_equal(np.asarray(batch.tokens[i]), np.asarray(one.tokens[0]))
    np.testing.assert_allclose(np.asarray(batch.logits[i]), np.asarray(one.logits[0]), atol=2e-5)


def test_siglip_without_head_initialises():
  """transformers' vision_use_head=False: no attention-pooling head, init still creates every norm."""
  cfg = small_config("siglip").vision
  tower = VisionTower(dataclasses.replace(cfg, use_head=False))
  params = tower.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  assert "head" not in params and "post_layernorm" in params


def _scans(fn, *args) -> list[int]:
  """Lengths of the `scan`s in fn's jaxpr (sub-jaxprs included), in order."""
  def walk(jaxpr):
    out = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "scan":
        out.append(eqn.params["length"])
      for sub in jax.core.jaxprs_in_params(eqn.params):
        out.extend(walk(sub))
    return out
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_scanned_layer_runs_equal_the_loop():
  """`scan_layers`: each run of layers between a plan's boundaries is one `lax.scan` (FastV at layer 3 of 5
  acts at boundaries 2 and 3: runs 0-1, 2, 3-4, the single layer unscanned), over the per-layer parameters
  checkpoints hold; logits, decoding and gradients equal the Python loop's (float32, 1e-6), with and without
  rematerialisation."""
  base = small_config()
  base = dataclasses.replace(base, text=dataclasses.replace(base.text, num_layers=5))
  toks, valid = pad_prompts(_prompts(np.random.default_rng(3)), 0)
  px = jnp.asarray(np.random.default_rng(4).standard_normal((3, 32, 32, 3)), jnp.float32)
  params = nn.unbox(jax.jit(VLM(base).init)(jax.random.key(0), px, toks, valid))
  assert {f"layers_{i}" for i in range(5)} <= set(params["params"]["decoder"])  # the checkpoint layout
  reduction = "fastv:layer=3,keep=5"
  outs = {}
  for scan, remat in ((False, "none"), (True, "none"), (True, "full")):
    model = VLM(dataclasses.replace(base, text=dataclasses.replace(base.text, scan_layers=scan, remat=remat)))

    def prefill(p, model=model):
      return model.apply(p, px, toks, valid, reduction=reduction, method=VLM.prefill)[0]

    loss = lambda p, prefill=prefill: jnp.mean(prefill(p) ** 2)  # noqa: E731
    outs[scan, remat] = {"grad": jax.jit(jax.grad(loss))(params)}
    if remat == "none":  # remat changes only what the backward pass stores
      gen = generate(model, params, px, toks, valid, max_new_tokens=3, reduction=reduction, return_logits=True)
      outs[scan, remat].update(prefill=jax.jit(prefill)(params), decode=gen.logits)
      assert _scans(prefill, params) == ([2, 2] if scan else [])
  want = outs[False, "none"]
  for key in ((True, "none"), (True, "full")):
    for name, got in outs[key].items():
      for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want[name])):
        np.testing.assert_allclose(g, w, rtol=1e-6 if name != "grad" else 1e-5, atol=1e-6 if name != "grad" else 1e-5)
