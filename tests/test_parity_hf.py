"""vtr_jax models against `transformers` (the reference) on tiny random checkpoints.

Print the numbers quoted in the closing note with:
    .venv/bin/python -m pytest tests/test_parity_hf.py -k report -s
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_tiny
from vtr_jax.models.decoder import Decoder
from vtr_jax.models.vit import VisionTower
from vtr_jax.models.vlm import VLM, generate, pad_prompts

RTOL = 1e-4
LENGTHS, IMAGE_AT = (7, 12, 4), (2, 6, 1)  # three prompts of different lengths


def _pixels(seed: int, b: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((b, 28, 28, 3)).astype(np.float32)


def _torch_pixels(px: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(px).permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]


def _hf_logits(tiny, prompt, px) -> np.ndarray:
  ids = torch.tensor([hf_tiny.hf_input_ids(prompt, tiny.config.num_image_tokens)])
  with torch.no_grad():
    return tiny.torch_model(input_ids=ids, pixel_values=_torch_pixels(px)).logits[0].numpy()


def _rel(a, b) -> float:
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_prefill_logits_batch1(tiny):
  prompt = hf_tiny.random_prompts(np.random.default_rng(1), [9], [3])[0]
  px = _pixels(1, 1)
  toks, valid = pad_prompts([prompt], hf_tiny.PAD)
  ours = np.asarray(VLM(tiny.config).apply(tiny.params, px, toks, valid))[0]
  ref = _hf_logits(tiny, prompt, px)
  assert ours.shape == ref.shape
  assert _rel(ours, ref) < RTOL


def test_prefill_logits_batch3_different_lengths(tiny):
  prompts = hf_tiny.random_prompts(np.random.default_rng(2), LENGTHS, IMAGE_AT)
  px = _pixels(2, 3)
  toks, valid = pad_prompts(prompts, hf_tiny.PAD)
  out, _, aux = VLM(tiny.config).apply(tiny.params, px, toks, valid, method=VLM.prefill)
  out = np.asarray(out)
  valid_slots = np.asarray(aux["prompt/valid"])
  for i, prompt in enumerate(prompts):
    ref = _hf_logits(tiny, prompt, px[i:i + 1])
    ours = out[i][valid_slots[i]]  # left padding removed
    assert ours.shape == ref.shape
    assert _rel(ours, ref) < RTOL, f"sample {i}"


def _hf_greedy(tiny, prompt, px, n) -> list[int]:
  ids = torch.tensor([hf_tiny.hf_input_ids(prompt, tiny.config.num_image_tokens)])
  with torch.no_grad():
    out = tiny.torch_model.generate(input_ids=ids, pixel_values=_torch_pixels(px), max_new_tokens=n,
                                    do_sample=False, min_new_tokens=n, pad_token_id=hf_tiny.PAD)
  return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_20_tokens(tiny, batch):
  prompts = hf_tiny.random_prompts(np.random.default_rng(3), LENGTHS[:batch], IMAGE_AT[:batch])
  px = _pixels(3, batch)
  toks, valid = pad_prompts(prompts, hf_tiny.PAD)
  # min_new_tokens on the HF side suppresses EOS; do the same here by dropping EOS from the config.
  cfg = tiny.config.__class__(**{**tiny.config.__dict__, "eos_token_ids": ()})
  gen = generate(VLM(cfg), tiny.params, px, toks, valid, max_new_tokens=20)
  for i, prompt in enumerate(prompts):
    ref = _hf_greedy(tiny, prompt, px[i:i + 1], 20)
    assert np.asarray(gen.tokens[i]).tolist() == ref, f"sample {i}"


def test_generation_stops_at_eos(tiny_clip):
  tiny = tiny_clip
  prompts = hf_tiny.random_prompts(np.random.default_rng(4), LENGTHS, IMAGE_AT)
  px = _pixels(4, 3)
  toks, valid = pad_prompts(prompts, hf_tiny.PAD)
  free = generate(VLM(tiny.config.__class__(**{**tiny.config.__dict__, "eos_token_ids": ()})), tiny.params,
                  px, toks, valid, max_new_tokens=12)
  # Declare the 4th generated token of sample 1 an end token: later tokens must become padding.
  stop = int(free.tokens[1, 3])
  cfg = tiny.config.__class__(**{**tiny.config.__dict__, "eos_token_ids": (stop,)})
  gen = generate(VLM(cfg), tiny.params, px, toks, valid, max_new_tokens=12)
  row = np.asarray(gen.tokens[1]).tolist()
  first = row.index(stop)
  assert first <= 3 and all(t == hf_tiny.PAD for t in row[first + 1:])
  assert bool(gen.done[1])


def test_vision_tower_alone(tiny):
  px = _pixels(5, 2)
  vcfg = tiny.config.vision
  layer = vcfg.feature_layers[0]
  tower = VisionTower(vcfg)
  run = vcfg.layers_run
  extras = {("received_attn", -1)} | ({("cls_attn", -1)} if vcfg.has_cls else set())
  feats, aux = tower.apply({"params": tiny.params["params"]["vision"]}, px, extras=frozenset(extras))
  tm = tiny.torch_model
  tm.model.vision_tower.config._attn_implementation = "eager"
  with torch.no_grad():
    out = tm.model.vision_tower(_torch_pixels(px), output_hidden_states=True, output_attentions=True)
  ref = out.hidden_states[layer].numpy()
  if vcfg.has_cls and not vcfg.keep_cls:
    ref = ref[:, 1:]
  assert _rel(np.asarray(feats), ref) < RTOL
  attn = out.attentions[run - 1].numpy()  # [B, N, T, T] of the block that produced the features
  np.testing.assert_allclose(np.asarray(aux[f"vision/received_attn/{run - 1}"]), attn.mean(axis=(1, 2)),
                             atol=1e-6)
  if vcfg.has_cls:
    np.testing.assert_allclose(np.asarray(aux[f"vision/cls_attn/{run - 1}"]), attn[:, :, 0], atol=1e-6)


def test_decoder_alone(tiny):
  rng = np.random.default_rng(6)
  prompts = [list(rng.integers(3, 80, size=n)) for n in (5, 9)]
  toks, valid = pad_prompts(prompts, hf_tiny.PAD)
  positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
  dec = Decoder(tiny.config.text)
  out = np.asarray(dec.apply({"params": tiny.params["params"]["decoder"]}, toks, positions, valid))
  lm = tiny.torch_model
  for i, p in enumerate(prompts):
    with torch.no_grad():
      h = lm.model.language_model(input_ids=torch.tensor([p])).last_hidden_state
      ref = lm.lm_head(h)[0].numpy()
    assert _rel(out[i][valid[i]], ref) < RTOL


def test_report_parity_numbers(tiny, capsys):
  """Prints max abs / relative logit error for batch 1 and batch 3 (see module docstring)."""
  prompts = hf_tiny.random_prompts(np.random.default_rng(7), LENGTHS, IMAGE_AT)
  px = _pixels(7, 3)
  toks, valid = pad_prompts(prompts, hf_tiny.PAD)
  out, _, aux = VLM(tiny.config).apply(tiny.params, px, toks, valid, method=VLM.prefill)
  errs = []
  for i, prompt in enumerate(prompts):
    ref = _hf_logits(tiny, prompt, px[i:i + 1])
    ours = np.asarray(out[i])[np.asarray(aux["prompt/valid"][i])]
    errs.append((float(np.max(np.abs(ours - ref))), _rel(ours, ref)))
  abs_err, rel_err = max(e[0] for e in errs), max(e[1] for e in errs)
  with capsys.disabled():
    print(f"\n[parity] {tiny.family}: batch of 3 (lengths {LENGTHS}) max abs {abs_err:.2e}, "
          f"max rel {rel_err:.2e} (fp32)")
  assert rel_err < RTOL
