"""LLaVA-NeXT's any-resolution image processor (`LlavaNextImageProcessorPil`) and its `<image>` token count.

Per image of size (h, w) (transformers 5.24, `image_processing_pil_llava_next.py`):
1. `select_best_resolution`: over `image_grid_pinpoints` read as (H, W), the canvas that keeps the most
   pixels (`min(int(w*s) * int(h*s), w*h)`, s = min(W/w, H/h)), then the least waste; a full tie keeps
   the earlier pin.
2. Resize to `patch_output_size` (the side that fits exactly, the other `min(ceil(.), .)`), bicubic PIL.
3. Pad to (H, W) with 0 in uint8 pixel space, before normalisation; `divmod` puts an odd pixel right / bottom.
4. Tiles of the tile side t (`crop_size`'s height, else `size`'s) in row-major order, after a base image
   squashed to `size` ignoring the aspect: `[base] + tiles`, each then resized / cropped / rescaled /
   normalised as a plain image (`common.transform`).
5. A batch pads the tile axis with zero tiles to its longest image (`do_pad`).

The model recomputes each image's tile grid from `image_sizes`; `AnyresImages` carries it ready-made.
The token count mirrors `LlavaNextProcessor._get_number_of_features`: base `p*p + num_additional_image_tokens`
(p = tile side / patch size), plus `rows * (cols + 1)` of the unpadded feature grid (one newline per row),
minus 1 with the `default` feature strategy (the model drops CLS).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from vtr_jax.processors.common import (ImageSettings, ProcessorError, as_image_list, read_processor_files,
                                       resize, transform)

STRATEGIES = ("default", "full")


def select_best_resolution(image_hw: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The (H, W) canvas of `pinpoints` an image of `image_hw` (h, w) is tiled on (transformers' rule and ties)."""
  h, w = image_hw
  best, best_effective, best_waste = None, 0, float("inf")
  for height, width in pinpoints:
    scale = min(width / w, height / h)
    effective = min(int(w * scale) * int(h * scale), w * h)
    waste = width * height - effective
    if effective > best_effective or (effective == best_effective and waste < best_waste):
      best, best_effective, best_waste = (height, width), effective, waste
  return best


def patch_output_size(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
  """(h', w') an image of `image_hw` is resized to inside `target_hw`, aspect kept (`get_patch_output_size`)."""
  h, w = image_hw
  target_h, target_w = target_hw
  scale_w, scale_h = target_w / w, target_h / h
  if scale_w < scale_h:
    return min(math.ceil(h * scale_w), target_h), target_w
  return target_h, min(math.ceil(w * scale_h), target_w)


def tile_side(settings: ImageSettings) -> int:
  """Side of one tile cut from the canvas: `crop_size`'s height, else `size`'s height, else its shortest edge."""
  if settings.crop_size is not None and settings.crop_size.height:
    return settings.crop_size.height
  return settings.size.height or settings.size.shortest_edge


def base_hw(settings: ImageSettings) -> tuple[int, int]:
  """(h, w) the whole image is squashed to for the base tile: `size`, or (shortest edge, shortest edge)."""
  size = settings.size
  return (size.height, size.width) if size.shortest_edge is None else (size.shortest_edge, size.shortest_edge)


def tile_output_hw(settings: ImageSettings) -> tuple[int, int]:
  """(h, w) of each processed tile (`pixel_values.shape[-2:]` in transformers)."""
  hw = (tile_side(settings),) * 2
  if settings.do_resize:
    hw = settings.size.output_size(*hw)
  if settings.do_center_crop:
    hw = settings.crop_size.height, settings.crop_size.width
  return hw


def check_pinpoints(settings: ImageSettings) -> tuple[tuple[int, int], ...]:
  """The settings' pinpoints, each a multiple of the tile side, or ProcessorError naming the first that is not."""
  pins, side = settings.image_grid_pinpoints, tile_side(settings)
  if not pins:
    raise ProcessorError(f"{settings.processor_type} needs image_grid_pinpoints, got {pins}")
  for pin in pins:
    if pin[0] % side or pin[1] % side:
      raise ProcessorError(f"image_grid_pinpoints entry {list(pin)} is not a multiple of the tile side {side}")
  return pins


def grid_shape(image_hw: tuple[int, int], settings: ImageSettings) -> tuple[int, int]:
  """(rows, cols) of tiles an image of `image_hw` (h, w) is cut into (the base tile not counted)."""
  height, width = select_best_resolution(image_hw, check_pinpoints(settings))
  side = tile_side(settings)
  return height // side, width // side


def anyres_tiles(image: np.ndarray, settings: ImageSettings) -> np.ndarray:
  """uint8[h, w, 3] -> float32[1 + rows * cols, S, S, 3]: the squashed base image, then the tiles row-major."""
  target = select_best_resolution(image.shape[:2], check_pinpoints(settings))
  new_h, new_w = patch_output_size(image.shape[:2], target)
  resized = resize(image, new_h, new_w, settings.resample)
  top, bottom = divmod(target[0] - new_h, 2)
  left, right = divmod(target[1] - new_w, 2)
  padded = np.pad(resized, ((top, top + bottom), (left, left + right), (0, 0)))  # uint8[H, W, 3], zeros
  side = tile_side(settings)
  tiles = [padded[i:i + side, j:j + side] for i in range(0, target[0], side) for j in range(0, target[1], side)]
  base = resize(image, *base_hw(settings), settings.resample)
  return np.stack([transform(tile, settings) for tile in [base] + tiles])


def unpadded_shape(image_hw: tuple[int, int], feature_hw: tuple[int, int]) -> tuple[int, int]:
  """(rows, cols) left of a (rows, cols) feature grid after `unpad_image` for an image of `image_hw` (h, w).

  The padded side loses `(side - round(.))//2` at each end (`round(., 7)`), so an odd remainder keeps one
  extra row / column: transformers' processor count and the model's `unpad_image` agree on this.
  """
  h, w = image_hw
  rows, cols = feature_hw
  if w / h > cols / rows:
    pad = (rows - int(round(h * (cols / w), 7))) // 2
    return rows - 2 * pad, cols
  pad = (cols - int(round(w * (rows / h), 7))) // 2
  return rows, cols - 2 * pad


@dataclasses.dataclass(frozen=True)
class AnyresImages:
  """A batch of images as the NeXT / OneVision image processors return it, channels last.

  Attributes:
    pixel_values: float32[N, T, S, S, 3], each image's tiles then zero tiles up to the longest image's T.
    num_tiles: int32[N], each image's real tiles (1 + rows * cols when tiled, 1 otherwise).
    image_sizes: int32[N, 2], each image's original (h, w) (transformers' `image_sizes`).
    grid_shapes: int32[N, 2], the (rows, cols) tile grid after the base tile; (0, 0) for an untiled image.
    tiled: bool[N], False for OneVision's multi-image path (one padded-square crop, no base, no unpad).
    batch_num_images: images per sample, as given (`batch_num_images` in transformers' OneVision output).
  """
  pixel_values: np.ndarray
  num_tiles: np.ndarray
  image_sizes: np.ndarray
  grid_shapes: np.ndarray
  tiled: np.ndarray
  batch_num_images: tuple[int, ...]


def batch(per_image: Sequence[np.ndarray], image_sizes, grid_shapes, tiled, batch_num_images) -> AnyresImages:
  """Pads per-image float32[T_i, S, S, 3] tiles to float32[N, max T_i, S, S, 3] (`_pad_for_batching`)."""
  most = max(len(p) for p in per_image)
  pixels = np.stack([np.pad(p, ((0, most - len(p)), (0, 0), (0, 0), (0, 0))) for p in per_image])
  return AnyresImages(pixel_values=pixels, num_tiles=np.asarray([len(p) for p in per_image], np.int32),
                      image_sizes=np.asarray(image_sizes, np.int32).reshape(-1, 2),
                      grid_shapes=np.asarray(grid_shapes, np.int32).reshape(-1, 2),
                      tiled=np.asarray(tiled, bool), batch_num_images=tuple(batch_num_images))


def images_per_sample(images: Any) -> tuple[int, ...]:
  """transformers' `batch_num_images`: a list of lists counts each non-empty sample, anything else one each."""
  if isinstance(images, (list, tuple)) and images and isinstance(images[0], (list, tuple)):
    return tuple(len(x) for x in images if x)
  if isinstance(images, (list, tuple)):
    return (1,) * len(images)
  arr = np.asarray(images)
  return (1,) * (len(arr) if arr.ndim == 4 else 1)


@dataclasses.dataclass(frozen=True)
class NextProcessor:
  """`LlavaNextProcessor`'s image side: tiling (`__call__`) and the `<image>` expansion (`image_tokens`).

  Attributes:
    image: the image processor's settings (`LlavaNextImageProcessor`).
    patch_size: the tower's patch side (processor_config.json `patch_size`).
    num_additional_image_tokens: tokens the tower adds per tile (1 for CLIP's CLS).
    vision_feature_select_strategy: `default` (the model drops CLS: one token less) or `full`.
  """
  image: ImageSettings
  patch_size: int | None = None
  num_additional_image_tokens: int = 0
  vision_feature_select_strategy: str = "default"

  def __post_init__(self):
    if self.vision_feature_select_strategy not in STRATEGIES:
      raise ProcessorError(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} is not one of "
                           f"{STRATEGIES}")
    check_pinpoints(self.image)

  @classmethod
  def from_pretrained(cls, directory: str, **overrides) -> "NextProcessor":
    """Reads processor_config.json / preprocessor_config.json (see `common.read_processor_files`)."""
    image, _, own = read_processor_files(directory)
    if image is None:
      raise ProcessorError(f"{directory!r} has no image processor settings")
    kwargs = {k: own[k] for k in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy")
              if own.get(k) is not None}
    return cls(image=ImageSettings.from_dict(image, "LlavaNextImageProcessor"), **{**kwargs, **overrides})

  def __call__(self, images: Any) -> AnyresImages:
    """Images (one, a uint8[B, H, W, 3] array, or lists of any sizes) -> `AnyresImages`; every image is tiled."""
    flat = as_image_list(images)
    return batch([anyres_tiles(img, self.image) for img in flat], [img.shape[:2] for img in flat],
                 [grid_shape(img.shape[:2], self.image) for img in flat], [True] * len(flat),
                 images_per_sample(images))

  def image_tokens(self, image_hw: tuple[int, int]) -> int:
    """`<image>` tokens for an image of `image_hw` (h, w): what the processor expands and the model fills."""
    if not self.patch_size:
      raise ProcessorError("the token count needs patch_size (processor_config.json), got "
                           f"{self.patch_size!r}")
    tile_h, tile_w = tile_output_hw(self.image)
    height, width = select_best_resolution(image_hw, self.image.image_grid_pinpoints)
    patches_h, patches_w = tile_h // self.patch_size, tile_w // self.patch_size
    rows, cols = unpadded_shape(image_hw, (patches_h * (height // tile_h), patches_w * (width // tile_w)))
    count = rows * (cols + 1) + patches_h * patches_w + self.num_additional_image_tokens
    return count - (self.vision_feature_select_strategy == "default")
