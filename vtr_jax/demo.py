"""A first look without any checkpoint: build a small LLaVA-geometry model, prefill, decode.

    python -m vtr_jax.demo
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.models.decoder import DecoderConfig
from vtr_jax.models.vit import VisionConfig
from vtr_jax.models.vlm import VLM, VLMConfig, generate, pad_prompts


def demo_config() -> VLMConfig:
  """LLaVA-1.5's token geometry (336 px, 14 px patches: 576 visual tokens) at a width a CPU runs fast."""
  vision = VisionConfig(image_size=336, patch_size=14, hidden_size=128, intermediate_size=256, num_layers=4,
                        num_heads=4)
  text = DecoderConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                       num_kv_heads=2)
  return VLMConfig(vision=vision, text=text, image_token_id=511, pad_token_id=0, eos_token_ids=())


def _timed(fn, *args, repeats: int = 5):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return out, first, float(np.median(times))


def main() -> None:
  cfg = demo_config()
  model = VLM(cfg)
  rng = np.random.default_rng(0)
  prompts = [[1, *rng.integers(2, 500, 6).tolist(), 511, *rng.integers(2, 500, 12).tolist()],
             [1, 511, *rng.integers(2, 500, 20).tolist()]]
  tokens, valid = pad_prompts(prompts, 0)
  pixels = jnp.asarray(rng.standard_normal((2, 336, 336, 3)), jnp.float32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), pixels, tokens, valid))
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f"vtr_jax demo on {jax.devices()[0].platform}: random {cfg.vision.kind}+{cfg.text.kind} model, "
        f"{n_params / 1e6:.2f} M parameters, {cfg.num_image_tokens} visual tokens per image")
  prefill = jax.jit(lambda p, x, t, v: model.apply(p, x, t, v, cache_extra=8, last_only=True,
                                                   method=VLM.prefill))
  (logits, cache, aux), first, steady = _timed(prefill, params, pixels, tokens, valid)
  print(f"  prompts: tokens {tokens.shape} -> LLM sequence {aux['prompt/valid'].shape} "
        f"({int(aux['prompt/visual'][0].sum())} visual slots per sample)")
  print(f"  prefill: logits {logits.shape}, KV cache {len(cache.layers)} layers x {cache.layers[0].k.shape}; "
        f"compile+run {first * 1e3:.0f} ms, run {steady * 1e3:.1f} ms (median of 5)")
  gen, first, steady = _timed(lambda: generate(model, params, pixels, tokens, valid, max_new_tokens=8))
  print(f"  generate 8 tokens: {np.asarray(gen.tokens).tolist()}; run {steady * 1e3:.1f} ms")


if __name__ == "__main__":
  main()
