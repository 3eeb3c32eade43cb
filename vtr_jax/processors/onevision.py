"""LLaVA-OneVision's image processor (`LlavaOnevisionImageProcessorPil`), its video steps, and its token counts.

Images (transformers 5.24, `image_processing_pil_llava_onevision.py`):
- a sample with one image is tiled exactly as LLaVA-NeXT tiles (`llava_next.anyres_tiles`; the code is the same);
- a sample with several images (a list of lists in `__call__`) is not tiled: each is padded to a square with
  the mean colour `int(255 * image_mean)` (127 for mean 0.5), centred (an odd remainder at the bottom /
  right), then resized to `size` (384 x 384) and normalised: one crop, no base tile.

Videos (`LlavaOnevisionVideoProcessor`): every frame is resized to `size` (384 x 384, aspect ignored), then
rescaled and normalised in the fused form transformers' torchvision backend uses,
`(x - 255 * mean) / (255 * std)` in float32 (a few float32 ulps from the image path's order). transformers
resizes with torchvision; here the resize is PIL's bicubic, whose result can differ from torchvision's uint8
bicubic kernel by a few grey levels (see tests/test_processors.py). The processor samples no frames by default;
`video.read_video` / `video.sample_frames` do.

Token counts (`LlavaOnevisionProcessor`):
- single image: base `num_image_tokens` (729) + the unpadded grid, shrunk by `anyres_max_N` when
  `sqrt(rows * cols / (N * p^2)) > 1.1` to `int(rows // ratio) x int(cols // ratio)`, one newline per row;
- multi-image: `num_image_tokens + 1` per image (one newline);
- video: `frames * ceil(p / 2)^2 + 1` (2x2 bilinear pooling, one newline after the last frame);
with p = sqrt(num_image_tokens), and one token less for images with the `default` feature strategy.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

from vtr_jax.processors.common import (ImageSettings, ProcessorError, as_image_list, center_crop,
                                       read_processor_files, resize, transform)
from vtr_jax.processors.llava_next import (STRATEGIES, AnyresImages, anyres_tiles, batch, check_pinpoints,
                                          grid_shape, images_per_sample, select_best_resolution, tile_output_hw,
                                          unpadded_shape)
from vtr_jax.processors.video import check_frames


def pad_to_square(image: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
  """uint8[h, w, 3] -> uint8[m, m, 3], m = max(h, w): the image centred on `color` (`pad_to_square`)."""
  h, w = image.shape[:2]
  if h == w:
    return image
  side = max(h, w)
  out = np.empty((side, side, 3), image.dtype)
  out[:] = np.asarray(color, image.dtype)
  top, left = (side - h) // 2 if w > h else 0, (side - w) // 2 if h > w else 0
  out[top:top + h, left:left + w] = image
  return out


def mean_colour(settings: ImageSettings) -> tuple[int, int, int]:
  """The multi-image padding colour: `int(255 * m)` per channel of `image_mean` (127 for 0.5)."""
  return tuple(int(m * 255) for m in settings.image_mean)


def square_crop(image: np.ndarray, settings: ImageSettings) -> np.ndarray:
  """The multi-image path: uint8[h, w, 3] -> float32[1, S, S, 3], mean-colour square, resized, normalised."""
  return transform(pad_to_square(image, mean_colour(settings)), settings)[None]


def anyres_max_shape(rows: int, cols: int, side: int, max_tiles: int) -> tuple[int, int]:
  """(rows, cols) of an unpadded feature grid after `anyres_max_<max_tiles>` (unchanged when ratio <= 1.1).

  `side` is the feature side of one tile (27 for SigLIP at 384 / 14). The model resizes the grid to this
  shape with bilinear interpolation (`align_corners=False`) before adding the newline column.
  """
  ratio = math.sqrt(rows * cols / (max_tiles * side ** 2))
  if ratio > 1.1:
    return int(rows // ratio), int(cols // ratio)
  return rows, cols


def max_tiles(vision_aspect_ratio: str) -> int:
  """N of `anyres_max_N`, or ProcessorError naming the value."""
  match = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio)
  if not match:
    raise ProcessorError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not 'anyres_max_<N>'")
  return int(match.group(1))


def process_video(frames: Any, settings: ImageSettings) -> np.ndarray:
  """One video's frames -> float32[T, h, w, 3] (the video processor's resize, crop, fused rescale-normalise).

  Args:
    frames: uint8[T, H, W, 3] or a list of uint8[H, W, 3] frames of one size (`video.check_frames`).
    settings: the video processor's settings (`LlavaOnevisionVideoProcessor`).
  """
  frames = check_frames(frames)
  out = []
  for frame in frames:
    if settings.do_resize:
      frame = resize(frame, *settings.size.output_size(*frame.shape[:2]), settings.resample)
    if settings.do_center_crop:
      frame = center_crop(frame, settings.crop_size.height, settings.crop_size.width)
    out.append(frame)
  x = np.stack(out).astype(np.float32)  # [T, h, w, 3]
  mean, std = np.asarray(settings.image_mean, np.float32), np.asarray(settings.image_std, np.float32)
  if settings.do_normalize:
    if settings.do_rescale:
      inverse = np.float32(1.0 / settings.rescale_factor)
      mean, std = mean * inverse, std * inverse
    return (x - mean) / std
  return x * np.float32(settings.rescale_factor) if settings.do_rescale else x


@dataclasses.dataclass(frozen=True)
class OnevisionProcessor:
  """`LlavaOnevisionProcessor`'s visual side: images (`__call__`), videos (`video`) and their token counts.

  Attributes:
    image: the image processor's settings (`LlavaOnevisionImageProcessor`).
    video_settings: the video processor's settings (`LlavaOnevisionVideoProcessor`), None when absent.
    num_image_tokens: tokens of one crop (729 for SigLIP-so400m at 384 / 14).
    vision_feature_select_strategy: `full` (OneVision) or `default` (one token less per image).
    vision_aspect_ratio: `anyres_max_<N>`, the downscale rule of single images.
  """
  image: ImageSettings
  video_settings: ImageSettings | None = None
  num_image_tokens: int | None = None
  vision_feature_select_strategy: str = "full"
  vision_aspect_ratio: str = "anyres_max_9"

  def __post_init__(self):
    if self.vision_feature_select_strategy not in STRATEGIES:
      raise ProcessorError(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} is not one of "
                           f"{STRATEGIES}")
    max_tiles(self.vision_aspect_ratio)
    check_pinpoints(self.image)
    if self.num_image_tokens is not None and math.isqrt(self.num_image_tokens) ** 2 != self.num_image_tokens:
      raise ProcessorError(f"num_image_tokens {self.num_image_tokens} is not a square (p x p patches)")

  @classmethod
  def from_pretrained(cls, directory: str, **overrides) -> "OnevisionProcessor":
    """Reads processor_config.json (or the legacy files; see `common.read_processor_files`)."""
    image, video, own = read_processor_files(directory)
    if image is None:
      raise ProcessorError(f"{directory!r} has no image processor settings")
    kwargs = {k: own[k] for k in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")
              if own.get(k) is not None}
    return cls(image=ImageSettings.from_dict(image, "LlavaOnevisionImageProcessor"),
               video_settings=None if video is None else ImageSettings.from_dict(video, "LlavaOnevisionVideoProcessor"),
               **{**kwargs, **overrides})

  def __call__(self, images: Any) -> AnyresImages:
    """Images -> `AnyresImages`. A list of lists is one list per sample: a sample of several images takes the
    multi-image path (untiled); one image, an array, or a flat list tiles every image (transformers' rule)."""
    counts, flat = images_per_sample(images), as_image_list(images)
    tiled = [n == 1 for n in counts for _ in range(n)]
    pixels = [anyres_tiles(img, self.image) if t else square_crop(img, self.image) for img, t in zip(flat, tiled)]
    grids = [grid_shape(img.shape[:2], self.image) if t else (0, 0) for img, t in zip(flat, tiled)]
    return batch(pixels, [img.shape[:2] for img in flat], grids, tiled, counts)

  def video(self, frames: Any) -> np.ndarray:
    """One video's frames (uint8[T, H, W, 3] or a list) -> float32[T, S, S, 3] (`process_video`)."""
    if self.video_settings is None:
      raise ProcessorError("this processor has no video processor settings (processor_config.json "
                           "'video_processor' or video_preprocessor_config.json)")
    return process_video(frames, self.video_settings)

  def _side(self) -> int:
    if self.num_image_tokens is None:
      raise ProcessorError("token counts need num_image_tokens (processor_config.json), got None")
    return math.isqrt(self.num_image_tokens)

  def image_tokens(self, image_hw: tuple[int, int]) -> int:
    """`<image>` tokens of an image of `image_hw` (h, w) alone in its sample (tiled, anyres_max rule)."""
    side = self._side()
    tile_h, tile_w = tile_output_hw(self.image)
    height, width = select_best_resolution(image_hw, self.image.image_grid_pinpoints)
    rows, cols = unpadded_shape(image_hw, (side * (height // tile_h), side * (width // tile_w)))
    rows, cols = anyres_max_shape(rows, cols, side, max_tiles(self.vision_aspect_ratio))
    return rows * (cols + 1) + self.num_image_tokens - (self.vision_feature_select_strategy == "default")

  def multi_image_tokens(self) -> int:
    """`<image>` tokens of each image in a sample of several images: one crop and one newline."""
    self._side()
    return self.num_image_tokens + 1 - (self.vision_feature_select_strategy == "default")

  def video_tokens(self, num_frames: int) -> int:
    """`<video>` tokens of a video of `num_frames` frames: ceil(p / 2)^2 per frame and one newline."""
    if num_frames < 1:
      raise ProcessorError(f"a video needs at least one frame, got num_frames={num_frames}")
    return num_frames * math.ceil(self._side() / 2) ** 2 + 1
