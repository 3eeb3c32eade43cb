"""Tiny random Hugging Face LLaVA models, built and saved locally for parity tests."""

from __future__ import annotations


import numpy as np

IMAGE_ID = 90
VOCAB = 96
PAD, BOS, EOS = 0, 1, 2


def tiny_config(family: str, *, feature_layer=None, tie: bool = False):
  """A transformers LlavaConfig of the given family ('clip_llama' or 'siglip_qwen2')."""
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config, SiglipVisionConfig
  if family == "clip_llama":
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=7, projection_dim=16)
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     rope_theta=10000.0, tie_word_embeddings=tie, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    layer, strategy = (-2 if feature_layer is None else feature_layer), "default"
  elif family == "siglip_qwen2":
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=28, patch_size=7)
    tc = Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     rope_theta=1000000.0, tie_word_embeddings=tie, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    layer, strategy = (-1 if feature_layer is None else feature_layer), "full"
  else:
    raise ValueError(family)
  return LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_ID, vision_feature_layer=layer,
                     vision_feature_select_strategy=strategy, tie_word_embeddings=tie)


def build(family: str, directory: str, *, seed: int = 0, shard: bool = False, **kw):
  """Creates, randomises and saves a tiny LLaVA; returns the torch model (eval mode, float32)."""
  import torch
  from transformers import LlavaForConditionalGeneration
  torch.manual_seed(seed)
  model = LlavaForConditionalGeneration(tiny_config(family, **kw)).eval()
  with torch.no_grad():  # HF inits some weights to 0/1; make every tensor informative
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.08 * torch.randn_like(p))
  model.save_pretrained(directory, max_shard_size="40KB" if shard else "1GB")
  save_tokenizer(directory)
  return model


def save_tokenizer(directory: str) -> None:
  """A word-level tokenizer whose ids match the tiny models' special ids (image = 90)."""
  import tokenizers
  from vtr_jax.data.tokenizer import Tokenizer
  specials = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3, "<image>": IMAGE_ID}
  vocab = {f"w{i}": i for i in range(VOCAB) if i not in specials.values()}
  vocab.update(specials)
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  backend.add_special_tokens(["<pad>", "<s>", "</s>", "<image>"])
  Tokenizer(backend, image_token="<image>", pad_token="<pad>", eos_token="</s>", bos_token="<s>").save(directory)


def hf_input_ids(prompt: list[int], n_image: int) -> list[int]:
  """Expands our single placeholder into HF's n_image placeholder tokens."""
  out = []
  for t in prompt:
    out.extend([IMAGE_ID] * n_image if t == IMAGE_ID else [t])
  return out


def random_prompts(rng: np.random.Generator, lengths, image_at) -> list[list[int]]:
  prompts = []
  for n, at in zip(lengths, image_at):
    p = [1] + list(rng.integers(5, IMAGE_ID, size=n - 1))
    p.insert(at, IMAGE_ID)
    prompts.append([int(x) for x in p])
  return prompts


# ---- Qwen2.5-VL -------------------------------------------------------------------------------
QWEN_VIDEO_ID, QWEN_VISION_START, QWEN_VISION_END = 91, 92, 93  # the image token is IMAGE_ID


def qwen2_5_vl_config(*, tie: bool = False):
  """A tiny transformers Qwen2_5_VLConfig: 4 vision blocks (1 and 3 attend fully, 0 and 2 in 2 x 2-unit
  windows of 56 px), a 2-layer Qwen2 decoder with M-RoPE sections [1, 2, 3] (head dim 12)."""
  from transformers import Qwen2_5_VLConfig
  vision = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=48, in_channels=3,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                fullatt_block_indexes=[1, 3], tokens_per_second=2)
  text = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 2, 3]},
              eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS)
  return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                          video_token_id=QWEN_VIDEO_ID, vision_start_token_id=QWEN_VISION_START,
                          vision_end_token_id=QWEN_VISION_END, tie_word_embeddings=tie)


def build_qwen2_5_vl(directory: str, *, seed: int = 0, tie: bool = False):
  """Creates, randomises and saves a tiny Qwen2.5-VL; returns the torch model (eval mode, float32)."""
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_config(tie=tie)).eval()
  with torch.no_grad():  # HF inits some weights to 0/1; make every tensor informative
    for name, p in model.named_parameters():
      if "norm" in name or "ln_q" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.08 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model
