"""vtr_jax.processors against transformers' processors (5.24, PIL backends) on raw non-square uint8 images.

Processors are built locally with explicit settings, saved with `save_pretrained` and read back with
vtr_jax's reader; pixels are compared to 1e-6 (the PIL resize is shared, so they come out equal), grids,
image sizes and token counts exactly. The token counts are checked against the processors' own `<image>`
expansion at the checkpoints' real settings (336 / 384 tiles), including the image sizes FAMILIES.md lists.
"""

from __future__ import annotations

import json
import math
import os
import re
from functools import partial

import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
from vtr_jax.models.vit import VisionConfig, preprocess
from vtr_jax.processors import ProcessorError, Size, clip, common, llava_next, onevision, video

PIXEL_TOL = 1e-6
TOWER = VisionConfig(kind="clip", image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_layers=1,
                     num_heads=2)
CLIP_MEAN, CLIP_STD = common.OPENAI_CLIP_MEAN, common.OPENAI_CLIP_STD
SIZES = [(37, 61), (61, 37), (32, 32), (20, 100), (130, 17), (45, 64)]  # (h, w), mostly non-square
# NeXT's pins and OneVision's, scaled to 32-pixel tiles so that the pixel tests stay fast.
SMALL_NEXT_PINS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
SMALL_OV_PINS = [[32 * a, 32 * b] for a in range(1, 4) for b in range(1, 4)]


def _image(rng, h, w):
  """A smooth gradient plus noise, uint8[h, w, 3] (noise alone would hide a misplaced tile less well)."""
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([255 * yy / max(h - 1, 1), 255 * xx / max(w - 1, 1), 128 + 0 * xx], -1)
  return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _images(seed=0, sizes=SIZES):
  rng = np.random.default_rng(seed)
  return [_image(rng, h, w) for h, w in sizes]


def _channels_last(pixels) -> np.ndarray:
  """transformers' [..., 3, S, S] pixel values -> [..., S, S, 3]."""
  return np.moveaxis(np.asarray(pixels), -3, -1)


def _saved(processor, directory):
  processor.save_pretrained(directory)
  return directory


def _assert_pixels(ours, theirs):
  theirs = _channels_last(theirs)
  assert ours.shape == theirs.shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=PIXEL_TOL)


def _tokenizer(directory):
  from transformers import PreTrainedTokenizerFast
  hf_tiny.save_tokenizer(directory)
  return PreTrainedTokenizerFast.from_pretrained(directory)


# ---------------------------------------------------------------------------------------------------- CLIP / SigLIP


def test_clip_matches_transformers(tmp_path):
  from transformers import CLIPImageProcessorPil
  hf = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  settings = common.load_image_settings(_saved(hf, str(tmp_path)))
  assert settings == clip.clip_settings(32)
  images = _images()
  ours = clip.process(images, settings)
  _assert_pixels(ours, np.stack(hf(images)["pixel_values"]))
  # a tower's preprocess is that processor: no stretching of the non-square images
  tower = VisionConfig(kind="clip", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=2)
  np.testing.assert_array_equal(np.asarray(preprocess(images, tower)), ours)
  np.testing.assert_array_equal(np.asarray(preprocess(images[1], tower)), ours[1:2])


def test_siglip_matches_transformers(tmp_path):
  from transformers import SiglipImageProcessorPil
  hf = SiglipImageProcessorPil(size={"height": 32, "width": 32})
  settings = common.load_image_settings(_saved(hf, str(tmp_path)))
  assert settings == clip.siglip_settings(32)
  images = _images(1)
  _assert_pixels(clip.process(images, settings), np.stack(hf(images)["pixel_values"]))
  tower = VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=2)
  same = np.stack([np.asarray(preprocess(img, tower))[0] for img in images])  # one at a time, mixed sizes
  np.testing.assert_array_equal(same, clip.process(images, settings))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_preprocess_leaves_square_inputs_unresampled(kind):
  """Images already at the tower's side (what vtr_jax.data.vqa passes) are only rescaled and normalised.

  transformers rescales in float64 (`x * (1/255)`, then float32); the previous jnp `x / 255.0` (which XLA
  computes as a float32 multiply by the reciprocal) is within ~5e-7 of it after normalisation.
  """
  tower = VisionConfig(kind=kind, image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=2)
  images = np.stack(_images(2, [(32, 32)] * 3))
  out = np.asarray(preprocess(images, tower))
  mean, std = np.asarray(tower.image_mean, np.float32), np.asarray(tower.image_std, np.float32)
  expect = ((images.astype(np.float64) * (1 / 255)).astype(np.float32) - mean) / std
  np.testing.assert_array_equal(out, expect)
  previous = (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std
  np.testing.assert_allclose(out, np.asarray(previous), rtol=0, atol=6e-7)


# ---------------------------------------------------------------------------------------------------- settings files


def test_settings_read_from_processor_config_and_legacy_file(tmp_path):
  """transformers 5 nests the image processor in processor_config.json; older checkpoints have
  preprocessor_config.json beside it. Both are read, the nested one first (as transformers does)."""
  from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor
  image = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                     image_grid_pinpoints=SMALL_NEXT_PINS, image_mean=[0.4, 0.5, 0.6])
  hf = LlavaNextProcessor(image_processor=image, tokenizer=_tokenizer(str(tmp_path / "tok")), patch_size=8,
                          vision_feature_select_strategy="full", num_additional_image_tokens=1)
  new = _saved(hf, str(tmp_path / "new"))
  assert sorted(os.listdir(new)) == ["processor_config.json", "tokenizer.json", "tokenizer_config.json"]
  ours = llava_next.NextProcessor.from_pretrained(new)
  assert (ours.patch_size, ours.num_additional_image_tokens, ours.vision_feature_select_strategy) == (8, 1, "full")
  assert ours.image.image_mean == (0.4, 0.5, 0.6)
  assert ours.image.image_grid_pinpoints == tuple(map(tuple, SMALL_NEXT_PINS))
  assert ours.image.size == Size(shortest_edge=32) and ours.image.crop_size == Size(height=32, width=32)
  # legacy layout: the image processor in preprocessor_config.json, processor_config.json without it
  legacy = _saved(image, str(tmp_path / "legacy"))
  with open(os.path.join(legacy, "processor_config.json"), "w") as f:
    json.dump({"patch_size": 8, "processor_class": "LlavaNextProcessor"}, f)
  assert llava_next.NextProcessor.from_pretrained(legacy).image == ours.image
  # both present: the nested settings win
  with open(os.path.join(new, "preprocessor_config.json"), "w") as f:
    json.dump({**image.to_dict(), "image_mean": [0.1, 0.1, 0.1]}, f)
  assert llava_next.NextProcessor.from_pretrained(new).image.image_mean == (0.4, 0.5, 0.6)


# ---------------------------------------------------------------------------------------------------- LLaVA-NeXT


def test_next_best_resolution_and_resize_match_transformers():
  from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
  rng = np.random.default_rng(3)
  pins = [list(p) for p in common._ANYRES_NEXT]
  sizes = [(300, 300), (336, 336), (1, 1), (336, 672), (480, 640)] + [tuple(s) for s in rng.integers(1, 2000, (300, 2))]
  for h, w in sizes:
    best = select_best_resolution((h, w), pins)
    assert llava_next.select_best_resolution((h, w), pins) == tuple(best), (h, w)
    canvas = np.broadcast_to(np.uint8(0), (3, h, w))
    assert llava_next.patch_output_size((h, w), best) == get_patch_output_size(canvas, best, "channels_first"), (h, w)
  assert llava_next.select_best_resolution((300, 300), pins) == (336, 672)  # the list-order tie (FAMILIES.md)


def test_next_pixels_match_transformers(tmp_path):
  from transformers import LlavaNextImageProcessorPil
  from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
  hf = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                  image_grid_pinpoints=SMALL_NEXT_PINS)
  proc = llava_next.NextProcessor(image=common.load_image_settings(_saved(hf, str(tmp_path))), patch_size=8)
  images = _images(4)
  ours, theirs = proc(images), hf(images)
  _assert_pixels(ours.pixel_values, np.stack(theirs["pixel_values"]))
  np.testing.assert_array_equal(ours.image_sizes, np.asarray(theirs["image_sizes"]))
  grids = [get_anyres_image_grid_shape(list(s), SMALL_NEXT_PINS, 32) for s in theirs["image_sizes"]]
  np.testing.assert_array_equal(ours.grid_shapes, grids)
  np.testing.assert_array_equal(ours.num_tiles, [1 + r * c for r, c in grids])
  for i, n in enumerate(ours.num_tiles):  # tiles beyond an image's count are the batch's zero padding
    assert not ours.pixel_values[i, n:].any() and ours.pixel_values[i, :n].any(axis=(1, 2, 3)).all()
  assert ours.tiled.all() and ours.batch_num_images == (1,) * len(images)


def test_next_pixels_at_checkpoint_size(tmp_path):
  from transformers import LlavaNextImageProcessorPil
  hf = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
  proc = llava_next.NextProcessor(image=common.load_image_settings(_saved(hf, str(tmp_path))), patch_size=14)
  images = _images(5, [(480, 640), (333, 500)])
  _assert_pixels(proc(images).pixel_values, np.stack(hf(images)["pixel_values"]))


NEXT_TABLE = [(480, 640), (640, 480), (300, 1200), (333, 500), (1000, 1000)]  # FAMILIES.md


@pytest.mark.parametrize("strategy,extra", [("default", 1), ("full", 1), ("default", 0)])
def test_next_token_counts_match_processor_expansion(tmp_path, strategy, extra):
  from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor
  image = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
  hf = LlavaNextProcessor(image_processor=image, tokenizer=_tokenizer(str(tmp_path / "tok")), patch_size=14,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=extra)
  proc = llava_next.NextProcessor.from_pretrained(_saved(hf, str(tmp_path / "ckpt")))
  # (55, 176), (88, 99): the unpad's round(., 7) matters; (300, 300): the list-order tie
  sizes = NEXT_TABLE + [(300, 300), (336, 336), (200, 1500), (1500, 200), (700, 333), (17, 23), (55, 176), (88, 99)]
  for h, w in sizes:  # the processor's own expansion of one `<image>`, pixels and all
    ids = np.asarray(hf(text="w5 <image> w6", images=np.zeros((h, w, 3), np.uint8))["input_ids"])
    assert proc.image_tokens((h, w)) == int((ids == hf_tiny.IMAGE_ID).sum()), (h, w)


# ---------------------------------------------------------------------------------------------------- OneVision


def _ov_image_processor(**kw):
  from transformers import LlavaOnevisionImageProcessorPil
  return LlavaOnevisionImageProcessorPil(**kw)


@pytest.mark.parametrize("mean", [(0.5, 0.5, 0.5), CLIP_MEAN])
def test_onevision_pixels_match_transformers(tmp_path, mean):
  hf = _ov_image_processor(size={"height": 32, "width": 32}, image_grid_pinpoints=SMALL_OV_PINS,
                           image_mean=list(mean), image_std=[0.5, 0.5, 0.5])
  proc = onevision.OnevisionProcessor(image=common.load_image_settings(_saved(hf, str(tmp_path))),
                                      num_image_tokens=16)
  images = _images(6)
  # flat: every image tiled; nested: [3 images] (odd and even padding on both sides), [1 image]
  single, multi = images[:3], [images[3:], images[:1]]
  for batch in (single, multi):
    ours, theirs = proc(batch), hf(batch)
    _assert_pixels(ours.pixel_values, np.stack(theirs["pixel_values"]))
    np.testing.assert_array_equal(ours.image_sizes, np.asarray(theirs["image_sizes"]))
    assert ours.batch_num_images == tuple(theirs["batch_num_images"])
  assert proc(multi).tiled.tolist() == [False, False, False, True]
  assert proc(multi).num_tiles.tolist()[:3] == [1] * 3 and proc(multi).grid_shapes.tolist()[:3] == [[0, 0]] * 3
  assert onevision.mean_colour(proc.image) == tuple(int(m * 255) for m in mean)


def test_onevision_pixels_at_checkpoint_size(tmp_path):
  hf = _ov_image_processor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
  proc = onevision.OnevisionProcessor(image=common.load_image_settings(_saved(hf, str(tmp_path))),
                                      num_image_tokens=729)
  images = _images(7, [(480, 640), (300, 500)])
  _assert_pixels(proc([images]).pixel_values, np.stack(hf([images])["pixel_values"]))  # multi-image, 384^2
  _assert_pixels(proc(images[:1]).pixel_values, np.stack(hf(images[:1])["pixel_values"]))  # tiled


def _hf_onevision_processor(image_processor, strategy):
  """`LlavaOnevisionProcessor` without its constructor, which needs a video processor (torchvision); its
  token methods read only these attributes."""
  from transformers import LlavaOnevisionProcessor
  hf = object.__new__(LlavaOnevisionProcessor)
  hf.image_processor, hf.num_image_tokens = image_processor, 729
  hf.vision_feature_select_strategy, hf.vision_aspect_ratio = strategy, "anyres_max_9"
  hf.image_token, hf.video_token = "<image>", "<video>"
  return hf


def _write_onevision_checkpoint(directory, image_processor, strategy):
  """processor_config.json as transformers 5 writes it, the video processor entry written by hand."""
  os.makedirs(directory, exist_ok=True)
  video_settings = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 384, "width": 384},
                    "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True}
  with open(os.path.join(directory, "processor_config.json"), "w") as f:
    json.dump({"image_processor": image_processor.to_dict(), "video_processor": video_settings,
               "num_image_tokens": 729, "vision_feature_select_strategy": strategy,
               "vision_aspect_ratio": "anyres_max_9", "processor_class": "LlavaOnevisionProcessor"}, f)
  return directory


OV_TABLE = [(1080, 1920), (2000, 3000), (480, 640)]  # FAMILIES.md


@pytest.mark.parametrize("strategy", ["full", "default"])
def test_onevision_token_counts_match_processor_expansion(tmp_path, strategy):
  image = _ov_image_processor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
  hf = _hf_onevision_processor(image, strategy)
  proc = onevision.OnevisionProcessor.from_pretrained(_write_onevision_checkpoint(str(tmp_path), image, strategy))
  assert proc.video_settings.size == Size(height=384, width=384)
  tile = np.asarray(image(np.zeros((40, 50, 3), np.uint8))["pixel_values"])[:, :1]  # [1, 1, 3, 384, 384]
  # (507, 1945), (544, 1945): 1 < ratio <= 1.1, no downscale; (1200, 1300), (2304, 2304): downscaled
  sizes = OV_TABLE + [(384, 384), (300, 300), (5000, 400), (400, 5000), (1200, 1300), (2304, 2304), (17, 9),
                      (507, 1945), (544, 1945)]
  inputs = {"image_sizes": [list(s) for s in sizes], "pixel_values": tile, "batch_num_images": [1] * len(sizes)}
  for i, size in enumerate(sizes):
    assert proc.image_tokens(size) == len(hf.replace_image_token(inputs, i)) // len("<image>"), size
  multi = {"image_sizes": [[300, 500], [500, 300]], "pixel_values": tile, "batch_num_images": [2]}
  assert proc.multi_image_tokens() == len(hf.replace_image_token(multi, 1)) // len("<image>")
  for frames in (1, 7, 8, 32):
    videos = {"pixel_values_videos": [np.zeros((frames, 3, 2, 2))]}
    assert proc.video_tokens(frames) == len(hf.replace_video_token(videos, 0)) // len("<video>")


def test_onevision_anyres_max_shape():
  """The downscale target of FAMILIES.md's 1080x1920 example, through the public helpers."""
  rows, cols = llava_next.unpadded_shape((1080, 1920), (27 * 3, 27 * 5))
  assert (rows, cols) == (75, 135)
  assert onevision.anyres_max_shape(rows, cols, 27, 9) == (int(75 // math.sqrt(75 * 135 / (9 * 27 ** 2))),
                                                            int(135 // math.sqrt(75 * 135 / (9 * 27 ** 2))))


# ---------------------------------------------------------------------------------------------------- video


def _torch_video_reference(frames, size, mean, std, rescale_factor=1 / 255):
  """LlavaOnevisionVideoProcessor's documented steps, plainly in torch (its torchvision backend cannot be
  imported here): resize with the kernel torchvision's `resize` calls for uint8 bicubic on CPU
  (`interpolate(..., antialias=True)` on the uint8 tensor), then the fused rescale-normalise
  `(x - mean / rescale_factor) / (std / rescale_factor)` in float32."""
  import torch
  x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
  if tuple(x.shape[-2:]) != size:
    x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
  m = torch.tensor(mean) * (1.0 / rescale_factor)
  s = torch.tensor(std) * (1.0 / rescale_factor)
  out = (x.to(torch.float32) - m[:, None, None]) / s[:, None, None]
  return out.permute(0, 2, 3, 1).numpy(), x.permute(0, 2, 3, 1).numpy()


def _video_settings(side):
  return common.ImageSettings.defaults("LlavaOnevisionVideoProcessor", size=Size(height=side, width=side),
                                       image_mean=(0.5,) * 3, image_std=(0.5,) * 3)


def test_video_normalisation_matches_reference():
  """Frames already at the processor's size: the fused normalisation, exactly (7 frames, an odd count)."""
  frames = np.stack(_images(8, [(32, 32)] * 7))
  expect, _ = _torch_video_reference(frames, (32, 32), (0.5,) * 3, (0.5,) * 3)
  ours = onevision.process_video(frames, _video_settings(32))
  assert ours.shape == (7, 32, 32, 3)
  np.testing.assert_allclose(ours, expect, rtol=0, atol=PIXEL_TOL)
  np.testing.assert_array_equal(onevision.process_video(list(frames), _video_settings(32)), ours)


def test_video_resize_close_to_torchvision_kernel():
  """The frame resize is PIL's bicubic; torchvision's uint8 bicubic kernel (what transformers' video processor
  runs) lands within 2 grey levels of it on downscaled frames, and equal almost everywhere."""
  from PIL import Image
  frames = np.stack(_images(9, [(96, 128)] * 3))
  _, theirs = _torch_video_reference(frames, (32, 32), (0.5,) * 3, (0.5,) * 3)
  ours = np.stack([np.asarray(Image.fromarray(f).resize((32, 32), Image.BICUBIC)) for f in frames])
  diff = np.abs(ours.astype(int) - theirs.astype(int))
  assert diff.max() <= 2 and (diff > 0).mean() < 0.05, (diff.max(), (diff > 0).mean())
  np.testing.assert_array_equal(onevision.process_video(frames, _video_settings(32)),
                                (ours.astype(np.float32) - 127.5) / 127.5)


@pytest.mark.parametrize("total,num_frames,fps,video_fps", [
    (20, 5, None, 10.0), (7, 7, None, 25.0), (100, 32, None, 30.0), (13, 4, None, None),
    (20, None, 2, 10.0), (31, None, 1.5, 7.5), (5, None, 0.01, 30.0), (9, None, None, 30.0)])
def test_sample_indices_match_transformers(total, num_frames, fps, video_fps):
  from transformers.video_utils import VideoMetadata, default_sample_indices_fn
  meta = VideoMetadata(total_num_frames=total, fps=video_fps)
  expect = default_sample_indices_fn(meta, num_frames=num_frames, fps=fps)
  got = video.sample_indices(total, num_frames=num_frames, fps=fps, video_fps=video_fps)
  np.testing.assert_array_equal(got, expect)
  frames = np.stack(_images(10, [(6, 5)] * total))
  np.testing.assert_array_equal(video.sample_frames(iter(list(frames)), num_frames=num_frames, fps=fps,
                                                    video_fps=video_fps), frames[expect])


def _write_video(path, frames, codec, rate=10):
  import av
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=rate)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    if codec == "libx264":
      stream.options = {"qp": "0"}
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _seeded_frames(n, h=48, w=64, seed=11):
  """Frames whose flat colour encodes their index, so a decoded frame tells which it was."""
  colours = np.random.default_rng(seed).permutation(np.arange(n) * 12 + 8)
  return np.stack([np.full((h, w, 3), c, np.uint8) for c in colours]), colours


@pytest.mark.parametrize("name,codec", [("clip.mp4", "libx264"), ("clip.webm", "libvpx-vp9")])
def test_read_video_matches_transformers_pyav_reader(tmp_path, name, codec):
  from transformers.video_utils import default_sample_indices_fn, read_video_pyav
  frames, colours = _seeded_frames(20)
  path = str(tmp_path / name)
  _write_video(path, frames, codec)
  info = video.video_info(path)
  assert (info.total_frames, info.fps, info.height, info.width) == (20, 10.0, 48, 64)
  for kw in ({"num_frames": 5}, {"fps": 2.0}, {}):
    got = video.read_video(path, **kw)
    indices = video.sample_indices(20, video_fps=10.0, **kw)
    decoded = [np.asarray(f) for f in _decode_all(path)]
    np.testing.assert_array_equal(got, np.stack(decoded)[indices])  # the sampled frames, exactly as decoded
    found = [colours[np.abs(colours.astype(int) - int(f.mean())).argmin()] for f in got]
    assert found == colours[indices].tolist()  # and they are the seeded frames of those indices
    if codec == "libx264":  # mp4 records the frame count, which transformers' reader relies on
      theirs, meta = read_video_pyav(path, partial(default_sample_indices_fn, **kw))
      np.testing.assert_array_equal(got, theirs)
      np.testing.assert_array_equal(meta.frames_indices, indices)
  np.testing.assert_array_equal(video.read_video(path, fps=2.0), video.read_video(path, num_frames=4))


def _decode_all(path):
  import av
  with av.open(path) as container:
    return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad,match", [
    (np.zeros((8, 9, 3), np.float32), r"images must be uint8\[H, W, 3\], got dtype float32 .*np.round"),
    (np.zeros((8, 9), np.uint8), r"got shape \(8, 9\)"),
    (np.zeros((8, 9, 4), np.uint8), r"got shape \(8, 9, 4\)"),
    (np.zeros((0, 9, 3), np.uint8), r"got shape \(0, 9, 3\)"),
    ([], r"images is empty"),
    ([np.zeros((8, 9, 3), np.uint8), np.zeros((3, 8, 9), np.uint8)], r"images\[1\] .*got shape \(3, 8, 9\)"),
    ([np.zeros((8, 9, 3), np.uint8), np.zeros((8, 9, 3), np.int64)], r"images\[1\] .*dtype int64"),
])
def test_bad_images_raise_naming_the_values(bad, match):
  settings = clip.clip_settings(8)
  next_proc = llava_next.NextProcessor(image=common.ImageSettings.defaults(
      "LlavaNextImageProcessor", size=Size(shortest_edge=8), crop_size=Size(height=8, width=8),
      image_grid_pinpoints=((8, 16), (16, 8))), patch_size=4)
  ov_proc = onevision.OnevisionProcessor(image=common.ImageSettings.defaults(
      "LlavaOnevisionImageProcessor", size=Size(height=8, width=8), image_grid_pinpoints=((8, 8), (8, 16))),
      num_image_tokens=4)
  for run in (partial(clip.process, settings=settings), next_proc, ov_proc, partial(preprocess, config=TOWER)):
    with pytest.raises(ProcessorError, match=match):
      run(bad)


def test_bad_frames_raise_naming_the_values():
  a, b = np.zeros((8, 9, 3), np.uint8), np.zeros((6, 9, 3), np.uint8)
  settings = _video_settings(8)
  with pytest.raises(ProcessorError, match=r"video frame 2 is 6x9 but frame 0 is 8x9"):
    onevision.process_video([a, a, b], settings)
  with pytest.raises(ProcessorError, match=r"video has no frames \(shape \(0, 8, 9, 3\)\)"):
    onevision.process_video(np.zeros((0, 8, 9, 3), np.uint8), settings)
  with pytest.raises(ProcessorError, match=r"video has no frames"):
    video.sample_frames(iter([]), num_frames=2)
  with pytest.raises(ProcessorError, match=r"video frame 1 must be uint8.*dtype float64"):
    video.sample_frames([a, a / 255.0])
  with pytest.raises(ProcessorError, match=r"asked for 9 frames .* with 8 frames"):
    video.sample_indices(8, num_frames=9)
  with pytest.raises(ProcessorError, match=r"num_frames=2 and fps=1.0 are exclusive"):
    video.sample_indices(8, num_frames=2, fps=1.0)
  with pytest.raises(ProcessorError, match=r"fps=2 needs the video's frame rate, got video_fps=None"):
    video.sample_indices(8, fps=2)


def test_unreadable_and_empty_video_files_raise_naming_the_path(tmp_path):
  import av
  junk = tmp_path / "junk.mp4"
  junk.write_bytes(b"not a video at all" * 10)
  with pytest.raises(ProcessorError, match=re.escape(f"cannot read video '{junk}'")):
    video.read_video(str(junk))
  with pytest.raises(ProcessorError, match=r"video file '.*missing.webm' does not exist"):
    video.read_video(str(tmp_path / "missing.webm"))
  empty = str(tmp_path / "empty.avi")  # a video stream that holds no frame
  with av.open(empty, "w") as container:
    stream = container.add_stream("mpeg4", rate=10)
    stream.width = stream.height = 16
    stream.pix_fmt = "yuv420p"
    container.start_encoding()
  with pytest.raises(ProcessorError, match=re.escape(f"video '{empty}' has no frames")):
    video.read_video(empty, num_frames=4)


def test_bad_settings_raise_naming_the_values():
  with pytest.raises(ProcessorError, match=r"entry \[40, 64\] is not a multiple of the tile side 32"):
    llava_next.NextProcessor(image=common.ImageSettings.defaults(
        "LlavaNextImageProcessor", size=Size(shortest_edge=32), crop_size=Size(height=32, width=32),
        image_grid_pinpoints=((32, 64), (40, 64))), patch_size=8)
  ov = common.ImageSettings.defaults("LlavaOnevisionImageProcessor")
  with pytest.raises(ProcessorError, match=r"vision_aspect_ratio 'anyres' is not 'anyres_max_<N>'"):
    onevision.OnevisionProcessor(image=ov, num_image_tokens=729, vision_aspect_ratio="anyres")
  with pytest.raises(ProcessorError, match=r"num_image_tokens 730 is not a square"):
    onevision.OnevisionProcessor(image=ov, num_image_tokens=730)
  with pytest.raises(ProcessorError, match=r"vision_feature_select_strategy 'cls' is not one of"):
    onevision.OnevisionProcessor(image=ov, num_image_tokens=729, vision_feature_select_strategy="cls")
  known = r"processor type 'Qwen2VLImageProcessorPil' is not supported; known: \['CLIPImageProcessor'"
  with pytest.raises(ProcessorError, match=known):
    common.ImageSettings.from_dict({"image_processor_type": "Qwen2VLImageProcessorPil"})
  with pytest.raises(ProcessorError, match=r"size \{'longest_edge': 5\} has keys \['longest_edge'\]"):
    common.Size.parse({"longest_edge": 5}, default_to_square=False)
  with pytest.raises(ProcessorError, match=r"image_mean must have 3 values \(RGB\), got \[0.5, 0.5\]"):
    common.ImageSettings.from_dict({"image_processor_type": "CLIPImageProcessor", "image_mean": [0.5, 0.5]})
  with pytest.raises(ProcessorError, match=r"needs patch_size"):
    llava_next.NextProcessor(image=common.ImageSettings.defaults(
        "LlavaNextImageProcessor", size=Size(shortest_edge=336), crop_size=Size(height=336, width=336))
    ).image_tokens((9, 9))
  with pytest.raises(ProcessorError, match=r"'/nonexistent/ckpt' does not exist"):
    common.load_image_settings("/nonexistent/ckpt")
