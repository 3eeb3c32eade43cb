"""Trained compressors: FALCON's registers (ReCompact, crops, ReAtten), TokenPacker, LLaVolta.

Shapes and static token counts, what each output may depend on, loop-based
NumPy renderings of TokenPacker and LLaVolta's pooling, saving and loading,
and a few training steps of each `configs/shapes_tiny.py` compressor variant.
"""

from __future__ import annotations

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vtr_jax
from configs import shapes_tiny
from vtr_jax import flops, training
from vtr_jax.data import vqa
from vtr_jax.convert import CheckpointError, config_to_hf, export, load_file, save, save_file
from vtr_jax.models.decoder import DecoderConfig
from vtr_jax.models.projector import TokenPacker, region_indices
from vtr_jax.models.vit import VisionConfig, VisionTower, split_crops
from vtr_jax.models.vlm import VLM, VLMConfig, pad_prompts

IMAGE = 60
TEXT = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)


def _vision(**kw) -> VisionConfig:
  base = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
              feature_layers=(-1,))
  return VisionConfig(**{**base, **kw})


@functools.lru_cache(maxsize=None)
def _model(vision: VisionConfig, projector: str = "mlp2x_gelu", seed: int = 0):
  """(VLM, params) of a small random model around `vision` (cached: tests share compiled models)."""
  cfg = VLMConfig(vision=vision, text=TEXT, projector=projector, image_token_id=IMAGE, pad_token_id=0,
                  eos_token_ids=())
  model = VLM(cfg)
  toks, valid = pad_prompts([[1, IMAGE, 5]], 0)
  s = vision.image_size
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, s, s, 3)), toks, valid)
  leaves = jax.tree_util.tree_leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
  return model, nn.unbox(variables)


def _prompts(b: int):
  return pad_prompts([[1] + [7 + i] * (i + 1) + [IMAGE, 5, 6] for i in range(b)], 0)


@functools.partial(jax.jit, static_argnames=("model", "reduction"))
def _prefill(model, params, pixels, toks, valid, reduction=None):
  return model.apply(params, pixels, toks, valid, reduction=reduction, method=VLM.prefill)


def _visual_count(model, params, pixels, reduction=None) -> list[int]:
  """Visual tokens in each sample's LLM input."""
  toks, valid = _prompts(pixels.shape[0])
  _, _, aux = _prefill(model, params, pixels, toks, valid, reduction)
  return np.asarray(aux["prompt/visual"]).sum(axis=1).tolist()


# ---- FALCON: registers, crops, ReAtten -------------------------------------------------------
CROPS = dict(image_size=64, crops=2, thumbnail=True, num_registers=3, reatten=True)


def test_only_registers_leave_the_tower():
  vision = _vision(kind="siglip", num_registers=5, use_head=True)
  tower = VisionTower(vision)
  pixels = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  params = nn.unbox(jax.jit(tower.init)(jax.random.key(0), pixels))
  assert params["params"]["registers"].shape == (5, 32) and "crop_embedding" not in params["params"]
  feats, aux = jax.jit(tower.apply)(params, pixels)
  assert feats.shape == (2, 5, 32) and vision.num_features == 5 and "vision/cls_feature" not in aux


def test_only_registers_of_every_view_reach_the_llm():
  vision = _vision(**CROPS)
  model, params = _model(vision)
  assert vision.num_crops == 5 and vision.grid == 4 and model.config.num_image_tokens == 15
  pixels = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
  assert _visual_count(model, params, pixels) == [15, 15]


def test_split_crops_and_thumbnail():
  vision = _vision(**CROPS)
  pixels = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 64, 3)), jnp.float32)
  views = np.asarray(split_crops(pixels, vision)).reshape(2, 5, 32, 32, 3)
  for i in range(2):
    for k in range(4):
      r, c = divmod(k, 2)
      np.testing.assert_array_equal(views[i, k], np.asarray(pixels[i, 32 * r:32 * r + 32, 32 * c:32 * c + 32]))
  thumb = jax.image.resize(pixels, (2, 32, 32, 3), "bilinear", antialias=True)
  np.testing.assert_allclose(views[:, 4], np.asarray(thumb), atol=1e-6)


def test_gradients_reach_the_registers():
  model, params = _model(_vision(**CROPS))
  pixels = jnp.asarray(np.random.default_rng(2).standard_normal((2, 64, 64, 3)), jnp.float32)
  toks, valid = _prompts(2)

  def loss(p):
    return jnp.mean(model.apply(p, pixels, toks, valid) ** 2)

  grads = jax.jit(jax.grad(loss))(params)["params"]["vision"]
  for name in ("registers", "crop_embedding"):
    assert float(jnp.abs(grads[name]).max()) > 0, name
  assert float(jnp.abs(grads["layers_0"]["interact_attn"]["q_proj"]["kernel"]).max()) > 0


@pytest.mark.parametrize("reatten", [True, False])
def test_reatten_lets_crops_see_each_other(reatten):
  """Perturbing crop 3's pixels moves crop 0's registers only with ReAtten (the thumbnail always sees it)."""
  vision = _vision(**{**CROPS, "reatten": reatten})
  tower = VisionTower(vision)
  pixels = jnp.asarray(np.random.default_rng(3).standard_normal((1, 64, 64, 3)), jnp.float32)
  params = jax.jit(tower.init)(jax.random.key(0), pixels)
  params = jax.tree_util.tree_map(lambda a: a * 4.0 if a.ndim >= 2 else a, params)  # less uniform attention
  run = jax.jit(tower.apply)
  a, _ = run(params, pixels)
  b, _ = run(params, pixels.at[:, 32:, 32:].add(1.0))  # crop 3 (bottom right)
  r = vision.num_registers
  moved = lambda view: float(jnp.abs(a[:, view * r:(view + 1) * r] - b[:, view * r:(view + 1) * r]).max())
  assert moved(3) > 1e-3 and moved(4) > 1e-3  # crop 3 itself and the thumbnail
  if reatten:
    assert moved(0) > 1e-3
  else:
    assert moved(0) == 0.0


def test_register_config_errors():
  with pytest.raises(ValueError, match="crops, reatten need visual registers"):
    _vision(image_size=64, crops=2, reatten=True)
  with pytest.raises(ValueError, match="keep_cls=True with num_registers=4"):
    _vision(num_registers=4, keep_cls=True)
  with pytest.raises(ValueError, match="thumbnail=True needs crops > 1"):
    _vision(num_registers=4, thumbnail=True)
  with pytest.raises(ValueError, match=r"crop size 12 \(image_size 36 / crops 3\) is not a multiple of patch_size 8"):
    _vision(image_size=36, crops=3, num_registers=2)
  tower = VisionTower(_vision(num_registers=2))
  params = jax.jit(tower.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="not available for a tower with num_registers=2"):
    tower.apply(params, jnp.zeros((1, 32, 32, 3)), extras=frozenset({("cls_attn", -1)}))


# ---- TokenPacker ----------------------------------------------------------------------------
def np_layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def np_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_mlp(x, p, name):
  h = np_gelu(x @ p[f"{name}_1"]["kernel"] + p[f"{name}_1"]["bias"])
  return h @ p[f"{name}_2"]["kernel"] + p[f"{name}_2"]["bias"]


def np_bilinear(img, m):
  """Half-pixel-centre bilinear resize of img [g, g, D] to [m, m, D] (torch's align_corners=False)."""
  g = img.shape[0]
  out = np.zeros((m, m, img.shape[-1]))
  for i in range(m):
    for j in range(m):
      acc = 0.0
      for (a, wa) in _taps((i + 0.5) * g / m - 0.5, g):
        for (b, wb) in _taps((j + 0.5) * g / m - 0.5, g):
          acc = acc + wa * wb * img[a, b]
      out[i, j] = acc
  return out


def _taps(src, g):
  lo = math.floor(src)
  f = src - lo
  return [(min(max(lo, 0), g - 1), 1 - f), (min(max(lo + 1, 0), g - 1), f)]


def np_tokenpacker(p, x, g, s, dv):
  """Loop-based rendering of the reference's region-to-point injection + MLP for one sample x [P, L * Dv]."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  m = g // s
  query = np_bilinear(x[:, -dv:].reshape(g, g, dv), m).reshape(m * m, dv)
  q = np_layer_norm(query @ p["q_proj"]["kernel"], p["ln_q"])
  k = np_layer_norm(np_mlp(x, p, "k_proj"), p["ln_k"])
  v = np_layer_norm(np_mlp(x, p, "v_proj"), p["ln_v"])
  heads, hd = p["attn_q"]["kernel"].shape[1:]
  out = []
  for r in range(m * m):
    ri, rj = divmod(r, m)
    keys = [(ri * s + a) * g + rj * s + b for a in range(s) for b in range(s)]
    qh = np.einsum("e,enh->nh", q[r], p["attn_q"]["kernel"]) + p["attn_q"]["bias"]
    o = np.zeros((heads, hd))
    for n in range(heads):
      kn = np.array([k[i] @ p["attn_k"]["kernel"][:, n] + p["attn_k"]["bias"][n] for i in keys])
      vn = np.array([v[i] @ p["attn_v"]["kernel"][:, n] + p["attn_v"]["bias"][n] for i in keys])
      logits = kn @ qh[n] / math.sqrt(hd)
      w = np.exp(logits - logits.max())
      o[n] = (w / w.sum()) @ vn
    out.append(np.einsum("nh,nhe->e", o, p["attn_out"]["kernel"]) + p["attn_out"]["bias"])
  return np_mlp(np.array(out), p, "linear")


def _packer(scale: int, grid: int = 6, levels=(1, 2)):
  vision = _vision(image_size=8 * grid, feature_layers=levels)
  packer = TokenPacker(vision, 24, scale)
  x = jnp.asarray(np.random.default_rng(scale).standard_normal((2, grid * grid, 32 * len(levels))), jnp.float32)
  params = nn.unbox(packer.init(jax.random.key(scale), x))
  params = jax.tree_util.tree_map(lambda a: a * 4.0 if a.ndim >= 2 else a, params)  # less uniform attention
  return packer, params, x


@pytest.mark.parametrize("scale", [2, 3])
def test_tokenpacker_matches_numpy(scale):
  packer, params, x = _packer(scale)
  out = np.asarray(jax.jit(packer.apply)(params, x))
  assert out.shape == (2, (6 // scale) ** 2, 24)
  for i in range(2):
    np.testing.assert_allclose(out[i], np_tokenpacker(params["params"], x[i], 6, scale, 32), atol=2e-5, rtol=1e-4)


def test_tokenpacker_query_sees_only_its_region():
  packer, params, x = _packer(2)
  run = jax.jit(packer.apply)
  base = np.asarray(run(params, x))
  regions = region_indices(6, 2)
  for r, members in enumerate(regions):
    outside = np.setdiff1d(np.arange(36), members)
    moved = np.asarray(run(params, x.at[:, outside].add(3.0)))
    np.testing.assert_array_equal(moved[:, r], base[:, r], err_msg=f"region {r} saw patches outside it")
    assert np.abs(np.delete(moved, r, axis=1) - np.delete(base, r, axis=1)).max() > 1e-3
    inside = np.asarray(run(params, x.at[:, members[-1]].add(3.0)))
    assert np.abs(inside[:, r] - base[:, r]).max() > 1e-4


def test_tokenpacker_in_the_vlm():
  vision = _vision(image_size=32, feature_layers=(1, 2))
  model, params = _model(vision, "tokenpacker:scale=2")
  assert model.config.num_image_tokens == 4 and model.config.image_positions == 16
  pixels = jnp.asarray(np.random.default_rng(4).standard_normal((2, 32, 32, 3)), jnp.float32)
  toks, valid = _prompts(2)
  _, aux = jax.jit(lambda p, x: model.apply(p, x, method=VLM.encode_image))(params, pixels)
  np.testing.assert_array_equal(np.asarray(aux["reduce/positions"]), [[0, 2, 8, 10]] * 2)  # top-left patches
  assert _visual_count(model, params, pixels) == [4, 4]
  with pytest.raises(ValueError, match=r"random left 8 of the 16 patches before the tokenpacker projector"):
    _prefill(model, params, pixels, toks, valid, "random:keep=8")


def test_tokenpacker_config_errors():
  with pytest.raises(ValueError, match=r"scale=3 must be >= 1 and divide the 4x4 patch grid"):
    VLMConfig(vision=_vision(), text=TEXT, projector="tokenpacker:scale=3")
  with pytest.raises(ValueError, match=r"keep_cls=False \(got num_registers=0, keep_cls=True\)"):
    VLMConfig(vision=_vision(keep_cls=True), text=TEXT, projector="tokenpacker")
  with pytest.raises(ValueError, match="unknown setting 'size'.*known settings: scale"):
    VLMConfig(vision=_vision(), text=TEXT, projector="tokenpacker:size=2")
  with pytest.raises(ValueError, match="unknown projector 'packer'"):
    VLMConfig(vision=_vision(), text=TEXT, projector="packer")


# ---- saving and loading ---------------------------------------------------------------------
@pytest.mark.parametrize("vision,projector,why", [
    (_vision(**CROPS), "mlp2x_gelu", "the vision tower has 3 visual registers in each of 5 views"),
    (_vision(feature_layers=(1, 2)), "tokenpacker:scale=2", "the projector is 'tokenpacker:scale=2'"),
])
def test_compressor_models_save_in_the_vtr_jax_layout(tmp_path, vision, projector, why):
  model, params = _model(vision, projector)
  with pytest.raises(CheckpointError, match=f"has no Hugging Face LLaVA layout: {why}"):
    config_to_hf(model.config)
  with pytest.raises(CheckpointError, match="no Hugging Face LLaVA layout"):
    export(str(tmp_path / "hf"), model.config, params)
  save(str(tmp_path / "native"), model.config, params)
  cfg, loaded, tok = vtr_jax.load(str(tmp_path / "native"), tokenizer=False)
  assert cfg == model.config and tok is None
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  weights = str(tmp_path / "native" / "model.safetensors")
  tensors = dict(load_file(weights))
  name = sorted(tensors)[0]
  del tensors[name]
  save_file(tensors, weights)
  with pytest.raises(CheckpointError, match=f"1 parameter\\(s\\) not in the checkpoint: {name}"):
    vtr_jax.load(str(tmp_path / "native"), tokenizer=False)


# ---- training end to end --------------------------------------------------------------------
def test_compressor_variants():
  tok = vqa.tokenizer()
  counts = {v: training.model_config(shapes_tiny.get_config(f"test,{v}"), tok).num_image_tokens
            for v in shapes_tiny.COMPRESSORS}
  assert counts == {"falcon": 4, "falcon_crops": 5, "tokenpacker": 4, "llavolta": 17}
  full = {v: training.model_config(shapes_tiny.get_config(v), tok).num_image_tokens for v in shapes_tiny.COMPRESSORS}
  assert full == {"falcon": 25, "falcon_crops": 25, "tokenpacker": 25, "llavolta": 101}
  with pytest.raises(ValueError, match=r"\['falcon', 'tokenpacker'\] exclude each other"):
    shapes_tiny.get_config("falcon,tokenpacker")


@pytest.mark.parametrize("variant", ["falcon_crops", "tokenpacker", "llavolta"])  # falcon_crops includes falcon
def test_compressor_trains_end_to_end(tmp_path, variant):
  c = shapes_tiny.get_config(f"test,{variant}")
  if variant == "llavolta":  # stages of the 8-step tiny run; its first two run here (pooling stride 3, then 2)
    assert training.reduction_schedule(c.train.reduction) == [
        (2, "llavolta:layer=1,stride=3"), (4, "llavolta:layer=1,stride=2"), (6, "llavolta:layer=1,stride=2"),
        (None, "none")]
  c.train.update(steps=4, log_every=1, eval_every=4 if variant == "falcon_crops" else 0, checkpoint_every=4)
  training.train(c, str(tmp_path), progress=False)
  losses = [row["loss"] for row in training.read_metrics(str(tmp_path))]
  assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.02
  cfg, params, tok = vtr_jax.load(str(tmp_path / "export"))
  assert cfg.num_image_tokens == {"falcon_crops": 5, "tokenpacker": 4, "llavolta": 17}[variant]
  assert os.path.exists(tmp_path / "export" / ("config.json" if variant == "llavolta" else "vtr_config.json"))
  assert set(params["params"]) == {"vision", "projector", "decoder"} and tok.vocab_size == cfg.text.vocab_size


@pytest.mark.parametrize("variant", [pytest.param("tokenpacker", marks=pytest.mark.slow), "falcon",
                                     pytest.param("falcon_crops", marks=pytest.mark.slow)])
def test_flops_kv_slots_match_the_cache(variant):
  """flops.py counts the tokens these models hand to the LLM (registers x views, packed regions)."""
  c = shapes_tiny.get_config(f"test,{variant}")
  tok = vqa.tokenizer()
  cfg = training.model_config(c, tok)
  params = training.init_params(VLM(cfg), cfg, 0)
  toks, valid = pad_prompts([tok.encode("<image> question : what colour is the star ? answer :")] * 2,
                            tok.pad_token_id)
  s = cfg.vision.image_size
  _, cache, _ = VLM(cfg).apply(params, np.zeros((2, s, s, 3), np.float32), toks, valid, cache_extra=0,
                               method=VLM.prefill)
  cost = flops.prefill_cost(cfg, None, text_tokens=toks.shape[1] - 1, batch=2, bytes_per_element=4)
  assert [lc.k.shape[1] for lc in cache.layers] == list(cost.kv_slots)
  assert cost.visual_tokens[0] == cfg.num_image_tokens and cost.projector > 0
