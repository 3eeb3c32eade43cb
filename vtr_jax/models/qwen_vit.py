"""The Qwen2.5-VL vision tower (Flax Linen, used functionally), as transformers 5.24 implements it.

Einsum letters as in `vtr_jax.models.common`; here B counts visual inputs
(images or videos), P patches per input (padded, a multiple of 4), M = P / 4
merge units (the tokens the tower hands to the LLM), D the tower width.

Static shapes: each visual input is one row of a padded batch,
`patches float[B, P, C * 2 * 14 * 14]` (processor order, see
`vtr_jax.processors.qwen2_vl`) with its `grid_thw int32[B, 3]` (patches on
t, h, w). Everything that depends on the grid sizes (the window permutation,
the attention segments, the rotary ids) is computed from `grid_thw` with
static-size jnp ops (`window_layout`), so one compiled program serves every
mix of image and video sizes that fits P, and `grid_thw` may be traced.

The forward pass, step by step as transformers does it:
1. patch embedding: a Conv3d without bias over (C, 2, 14, 14) == one matmul
   on the 1176-wide rows;
2. window permutation (`get_vision_window_index`): merge units (2 x 2 patches,
   consecutive in the input) are reordered window-major, windows being
   `window_size / 14 / 2` units square (4 x 4 for 112 px), each temporal
   slice on its own; the merged grid is padded by `w - n % w` units per side
   (a whole empty window when divisible), and empty windows vanish;
3. 2-D rotary embeddings in float32: ids (h, w) per patch, angles
   `[h * f, w * f]` repeated to the head dim, permuted with the units;
4. blocks: x + attn(RMSNorm(x)), x + SwiGLU(RMSNorm(x)) (eps 1e-6, qkv and MLP
   with bias); window blocks attend within their window, the blocks in
   `fullatt_block_indexes` within their temporal slice (transformers'
   `cu_seqlens` has one segment per t: no attention across time). Attention
   is a segment mask over the row (a varlen / block-sparse kernel is the fast
   path to add; the segments are contiguous in window order, as it needs);
5. the PatchMerger: RMSNorm, 4 x D -> Linear -> exact GELU -> Linear to the
   LLM width, then the units go back to the input order (`argsort(window_index)`).

Attributes of a `QwenVisionConfig` name transformers' fields (`depth`,
`fullatt_block_indexes`, ...); `vtr_jax.convert.qwen2_5_vl` reads them from
config.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.models import attention as attn
from vtr_jax.models import common as c
from vtr_jax.models.decoder import RMSNorm, apply_rotary
from vtr_jax.seams import take

Array = jax.Array

# Extras a caller may request per block (see `QwenVisionTower.__call__`).
EXTRA_NAMES = ("keys", "received_attn")


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
  """Geometry of the Qwen2.5-VL vision tower (transformers' `Qwen2_5_VLVisionConfig` names).

  Attributes:
    depth: number of blocks.
    hidden_size: tower width D.
    intermediate_size: SwiGLU width.
    num_heads: attention heads (head dim = hidden_size / num_heads, a multiple of 4).
    attention: the attention implementation (`vtr_jax.models.attention`; its segment masks run on
      `reference` or `xla`).
    in_channels, patch_size, temporal_patch_size: one patch is
      (C, temporal_patch_size, patch_size, patch_size) pixels.
    spatial_merge_size: the merger joins m x m patches into one token.
    window_size: window side in pixels (a multiple of patch_size * merge).
    fullatt_block_indexes: blocks that attend over their whole temporal slice.
    out_hidden_size: the merger's output width (the LLM's hidden size).
    tokens_per_second: temporal position scale of videos (read by `mrope`).
    rope_theta: base of the 2-D rotary embedding.
    hidden_act: the MLP activation (only `silu`).
  """
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 3584
  tokens_per_second: float = 2
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  hidden_act: str = "silu"
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention: str = "auto"  # an implementation of `vtr_jax.models.attention` that takes segment masks

  def __post_init__(self):
    object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
    if self.hidden_act != "silu":
      raise ValueError(f"QwenVisionConfig.hidden_act {self.hidden_act!r} is not supported (only 'silu')")
    if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
      raise ValueError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a whole head dim "
                       "divisible by 4 (2-D rotary embedding over h and w)")
    unit = self.patch_size * self.spatial_merge_size
    if self.window_size % unit or self.window_size < unit:
      raise ValueError(f"window_size {self.window_size} must be a positive multiple of patch_size * "
                       f"spatial_merge_size = {unit}")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"fullatt_block_indexes {bad} are outside the {self.depth} blocks")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Width of one patch row: C * T * p * p (1176)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    """Patches per output token (4)."""
    return self.spatial_merge_size ** 2

  @property
  def window_units(self) -> int:
    """Window side in merge units (4 for 112 px)."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@flax.struct.dataclass
class WindowLayout:
  """Where every merge unit of a padded batch goes (computed by `window_layout`).

  Attributes:
    order: int32[B, M] transformers' `window_index` per row: the input-order
      unit at each window-order slot (valid units first, padding after).
    window: int32[B, M] window id of each window-order slot (ascending; -1 padding).
    frame: int32[B, M] temporal slice of each window-order slot (-1 padding).
    hw: int32[B, M, 2] (row, col) on the merged grid of each window-order slot.
    valid: bool[B, M] input-order units that hold a real token.
    thw: int32[B, M, 3] (t, h, w) on the merged grid of each input-order unit (0 padding).
  """
  order: Array
  window: Array
  frame: Array
  hw: Array
  valid: Array
  thw: Array


def window_layout(grid_thw: Array, num_units: int, config: QwenVisionConfig) -> WindowLayout:
  """The window permutation and segments of each row, with static-size jnp ops (traceable).

  Args:
    grid_thw: int32[B, 3] patches on (t, h, w) per row; h and w multiples of the merge size.
    num_units: static M, merge units per row (padding included).
  """
  m, win = config.spatial_merge_size, config.window_units
  grid = jnp.asarray(grid_thw, jnp.int32)
  t, mh, mw = grid[:, :1], grid[:, 1:2] // m, grid[:, 2:3] // m  # [B, 1] each
  u = jnp.arange(num_units, dtype=jnp.int32)[None, :]  # [1, M]
  per_frame = jnp.maximum(mh * mw, 1)
  valid = u < t * mh * mw
  ti, rest = u // per_frame, u % per_frame
  r, col = rest // jnp.maximum(mw, 1), rest % jnp.maximum(mw, 1)
  # Windows per side after transformers' padding by win - n % win units (a whole empty window when n % win == 0;
  # empty windows hold no unit, so they vanish from the order and the segments).
  n_wr, n_wc = mh // win + 1, mw // win + 1
  window = (ti * n_wr + r // win) * n_wc + col // win
  key = jnp.where(valid, window * win * win + (r % win) * win + col % win, jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(key, axis=1, stable=True).astype(jnp.int32)  # [B, M]
  valid_w = take(valid, order)
  thw = jnp.where(valid[..., None], jnp.stack([ti, r, col], axis=-1), 0)  # [B, M, 3]
  return WindowLayout(order=order, window=jnp.where(valid_w, take(window, order), -1),
                      frame=jnp.where(valid_w, take(ti, order), -1), hw=take(thw[..., 1:], order), valid=valid,
                      thw=thw.astype(jnp.int32))


def hf_window_index(grid_thw, config: QwenVisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """transformers' `(window_index, cu_window_seqlens)` for grids packed in one sequence, from `window_layout`.

  grid_thw: int[B, 3]. Returns (int64[sum M_b] window-order unit indices into
  the concatenated units, int32[n_windows + 1] patch boundaries of the
  non-empty windows).
  """
  grid = np.asarray(grid_thw)
  units = (grid.prod(axis=1) // config.merge_unit).astype(int)
  layout = jax.device_get(window_layout(grid, max(int(units.max()), 1), config))
  index, cu, offset = [], [0], 0
  for b, n in enumerate(units):
    index.append(np.asarray(layout.order[b, :n], np.int64) + offset)
    _, counts = np.unique(layout.window[b, :n], return_counts=True)  # windows ascend in window order
    cu.extend((cu[-1] + np.cumsum(counts) * config.merge_unit).tolist())
    offset += n
  return np.concatenate(index), np.asarray(cu, np.int32)


def pad_patches(pixel_values, grid_thw, max_patches: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Processor output (all inputs' patches concatenated) -> the tower's padded batch.

  Args:
    pixel_values: float[sum_b t*h*w, patch_dim] (transformers' `pixel_values`).
    grid_thw: int[B, 3].
    max_patches: static P (default: the largest input, rounded up to a
      multiple of 4); keep it fixed to reuse one compiled program.
  Returns:
    (patches float32[B, P, patch_dim] zero-padded, grid_thw int32[B, 3]).
  """
  pixels, grid = np.asarray(pixel_values, np.float32), np.asarray(grid_thw, np.int64).reshape(-1, 3)
  counts = grid.prod(axis=1)
  if counts.sum() != pixels.shape[0]:
    raise ValueError(f"grid_thw {grid.tolist()} holds {int(counts.sum())} patches but pixel_values has "
                     f"{pixels.shape[0]} rows")
  if np.any(grid[:, 1:] % 2):
    raise ValueError(f"grid_thw {grid.tolist()}: h and w must be even (whole 2 x 2 merge units)")
  need = int(-(-counts.max() // 4) * 4) if len(counts) else 4
  p = need if max_patches is None else int(max_patches)
  if p < need or p % 4:
    raise ValueError(f"max_patches {p} must be a multiple of 4 and at least the largest input's {need} patches")
  out = np.zeros((len(grid), p, pixels.shape[1]), np.float32)
  start = 0
  for b, n in enumerate(counts):
    out[b, :n] = pixels[start:start + n]
    start += n
  return out, grid.astype(np.int32)


class QwenVisionAttention(nn.Module):
  """Self-attention with one biased qkv projection (transformers' `qkv`, rows ordered (3, N, H))."""
  config: QwenVisionConfig

  def setup(self):
    cfg = self.config
    self.qkv = nn.DenseGeneral(
        (3, cfg.num_heads, cfg.head_dim), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="qkv",
        kernel_init=c.param_axes(c.dense_init(), (c.EMBED, None, c.HEADS, c.HEAD_DIM)),
        bias_init=c.param_axes(nn.initializers.zeros, (None, c.HEADS, c.HEAD_DIM)))
    self.proj = nn.DenseGeneral(
        cfg.hidden_size, axis=(-2, -1), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="proj",
        kernel_init=c.param_axes(c.dense_init(), (c.HEADS, c.HEAD_DIM, c.EMBED)),
        bias_init=c.param_axes(nn.initializers.zeros, (c.EMBED,)))

  def __call__(self, x: Array, angles: Array, mask: attn.Mask) -> tuple[Array, Array, Array, Array]:
    """x float[B, P, D] (normed), angles float32[B, P, 1, H/2], mask: the block's segments ->
    (out float[B, P, D], roped q, roped k, k before the rotary embedding: float[B, P, N, H])."""
    qkv = self.qkv(x)  # [B, P, 3, N, H]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q_r = apply_rotary(q.astype(jnp.float32), angles).astype(q.dtype)  # rotary in float32, as transformers
    k_r = apply_rotary(k.astype(jnp.float32), angles).astype(k.dtype)
    out = attn.attend(q_r, k_r, v, mask, implementation=self.config.attention)
    return self.proj(out), q_r, k_r, k


class QwenVisionMLP(nn.Module):
  """SwiGLU with biases: down(silu(gate(x)) * up(x))."""
  config: QwenVisionConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dense = lambda name, feats, axes: nn.Dense(
        feats, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
        kernel_init=c.param_axes(c.dense_init(), axes), bias_init=c.param_axes(nn.initializers.zeros, axes[1:]))
    gate = dense("gate_proj", cfg.intermediate_size, (c.EMBED, c.MLP))(x)
    up = dense("up_proj", cfg.intermediate_size, (c.EMBED, c.MLP))(x)
    return dense("down_proj", cfg.hidden_size, (c.MLP, c.EMBED))(jax.nn.silu(gate) * up)


class QwenVisionBlock(nn.Module):
  config: QwenVisionConfig

  def setup(self):
    cfg = self.config
    self.norm1 = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm1")
    self.norm2 = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm2")
    self.attn = QwenVisionAttention(cfg, name="attn")
    self.mlp = QwenVisionMLP(cfg, name="mlp")

  def __call__(self, x: Array, angles: Array, mask: Array) -> tuple[Array, Array, Array, Array]:
    """Returns (x float[B, P, D], roped q, roped k, k before the rotary embedding: float[B, P, N, H])."""
    out, q, k, k_raw = self.attn(self.norm1(x), angles, mask)
    x = x + out
    return x + self.mlp(self.norm2(x)), q, k, k_raw


class QwenPatchMerger(nn.Module):
  """RMSNorm, then each merge unit's 4 x D -> Linear -> exact GELU -> Linear to `out_hidden_size`."""
  config: QwenVisionConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """float[B, P, D] -> float[B, P / 4, out_hidden_size] (units in the order of x)."""
    cfg = self.config
    x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="ln_q")(x)
    b, p, d = x.shape
    width = d * cfg.merge_unit
    x = x.reshape(b, p // cfg.merge_unit, width)  # [B, P, D] -> [B, M, 4D]
    # The hidden width is named `mlp` (tensor-parallel), the ends `embed`, as in the LLaVA projector.
    dense = lambda name, feats, axes: nn.Dense(
        feats, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
        kernel_init=c.param_axes(c.dense_init(), axes), bias_init=c.param_axes(nn.initializers.zeros, axes[1:]))
    x = jax.nn.gelu(dense("mlp_0", width, (c.EMBED, c.MLP))(x), approximate=False)  # transformers' mlp.0
    return dense("mlp_2", cfg.out_hidden_size, (c.MLP, c.EMBED))(x)  # mlp.2


class QwenVisionTower(nn.Module):
  """Patches of several images / videos -> merged tokens for the LLM, with optional extras."""
  config: QwenVisionConfig

  def setup(self):
    cfg = self.config
    # transformers' Conv3d (stride = kernel, no bias) on one patch == a matmul on its (C, T, p, p) row.
    self.patch_embed = nn.Dense(cfg.hidden_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                kernel_init=c.param_axes(c.dense_init(), (c.CHANNELS, c.EMBED)),
                                name="patch_embed")
    self.blocks = [QwenVisionBlock(cfg, name=f"blocks_{i}") for i in range(cfg.depth)]
    self.merger = QwenPatchMerger(cfg, name="merger")

  def rotary_angles(self, hw: Array) -> Array:
    """2-D rotary angles of the patches of window-order units: int32[B, M, 2] -> float32[B, P, 1, H/2].

    A unit at merged (r, c) holds patches (2r + i, 2c + j), i, j in {0, 1},
    raster within the unit; angles are `[h * f, w * f]` with the H/4
    frequencies `1 / theta^(arange(0, H/2, 2) / (H/2))`.
    """
    cfg = self.config
    m = cfg.spatial_merge_size
    quarter = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))  # [H/4]
    i, j = jnp.meshgrid(jnp.arange(m), jnp.arange(m), indexing="ij")
    within = jnp.stack([i.reshape(-1), j.reshape(-1)], axis=-1)  # [4, 2]
    ids = hw[:, :, None, :] * m + within[None, None]  # [B, M, 4, 2]
    b, n = hw.shape[:2]
    ids = ids.reshape(b, n * cfg.merge_unit, 2)  # [B, M, 4, 2] -> [B, P, 2]
    angles = ids.astype(jnp.float32)[..., None] * inv_freq  # [B, P, 2, H/4]
    return angles.reshape(b, n * cfg.merge_unit, 1, quarter)  # [B, P, 2, H/4] -> [B, P, 1, H/2]: [h*f, w*f]

  def __call__(self, patches: Array, grid_thw: Array, *,
               extras: frozenset = frozenset()) -> tuple[Array, dict[str, Any]]:
    """Runs the tower.

    Args:
      patches: float[B, P, patch_dim] one visual input per row, padded with
        zeros after its t*h*w patches (`pad_patches`); P a multiple of 4.
      grid_thw: int32[B, 3] (t, h, w) in patches of each row (may be traced;
        t*h*w must fit P, which `pad_patches` checks).
      extras: pairs (name, block), name in EXTRA_NAMES, block an index in
        0..depth-1 or negative from the end. Per-patch values in input order
        (the 4 patches of output token j are slots 4j..4j+3: reshape to
        [B, M, 4] to score merged tokens); 0 on padding:
          keys: float[B, P, H] the block's keys before the rotary embedding,
            averaged over heads.
          received_attn: float32[B, P] attention each patch receives within
            its segment (its window in a window block, its temporal slice in a
            full-attention block), averaged over heads and over the segment's
            query rows: it sums to 1 over each segment.
    Returns:
      (tokens float[B, M, out_hidden_size] in input order (t, h', w') raster,
      aux) with `vision/valid` bool[B, M] (real tokens), `vision/thw`
      int32[B, M, 3] each token's (t, h, w) on the merged grid, and the extras
      under `vision/<name>/<block>`.
    """
    cfg = self.config
    b, p, width = patches.shape
    if width != cfg.patch_dim or p % cfg.merge_unit:
      raise ValueError(f"patches must be float[B, P, {cfg.patch_dim}] with P a multiple of {cfg.merge_unit}, "
                       f"got shape {tuple(patches.shape)}")
    wanted: dict[int, set] = {}
    for name, block in extras:
      if name not in EXTRA_NAMES:
        hint = " (the tower has no class token; use 'received_attn')" if name == "cls_attn" else ""
        raise ValueError(f"unknown Qwen vision extra {name!r}{hint}; known: {', '.join(EXTRA_NAMES)}")
      if not -cfg.depth <= block < cfg.depth:
        raise ValueError(f"extra {name!r} at block {block}: the tower has blocks 0..{cfg.depth - 1}")
      wanted.setdefault(block % cfg.depth, set()).add(name)

    n_units = p // cfg.merge_unit
    layout = window_layout(grid_thw, n_units, cfg)
    u = cfg.merge_unit
    patch_order = (layout.order[:, :, None] * u + jnp.arange(u)[None, None]).reshape(b, p)  # [B, M, 4] -> [B, P]
    x = self.patch_embed(patches.astype(cfg.dtype))  # [B, P, D]
    x = take(x, patch_order)  # window order
    angles = self.rotary_angles(layout.hw)
    segments = {name: jnp.repeat(ids, u, axis=1) for name, ids in (("window", layout.window),
                                                                   ("frame", layout.frame))}  # [B, P]
    masks = {name: attn.Mask(segment_ids=ids) for name, ids in segments.items()}  # block-diagonal attention
    inverse = jnp.argsort(patch_order, axis=1)  # window order -> input order
    real = jnp.repeat(layout.valid, u, axis=1)  # [B, P] input order

    aux: dict[str, Any] = {"vision/valid": layout.valid, "vision/thw": layout.thw}
    for i, block in enumerate(self.blocks):
      kind = "frame" if i in cfg.fullatt_block_indexes else "window"
      x, q, k, k_raw = block(x, angles, masks[kind])
      for name in wanted.get(i, ()):
        if name == "keys":
          value = k_raw.mean(axis=2)
        else:
          dense = masks[kind].dense(p, p)  # [B, P, P] (the extra is requested for scoring, on small inputs)
          probs = c.masked_softmax(c.attention_logits(q, k), dense[:, None])  # [B, N, P, P]
          size = jnp.sum(dense, axis=1)  # [B, P] queries that see each key (0 on padding)
          value = probs.mean(axis=1).sum(axis=1) / jnp.maximum(size, 1)
        value = take(value, inverse)
        aux[f"vision/{name}/{i}"] = jnp.where(real.reshape(real.shape + (1,) * (value.ndim - 2)), value, 0)
    merged = self.merger(x)  # [B, M, out], window order
    return take(merged, jnp.argsort(layout.order, axis=1)), aux
