"""Qwen2-VL / Qwen2.5-VL pixels: raw uint8 images and video frames -> `pixel_values` and `grid_thw`.

Host-side NumPy, reproducing transformers 5.24:
- images as `Qwen2VLImageProcessorPil`: smart resize, Pillow bicubic, rescale
  (float64, then float32), normalise with the CLIP mean/std (float32);
- videos as `Qwen2VLVideoProcessor`: smart resize with the video pixel limits,
  the antialiased bicubic resize torchvision runs on uint8 tensors on CPU
  (torch's native kernel, fixed-point weights; `resize_frames`), the fused
  rescale-and-normalise `(x - 255 mean) / (255 std)` in float32, and the frame
  count padded to a multiple of the temporal patch by repeating the last frame.
Both patchify in the order (t, h/2, w/2, 2, 2): the four patches of a merge
unit are consecutive rows, each row (C, T, 14, 14) = 1176 values, and an image
is one frame repeated over T. `grid_thw` is (t, h/14, w/14) and a visual
input takes t*h*w/4 LLM tokens.

Stricter than transformers (it would silently upscale or accept these): an
image or frame side below one merge unit (28 px; transformers 4.x and
qwen-vl-utils refuse it too), min/max pixels that are not positive and
ordered, a video with frames of different sizes or without frames.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import PIL.Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class QwenPixelConfig:
  """The processors' settings (transformers' defaults; a checkpoint's preprocessor_config.json may change them).

  Attributes:
    min_pixels, max_pixels: image area limits of `smart_resize`
      (`size.shortest_edge`, `size.longest_edge`).
    video_min_pixels, video_max_pixels: the same for video frames.
  """
  patch_size: int = 14
  merge_size: int = 2
  temporal_patch_size: int = 2
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  video_min_pixels: int = 128 * 28 * 28
  video_max_pixels: int = 768 * 28 * 28
  image_mean: tuple[float, ...] = CLIP_MEAN
  image_std: tuple[float, ...] = CLIP_STD

  def __post_init__(self):
    for kind, lo, hi in (("image", self.min_pixels, self.max_pixels),
                         ("video", self.video_min_pixels, self.video_max_pixels)):
      if not 0 < lo <= hi:
        raise ValueError(f"{kind} min_pixels {lo} and max_pixels {hi} must satisfy 0 < min_pixels <= max_pixels")

  @property
  def factor(self) -> int:
    """Side of one merge unit in pixels (28)."""
    return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """(height, width) -> the processor's target size: multiples of `factor`, area within [min, max] pixels.

  Sides round to the nearest multiple of `factor`; an area above `max_pixels`
  scales both down by sqrt(hw / max) (floor, at least `factor`), below
  `min_pixels` up by sqrt(min / hw) (ceil). Raises ValueError for a side
  below `factor`, an aspect ratio above 200, or min/max pixels that are not
  0 < min <= max.
  """
  if min(height, width) < factor:
    raise ValueError(f"image of {height}x{width} pixels is smaller than one {factor}x{factor} merge unit "
                     f"(both sides must be at least {factor})")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"image of {height}x{width} pixels has aspect ratio "
                     f"{max(height, width) / min(height, width):.1f}; it must be at most 200")
  if not 0 < min_pixels <= max_pixels:
    raise ValueError(f"min_pixels {min_pixels} and max_pixels {max_pixels} must satisfy 0 < min <= max")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def patchify(frames: np.ndarray, config: QwenPixelConfig) -> tuple[np.ndarray, np.ndarray]:
  """float32[T, C, H, W] (resized, normalised) -> (float32[t*h*w, C*Tp*p*p] rows, int64[3] grid (t, h, w)).

  T is padded to a multiple of the temporal patch Tp by repeating the last
  frame (an image, T = 1, is duplicated).
  """
  p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
  if pad := -frames.shape[0] % tp:
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
  n, ch, height, width = frames.shape
  gt, gh, gw = n // tp, height // p, width // p
  x = frames.reshape(gt, tp, ch, gh // m, m, p, gw // m, m, p)
  x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # -> [gt, gh/m, gw/m, m, m, C, Tp, p, p]
  rows = x.reshape(gt * gh * gw, ch * tp * p * p)  # [t, h/m, w/m, m, m, C, Tp, p, p] -> [t*h*w, 1176]
  return np.ascontiguousarray(rows, np.float32), np.array([gt, gh, gw], np.int64)


def _check_uint8_rgb(array, what: str) -> np.ndarray:
  array = np.asarray(array)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"{what} must be uint8[H, W, 3] (RGB, channels last), got {array.dtype}{list(array.shape)}")
  return array


def process_images(images: Sequence[np.ndarray], config: QwenPixelConfig = QwenPixelConfig()) -> dict:
  """uint8[H, W, 3] images (any sizes) -> {'pixel_values': float32[sum t*h*w, 1176],
  'image_grid_thw': int64[n, 3]}, as `Qwen2VLImageProcessorPil`."""
  if not len(images):
    raise ValueError("process_images needs at least one image")
  mean, std = np.asarray(config.image_mean, np.float32), np.asarray(config.image_std, np.float32)
  rows, grids = [], []
  for i, image in enumerate(images):
    image = _check_uint8_rgb(image, f"image {i}")
    h, w = smart_resize(image.shape[0], image.shape[1], config.factor, config.min_pixels, config.max_pixels)
    resized = np.asarray(PIL.Image.fromarray(image).resize((w, h), resample=PIL.Image.BICUBIC))
    x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)  # transformers' rescale
    x = (x - mean) / std  # [h, w, C]
    r, g = patchify(x.transpose(2, 0, 1)[None], config)  # [h, w, C] -> [1, C, h, w]
    rows.append(r)
    grids.append(g)
  return {"pixel_values": np.concatenate(rows), "image_grid_thw": np.stack(grids)}


def process_video(frames, config: QwenPixelConfig = QwenPixelConfig(), fps: float = 24.0) -> dict:
  """uint8[T, H, W, 3] frames of one video -> {'pixel_values_videos': float32[t*h*w, 1176],
  'video_grid_thw': int64[1, 3], 'second_per_grid_ts': float[1]}, as `Qwen2VLVideoProcessor` with
  `do_sample_frames=False` (the frames given are the frames used).

  fps: the frames' rate (transformers assumes 24 without metadata);
  second_per_grid_ts = temporal_patch_size / fps.
  """
  if isinstance(frames, (list, tuple)):
    sizes = sorted({tuple(np.shape(f)) for f in frames})
    if len(sizes) > 1:
      raise ValueError(f"video frames have different shapes {sizes}; every frame must have the same size")
    frames = np.stack([np.asarray(f) for f in frames]) if frames else np.zeros((0, 0, 0, 3), np.uint8)
  frames = np.asarray(frames)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not frames.shape[0]:
    raise ValueError(f"video must be uint8[T, H, W, 3] with T >= 1 frames, got {frames.dtype}{list(frames.shape)}")
  h, w = smart_resize(frames.shape[1], frames.shape[2], config.factor, config.video_min_pixels,
                      config.video_max_pixels)
  resized = resize_frames(frames, h, w)
  mean255 = np.asarray(config.image_mean, np.float32) * np.float32(255)
  std255 = np.asarray(config.image_std, np.float32) * np.float32(255)
  x = (resized.astype(np.float32) - mean255) / std255  # transformers' fused rescale + normalise, [T, h, w, C]
  rows, grid = patchify(x.transpose(0, 3, 1, 2), config)  # [T, h, w, C] -> [T, C, h, w]
  return {"pixel_values_videos": rows, "video_grid_thw": grid[None],
          "second_per_grid_ts": np.array([config.temporal_patch_size / fps])}


def num_tokens(grid_thw, merge_size: int = 2) -> np.ndarray:
  """int[n, 3] grids -> int64[n] LLM tokens per visual input (t*h*w / merge^2)."""
  return np.asarray(grid_thw, np.int64).prod(axis=-1) // merge_size ** 2


# ---- torch's antialiased bicubic on uint8 (what torchvision's resize runs for uint8 on CPU) ----------
def _cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic kernel with a = -0.5 (torch's antialias filter, as Pillow)."""
  a = -0.5
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _fixed_point_weights(in_size: int, out_size: int) -> tuple[np.ndarray, int]:
  """int64[out, in] weights in fixed point and their precision (bits), as torch's
  `_compute_index_ranges_int16_weights` (double weights normalised per output, int16 rounding)."""
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  invscale = 1.0 / scale if scale >= 1.0 else 1.0
  max_taps = int(math.ceil(support)) * 2 + 1
  dense = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    n = min(max(min(int(center + support + 0.5), in_size) - lo, 0), max_taps)
    w = _cubic((np.arange(n) + lo - center + 0.5) * invscale)
    total = w.sum()
    dense[i, lo:lo + n] = w / total if total != 0.0 else w
  wt_max = dense.max()
  precision = 0
  while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
    precision += 1
  scaled = dense * (1 << precision)
  return np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64), precision


def _resample_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
  weights, precision = _fixed_point_weights(x.shape[axis], out_size)
  moved = np.moveaxis(x.astype(np.int64), axis, -1)
  acc = moved @ weights.T + (1 << (precision - 1))  # exact integer sums
  return np.moveaxis(np.clip(acc >> precision, 0, 255).astype(np.uint8), -1, axis)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8[T, H, W, C] -> uint8[T, height, width, C]: antialiased bicubic, horizontal pass then vertical,
  each rounded to uint8 (torch's `interpolate(uint8, mode='bicubic', antialias=True)`)."""
  if frames.shape[2] != width:
    frames = _resample_axis(frames, width, axis=2)
  if frames.shape[1] != height:
    frames = _resample_axis(frames, height, axis=1)
  return frames
