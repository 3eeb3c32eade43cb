"""Preprocessing equal to transformers' processors: raw uint8 images and video frames -> pixel values.

NumPy and PIL only (no torch), channels last. One module per family:

  clip        LLaVA-1.5's `CLIPImageProcessor` (resize shortest edge, center crop) and `SiglipImageProcessor`
  llava_next  `LlavaNextImageProcessor`: best-fit canvas, tiles, `image_sizes`, `<image>` token counts
  onevision   `LlavaOnevisionImageProcessor` (anyres_max, multi-image) and the video steps, token counts
  video       PyAV reading and transformers' uniform / fps frame sampling
  qwen2_vl    `Qwen2VLImageProcessor` smart_resize and patchify (temporal patch 2), the video steps
  common      settings read from a checkpoint (processor_config.json / preprocessor_config.json) and the
              PIL-backend steps every processor shares

This package imports nothing of vtr_jax above it: `models.vit.preprocess` delegates to `clip`.
"""

from vtr_jax.processors.common import ImageSettings, ProcessorError, Size, load_image_settings, read_processor_files

__all__ = ["ImageSettings", "ProcessorError", "Size", "load_image_settings", "read_processor_files"]
