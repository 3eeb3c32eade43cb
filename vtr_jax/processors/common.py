"""What every image processor shares: settings read from a checkpoint, input checks, and the PIL/NumPy steps.

The steps are transformers' PIL backend (`image_processing_backends.PilBackend`, 5.x) written out:

  resize       PIL `Image.resize` on the uint8 image (transformers' `image_transforms.resize` converts a uint8
               array to PIL and back without rescaling), so the result is bit-identical;
  center_crop  `image_transforms.center_crop`, zero-padding an image smaller than the crop;
  rescale      `(uint8 as float64) * rescale_factor`, then float32;
  normalize    `(x - mean) / std` in float32.

Images are channels-last here (uint8[H, W, 3] in, float32[h, w, 3] out); transformers works channels-first,
which does not change any value.

Attributes:
  Size: a `size` or `crop_size` entry (`shortest_edge`, or `height` and `width`).
  ImageSettings: one image or video processor's settings, with the class defaults transformers fills in.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
BICUBIC = int(Image.Resampling.BICUBIC)

PROCESSOR_FILE = "processor_config.json"  # transformers 5: the sub-processors' settings nested inside
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"  # older checkpoints, and an image processor saved alone
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"


class ProcessorError(ValueError):
  """An input or a processor setting the processors cannot handle; the message names the values."""


@dataclasses.dataclass(frozen=True)
class Size:
  """transformers' `SizeDict` for `size` / `crop_size`: `shortest_edge`, or `height` and `width`."""
  shortest_edge: int | None = None
  height: int | None = None
  width: int | None = None

  def __post_init__(self):
    fixed = self.height is not None and self.width is not None
    if (self.shortest_edge is None) == (not fixed) or any(v is not None and v < 1 for v in dataclasses.astuple(self)):
      raise ProcessorError(f"a size is either {{'shortest_edge': S}} or {{'height': H, 'width': W}} with positive "
                           f"values, got {dataclasses.asdict(self)}")

  @classmethod
  def parse(cls, value: Any, *, default_to_square: bool, name: str = "size") -> "Size":
    """transformers' `get_size_dict`: an int is a shortest edge (or a square), a pair is (h, w), else a dict."""
    if isinstance(value, Size):
      return value
    if isinstance(value, int):
      return cls(height=value, width=value) if default_to_square else cls(shortest_edge=value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
      return cls(height=int(value[0]), width=int(value[1]))
    if isinstance(value, Mapping):
      value = {k: v for k, v in value.items() if v is not None}
      unknown = set(value) - {"shortest_edge", "height", "width"}
      if unknown:
        raise ProcessorError(f"{name} {dict(value)} has keys {sorted(unknown)} these processors do not use "
                             "(they use 'shortest_edge', or 'height' and 'width')")
      return cls(**{k: int(v) for k, v in value.items()})
    raise ProcessorError(f"{name} must be an int, an (h, w) pair or a dict, got {value!r}")

  def output_size(self, height: int, width: int) -> tuple[int, int]:
    """(h, w) of an image of `height` x `width` after the resize (`get_resize_output_image_size`)."""
    if self.shortest_edge is None:
      return self.height, self.width
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(self.shortest_edge * long / short)
    return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)


# Class defaults of the processors read here (transformers 5.24, `<Model>ImageProcessor[Pil]` class attributes).
_ANYRES_NEXT = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_ANYRES_ONEVISION = tuple((384 * a, 384 * b) for a in range(1, 7) for b in range(1, 7))
_DEFAULTS = {
    "CLIPImageProcessor": dict(size=Size(shortest_edge=224), crop_size=Size(height=224, width=224),
                               do_center_crop=True),
    "SiglipImageProcessor": dict(size=Size(height=224, width=224), image_mean=IMAGENET_STANDARD_MEAN,
                                 image_std=IMAGENET_STANDARD_STD),
    "LlavaNextImageProcessor": dict(size=Size(shortest_edge=224), crop_size=Size(height=224, width=224),
                                    do_center_crop=True, do_pad=True, image_grid_pinpoints=_ANYRES_NEXT),
    "LlavaOnevisionImageProcessor": dict(size=Size(height=384, width=384), do_pad=True,
                                         image_grid_pinpoints=_ANYRES_ONEVISION),
    "LlavaOnevisionVideoProcessor": dict(size=Size(height=384, width=384)),
}


@dataclasses.dataclass(frozen=True)
class ImageSettings:
  """An image (or video) processor's settings, as transformers stores them in preprocessor_config.json.

  Attributes:
    processor_type: the transformers class without its backend suffix (`CLIPImageProcessor`, ...).
    size: the resize target (`Size`): a shortest edge (aspect kept) or a fixed (height, width).
    crop_size: the center crop (height, width), used when `do_center_crop`.
    resample: PIL filter id (3 = bicubic).
    image_grid_pinpoints: the any-resolution canvases as (height, width) pairs, list order kept (NeXT, OneVision).
    do_pad: pad the tile axis of a batch to its longest image (NeXT, OneVision).
  """
  processor_type: str
  size: Size
  crop_size: Size | None = None
  do_resize: bool = True
  do_center_crop: bool = False
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  image_std: tuple[float, ...] = OPENAI_CLIP_STD
  resample: int = BICUBIC
  image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
  do_pad: bool = False

  def __post_init__(self):
    for name in ("image_mean", "image_std"):
      value = getattr(self, name)
      if len(value) != 3:
        raise ProcessorError(f"{name} must have 3 values (RGB), got {list(value)}")
    if self.do_center_crop and (self.crop_size is None or self.crop_size.shortest_edge is not None):
      raise ProcessorError(f"do_center_crop needs crop_size {{'height', 'width'}}, got {self.crop_size}")
    for pin in self.image_grid_pinpoints or ():
      if len(pin) != 2 or min(pin) < 1:
        raise ProcessorError(f"image_grid_pinpoints entries are (height, width) pairs of positive ints, got {pin}")

  @classmethod
  def defaults(cls, processor_type: str, **overrides) -> "ImageSettings":
    """The class defaults of `processor_type` (a transformers class name; `Pil`/`Fast` suffixes ignored)."""
    base = _base_type(processor_type)
    if base not in _DEFAULTS:
      raise ProcessorError(f"processor type {processor_type!r} is not supported; known: {sorted(_DEFAULTS)}")
    return cls(processor_type=base, **{**_DEFAULTS[base], **overrides})

  @classmethod
  def from_dict(cls, config: Mapping[str, Any], processor_type: str | None = None) -> "ImageSettings":
    """A saved processor dict -> settings; keys it lacks take `processor_type`'s (or the dict's own type's) defaults."""
    kind = processor_type or config.get("image_processor_type") or config.get("video_processor_type")
    if kind is None:
      raise ProcessorError(f"processor settings name no image_processor_type / video_processor_type (keys "
                           f"{sorted(config)}); pass processor_type")
    out = {}
    if config.get("size") is not None:
      out["size"] = Size.parse(config["size"], default_to_square=False)
    if config.get("crop_size") is not None:
      out["crop_size"] = Size.parse(config["crop_size"], default_to_square=True, name="crop_size")
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_pad"):
      if config.get(key) is not None:
        out[key] = bool(config[key])
    for key in ("image_mean", "image_std"):
      if config.get(key) is not None:
        value = config[key]
        out[key] = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3
    if config.get("rescale_factor") is not None:
      out["rescale_factor"] = float(config["rescale_factor"])
    if config.get("resample") is not None:
      out["resample"] = int(config["resample"])
    if config.get("image_grid_pinpoints") is not None:
      out["image_grid_pinpoints"] = tuple(tuple(int(v) for v in pin) for pin in config["image_grid_pinpoints"])
    return cls.defaults(kind, **out)

  @property
  def output_hw(self) -> tuple[int, int] | None:
    """(h, w) every processed image has (the crop, or a fixed resize), or None when it depends on the image."""
    if self.do_center_crop:
      return self.crop_size.height, self.crop_size.width
    if self.do_resize and self.size.shortest_edge is None:
      return self.size.height, self.size.width
    return None


def _base_type(name: str) -> str:
  for suffix in ("Pil", "Fast"):
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ProcessorError(f"{path} is not valid JSON: {e}") from None


def read_processor_files(directory: str) -> tuple[dict | None, dict | None, dict]:
  """A checkpoint directory's processor settings, found as transformers 5 finds them.

  Returns:
    (image processor dict, video processor dict, processor dict). The image dict is `processor_config.json`'s
    nested `image_processor`, else `preprocessor_config.json`; the video dict is the nested `video_processor`,
    else `video_preprocessor_config.json`, else `preprocessor_config.json`; the processor dict holds
    `processor_config.json`'s own entries (`patch_size`, `num_image_tokens`, `vision_feature_select_strategy`,
    ...), empty when there is none. A missing sub-processor is None.
  """
  if not os.path.isdir(directory):
    raise ProcessorError(f"checkpoint directory {directory!r} does not exist")
  processor = _read_json(os.path.join(directory, PROCESSOR_FILE)) or {}
  legacy = _read_json(os.path.join(directory, IMAGE_PROCESSOR_FILE))
  image = processor.get("image_processor") or legacy
  video = processor.get("video_processor") or _read_json(os.path.join(directory, VIDEO_PROCESSOR_FILE)) or legacy
  own = {k: v for k, v in processor.items() if not isinstance(v, dict)}
  return image, video, own


def load_image_settings(directory: str, processor_type: str | None = None) -> ImageSettings:
  """The image processor settings of a checkpoint directory (see `read_processor_files`)."""
  image, _, _ = read_processor_files(directory)
  if image is None:
    raise ProcessorError(f"{directory!r} has no image processor settings ({PROCESSOR_FILE} with an "
                         f"'image_processor' entry, or {IMAGE_PROCESSOR_FILE})")
  return ImageSettings.from_dict(image, processor_type)


def check_image(image: Any, where: str = "image") -> np.ndarray:
  """Returns `image` as uint8[H, W, 3] (channels last) or raises ProcessorError naming its dtype / shape.

  Float images are refused: transformers' processors quantise them to uint8 (truncating) before the PIL resize
  and, with `do_rescale` (every checkpoint here), scale them by 1/255 a second time.
  """
  if isinstance(image, Image.Image):
    raise ProcessorError(f"{where} is a PIL image; pass np.asarray(image.convert('RGB'))")
  arr = np.asarray(image)
  if arr.dtype != np.uint8:
    hint = (" (transformers would truncate floats to uint8 and, with do_rescale, divide by 255 twice); convert "
            "with np.round(x * 255).astype(np.uint8)" if np.issubdtype(arr.dtype, np.floating) else "")
    raise ProcessorError(f"{where} must be uint8[H, W, 3], got dtype {arr.dtype}{hint}")
  if arr.ndim != 3 or arr.shape[-1] != 3 or 0 in arr.shape:
    raise ProcessorError(f"{where} must be uint8[H, W, 3] (channels last, RGB, non-empty), got shape "
                         f"{tuple(arr.shape)}")
  return arr


def as_image_list(images: Any, name: str = "images") -> list[np.ndarray]:
  """One image, a uint8[B, H, W, 3] array, or a (nested) list of images -> a flat list of uint8[H, W, 3].

  The layouts are those of transformers' `make_flat_list_of_images`; every image is checked (`check_image`).
  """
  if isinstance(images, (list, tuple)):
    flat = []
    for i, item in enumerate(images):
      if isinstance(item, (list, tuple)):
        flat.extend(as_image_list(item, f"{name}[{i}]") if item else [])
      else:
        arr = np.asarray(item)
        flat.extend(arr if arr.ndim == 4 else [arr])
    where = [f"{name}[{i}]" for i in range(len(flat))]
  else:
    arr = np.asarray(images)
    flat = list(arr) if arr.ndim == 4 else [arr]
    where = [f"{name}[{i}]" for i in range(len(flat))] if arr.ndim == 4 else [name]
  if not flat:
    raise ProcessorError(f"{name} is empty: pass at least one uint8[H, W, 3] image")
  return [check_image(img, w) for img, w in zip(flat, where)]


def resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
  """uint8[H, W, 3] -> uint8[height, width, 3] with PIL (an unchanged size returns a copy)."""
  return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """transformers' `center_crop`: the middle (height, width) of [H, W, C]; a smaller image is zero-padded first."""
  h, w = image.shape[:2]
  top, left = (h - height) // 2, (w - width) // 2
  if top >= 0 and left >= 0:
    return image[top:top + height, left:left + width]
  new_h, new_w = max(height, h), max(width, w)
  pad_top, pad_left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)  # ceil
  canvas = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
  canvas[pad_top:pad_top + h, pad_left:pad_left + w] = image
  top, left = top + pad_top, left + pad_left
  return canvas[max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def rescale_normalize(image: np.ndarray, settings: ImageSettings) -> np.ndarray:
  """uint8[..., 3] -> float32[..., 3]: `rescale` in float64 then float32, `normalize` in float32 (PIL backend)."""
  x = image
  if settings.do_rescale:
    x = (x.astype(np.float64) * settings.rescale_factor).astype(np.float32)
  x = x.astype(np.float32)
  if settings.do_normalize:
    x = (x - np.asarray(settings.image_mean, np.float32)) / np.asarray(settings.image_std, np.float32)
  return x


def transform(image: np.ndarray, settings: ImageSettings) -> np.ndarray:
  """The standard PIL-backend pipeline on one image: uint8[H, W, 3] -> float32[h, w, 3].

  resize to `settings.size` (if `do_resize`), center crop (if `do_center_crop`), rescale, normalise.
  """
  if settings.do_resize:
    image = resize(image, *settings.size.output_size(*image.shape[:2]), settings.resample)
  if settings.do_center_crop:
    image = center_crop(image, settings.crop_size.height, settings.crop_size.width)
  return rescale_normalize(image, settings)


def stack_same_size(arrays: Iterable[np.ndarray], name: str) -> np.ndarray:
  """Stacks [h, w, ...] arrays, raising ProcessorError naming the first two sizes that differ."""
  arrays = list(arrays)
  first = arrays[0].shape[:2]
  for i, a in enumerate(arrays):
    if a.shape[:2] != first:
      raise ProcessorError(f"{name}: item {i} is {a.shape[0]}x{a.shape[1]} but item 0 is {first[0]}x{first[1]}; "
                           "they cannot share one array")
  return np.stack(arrays)
