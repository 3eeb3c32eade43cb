"""vtr_jax's own checkpoint layout, for models that have no Hugging Face LLaVA layout.

The trained compressors (FALCON's visual registers and crops, TokenPacker's
projector) add parameters and geometry that `LlavaForConditionalGeneration`
cannot hold. `vtr_jax.save` writes such a model as a directory with
`vtr_config.json` (the `VLMConfig`), `model.safetensors` (every parameter
under its vtr_jax path, e.g. `vision/registers`) and the tokenizer files;
`vtr_jax.load` reads it back with the same strictness as a Hugging Face
checkpoint (every tensor used once, every parameter filled, shapes equal).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from vtr_jax.convert.hf_llava import _listing, flatten, param_shapes, unflatten
from vtr_jax.convert.safetensors_io import CheckpointError, check_finite, load_file, save_file
from vtr_jax.models.decoder import DecoderConfig
from vtr_jax.models.vit import VisionConfig
from vtr_jax.models.vlm import VLMConfig

CONFIG_FILE = "vtr_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "vtr_jax"


def is_native(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, CONFIG_FILE))


def config_to_dict(cfg: VLMConfig) -> dict[str, Any]:
  return {"format": FORMAT, **dataclasses.asdict(cfg)}


def config_from_dict(d: Mapping[str, Any], *, dtype: str | None = None, param_dtype: str | None = None,
                     source: str = "config") -> VLMConfig:
  """A `config_to_dict` dict -> VLMConfig (lists back to tuples; optional dtype overrides)."""
  if d.get("format") != FORMAT:
    raise CheckpointError(f"{source}: 'format' is {d.get('format')!r}, expected {FORMAT!r}")
  tuples = lambda part: {k: tuple(v) if isinstance(v, list) else v for k, v in part.items()}  # noqa: E731
  dtypes = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype or dtype)) if v}
  top = {k: v for k, v in d.items() if k not in ("format", "vision", "text")}
  try:
    vision = VisionConfig(**{**tuples(d["vision"]), **dtypes})
    text = DecoderConfig(**{**tuples(d["text"]), **dtypes})
    return VLMConfig(vision=vision, text=text, **tuples(top))
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{source} does not describe a vtr_jax model: {e}") from None


def save_native(directory: str, cfg: VLMConfig, params: Mapping) -> None:
  """Writes vtr_config.json + model.safetensors (parameters by their '/'-joined vtr_jax paths)."""
  os.makedirs(directory, exist_ok=True)
  flat = flatten(params.get("params", params))
  save_file({k: np.asarray(v) for k, v in flat.items()}, os.path.join(directory, WEIGHTS_FILE),
            metadata={"format": FORMAT})
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config_to_dict(cfg), f, indent=2)


def load_native(directory: str, *, dtype: str | None = None, param_dtype: str | None = None
                ) -> tuple[VLMConfig, dict]:
  """(VLMConfig, {'params': ...}) from a `save_native` directory; raises CheckpointError naming every mismatch."""
  path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(path) as f:
      cfg = config_from_dict(json.load(f), dtype=dtype, param_dtype=param_dtype, source=path)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None
  weights = os.path.join(directory, WEIGHTS_FILE)
  if not os.path.exists(weights):
    raise CheckpointError(f"{weights} not found: a vtr_jax checkpoint directory needs {WEIGHTS_FILE}")
  tensors = load_file(weights)
  check_finite(tensors, weights)
  expected = param_shapes(cfg)
  unused = sorted(set(tensors) - set(expected))
  missing = sorted(set(expected) - set(tensors))
  mismatched = [f"{k} {list(tensors[k].shape)} vs {list(expected[k].shape)}"
                for k in sorted(set(tensors) & set(expected)) if tuple(tensors[k].shape) != tuple(expected[k].shape)]
  problems = [f"{len(items)} {what}: {_listing(items)}" for what, items in (
      ("checkpoint tensor(s) fill no parameter", unused), ("parameter(s) not in the checkpoint", missing),
      ("shape mismatch(es)", mismatched)) if items]
  if problems:
    raise CheckpointError(f"{directory} does not match its config ({cfg.name}): " + "; ".join(problems))
  params = {k: np.asarray(v).astype(expected[k].dtype) for k, v in tensors.items()}
  return cfg, {"params": unflatten(params)}
