"""Shared fixtures. Nothing here touches the network."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# LLVM at -O0 without its expensive passes: XLA:CPU compiles about a third faster, and compiling is
# most of what these tests do. Numerics are unchanged (this is LLVM codegen, not XLA's fusion).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true").strip()
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


def _mapped_regions() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux
    return 0


MAX_MAPPED_REGIONS = 30000  # Linux's default vm.max_map_count is 65530


def _release(label: str) -> None:
  import gc

  import jax
  before = _mapped_regions()
  jax.clear_caches()
  gc.collect()
  if os.environ.get("VTR_REPORT_MAPS"):
    print(f"\n[maps] {label}: {before} -> {_mapped_regions()}", file=sys.stderr)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code(request):
  """Drop every compiled executable after each test module.

  XLA:CPU maps each executable's code into memory; a few hundred tests' worth
  of executables exceed Linux's default vm.max_map_count (65530) and the next
  compile aborts (or segfaults) the whole process. Clearing JAX's caches lets
  them be freed.
  """
  yield
  _release(request.module.__name__)


@pytest.fixture(autouse=True)
def _release_within_large_modules(request):
  """The same inside a module whose tests compile many programs (the registry-driven contract suite): after a
  test that leaves more than MAX_MAPPED_REGIONS mapped regions."""
  yield
  if _mapped_regions() > MAX_MAPPED_REGIONS:
    _release(request.node.nodeid)
