"""Checkpoint conversion: strictness, error messages, layouts, and the export round trip."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import hf_tiny
import vtr_jax
from vtr_jax.convert import CheckpointError, load_file, save_file
from vtr_jax.convert.hf_llava import canonical_name, param_path
from vtr_jax.models.vlm import VLM, pad_prompts


def _copy(tiny, tmp_path) -> str:
  d = str(tmp_path / "ckpt")
  shutil.copytree(tiny.directory, d)
  return d


def _rewrite(directory: str, edit) -> None:
  """Applies edit(dict name->array) to the shard that holds the first vision tensor."""
  files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
  for f in files:
    path = os.path.join(directory, f)
    tensors = {k: np.array(v) for k, v in load_file(path).items()}
    if any(k.startswith("vision_tower.") for k in tensors):
      edit(tensors)
      save_file(tensors, path)
      return
  raise AssertionError("no vision shard")


def test_sharded_checkpoint_loads(tiny_clip):
  files = [f for f in os.listdir(tiny_clip.directory) if f.endswith(".safetensors")]
  assert len(files) > 1 and os.path.exists(os.path.join(tiny_clip.directory, "model.safetensors.index.json"))
  assert tiny_clip.config.vision.kind == "clip" and tiny_clip.config.text.kind == "llama"


def test_missing_tensor_is_named(tiny_clip, tmp_path):
  d = _copy(tiny_clip, tmp_path)
  removed = []

  def drop(t):
    name = sorted(k for k in t if k.startswith("vision_tower."))[0]
    removed.append(name)
    del t[name]

  _rewrite(d, drop)
  # the shard index still names it; drop it there too so only the parameter check can catch it
  idx = os.path.join(d, "model.safetensors.index.json")
  with open(idx) as f:
    index = json.load(f)
  index["weight_map"].pop(removed[0])
  with open(idx, "w") as f:
    json.dump(index, f)
  with pytest.raises(CheckpointError, match="not in the checkpoint") as e:
    vtr_jax.load(d)
  assert param_path(removed[0])[0] in str(e.value)


def test_extra_tensor_is_named(tiny_clip, tmp_path):
  d = _copy(tiny_clip, tmp_path)
  _rewrite(d, lambda t: t.update({"vision_tower.encoder.layers.7.mlp.fc1.weight": np.zeros((2, 2), np.float32),
                                  "something.else": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match="fill no parameter") as e:
    vtr_jax.load(d)
  assert "vision_tower.encoder.layers.7.mlp.fc1.weight" in str(e.value) and "something.else" in str(e.value)


def test_shape_mismatch_is_named(tiny_clip, tmp_path):
  d = _copy(tiny_clip, tmp_path)
  _rewrite(d, lambda t: t.update({"vision_tower.embeddings.class_embedding": np.zeros(5, np.float32)}))
  with pytest.raises(CheckpointError, match=r"class_embedding \[5\]"):
    vtr_jax.load(d)


def test_truncated_file_is_named(tiny_clip, tmp_path):
  d = _copy(tiny_clip, tmp_path)
  path = os.path.join(d, sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0])
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 16)
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    vtr_jax.load(d)


def test_garbage_header_is_named(tmp_path):
  path = str(tmp_path / "model.safetensors")
  with open(path, "wb") as f:
    f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
  with pytest.raises(CheckpointError, match="not valid JSON"):
    load_file(path)


def test_missing_directory_and_pickles(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    vtr_jax.load(str(tmp_path / "nope"))
  d = tmp_path / "pickled"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(hf_tiny.tiny_config("clip_llama").to_dict()))
  (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
  with pytest.raises(CheckpointError, match="pickle checkpoints are not loaded"):
    vtr_jax.load(str(d))


def test_unsupported_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
  with pytest.raises(CheckpointError, match="any-resolution tiling is not implemented"):
    vtr_jax.load(str(tmp_path))


def test_key_layouts_are_equivalent():
  names = ["vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.weight",
           "vision_tower.encoder.layers.3.self_attn.q_proj.weight",
           "model.vision_tower.encoder.layers.3.self_attn.q_proj.weight"]
  assert {canonical_name(n) for n in names} == {"vision.encoder.layers.3.self_attn.q_proj.weight"}
  assert param_path("language_model.model.layers.2.mlp.up_proj.weight") == \
      param_path("model.language_model.layers.2.mlp.up_proj.weight") == ("decoder/layers_2/mlp/up_proj/kernel", "linear")
  assert param_path("language_model.lm_head.weight") == param_path("lm_head.weight")


def test_tokenizer_matches_transformers(tiny_clip):
  from transformers import PreTrainedTokenizerFast
  ref = PreTrainedTokenizerFast(tokenizer_file=os.path.join(tiny_clip.directory, "tokenizer.json"))
  text = "<s> w5 w17 <image> w40 w41"
  assert tiny_clip.tokenizer.encode(text) == ref(text).input_ids
  assert tiny_clip.tokenizer.image_token_id == tiny_clip.config.image_token_id


def test_export_round_trip_loads_in_transformers(tiny, tmp_path):
  """vtr_jax.save -> transformers.from_pretrained gives the original model's logits."""
  from transformers import LlavaForConditionalGeneration
  d = str(tmp_path / "exported")
  vtr_jax.save(d, tiny.config, tiny.params, tiny.tokenizer)
  reloaded = LlavaForConditionalGeneration.from_pretrained(d).eval()
  prompt = hf_tiny.random_prompts(np.random.default_rng(0), [6], [2])[0]
  ids = torch.tensor([hf_tiny.hf_input_ids(prompt, tiny.config.num_image_tokens)])
  px = torch.randn(1, 3, 28, 28)
  with torch.no_grad():
    a = tiny.torch_model(input_ids=ids, pixel_values=px).logits
    b = reloaded(input_ids=ids, pixel_values=px).logits
  np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
  cfg2, params2, tok2 = vtr_jax.load(d)
  assert cfg2 == tiny.config
  flat = lambda p: {k: np.asarray(v) for k, v in vtr_jax.convert.hf_llava.flatten(p["params"]).items()}
  a_flat, b_flat = flat(tiny.params), flat(params2)
  assert a_flat.keys() == b_flat.keys()
  for k in a_flat:
    np.testing.assert_array_equal(a_flat[k], b_flat[k], err_msg=k)


def test_tied_embeddings_and_bf16(tmp_path):
  """A tied-embedding bf16 checkpoint loads with bf16 params and matches transformers in bf16."""
  d = str(tmp_path / "tied")
  tm = hf_tiny.build("clip_llama", d, tie=True)
  tm = tm.to(torch.bfloat16)
  tm.save_pretrained(d)
  cfg, params, _ = vtr_jax.load(d)
  assert cfg.text.tie_embeddings and cfg.text.param_dtype == "bfloat16"
  assert "lm_head" not in params["params"]["decoder"]
  emb = params["params"]["decoder"]["embed_tokens"]["embedding"]
  assert str(emb.dtype) == "bfloat16"
  ref = tm.model.language_model.embed_tokens.weight.float().detach().numpy()
  np.testing.assert_array_equal(np.asarray(emb, np.float32), ref)
  # fp32 compute over the same bf16 weights agrees with transformers' fp32 run of them
  cfg32, params32, _ = vtr_jax.load(d, dtype="float32")
  prompt = hf_tiny.random_prompts(np.random.default_rng(0), [6], [2])[0]
  toks, valid = pad_prompts([prompt], 0)
  px = np.random.default_rng(0).standard_normal((1, 28, 28, 3)).astype(np.float32)
  ours = np.asarray(VLM(cfg32).apply(params32, px, toks, valid))[0]
  from transformers import LlavaForConditionalGeneration
  # reload in fp32 (casting the bf16 module in place would leave its RoPE buffer rounded to bf16)
  tm = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
  with torch.no_grad():
    ref = tm(input_ids=torch.tensor([hf_tiny.hf_input_ids(prompt, cfg.num_image_tokens)]),
             pixel_values=torch.from_numpy(px).permute(0, 3, 1, 2)).logits[0].numpy()
  assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4
