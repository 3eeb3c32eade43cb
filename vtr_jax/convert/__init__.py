"""Hugging Face LLaVA-style checkpoints -> (config, params, tokenizer).

    config, params, tokenizer = vtr_jax.load("/path/to/llava-1.5-7b-hf")

Reads config.json, safetensors (single or sharded with
model.safetensors.index.json) and tokenizer.json from a local directory;
nothing is downloaded and nothing is unpickled.
"""

from __future__ import annotations

import os

from vtr_jax.convert.hf_llava import (config_from_hf, config_to_hf, convert_tensors, export, load_config,
                                      load_params, param_shapes, params_to_tensors)
from vtr_jax.convert.safetensors_io import CheckpointError, load_directory, load_file, save_file
from vtr_jax.data.tokenizer import Tokenizer


def load(path: str, *, dtype: str | None = None, param_dtype: str | None = None, tokenizer: bool = True):
  """Loads a checkpoint directory.

  Args:
    path: directory with config.json, *.safetensors and tokenizer.json.
    dtype: compute dtype (default: the checkpoint's).
    param_dtype: parameter dtype (default: `dtype`).
    tokenizer: also load tokenizer.json (None is returned when False).
  Returns:
    (VLMConfig, params {'params': ...} of NumPy arrays, Tokenizer or None).
  """
  path = os.path.abspath(os.path.expanduser(path))
  cfg = load_config(path, dtype=dtype, param_dtype=param_dtype)
  params = load_params(path, cfg)
  tok = Tokenizer.from_directory(path) if tokenizer else None
  return cfg, params, tok


def save(path: str, cfg, params, tokenizer: Tokenizer | None = None) -> None:
  """Writes a checkpoint directory that `load` (and transformers) can read."""
  export(path, cfg, params)
  if tokenizer is not None:
    tokenizer.save(path)


__all__ = ["CheckpointError", "Tokenizer", "config_from_hf", "config_to_hf", "convert_tensors", "export",
           "load", "load_config", "load_directory", "load_file", "load_params", "param_shapes",
           "params_to_tensors", "save", "save_file"]
