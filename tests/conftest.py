"""Shared fixtures. Nothing here touches the network."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

FAMILIES = ("clip_llama", "siglip_qwen2")


class TinyFamily:
  """A tiny random HF LLaVA saved to disk, its torch model, and the vtr_jax load of it."""

  def __init__(self, family: str, directory: str):
    import hf_tiny
    import vtr_jax
    self.family = family
    self.directory = directory
    self.torch_model = hf_tiny.build(family, directory, shard=family == "clip_llama")
    self.config, self.params, self.tokenizer = vtr_jax.load(directory)


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request, tmp_path_factory) -> TinyFamily:
  return _tiny(request.param, tmp_path_factory)


_CACHE: dict = {}


def _tiny(family, tmp_path_factory) -> TinyFamily:
  if family not in _CACHE:
    _CACHE[family] = TinyFamily(family, str(tmp_path_factory.mktemp(family)))
  return _CACHE[family]


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> TinyFamily:
  return _tiny("clip_llama", tmp_path_factory)
