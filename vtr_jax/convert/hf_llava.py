"""Hugging Face LLaVA checkpoints <-> vtr_jax parameters.

Covers `LlavaForConditionalGeneration` checkpoints with a CLIP tower and a
LLaMA decoder (LLaVA-1.5) and with a SigLIP tower and a Qwen2 decoder (the
LLaVA-OneVision family's tower and LLM, as in llava-interleave-qwen), in
every key layout transformers has written (`vision_tower.vision_model.*`,
`vision_tower.*`, `model.vision_tower.*`, `language_model.model.*`,
`model.language_model.*`, ...). Conversion is strict: a checkpoint tensor
that fills no parameter, a parameter no tensor fills, or a shape mismatch
raises `CheckpointError` naming every offending key.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.convert.safetensors_io import CheckpointError, check_finite, load_directory, save_file
from vtr_jax.models.decoder import DecoderConfig
from vtr_jax.models.vit import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, VisionConfig
from vtr_jax.models.vlm import VLM, VLMConfig

# Buffers some transformers versions saved; they are derived, not weights.
DERIVED_BUFFERS = re.compile(r"(\.position_ids|\.rotary_emb\.inv_freq)$")

# Prefixes of each part, in the order they are tried (longest first).
_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision."), ("model.vision_tower.", "vision."),
    ("vision_tower.vision_model.", "vision."), ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."), ("multi_modal_projector.", "projector."),
    ("model.language_model.model.", "llm."), ("model.language_model.", "llm."),
    ("language_model.model.", "llm."), ("language_model.lm_head.", "lm_head."),
    ("model.lm_head.", "lm_head."), ("lm_head.", "lm_head."), ("model.image_newline", "image_newline"),
    ("image_newline", "image_newline"),
)
# What `export` writes (the layout transformers itself saves).
_EXPORT_PREFIXES = {"vision.": "vision_tower.", "projector.": "multi_modal_projector.",
                    "llm.": "language_model.model.", "lm_head.": "language_model.lm_head."}


def canonical_name(name: str) -> str | None:
  for prefix, repl in _PREFIXES:
    if name.startswith(prefix):
      return repl + name[len(prefix):]
  return None


# ---- transforms between a torch tensor layout and ours ------------------------------------
# Each: (to_ours(w, target_shape), to_hf(p)).
def _t(w, shape):
  return w.T.reshape(shape)


_TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    "copy": (lambda w, s: w.reshape(s), lambda p: p),
    "linear": (_t, lambda p: p.T),
    "heads_in": (_t, lambda p: p.reshape(p.shape[0], -1).T),  # [D, N*H] <- [N*H, D]
    "heads_bias": (lambda w, s: w.reshape(s), lambda p: p.reshape(-1)),
    "heads_out": (_t, lambda p: p.reshape(-1, p.shape[-1]).T),  # [N, H, D] <- [D, N*H]
    "conv": (lambda w, s: w.transpose(2, 3, 1, 0).reshape(s), lambda p: p.transpose(3, 2, 0, 1)),
}

# (HF canonical template, our parameter path template, transform). `{i}` is a layer index,
# `{name:a|b}` one of the alternatives.
_RULES = (
    ("vision.embeddings.patch_embedding.weight", "vision/patch_embedding/kernel", "conv"),
    ("vision.embeddings.patch_embedding.bias", "vision/patch_embedding/bias", "copy"),
    ("vision.embeddings.class_embedding", "vision/class_embedding", "copy"),
    ("vision.embeddings.position_embedding.weight", "vision/position_embedding", "copy"),
    ("vision.{n:pre_layrnorm|post_layernorm}.weight", "vision/{n}/scale", "copy"),
    ("vision.{n:pre_layrnorm|post_layernorm}.bias", "vision/{n}/bias", "copy"),
    ("vision.encoder.layers.{i}.self_attn.{p:q|k|v}_proj.weight", "vision/layers_{i}/self_attn/{p}_proj/kernel",
     "heads_in"),
    ("vision.encoder.layers.{i}.self_attn.{p:q|k|v}_proj.bias", "vision/layers_{i}/self_attn/{p}_proj/bias",
     "heads_bias"),
    ("vision.encoder.layers.{i}.self_attn.out_proj.weight", "vision/layers_{i}/self_attn/out_proj/kernel",
     "heads_out"),
    ("vision.encoder.layers.{i}.self_attn.out_proj.bias", "vision/layers_{i}/self_attn/out_proj/bias", "copy"),
    ("vision.encoder.layers.{i}.{n:layer_norm1|layer_norm2}.weight", "vision/layers_{i}/{n}/scale", "copy"),
    ("vision.encoder.layers.{i}.{n:layer_norm1|layer_norm2}.bias", "vision/layers_{i}/{n}/bias", "copy"),
    ("vision.encoder.layers.{i}.mlp.{f:fc1|fc2}.weight", "vision/layers_{i}/mlp/{f}/kernel", "linear"),
    ("vision.encoder.layers.{i}.mlp.{f:fc1|fc2}.bias", "vision/layers_{i}/mlp/{f}/bias", "copy"),
    ("vision.head.probe", "vision/head/probe", "copy"),
    ("vision.head.attention.in_proj_weight", "vision/head/in_proj_kernel", "heads_in"),
    ("vision.head.attention.in_proj_bias", "vision/head/in_proj_bias", "heads_bias"),
    ("vision.head.attention.out_proj.weight", "vision/head/out_proj/kernel", "heads_out"),
    ("vision.head.attention.out_proj.bias", "vision/head/out_proj/bias", "copy"),
    ("vision.head.layernorm.weight", "vision/head/layernorm/scale", "copy"),
    ("vision.head.layernorm.bias", "vision/head/layernorm/bias", "copy"),
    ("vision.head.mlp.{f:fc1|fc2}.weight", "vision/head/mlp/{f}/kernel", "linear"),
    ("vision.head.mlp.{f:fc1|fc2}.bias", "vision/head/mlp/{f}/bias", "copy"),
    ("projector.{l:linear_1|linear_2}.weight", "projector/{l}/kernel", "linear"),
    ("projector.{l:linear_1|linear_2}.bias", "projector/{l}/bias", "copy"),
    ("llm.embed_tokens.weight", "decoder/embed_tokens/embedding", "copy"),
    ("llm.layers.{i}.self_attn.{p:q|k|v}_proj.weight", "decoder/layers_{i}/self_attn/{p}_proj/kernel", "heads_in"),
    ("llm.layers.{i}.self_attn.{p:q|k|v}_proj.bias", "decoder/layers_{i}/self_attn/{p}_proj/bias", "heads_bias"),
    ("llm.layers.{i}.self_attn.o_proj.weight", "decoder/layers_{i}/self_attn/o_proj/kernel", "heads_out"),
    ("llm.layers.{i}.mlp.{p:gate|up|down}_proj.weight", "decoder/layers_{i}/mlp/{p}_proj/kernel", "linear"),
    ("llm.layers.{i}.{n:input_layernorm|post_attention_layernorm}.weight", "decoder/layers_{i}/{n}/weight", "copy"),
    ("llm.norm.weight", "decoder/norm/weight", "copy"),
    ("lm_head.weight", "decoder/lm_head/kernel", "linear"),
)


_FIELD = re.compile(r"\{(\w+)(?::([^}]*))?\}")


def _compile(template: str, alternatives: Mapping[str, str]) -> re.Pattern:
  out, pos = "", 0
  for m in _FIELD.finditer(template):
    out += re.escape(template[pos:m.start()])
    alt = alternatives.get(m.group(1)) or r"\d+"
    out += f"(?P<{m.group(1)}>{alt})"
    pos = m.end()
  return re.compile(out + re.escape(template[pos:]) + "$")


def _alternatives(template: str) -> dict[str, str]:
  return {m.group(1): m.group(2) for m in _FIELD.finditer(template) if m.group(2)}


def _fill(template: str, groups: Mapping[str, str]) -> str:
  return _FIELD.sub(lambda m: groups[m.group(1)], template)


_HF_TO_OURS = [(_compile(hf, _alternatives(hf)), ours, kind) for hf, ours, kind in _RULES]
_OURS_TO_HF = [(_compile(ours, _alternatives(hf)), hf, kind) for hf, ours, kind in _RULES]


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
def _rope_theta(text: Mapping[str, Any], default: float) -> float:
  params = text.get("rope_parameters") or {}
  scaling = text.get("rope_scaling") or {}
  kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if kind not in ("default", None):
    raise CheckpointError(f"RoPE type {kind!r} is not supported (only the default rotary embedding)")
  return float(params.get("rope_theta", text.get("rope_theta", default)))


def config_from_hf(hf: Mapping[str, Any], preprocessor: Mapping[str, Any] | None = None,
                   generation: Mapping[str, Any] | None = None, *, dtype: str | None = None,
                   param_dtype: str | None = None, tokenizer_ids: Mapping[str, int | None] | None = None) -> VLMConfig:
  """A transformers `LlavaConfig` dict (config.json) -> `VLMConfig`.

  Special ids: end of sequence from generation_config.json, text_config or
  config.json, else the tokenizer's `eos` (`tokenizer_ids`), else an error
  (generation could never stop early); padding from the same files, else the
  tokenizer's pad token, else the first end-of-sequence id (transformers'
  convention) -- never a silent 0, which is a real token in most vocabularies.
  """
  model_type = hf.get("model_type")
  if model_type != "llava":
    hint = (" LLaVA-OneVision's any-resolution tiling is not implemented; its tower, projector and LLM "
            "use the same layout as a `llava` SigLIP+Qwen2 checkpoint" if model_type == "llava_onevision" else "")
    raise CheckpointError(f"config.json has model_type {model_type!r}; vtr_jax loads 'llava' checkpoints.{hint}")
  vis, text = hf.get("vision_config") or {}, hf.get("text_config") or {}
  vkind = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(vis.get("model_type"))
  tkind = {"llama": "llama", "qwen2": "qwen2"}.get(text.get("model_type", "llama"))
  if vkind is None:
    raise CheckpointError(f"vision_config.model_type {vis.get('model_type')!r} is not supported "
                          "(clip_vision_model, siglip_vision_model)")
  if tkind is None:
    raise CheckpointError(f"text_config.model_type {text.get('model_type')!r} is not supported (llama, qwen2)")
  want_act = {"clip": "quick_gelu", "siglip": "gelu_pytorch_tanh"}[vkind]
  if vis.get("hidden_act", want_act) != want_act:
    raise CheckpointError(f"vision hidden_act {vis['hidden_act']!r}; a {vkind} tower uses {want_act!r}")
  if text.get("hidden_act", "silu") != "silu" or text.get("mlp_bias", False):
    raise CheckpointError("the decoder must use a bias-free SiLU-gated MLP (hidden_act 'silu', mlp_bias false)")
  if tkind == "llama" and text.get("attention_bias", False):
    raise CheckpointError("LLaMA attention_bias=true is not supported")
  if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias", True):
    raise CheckpointError("the projector must be LLaVA's mlp2x_gelu with biases")
  layer = hf.get("vision_feature_layer", -2)
  layers = tuple(layer) if isinstance(layer, (list, tuple)) else (int(layer),)
  strategy = hf.get("vision_feature_select_strategy", "default")
  if strategy not in ("default", "full"):
    raise CheckpointError(f"vision_feature_select_strategy {strategy!r} is not supported (default, full)")
  dtype = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
  param_dtype = param_dtype or dtype
  pre = preprocessor or {}
  mean_std = (CLIP_MEAN, CLIP_STD) if vkind == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
  vision = VisionConfig(
      kind=vkind, image_size=int(vis.get("image_size", 224)), patch_size=int(vis.get("patch_size", 32 if vkind == "clip" else 16)),
      num_channels=int(vis.get("num_channels", 3)), hidden_size=int(vis.get("hidden_size", 768)),
      intermediate_size=int(vis.get("intermediate_size", 3072)), num_layers=int(vis.get("num_hidden_layers", 12)),
      num_heads=int(vis.get("num_attention_heads", 12)),
      layer_norm_eps=float(vis.get("layer_norm_eps", 1e-5 if vkind == "clip" else 1e-6)),
      feature_layers=layers, keep_cls=strategy == "full",
      use_head=vkind == "siglip" and bool(vis.get("vision_use_head", True)),
      image_mean=tuple(pre.get("image_mean", mean_std[0])), image_std=tuple(pre.get("image_std", mean_std[1])),
      dtype=dtype, param_dtype=param_dtype)
  heads = int(text.get("num_attention_heads", 32))
  decoder = DecoderConfig(
      kind=tkind, vocab_size=int(text.get("vocab_size", 32000)), hidden_size=int(text.get("hidden_size", 4096)),
      intermediate_size=int(text.get("intermediate_size", 11008)),
      num_layers=int(text.get("num_hidden_layers", 32)), num_heads=heads,
      num_kv_heads=int(text.get("num_key_value_heads") or heads), head_dim=int(text.get("head_dim") or int(text.get("hidden_size", 4096)) // heads),
      rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
      rope_theta=_rope_theta(text, 10000.0 if tkind == "llama" else 1000000.0),
      tie_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
      max_positions=int(text.get("max_position_embeddings", 4096)), dtype=dtype, param_dtype=param_dtype)
  gen, ids = generation or {}, tokenizer_ids or {}
  first = lambda key: next((d[key] for d in (gen, text, hf) if d.get(key) is not None), None)  # noqa: E731
  eos = first("eos_token_id")
  eos = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
  if not eos and ids.get("eos") is not None:
    eos = (int(ids["eos"]),)
  if not eos:
    raise CheckpointError("the checkpoint defines no end-of-sequence id (eos_token_id in generation_config.json or "
                          "config.json, or the tokenizer's eos_token): generation could never stop early; set one")
  pad = first("pad_token_id")
  if pad is None:
    pad = ids.get("pad") if ids.get("pad") is not None else eos[0]
  image_id = hf.get("image_token_id", hf.get("image_token_index", 32000))
  return VLMConfig(vision=vision, text=decoder, projector="mlp2x_gelu", image_token_id=int(image_id),
                   pad_token_id=int(pad), eos_token_ids=eos,
                   name=f"llava-{vkind}-{tkind}")


def hf_layout_problem(cfg: VLMConfig) -> str | None:
  """Why the model has no transformers LLaVA layout (the trained compressors), or None when it has one."""
  v = cfg.vision
  if v.num_registers:
    views = f" in each of {v.num_crops} views" if v.num_crops > 1 else ""
    return f"the vision tower has {v.num_registers} visual registers{views} (FALCON)"
  if cfg.projector != "mlp2x_gelu":
    return f"the projector is {cfg.projector!r}; only mlp2x_gelu has one"
  return None


def check_hf_layout(cfg: VLMConfig) -> None:
  """Raises CheckpointError naming why the model has no transformers LLaVA layout."""
  problem = hf_layout_problem(cfg)
  if problem is not None:
    raise CheckpointError(f"model {cfg.name!r} has no Hugging Face LLaVA layout: {problem}; vtr_jax.save writes "
                          "it in vtr_jax's own layout (vtr_config.json + model.safetensors), which vtr_jax.load reads")


def config_to_hf(cfg: VLMConfig) -> dict[str, Any]:
  """`VLMConfig` -> a config.json that transformers loads as `LlavaForConditionalGeneration`."""
  check_hf_layout(cfg)
  v, t = cfg.vision, cfg.text
  vision = {"model_type": "clip_vision_model" if v.kind == "clip" else "siglip_vision_model",
            "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": "quick_gelu" if v.kind == "clip" else "gelu_pytorch_tanh"}
  if v.kind == "siglip":
    vision["vision_use_head"] = v.use_head
  text = {"model_type": t.kind, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
          "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
          "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.dim_per_head,
          "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
          "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"},
          "max_position_embeddings": t.max_positions, "tie_word_embeddings": t.tie_embeddings,
          "hidden_act": "silu", "pad_token_id": cfg.pad_token_id,
          "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0]}
  layers = list(v.feature_layers)
  return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
          "vision_config": vision, "text_config": text, "image_token_index": cfg.image_token_id,
          "image_seq_length": v.num_features, "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
          "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
          "vision_feature_select_strategy": "full" if v.keep_cls else "default",
          "tie_word_embeddings": t.tie_embeddings, "dtype": v.param_dtype}


# ---- parameters -----------------------------------------------------------------------------
def param_shapes(cfg: VLMConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Every parameter of the model, '/'-joined path -> shape and dtype (no allocation)."""
  s = cfg.vision.image_size
  abstract = jax.eval_shape(
      VLM(cfg).init, jax.random.key(0), jnp.zeros((1, s, s, cfg.vision.num_channels), jnp.float32),
      jnp.full((1, 2), cfg.image_token_id, jnp.int32).at[0, 0].set(cfg.pad_token_id), jnp.ones((1, 2), bool))
  return flatten(nn.unbox(abstract)["params"])


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _listing(names, limit=20) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def convert_tensors(tensors: Mapping[str, np.ndarray], cfg: VLMConfig, *, source: str = "checkpoint") -> dict:
  """HF tensors -> our params pytree, checking that every key is used once and every parameter filled."""
  expected = param_shapes(cfg)
  filled: dict[str, np.ndarray] = {}
  unused, mismatched = [], []
  for name, w in tensors.items():
    if DERIVED_BUFFERS.search(name):
      continue
    hit = param_path(name)
    if hit is None or hit[0] not in expected:
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
    filled[path] = _TRANSFORMS[kind][0](w, want.shape).astype(want.dtype)
  missing = sorted(set(expected) - set(filled))
  problems = []
  if unused:
    problems.append(f"{len(unused)} checkpoint tensor(s) fill no parameter: {_listing(unused)}")
  if missing:
    problems.append(f"{len(missing)} parameter(s) not in the checkpoint: {_listing(missing)}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
  if problems:
    raise CheckpointError(f"{source} does not match the model config ({cfg.name}): " + "; ".join(problems))
  return unflatten(filled)


def params_to_tensors(params: Mapping, cfg: VLMConfig) -> dict[str, np.ndarray]:
  """Our params pytree -> HF tensors in the layout transformers saves."""
  check_hf_layout(cfg)
  flat = flatten(params.get("params", params))
  out = {}
  for path, value in flat.items():
    for pattern, hf, kind in _OURS_TO_HF:
      m = pattern.match(path)
      if m:
        name = _fill(hf, m.groupdict())
        prefix = next(p for p in _EXPORT_PREFIXES if name.startswith(p))
        out[_EXPORT_PREFIXES[prefix] + name[len(prefix):]] = np.asarray(_TRANSFORMS[kind][1](np.asarray(value)))
        break
    else:
      raise CheckpointError(f"parameter {path} has no Hugging Face name")
  return out


def _read_json(path: str, required: bool) -> dict | None:
  if not os.path.exists(path):
    if required:
      raise CheckpointError(f"{path} not found: a checkpoint directory needs config.json")
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def load_config(directory: str, tokenizer_ids: Mapping[str, int | None] | None = None, **dtypes) -> VLMConfig:
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
  return config_from_hf(_read_json(os.path.join(directory, "config.json"), True),
                        _read_json(os.path.join(directory, "preprocessor_config.json"), False),
                        _read_json(os.path.join(directory, "generation_config.json"), False),
                        tokenizer_ids=tokenizer_ids, **dtypes)


def load_params(directory: str, cfg: VLMConfig) -> dict:
  tensors = load_directory(directory)
  check_finite(tensors, directory)
  return {"params": convert_tensors(tensors, cfg, source=directory)}


def export(directory: str, cfg: VLMConfig, params: Mapping) -> None:
  """Writes config.json + model.safetensors in the transformers LLaVA layout."""
  os.makedirs(directory, exist_ok=True)
  tensors = params_to_tensors(params, cfg)
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)
  v = cfg.vision
  with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
    json.dump({"image_mean": list(v.image_mean), "image_std": list(v.image_std),
               "size": {"height": v.image_size, "width": v.image_size}}, f, indent=2)
