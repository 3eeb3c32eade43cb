"""LLaVA-1.5's image processor (`CLIPImageProcessor`) and SigLIP's (`SiglipImageProcessor`), PIL backend.

Both run transformers' standard pipeline (`common.transform`); only the settings differ:

| processor              | resize                                   | center crop  | mean / std      |
|------------------------|------------------------------------------|--------------|-----------------|
| `CLIPImageProcessor`   | shortest edge to S, aspect kept (bicubic) | S x S       | OpenAI CLIP     |
| `SiglipImageProcessor` | to S x S, aspect ignored (bicubic)        | none        | 0.5 / 0.5       |

A non-square photo is therefore cropped by CLIP (the long side loses its ends) and squashed by SigLIP.
LLaVA-1.5's own repository pads to a square with the mean colour before this processor
(`image_aspect_ratio=pad`); transformers' `LlavaProcessor` does not, and neither does this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vtr_jax.processors.common import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, IMAGENET_STANDARD_MEAN,
                                       IMAGENET_STANDARD_STD, ImageSettings, Size, as_image_list,
                                       stack_same_size, transform)


def clip_settings(image_size: int, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD) -> ImageSettings:
  """A `CLIPImageProcessor` for a tower of side `image_size`: shortest edge and crop `image_size`."""
  return ImageSettings.defaults("CLIPImageProcessor", size=Size(shortest_edge=image_size),
                                crop_size=Size(height=image_size, width=image_size),
                                image_mean=tuple(image_mean), image_std=tuple(image_std))


def siglip_settings(image_size: int, image_mean=IMAGENET_STANDARD_MEAN,
                    image_std=IMAGENET_STANDARD_STD) -> ImageSettings:
  """A `SiglipImageProcessor` for a tower of side `image_size`: resize to `image_size` x `image_size`."""
  return ImageSettings.defaults("SiglipImageProcessor", size=Size(height=image_size, width=image_size),
                                image_mean=tuple(image_mean), image_std=tuple(image_std))


def process(images: Any, settings: ImageSettings) -> np.ndarray:
  """Raw images -> pixel values as the processor makes them, channels last.

  Args:
    images: uint8[H, W, 3], uint8[B, H, W, 3], or a list of uint8[H, W, 3] of any sizes.
    settings: a CLIP or SigLIP processor's settings (`clip_settings`, `siglip_settings`,
      `common.load_image_settings`).
  Returns:
    float32[B, S, S, 3] (transformers' `pixel_values` is the same array as [B, 3, S, S]).
  """
  return stack_same_size([transform(img, settings) for img in as_image_list(images)],
                         f"{settings.processor_type} outputs (set a crop or a fixed size)")
