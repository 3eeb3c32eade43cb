"""Qwen2.5-VL's parts against transformers 5.24 on a tiny random `Qwen2_5_VLForConditionalGeneration`.

The tower, the window index, the M-RoPE position ids, the decoder (logits and
the first decode step) and the image processor are compared with
transformers itself. transformers' video processor needs torchvision, which
cannot be installed here, so the video test re-implements its documented
steps plainly in torch (smart resize with the video limits, the uint8
antialiased bicubic `torch.nn.functional.interpolate` that torchvision's
resize runs on CPU, the fused rescale-and-normalise, its patchify with the
last frame repeated) and compares the processor with that.

Print the parity numbers with:
    .venv/bin/python -m pytest tests/test_qwen.py -k parity -s
"""

from __future__ import annotations

import json
import os
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_tiny
from vtr_jax.convert import qwen2_5_vl as conv
from vtr_jax.convert.safetensors_io import CheckpointError, load_directory
from vtr_jax.models import mrope
from vtr_jax.models.decoder import Decoder, DecoderConfig, rope
from vtr_jax.models.qwen_vit import QwenVisionConfig, QwenVisionTower, hf_window_index, pad_patches
from vtr_jax.processors import qwen2_vl as proc
from vtr_jax.seams import LLMState

PIXELS = proc.QwenPixelConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 40, video_min_pixels=28 * 28,
                              video_max_pixels=28 * 28 * 12)
MAX_PATCHES = 160  # one compiled tower serves every input below
EXTRAS = frozenset({("received_attn", 0), ("keys", 0), ("received_attn", 1), ("keys", -1)})


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("qwen2_5_vl"))
  model = hf_tiny.build_qwen2_5_vl(directory)
  cfg, params = conv.load_qwen2_5_vl(directory)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (141, 199, 3), np.uint8), rng.integers(0, 256, (113, 87, 3), np.uint8)]
  video = rng.integers(0, 256, (3, 90, 120, 3), np.uint8)  # odd frame count: the last frame is repeated
  im, vid = proc.process_images(images, PIXELS), proc.process_video(video, PIXELS, fps=3.0)
  pixel_values = np.concatenate([im["pixel_values"], vid["pixel_values_videos"]])
  grid = np.concatenate([im["image_grid_thw"], vid["video_grid_thw"]])
  tower = QwenVisionTower(cfg.vision)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run_tower(patches, grid_thw):
    return tower.apply({"params": params["params"]["vision"]}, patches, grid_thw, extras=EXTRAS)

  return types.SimpleNamespace(model=model, directory=directory, cfg=cfg, params=params, images=images, video=video,
                               pixel_values=pixel_values, grid=grid, second_per_grid_ts=vid["second_per_grid_ts"],
                               run_tower=run_tower)


def _unpad(rows, grid, per_token: int = 1) -> np.ndarray:
  """Concatenates each row's first t*h*w / per_token entries (transformers' packed layout)."""
  counts = np.asarray(grid).prod(axis=1) // per_token
  return np.concatenate([np.asarray(r)[:n] for r, n in zip(rows, counts)])


# ---- processor ------------------------------------------------------------------------------
def test_smart_resize_matches_transformers():
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
  rng = np.random.default_rng(1)
  for h, w in [(1080, 1920), (28, 28), (29, 5000), (300, 41)] + [tuple(rng.integers(28, 3000, 2)) for _ in range(50)]:
    for lo, hi in [(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28), (28 * 28, 28 * 28 * 40)]:
      assert proc.smart_resize(int(h), int(w), 28, lo, hi) == smart_resize(int(h), int(w), 28, lo, hi)
  assert proc.smart_resize(1080, 1920) == (728, 1316)  # FAMILIES.md's verified example
  assert proc.smart_resize(1080, 1920, max_pixels=12845056) == (1092, 1932)


def test_processor_refuses_bad_inputs():
  with pytest.raises(ValueError, match="20x300 .* smaller than one 28x28"):
    proc.smart_resize(20, 300)
  with pytest.raises(ValueError, match="aspect ratio 201.0"):
    proc.smart_resize(28, 28 * 201)
  with pytest.raises(ValueError, match="min_pixels 5000 and max_pixels 4000"):
    proc.smart_resize(100, 100, 28, 5000, 4000)
  with pytest.raises(ValueError, match="min_pixels 10 and max_pixels 5"):
    proc.QwenPixelConfig(min_pixels=10, max_pixels=5)
  frames = [np.zeros((60, 80, 3), np.uint8), np.zeros((60, 84, 3), np.uint8)]
  with pytest.raises(ValueError, match=r"different shapes \[\(60, 80, 3\), \(60, 84, 3\)\]"):
    proc.process_video(frames)
  with pytest.raises(ValueError, match="uint8"):
    proc.process_images([np.zeros((60, 80, 3), np.float32)])


def test_processor_images_parity(qwen):
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  rng = np.random.default_rng(2)
  images = qwen.images + [rng.integers(0, 256, (56, 84, 3), np.uint8), rng.integers(0, 256, (400, 90, 3), np.uint8),
                          rng.integers(0, 256, (29, 31, 3), np.uint8)]
  ref = Qwen2VLImageProcessorPil(min_pixels=PIXELS.min_pixels, max_pixels=PIXELS.max_pixels)(images,
                                                                                             return_tensors="np")
  ours = proc.process_images(images, PIXELS)
  np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
  err = np.abs(ours["pixel_values"] - ref["pixel_values"]).max()
  print(f"\n[parity] image pixel_values max abs err {err:.2e} over {ref['pixel_values'].shape}")
  assert err <= 1e-6
  np.testing.assert_array_equal(proc.num_tokens(ref["image_grid_thw"]),
                                ref["image_grid_thw"].prod(axis=1) // 4)


def _reference_video(frames: np.ndarray, fps: float) -> dict:
  """`Qwen2VLVideoProcessor._preprocess` (do_sample_frames=False) step by step, in torch."""
  import torch.nn.functional as F
  from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
  video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # [1, T, C, H, W] uint8
  h, w = smart_resize(frames.shape[1], frames.shape[2], 28, PIXELS.video_min_pixels, PIXELS.video_max_pixels)
  # tvF.resize on a uint8 CPU tensor with BICUBIC and antialias runs torch's native uint8 kernel:
  video = F.interpolate(video[0], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[None]
  mean = torch.tensor(OPENAI_CLIP_MEAN) * (1.0 / (1 / 255))  # `_fuse_mean_std_and_rescale_factor`
  std = torch.tensor(OPENAI_CLIP_STD) * (1.0 / (1 / 255))
  video = (video.to(torch.float32) - mean[:, None, None]) / std[:, None, None]  # tvF.normalize
  b, t, c, hh, ww = video.shape
  if pad := -t % 2:  # `patchify`
    video = torch.cat((video, video[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
    t += pad
  gt, gh, gw = t // 2, hh // 14, ww // 14
  patches = video.view(b, gt, 2, c, gh // 2, 2, 14, gw // 2, 2, 14).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
  return {"pixel_values_videos": patches.reshape(gt * gh * gw, c * 2 * 14 * 14).numpy(),
          "video_grid_thw": np.array([[gt, gh, gw]]), "second_per_grid_ts": np.array([2 / fps])}


def test_processor_video_parity(qwen):
  rng = np.random.default_rng(3)
  for frames in (qwen.video, rng.integers(0, 256, (4, 61, 200, 3), np.uint8)):
    ref, ours = _reference_video(frames, 3.0), proc.process_video(frames, PIXELS, fps=3.0)
    np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"])
    np.testing.assert_allclose(ours["second_per_grid_ts"], ref["second_per_grid_ts"])
    err = np.abs(ours["pixel_values_videos"] - ref["pixel_values_videos"]).max()
    print(f"\n[parity] video pixel_values max abs err {err:.2e} over {ref['pixel_values_videos'].shape}")
    assert err <= 1e-6


# ---- vision tower ---------------------------------------------------------------------------
def test_window_index_matches_transformers():
  from transformers.vision_utils import get_vision_window_index
  tiny = QwenVisionConfig(depth=1, hidden_size=32, intermediate_size=8, num_heads=2, window_size=56,
                          fullatt_block_indexes=(), out_hidden_size=8)
  for cfg in (QwenVisionConfig(), tiny):
    for grid in ([[1, 16, 20]], [[1, 10, 14], [1, 8, 6], [2, 6, 8]], [[1, 16, 16], [3, 2, 2], [1, 34, 6]]):
      ref_index, ref_cu = get_vision_window_index(torch.tensor(grid), cfg.spatial_merge_size, cfg.window_size,
                                                  cfg.patch_size)
      index, cu = hf_window_index(np.array(grid), cfg)
      np.testing.assert_array_equal(index, ref_index.numpy())
      np.testing.assert_array_equal(cu, ref_cu.numpy())
  np.testing.assert_array_equal(hf_window_index(np.array([[1, 16, 20]]), QwenVisionConfig())[1],
                                [0, 64, 128, 160, 224, 288, 320])  # FAMILIES.md's check


def test_tower_parity_two_images_and_a_video(qwen):
  patches, grid = pad_patches(qwen.pixel_values, qwen.grid, MAX_PATCHES)
  tokens, aux = qwen.run_tower(patches, grid)
  with torch.no_grad():
    ref = qwen.model.model.visual(torch.from_numpy(qwen.pixel_values), grid_thw=torch.from_numpy(qwen.grid))
  ref = ref.pooler_output.numpy()
  ours = _unpad(tokens, grid, per_token=4)
  valid = np.asarray(aux["vision/valid"])
  np.testing.assert_array_equal(valid.sum(axis=1), grid.prod(axis=1) // 4)
  err = np.abs(ours - ref).max()
  print(f"\n[parity] tower grids {grid.tolist()}: merged tokens max abs err {err:.2e} over {ref.shape}")
  assert err <= 1e-5
  thw = _unpad(aux["vision/thw"], grid, per_token=4)
  want = np.concatenate([np.stack(np.meshgrid(np.arange(t), np.arange(h // 2), np.arange(w // 2), indexing="ij"),
                                  -1).reshape(-1, 3) for t, h, w in grid])
  np.testing.assert_array_equal(thw, want)


def test_tower_one_trace_and_rows_independent(qwen):
  """Other mixes and orders of grids reuse the compiled tower, and a row's tokens do not depend on its batch."""
  patches, grid = pad_patches(qwen.pixel_values, qwen.grid, MAX_PATCHES)
  full, _ = qwen.run_tower(patches, grid)
  for order in ([2, 0, 1], [1, 1, 0]):
    p, g = patches[order], grid[order]
    out, _ = qwen.run_tower(p, g)
    for row, src in enumerate(order):
      n = g[row].prod() // 4
      np.testing.assert_allclose(np.asarray(out[row, :n]), np.asarray(full[src, :n]), atol=1e-6)


def _hf_extras(model, pixel_values, grid, layers):
  """Loop-based rendering from transformers' own block inputs: per patch (input order), the attention received
  within its cu_seqlens segment (mean over heads and the segment's query rows) and the head-mean raw keys."""
  from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
  from transformers.vision_utils import get_vision_window_index
  visual = model.model.visual
  seen = {}

  def keep(i):
    def hook(module, args, kwargs, out):
      seen[i] = (args[0], kwargs)
    return hook

  hooks = [visual.blocks[i].attn.register_forward_hook(keep(i), with_kwargs=True) for i in layers]
  with torch.no_grad():
    visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid))
    for h in hooks:
      h.remove()
    window_index, _ = get_vision_window_index(torch.from_numpy(grid), 2, visual.window_size, visual.patch_size)
    to_input = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1).numpy()  # window slot -> input patch
    out = {}
    for i in layers:
      hidden, kwargs = seen[i]
      attn = visual.blocks[i].attn
      q, k, _ = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
      keys = k.mean(dim=1).numpy()
      q, k = apply_rotary_pos_emb_vision(q, k, *kwargs["position_embeddings"])
      q, k = q.double().numpy(), k.double().numpy()
      received = np.zeros(hidden.shape[0])
      cu = kwargs["cu_seqlens"].tolist()
      for lo, hi in zip(cu[:-1], cu[1:]):
        logits = np.einsum("qnh,knh->nqk", q[lo:hi], k[lo:hi]) * attn.scaling
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        received[lo:hi] = probs.mean(axis=0).sum(axis=0) / (hi - lo)
      for name, value in (("received_attn", received), ("keys", keys)):
        back = np.zeros_like(value)
        back[to_input] = value
        out[name, i] = back
  return out


def test_tower_extras_match_a_loop_rendering(qwen):
  patches, grid = pad_patches(qwen.pixel_values, qwen.grid, MAX_PATCHES)
  _, aux = qwen.run_tower(patches, grid)
  ref = _hf_extras(qwen.model, qwen.pixel_values, qwen.grid, layers=(0, 1, 3))
  for name, layer, ref_layer in (("received_attn", 0, 0), ("received_attn", 1, 1), ("keys", 0, 0), ("keys", 3, 3)):
    ours = _unpad(aux[f"vision/{name}/{layer}"], grid)
    np.testing.assert_allclose(ours, ref[name, ref_layer], atol=1e-6, rtol=1e-5)
  padding = np.arange(MAX_PATCHES)[None] >= grid.prod(axis=1)[:, None]
  assert np.all(np.asarray(aux["vision/received_attn/0"])[padding] == 0)
  assert np.all(np.asarray(aux["vision/keys/3"])[padding] == 0)
  n_windows = len(hf_window_index(grid, qwen.cfg.vision)[1]) - 1
  for layer, n_segments in ((0, n_windows), (1, grid[:, 0].sum())):  # 1 per window / temporal slice
    assert abs(_unpad(aux[f"vision/received_attn/{layer}"], grid).sum() - n_segments) < 1e-4
  with pytest.raises(ValueError, match="no class token"):
    QwenVisionTower(qwen.cfg.vision).apply(qwen.params, patches, grid, extras=frozenset({("cls_attn", 0)}))


# ---- M-RoPE ---------------------------------------------------------------------------------
def _prompt(parts) -> tuple[list[int], list[int]]:
  """[('t', n) | ('i', grid) | ('v', grid)] -> token ids with vision start/end around each visual input."""
  rng = np.random.default_rng(len(parts))
  ids = []
  for kind, arg in parts:
    if kind == "t":
      ids += [int(x) for x in rng.integers(5, hf_tiny.IMAGE_ID, arg)]
    else:
      n = int(np.prod(arg)) // 4
      ids += [hf_tiny.QWEN_VISION_START] + [hf_tiny.IMAGE_ID if kind == "i" else hf_tiny.QWEN_VIDEO_ID] * n
      ids += [hf_tiny.QWEN_VISION_END]
  return ids


def _left_pad(prompts):
  t = max(len(p) for p in prompts)
  ids = np.full((len(prompts), t), hf_tiny.PAD, np.int64)
  mask = np.zeros((len(prompts), t), np.int64)
  for b, p in enumerate(prompts):
    ids[b, t - len(p):], mask[b, t - len(p):] = p, 1
  return ids, mask


MIXED = ([("t", 3), ("i", (1, 10, 14)), ("t", 2), ("v", (2, 6, 8)), ("t", 2)],
         [("t", 1), ("i", (1, 8, 6)), ("t", 4), ("i", (1, 4, 6)), ("t", 1)],
         [("t", 5)],
         [("v", (3, 4, 8)), ("t", 3)])


def _mixed_inputs():
  ids, mask = _left_pad([_prompt(p) for p in MIXED])
  images = np.array([g for p in MIXED for k, g in p if k == "i"])
  videos = np.array([g for p in MIXED for k, g in p if k == "v"])
  return ids, mask, images, videos, np.array([1.0, 2 / 3], np.float32)


def test_rope_index_matches_transformers(qwen):
  ids, mask, images, videos, seconds = _mixed_inputs()
  types_ = mrope.token_types(ids, hf_tiny.IMAGE_ID, hf_tiny.QWEN_VIDEO_ID)
  with torch.no_grad():
    ref_pos, ref_delta = qwen.model.model.get_rope_index(
        torch.from_numpy(ids), torch.from_numpy(types_), torch.from_numpy(images), torch.from_numpy(videos),
        torch.from_numpy(seconds), torch.from_numpy(mask))
  pos, delta = mrope.get_rope_index(types_, mask, images, videos, seconds,
                                    tokens_per_second=qwen.cfg.vision.tokens_per_second)
  np.testing.assert_array_equal(pos, ref_pos.permute(1, 2, 0).numpy())
  np.testing.assert_array_equal(delta, ref_delta[:, 0].numpy())


def test_rope_index_text_after_video():
  """FAMILIES.md's worked example: 5.x starts the text after a video at start + max(H', W'), 4.x at max + 1."""
  parts = [("t", 3), ("i", (1, 4, 6)), ("v", (3, 4, 4)), ("t", 1)]  # vision start/end add the text tokens
  ids = np.array([_prompt(parts)])
  types_ = mrope.token_types(ids, hf_tiny.IMAGE_ID, hf_tiny.QWEN_VIDEO_ID)
  video = np.array([[3, 4, 4]])
  pos5, delta5 = mrope.get_rope_index(types_, None, np.array([[1, 4, 6]]), video, [1.0], tokens_per_second=2)
  pos4, delta4 = mrope.get_rope_index(types_, None, np.array([[1, 4, 6]]), video, [1.0], tokens_per_second=2,
                                      text_after_video="max_plus_one")
  video_t = pos5[0, types_[0] == mrope.VIDEO, 0]
  assert sorted(set(video_t.tolist())) == [9, 11, 13]
  assert pos5[0, -2:, 0].tolist() == [11, 12] and pos4[0, -2:, 0].tolist() == [14, 15]
  assert delta5.tolist() == [-12] and mrope.next_position(delta5, np.ones_like(ids)).tolist() == [14]
  assert delta4.tolist() == [-10]
  with pytest.raises(ValueError, match="does not match its grid_thw"):
    mrope.get_rope_index(types_, None, np.array([[1, 4, 8]]), video, [1.0])


def test_mrope_section_validated():
  with pytest.raises(ValueError, match=r"mrope_section \[16, 24, 16\] .* head_dim // 2 = 64 .* sums to 56"):
    DecoderConfig(hidden_size=4096, num_heads=32, mrope_section=(16, 24, 16))
  hf = hf_tiny.qwen2_5_vl_config().to_dict()
  hf["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 3]
  with pytest.raises(CheckpointError, match=r"mrope_section \[2, 2, 3\]"):
    conv.config_from_hf(hf)
  x = jnp.ones((1, 2, 1, 12))
  with pytest.raises(ValueError, match="no mrope_section"):
    rope(x, jnp.zeros((1, 2, 3), jnp.int32), 1e6)


def test_mrope_text_equals_1d_rope():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 12))
  pos = jax.random.randint(jax.random.key(1), (2, 5), 0, 1000)
  plain = rope(x, pos, 1e6)
  assert jnp.array_equal(rope(x, pos, 1e6, (1, 2, 3)), plain)
  assert jnp.array_equal(rope(x, jnp.repeat(pos[..., None], 3, axis=-1), 1e6, (1, 2, 3)), plain)


def test_decoder_parity_with_3d_positions(qwen):
  """Logits from inputs_embeds and M-RoPE ids, then one decode step at n_valid + delta, against transformers."""
  ids, mask, images, videos, seconds = _mixed_inputs()
  types_ = mrope.token_types(ids, hf_tiny.IMAGE_ID, hf_tiny.QWEN_VIDEO_ID)
  pos, delta = mrope.get_rope_index(types_, mask, images, videos, seconds, tokens_per_second=2)
  b, t = ids.shape
  embeds = np.random.default_rng(4).standard_normal((b, t, qwen.cfg.text.hidden_size)).astype(np.float32)
  next_token = np.arange(b) + 10
  start = mrope.next_position(delta, mask)
  pos_next = np.concatenate([pos, np.repeat(start[:, None, None], 3, axis=2)], axis=1)  # [B, T + 1, 3]
  mask_next = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
  with torch.no_grad():
    lm = qwen.model.model.language_model
    x = torch.cat([torch.from_numpy(embeds), lm.embed_tokens(torch.from_numpy(next_token)[:, None])], dim=1)
    hidden = lm(inputs_embeds=x, attention_mask=torch.from_numpy(mask_next),
                position_ids=torch.from_numpy(pos_next).permute(2, 0, 1).long()).last_hidden_state
    ref = qwen.model.lm_head(hidden).numpy()
  decoder, dparams = Decoder(qwen.cfg.text), {"params": qwen.params["params"]["decoder"]}
  valid = mask.astype(bool)
  state = LLMState(jnp.asarray(embeds), jnp.asarray(pos), jnp.asarray(valid), jnp.zeros((b, t), bool))
  logits, cache, _ = decoder.apply(dparams, state, cache_extra=1, method=Decoder.prefill)
  err = np.abs(np.asarray(logits)[valid] - ref[:, :t][valid]).max()
  np.testing.assert_array_equal(np.asarray(cache.layers[0].next_position), start)
  step, _ = decoder.apply(dparams, jnp.asarray(next_token, jnp.int32), cache, method=Decoder.decode_step)
  step_err = np.abs(np.asarray(step) - ref[:, t]).max()
  print(f"\n[parity] decoder M-RoPE logits max abs err {err:.2e}, first decode step {step_err:.2e}")
  assert err <= 1e-5 and step_err <= 1e-5
  _, forced, _ = decoder.apply(dparams, state, cache_extra=1, next_position=jnp.asarray(start + 7),
                               method=Decoder.prefill)
  assert all(np.array_equal(np.asarray(lc.next_position), start + 7) for lc in forced.layers)


# ---- conversion -----------------------------------------------------------------------------
def test_config_round_trip(qwen):
  cfg = qwen.cfg
  assert cfg.text.mrope_section == (1, 2, 3) and cfg.vision.fullatt_block_indexes == (1, 3)
  assert cfg.vision.window_size == 56 and cfg.text.kind == "qwen2" and cfg.image_token_id == hf_tiny.IMAGE_ID
  assert conv.config_from_hf(conv.config_to_hf(cfg)) == cfg
  with open(os.path.join(qwen.directory, "config.json")) as f:
    nested = json.load(f)
  text = nested.pop("text_config")
  text.pop("rope_parameters")
  text.pop("model_type")
  legacy = {**nested, **text, "rope_theta": 1000000.0,  # the flat 4.x layout, rope_scaling of type mrope
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 2, 3]}}
  assert conv.config_from_hf(legacy) == cfg


def test_strict_loading(qwen):
  tensors = dict(load_directory(qwen.directory))
  assert "visual.merger.mlp.2.bias" in tensors  # transformers saves the published layout
  modules = {("model.visual." + k[len("visual."):] if k.startswith("visual.") else
              "model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
             for k, v in tensors.items()}  # transformers' module names
  a = conv.convert_tensors(tensors, qwen.cfg)
  b = conv.convert_tensors(modules, qwen.cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  extra = {**tensors, "visual.blocks.9.norm1.weight": np.ones(32, np.float32)}
  with pytest.raises(CheckpointError, match=r"fill no parameter: visual\.blocks\.9\.norm1\.weight"):
    conv.convert_tensors(extra, qwen.cfg)
  missing = {k: v for k, v in tensors.items() if k != "visual.merger.mlp.2.bias"}
  with pytest.raises(CheckpointError, match=r"not in the checkpoint: vision/merger/mlp_2/bias"):
    conv.convert_tensors(missing, qwen.cfg)
  wrong = {**tensors, "visual.patch_embed.proj.weight": np.zeros((32, 3, 2, 14, 13), np.float32)}
  with pytest.raises(CheckpointError, match=r"shape mismatch.*patch_embed\.proj\.weight \[32, 3, 2, 14, 13\]"):
    conv.convert_tensors(wrong, qwen.cfg)


def test_export_loads_in_transformers(qwen, tmp_path):
  from transformers import Qwen2_5_VLForConditionalGeneration
  conv.export(str(tmp_path), qwen.cfg, qwen.params)
  again = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  ref = qwen.model.state_dict()
  got = again.state_dict()
  assert set(got) == set(ref)
  for name in ref:
    np.testing.assert_array_equal(got[name].numpy(), ref[name].numpy(), err_msg=name)
  assert again.config.text_config.rope_parameters["mrope_section"] == [1, 2, 3]
  assert conv.load_qwen2_5_vl(str(tmp_path))[0] == qwen.cfg
  assert set(load_directory(str(tmp_path))) == set(load_directory(qwen.directory))


def test_every_tower_parameter_has_logical_axes(qwen):
  import flax.linen as nn
  v = qwen.cfg.vision
  boxed = jax.eval_shape(QwenVisionTower(v).init, jax.random.key(0), jnp.zeros((1, 4, v.patch_dim)),
                         jnp.array([[1, 2, 2]], jnp.int32))["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) and len(x.names) == x.value.ndim for x in leaves)
