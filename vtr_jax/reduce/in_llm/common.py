"""What every in-LLM method shares: attention rows from Q/K, visual-token selection, the state.

The decoder calls a method's hook before each layer with a state dict:
  x float[B, T, D], positions int32[B, T], valid bool[B, T],
  visual bool[B, T] (slot holds a visual token), n_visual (static int: visual
  slots, the same for every sample), tok/patch int32[B, T] (original patch of
  a visual token, -2 for text), and method entries. Entries named in
  TOKEN_KEYS or starting with "tok/" are per-token and follow every gather.

Selection keeps every text token and `keep` visual tokens per sample (a
static count), in slot order, so visual tokens stay one contiguous block.
The `mask` variant keeps the sequence whole and hides the dropped tokens
with `valid` instead (FastV's attention-mask variant): same results, no
speed-up — the reference the drop variant is tested against.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vtr_jax.kernels import ops
from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import ReductionError

TOKEN_KEYS = ("x", "positions", "valid", "visual")
BIG = 3.0e38  # priority of tokens that are always kept


def is_token_key(key: str) -> bool:
  return key in TOKEN_KEYS or key.startswith("tok/")


def gather_state(state: dict[str, Any], idx: jax.Array) -> dict[str, Any]:
  """Every per-token entry gathered at idx (int32[B, T'])."""
  return {k: (P.take(v, idx) if is_token_key(k) else v) for k, v in state.items()}


def renumber(valid: jax.Array) -> jax.Array:
  """Contiguous position ids over the valid tokens: int32[B, T]."""
  return jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)


def prompt_mask(state) -> jax.Array:
  """bool[B, T]: valid prompt tokens (`tok/prompt` when the caller marks appended answer tokens)."""
  return state["valid"] & state.get("tok/prompt", True)


def last_row(state) -> tuple[jax.Array, jax.Array]:
  """(slot index int32[B, 1], valid bool[B, 1]) of the last prompt token.

  With left padding that is slot T-1, unless `tok/prompt` marks tokens
  appended after the prompt (answers during training, generated tokens when
  re-running a prefill): then it is the last slot of the prompt.
  """
  b, t = state["valid"].shape
  if "tok/prompt" not in state:
    return jnp.full((b, 1), t - 1, jnp.int32), jnp.ones((b, 1), bool)
  slots = jnp.arange(t, dtype=jnp.int32)[None]
  last = jnp.max(jnp.where(prompt_mask(state), slots, -1), axis=1, keepdims=True)
  return jnp.maximum(last, 0), last >= 0


def text_after_image(state) -> jax.Array:
  """bool[B, T]: valid prompt text tokens after the last visual slot."""
  t = state["valid"].shape[1]
  slots = jnp.arange(t)[None]
  last_vis = jnp.max(jnp.where(state["visual"], slots, -1), axis=1, keepdims=True)
  return prompt_mask(state) & ~state["visual"] & (slots > last_vis)


def attention_mass(access, layer: int, state, rows: jax.Array, row_valid: jax.Array) -> jax.Array:
  """Mean softmax attention that the query rows pay each key at decoder layer `layer`.

  Computes only the rows' q (and all keys) with layer `layer`'s input norm,
  projections and RoPE on the hidden states entering it; the attention
  matrix is never formed (`vtr_jax.kernels.ops.attention_mass`).

  Args:
    access: the decoder's `LayerAccess`.
    rows: int32[B, R] query slots; row_valid: bool[B, R].
  Returns:
    float32[B, T] attention per key, averaged over heads and valid rows,
    causal and padding masks applied.
  """
  q, k = access.qk(layer, state["x"], state["positions"])  # [B, T, N, H], [B, T, K, H]
  q_rows = P.take(q, rows)  # [B, R, N, H]
  return ops.attention_mass(jnp.swapaxes(q_rows, 1, 2), jnp.swapaxes(k, 1, 2), key_valid=state["valid"],
                            row_valid=row_valid, q_slots=rows)


def keep_visual(state: dict[str, Any], scores: jax.Array, keep: int, *, mask: bool,
                renumber_positions: bool) -> tuple[dict[str, Any], jax.Array]:
  """Keeps every text token and the `keep` best-scoring valid visual tokens.

  Args:
    scores: float[B, T] (only visual slots matter; NaN ranks last).
    keep: static visual tokens to keep, 0 <= keep <= n_visual.
    mask: hide dropped tokens (valid=False) instead of removing them.
    renumber_positions: contiguous positions afterwards (else original ids).
  Returns:
    (new state, chosen bool[B, T] over the old slots: visual tokens kept).
  """
  n_vis = state["n_visual"]
  if not 0 <= keep <= n_vis:
    raise ReductionError(f"cannot keep {keep} visual tokens: {n_vis} are left at this layer")
  visual, valid = state["visual"], state["valid"]
  score = jnp.where(jnp.isnan(scores), -jnp.inf, scores.astype(jnp.float32))
  if keep:
    vis_idx = P.topk_indices(jnp.where(visual, score, -jnp.inf), keep, visual & valid)
    chosen = P.chosen_mask(vis_idx, visual.shape[1]) & visual
  else:
    chosen = jnp.zeros_like(visual)
  if mask:
    new = dict(state)
    new["valid"] = valid & (~visual | chosen)
  else:
    t = visual.shape[1]
    idx = P.topk_indices(jnp.where(~visual | chosen, 1.0, 0.0), t - n_vis + keep)  # sorted slots
    new = gather_state(state, idx)
    new["n_visual"] = keep
  if renumber_positions:
    new["positions"] = renumber(new["valid"])
  return new, chosen


def single_drop_counts(method: str, layer: int, kept: int, n_visual: int, num_layers: int, mask: bool) -> list[int]:
  """Visual tokens entering each layer for a method that drops once before `layer` (dense when masked)."""
  if mask:  # the checking variant keeps every slot: no saving
    return [n_visual] * num_layers
  check_layer(method, layer, num_layers, first=1)
  return [n_visual if i < layer else kept for i in range(num_layers)]


def check_layer(method: str, layer: int, num_layers: int, *, first: int = 0) -> None:
  if not first <= layer < num_layers:
    raise ReductionError(f"{method}: layer={layer} must be in {first}..{num_layers - 1} "
                         f"(the decoder has {num_layers} layers)")
