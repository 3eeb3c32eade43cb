"""Hugging Face Qwen2.5-VL checkpoints (`Qwen2_5_VLForConditionalGeneration`) <-> vtr_jax parameters.

    cfg, params = load_qwen2_5_vl("/path/to/Qwen2.5-VL-7B-Instruct")

Reads config.json (the flat 4.x layout and the nested 5.x `text_config`) and
safetensors in either key layout (`visual.*` + `model.*`, as published and as
transformers 5.24 still saves, or `model.visual.*` + `model.language_model.*`,
its module names). Conversion is strict, as `hf_llava`: a tensor that fills no
parameter, a parameter no tensor fills, or a shape mismatch raises
`CheckpointError` naming every offending key. `export` writes the published
layout and a 5.x config.json, which transformers loads. Parameters: `{"params": {"vision": QwenVisionTower's,
"decoder": Decoder's}}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.convert.hf_llava import (_RULES, _TRANSFORMS, DERIVED_BUFFERS, _alternatives, _compile, _fill, _listing,
                                      _read_json, flatten, unflatten)
from vtr_jax.convert.safetensors_io import CheckpointError, load_directory, save_file
from vtr_jax.models.decoder import Decoder, DecoderConfig
from vtr_jax.models.qwen_vit import QwenVisionConfig, QwenVisionTower


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
  """A Qwen2.5-VL checkpoint's model: the vision tower, the Qwen2 decoder with M-RoPE, and the special ids."""
  vision: QwenVisionConfig
  text: DecoderConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None


_PREFIXES = (("model.visual.", "vision."), ("visual.", "vision."), ("model.language_model.", "llm."),
             ("model.", "llm."), ("lm_head.", "lm_head."))
_EXPORT_PREFIXES = {"vision.": "visual.", "llm.": "model.", "lm_head.": "lm_head."}

_VISION_RULES = (
    ("vision.patch_embed.proj.weight", "vision/patch_embed/kernel", "patch"),
    ("vision.blocks.{i}.{n:norm1|norm2}.weight", "vision/blocks_{i}/{n}/weight", "copy"),
    ("vision.blocks.{i}.attn.qkv.weight", "vision/blocks_{i}/attn/qkv/kernel", "heads_in"),
    ("vision.blocks.{i}.attn.qkv.bias", "vision/blocks_{i}/attn/qkv/bias", "heads_bias"),
    ("vision.blocks.{i}.attn.proj.weight", "vision/blocks_{i}/attn/proj/kernel", "heads_out"),
    ("vision.blocks.{i}.attn.proj.bias", "vision/blocks_{i}/attn/proj/bias", "copy"),
    ("vision.blocks.{i}.mlp.{p:gate|up|down}_proj.weight", "vision/blocks_{i}/mlp/{p}_proj/kernel", "linear"),
    ("vision.blocks.{i}.mlp.{p:gate|up|down}_proj.bias", "vision/blocks_{i}/mlp/{p}_proj/bias", "copy"),
    ("vision.merger.ln_q.weight", "vision/merger/ln_q/weight", "copy"),
    ("vision.merger.mlp.{l:0|2}.weight", "vision/merger/mlp_{l}/kernel", "linear"),
    ("vision.merger.mlp.{l:0|2}.bias", "vision/merger/mlp_{l}/bias", "copy"),
)
# The Qwen2 decoder's names are those of the LLaVA checkpoints' language model.
_RULES_QWEN = _VISION_RULES + tuple(r for r in _RULES if r[0].startswith(("llm.", "lm_head.")))
_HF_TO_OURS = [(_compile(hf, _alternatives(hf)), ours, kind) for hf, ours, kind in _RULES_QWEN]
_OURS_TO_HF = [(_compile(ours, _alternatives(hf)), hf, kind) for hf, ours, kind in _RULES_QWEN]


def canonical_name(name: str) -> str | None:
  for prefix, repl in _PREFIXES:
    if name.startswith(prefix):
      return repl + name[len(prefix):]
  return None


def param_path(hf_name: str) -> tuple[str, str] | None:
  """HF tensor name -> (our '/'-joined parameter path, transform) or None."""
  name = canonical_name(hf_name)
  if name is None:
    return None
  for pattern, ours, kind in _HF_TO_OURS:
    m = pattern.match(name)
    if m:
      return _fill(ours, m.groupdict()), kind
  return None


# ---- configs --------------------------------------------------------------------------------
def config_from_hf(hf: Mapping[str, Any], generation: Mapping[str, Any] | None = None, *,
                   dtype: str | None = None, param_dtype: str | None = None) -> Qwen2_5_VLConfig:
  """A transformers `Qwen2_5_VLConfig` dict (config.json) -> `Qwen2_5_VLConfig`; absent fields take
  transformers 5.24's class defaults."""
  if hf.get("model_type") != "qwen2_5_vl":
    raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}; this loader reads 'qwen2_5_vl'")
  vis, text = hf.get("vision_config") or {}, hf.get("text_config") or hf
  dtype = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
  param_dtype = param_dtype or dtype
  if text.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"text hidden_act {text['hidden_act']!r}; the Qwen2 decoder uses 'silu'")
  if text.get("use_sliding_window", False):
    raise CheckpointError("use_sliding_window=true is not supported (the decoder attends over the whole prompt)")
  rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ("default", "mrope"):
    raise CheckpointError(f"RoPE type {kind!r} is not supported (only M-RoPE without scaling)")
  section = tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24)))  # transformers' default
  theta = float(rope.get("rope_theta", text.get("rope_theta", 1000000.0)))
  hidden, heads = int(text.get("hidden_size", 8192)), int(text.get("num_attention_heads", 64))
  if text.get("head_dim") not in (None, hidden // heads):
    raise CheckpointError(f"text head_dim {text['head_dim']} differs from hidden_size {hidden} / num_attention_heads "
                          f"{heads}, which transformers' Qwen2.5-VL attention uses")
  tie = bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
  try:
    decoder = DecoderConfig(
        kind="qwen2", vocab_size=int(text.get("vocab_size", 152064)), hidden_size=hidden,
        intermediate_size=int(text.get("intermediate_size", 29568)),
        num_layers=int(text.get("num_hidden_layers", 80)), num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads), head_dim=hidden // heads,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)), rope_theta=theta, tie_embeddings=tie,
        max_positions=int(text.get("max_position_embeddings", 32768)), dtype=dtype, param_dtype=param_dtype,
        mrope_section=section)
    vrope = vis.get("rope_parameters") or {}
    vision = QwenVisionConfig(
        depth=int(vis.get("depth", 32)), hidden_size=int(vis.get("hidden_size", 3584)),
        intermediate_size=int(vis.get("intermediate_size", 3420)), num_heads=int(vis.get("num_heads", 16)),
        in_channels=int(vis.get("in_channels", vis.get("in_chans", 3))),
        patch_size=int(vis.get("patch_size", vis.get("spatial_patch_size", 14))),
        temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vis.get("spatial_merge_size", 2)), window_size=int(vis.get("window_size", 112)),
        fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
        out_hidden_size=int(vis.get("out_hidden_size", 3584)), tokens_per_second=vis.get("tokens_per_second", 4),
        rope_theta=float(vrope.get("rope_theta", 10000.0)), hidden_act=vis.get("hidden_act", "silu"),
        dtype=dtype, param_dtype=param_dtype)
  except ValueError as e:
    raise CheckpointError(f"config.json does not describe a supported Qwen2.5-VL model: {e}") from None
  if vision.out_hidden_size != decoder.hidden_size:
    raise CheckpointError(f"vision out_hidden_size {vision.out_hidden_size} differs from the text hidden_size "
                          f"{decoder.hidden_size}")
  gen = generation or {}
  eos = gen.get("eos_token_id", text.get("eos_token_id", hf.get("eos_token_id")))
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
  pad = gen.get("pad_token_id", text.get("pad_token_id", hf.get("pad_token_id")))
  ids = {k: int(hf.get(k, getattr(Qwen2_5_VLConfig, k))) for k in
         ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
  return Qwen2_5_VLConfig(vision, decoder, eos_token_ids=eos, pad_token_id=None if pad is None else int(pad), **ids)


def config_to_hf(cfg: Qwen2_5_VLConfig) -> dict[str, Any]:
  """`Qwen2_5_VLConfig` -> a config.json (5.x layout) that transformers loads."""
  v, t = cfg.vision, cfg.text
  tps = v.tokens_per_second
  vision = {"model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": v.in_channels,
            "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size, "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes), "out_hidden_size": v.out_hidden_size,
            "tokens_per_second": int(tps) if float(tps).is_integer() else tps, "hidden_act": v.hidden_act,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta}}
  eos = list(cfg.eos_token_ids)
  text = {"model_type": "qwen2_5_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
          "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
          "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "rms_norm_eps": t.rms_norm_eps,
          "max_position_embeddings": t.max_positions, "hidden_act": "silu",
          "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                              "mrope_section": list(t.mrope_section)},
          "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "pad_token_id": cfg.pad_token_id}
  return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
          "vision_config": vision, "text_config": text, "image_token_id": cfg.image_token_id,
          "video_token_id": cfg.video_token_id, "vision_start_token_id": cfg.vision_start_token_id,
          "vision_end_token_id": cfg.vision_end_token_id, "tie_word_embeddings": t.tie_embeddings,
          "dtype": t.param_dtype}


# ---- parameters -----------------------------------------------------------------------------
def param_shapes(cfg: Qwen2_5_VLConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Every parameter, '/'-joined path ('vision/...', 'decoder/...') -> shape and dtype (no allocation)."""
  v = cfg.vision
  vision = jax.eval_shape(QwenVisionTower(v).init, jax.random.key(0), jnp.zeros((1, v.merge_unit, v.patch_dim)),
                          jnp.array([[1, v.spatial_merge_size, v.spatial_merge_size]], jnp.int32))
  tokens = jnp.zeros((1, 2), jnp.int32)
  decoder = jax.eval_shape(Decoder(cfg.text).init, jax.random.key(0), tokens, tokens, jnp.ones((1, 2), bool))
  return flatten({"vision": nn.unbox(vision)["params"], "decoder": nn.unbox(decoder)["params"]})


# `patch`: transformers' Conv3d weight [D, C, T, p, p] <-> our matmul kernel [C*T*p*p, D]; the rest as hf_llava.
def _from_hf(kind: str, w: np.ndarray, shape) -> np.ndarray:
  if kind == "patch":
    return w.reshape(w.shape[0], -1).T.reshape(shape)
  return _TRANSFORMS[kind][0](w, shape)


def _to_hf(kind: str, p: np.ndarray, cfg: Qwen2_5_VLConfig) -> np.ndarray:
  if kind != "patch":
    return _TRANSFORMS[kind][1](p)
  v = cfg.vision
  return p.T.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


def convert_tensors(tensors: Mapping[str, np.ndarray], cfg: Qwen2_5_VLConfig, *, source: str = "checkpoint") -> dict:
  """HF tensors -> our params pytree; every tensor must fill exactly one parameter and every parameter be filled.

  With tied embeddings an `lm_head.weight` equal to the embedding matrix (a
  copy some savers write) is accepted and skipped.
  """
  expected = param_shapes(cfg)
  filled: dict[str, np.ndarray] = {}
  unused, mismatched = [], []
  for name, w in tensors.items():
    if DERIVED_BUFFERS.search(name):
      continue
    hit = param_path(name)
    if hit is None or hit[0] not in expected:
      if cfg.text.tie_embeddings and canonical_name(name) == "lm_head.weight":
        embed = next((t for n, t in tensors.items() if canonical_name(n) == "llm.embed_tokens.weight"), None)
        if embed is not None and np.array_equal(np.asarray(embed), np.asarray(w)):
          continue
      unused.append(name)
      continue
    path, kind = hit
    want = expected[path]
    w = np.asarray(w)
    if w.size != int(np.prod(want.shape)):
      mismatched.append(f"{name} {list(w.shape)} -> {path} {list(want.shape)}")
      continue
    if path in filled:
      raise CheckpointError(f"{source}: parameter {path} is filled twice (second time by {name!r})")
    filled[path] = _from_hf(kind, w, want.shape).astype(want.dtype)
  missing = sorted(set(expected) - set(filled))
  problems = []
  if unused:
    problems.append(f"{len(unused)} checkpoint tensor(s) fill no parameter: {_listing(unused)}")
  if missing:
    problems.append(f"{len(missing)} parameter(s) not in the checkpoint: {_listing(missing)}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
  if problems:
    raise CheckpointError(f"{source} does not match the Qwen2.5-VL config: " + "; ".join(problems))
  return unflatten(filled)


def params_to_tensors(params: Mapping, cfg: Qwen2_5_VLConfig) -> dict[str, np.ndarray]:
  """Our params pytree -> HF tensors in the layout transformers saves (`visual.*`, `model.*`, `lm_head.*`)."""
  out = {}
  for path, value in flatten(params.get("params", params)).items():
    for pattern, hf, kind in _OURS_TO_HF:
      m = pattern.match(path)
      if m:
        name = _fill(hf, m.groupdict())
        prefix = next(p for p in _EXPORT_PREFIXES if name.startswith(p))
        out[_EXPORT_PREFIXES[prefix] + name[len(prefix):]] = np.asarray(_to_hf(kind, np.asarray(value), cfg))
        break
    else:
      raise CheckpointError(f"parameter {path} has no Hugging Face Qwen2.5-VL name")
  return out


def load_config(directory: str, **dtypes) -> Qwen2_5_VLConfig:
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
  return config_from_hf(_read_json(os.path.join(directory, "config.json"), True),
                        _read_json(os.path.join(directory, "generation_config.json"), False), **dtypes)


def load_qwen2_5_vl(path: str, *, dtype: str | None = None,
                    param_dtype: str | None = None) -> tuple[Qwen2_5_VLConfig, dict]:
  """A checkpoint directory -> (Qwen2_5_VLConfig, {'params': {'vision': ..., 'decoder': ...}} of NumPy arrays)."""
  path = os.path.abspath(os.path.expanduser(path))
  cfg = load_config(path, dtype=dtype, param_dtype=param_dtype)
  return cfg, {"params": convert_tensors(load_directory(path), cfg, source=path)}


def export(directory: str, cfg: Qwen2_5_VLConfig, params: Mapping) -> None:
  """Writes config.json + model.safetensors that transformers loads as `Qwen2_5_VLForConditionalGeneration`."""
  os.makedirs(directory, exist_ok=True)
  save_file(params_to_tensors(params, cfg), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)
