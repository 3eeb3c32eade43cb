"""Checks of what users hand the model's public entry points (`VLM.prefill`, `encode_image`, `generate`).

Every check runs on concrete (host or device) arrays only: inside `jax.jit` the
inputs are tracers and only their static properties (shapes, dtypes) are checked,
so no check adds a host sync to a compiled program. Each raises `InputError`
with one line naming the offending values and what to do.
"""

from __future__ import annotations

import math

import jax
import numpy as np

# Normalised pixels of a [0, 1] image lie within a few units of 0 for every family's mean/std (CLIP: -1.8..2.2,
# SigLIP: -1..1); values beyond this are raw intensities (0..255) that skipped preprocessing.
UNNORMALISED_LIMIT = 20.0


class InputError(ValueError):
  """An input a public entry point cannot use (names the values)."""


def concrete(*arrays) -> bool:
  """True when none of the arrays is being traced (checks that read values may run)."""
  return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def check_pixels(vision, pixels) -> None:
  """pixels float[B, S, S, C] for this tower, normalised, finite, at least one image."""
  want = (vision.image_size, vision.image_size, vision.num_channels)
  shape = tuple(pixels.shape)
  if len(shape) != 4 or shape[1:] != want:
    raise InputError(f"pixels must be float[B, {want[0]}, {want[1]}, {want[2]}] (channels last) for this tower, got "
                     f"shape {shape}; resize with vtr_jax.models.vit.preprocess")
  if shape[0] == 0:
    raise InputError("the batch is empty: pixels have shape (0, ...); pass at least one image")
  if not np.issubdtype(np.dtype(pixels.dtype), np.floating):
    raise InputError(f"pixels have dtype {np.dtype(pixels.dtype).name}; the model takes normalised floats: pass "
                     "uint8 images through vtr_jax.models.vit.preprocess")
  if not concrete(pixels):
    return
  values = np.asarray(pixels, np.float32)
  bad = ~np.isfinite(values)
  if bad.any():
    samples = sorted({int(i) for i in np.nonzero(bad)[0]})
    raise InputError(f"pixels hold {int(bad.sum())} NaN/Inf values (samples {samples[:8]}); pass finite images")
  peak = float(np.abs(values).max())
  if peak > UNNORMALISED_LIMIT:
    lo = min((0 - m) / s for m, s in zip(vision.image_mean, vision.image_std))
    hi = max((1 - m) / s for m, s in zip(vision.image_mean, vision.image_std))
    raise InputError(f"pixels look unnormalised: |values| reach {peak:.4g}, while normalised images lie in "
                     f"[{lo:.2f}, {hi:.2f}] for this tower's mean/std; pass uint8 images through "
                     "vtr_jax.models.vit.preprocess")


def check_prompts(tokens, valid, image_token_id: int, vocab_size: int | None = None) -> None:
  """Left-padded prompts int[B, T] with bool[B, T] validity: one image placeholder each, ids in the vocabulary."""
  if len(tokens.shape) != 2:
    raise InputError(f"tokens must be int[B, T], got shape {tuple(tokens.shape)}")
  if tuple(valid.shape) != tuple(tokens.shape):
    raise InputError(f"valid has shape {tuple(valid.shape)}, tokens {tuple(tokens.shape)}; they must match")
  if tokens.shape[0] == 0 or tokens.shape[1] == 0:
    raise InputError(f"the batch is empty: tokens have shape {tuple(tokens.shape)}; pass at least one prompt")
  if not np.issubdtype(np.dtype(tokens.dtype), np.integer):
    raise InputError(f"tokens have dtype {np.dtype(tokens.dtype).name}; token ids are integers")
  if not concrete(tokens, valid):
    return
  tokens, valid = np.asarray(tokens), np.asarray(valid).astype(bool)
  empty = np.nonzero(~valid.any(axis=1))[0]
  if empty.size:
    raise InputError(f"prompts {empty.tolist()[:8]} are all padding (valid is False everywhere); every sample needs "
                     "a prompt")
  right = np.nonzero((valid[:, :-1] & ~valid[:, 1:]).any(axis=1))[0]
  if right.size:
    i = int(right[0])
    raise InputError(f"prompts must be left-padded (padding first, then the prompt); sample {i} has padding after a "
                     f"real token at slot {int(np.nonzero(valid[i, :-1] & ~valid[i, 1:])[0][0]) + 1} (samples "
                     f"{right.tolist()[:8]}); use vtr_jax.models.vlm.pad_prompts")
  if vocab_size is not None:
    outside = (tokens < 0) | (tokens >= vocab_size)
    if outside.any():
      i, j = (int(a[0]) for a in np.nonzero(outside))
      raise InputError(f"token id {int(tokens[i, j])} at sample {i}, slot {j} is outside the vocabulary "
                       f"(0..{vocab_size - 1}); {int(outside.sum())} ids are out of range")
  counts = np.sum((tokens == image_token_id) & valid, axis=1)
  bad = np.nonzero(counts != 1)[0]
  if bad.size:
    i = int(bad[0])
    raise InputError(f"each prompt needs exactly one image placeholder (id {image_token_id}); "
                     f"sample {i} has {int(counts[i])} (samples with the wrong count: {bad.tolist()})")


def check_batch(pixels, tokens) -> None:
  """The images and the prompts describe the same samples."""
  if pixels.shape[0] != tokens.shape[0]:
    raise InputError(f"{pixels.shape[0]} images but {tokens.shape[0]} prompts: the batch sizes of pixels and tokens "
                     "must agree (one image per prompt)")


def check_generation(cfg, tokens, valid, *, max_new_tokens: int, temperature: float, top_k: int, rng) -> None:
  """Decoding settings: a step count the positions and caches allow, a usable temperature and top_k."""
  if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  if not isinstance(temperature, (int, float)) or math.isnan(temperature) or temperature < 0:
    raise InputError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
  if not isinstance(top_k, int) or top_k < 0 or top_k > cfg.text.vocab_size:
    raise InputError(f"top_k must be an integer in 0..{cfg.text.vocab_size} (0: no truncation), got {top_k!r}")
  if temperature > 0 and rng is None:
    raise InputError("sampling (temperature > 0) needs an rng key: pass rng=jax.random.key(seed)")
  # the longest sequence: the whole prompt with every image position (as if nothing were pruned) + new tokens
  longest = tokens.shape[1] - 1 + cfg.image_positions + max_new_tokens
  if concrete(valid):
    longest = int(np.asarray(valid).sum(axis=1).max()) - 1 + cfg.image_positions + max_new_tokens
  if longest > cfg.text.max_positions:
    raise InputError(f"max_new_tokens={max_new_tokens} needs positions up to {longest}, beyond the decoder's "
                     f"max_positions={cfg.text.max_positions} (prompt + {cfg.image_positions} image positions + new "
                     "tokens); shorten the prompt or generate fewer tokens")
