"""Hugging Face LLaVA-style checkpoints -> (config, params, tokenizer).

    config, params, tokenizer = vtr_jax.load("/path/to/llava-1.5-7b-hf")

Reads config.json, safetensors (single or sharded with
model.safetensors.index.json) and tokenizer.json from a local directory;
nothing is downloaded and nothing is unpickled. Models without a Hugging
Face LLaVA layout (the trained compressors: visual registers, crops,
TokenPacker) are saved and loaded in vtr_jax's own layout (`native`).
"""

from __future__ import annotations

import os

from vtr_jax.convert.hf_llava import (config_from_hf, config_to_hf, convert_tensors, export, hf_layout_problem,
                                      load_config, load_params, param_shapes, params_to_tensors)
from vtr_jax.convert.native import is_native, load_native, save_native
from vtr_jax.convert.safetensors_io import CheckpointError, load_directory, load_file, save_file
from vtr_jax.data.tokenizer import Tokenizer


def load(path: str, *, dtype: str | None = None, param_dtype: str | None = None, tokenizer: bool = True):
  """Loads a checkpoint directory.

  Args:
    path: directory with config.json, *.safetensors and tokenizer.json (or a
      vtr_jax layout directory with vtr_config.json, see `native`).
    dtype: compute dtype (default: the checkpoint's).
    param_dtype: parameter dtype (default: `dtype`).
    tokenizer: also return the tokenizer (None is returned when False; its
      special ids fill a config's missing pad / end-of-sequence ids either way).
  Returns:
    (VLMConfig, params {'params': ...} of NumPy arrays, Tokenizer or None).
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory {path!r} does not exist")
  has_tokenizer = os.path.exists(os.path.join(path, "tokenizer.json"))
  tok = Tokenizer.from_directory(path) if has_tokenizer else None
  if is_native(path):
    cfg, params = load_native(path, dtype=dtype, param_dtype=param_dtype)
  else:
    ids = {"pad": tok.pad_token_id, "eos": tok.eos_token_id} if tok is not None else None
    cfg = load_config(path, tokenizer_ids=ids, dtype=dtype, param_dtype=param_dtype)
    params = load_params(path, cfg)
  if tokenizer and tok is None:
    tok = Tokenizer.from_directory(path)  # raises, naming the missing file
  return cfg, params, tok if tokenizer else None


def save(path: str, cfg, params, tokenizer: Tokenizer | None = None) -> None:
  """Writes a checkpoint directory that `load` reads.

  The transformers LLaVA layout (`export`, which transformers loads too) when
  the model has one; otherwise (registers, crops, TokenPacker) vtr_jax's own
  layout (`native.save_native`), which transformers cannot load.
  """
  if hf_layout_problem(cfg) is None:
    export(path, cfg, params)
  else:
    save_native(path, cfg, params)
  if tokenizer is not None:
    tokenizer.save(path)


__all__ = ["CheckpointError", "Tokenizer", "config_from_hf", "config_to_hf", "convert_tensors", "export",
           "hf_layout_problem", "load", "load_config", "load_directory", "load_file", "load_native", "load_params",
           "param_shapes", "params_to_tensors", "save", "save_file", "save_native"]
