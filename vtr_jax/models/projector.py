"""Vision-to-language projectors: LLaVA's `mlp2x_gelu` and `linear`, and TokenPacker.

`VLMConfig.projector` names one with a string: `mlp2x_gelu`, `linear`, or
`tokenpacker[:scale=s]` (TokenPacker's region-to-point projector, which packs
every s x s region of the patch grid into one token).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.models import common as c
from vtr_jax.models.vit import VisionConfig
from vtr_jax.seams import Tokens

PROJECTOR_KINDS = ("mlp2x_gelu", "linear", "tokenpacker")
_SETTINGS = {"tokenpacker": {"scale": 2}}  # kind -> setting -> default (all ints)


def parse_projector(spec: str) -> tuple[str, dict[str, int]]:
  """'tokenpacker:scale=3' -> ('tokenpacker', {'scale': 3}); settings default when left out."""
  kind, _, body = spec.partition(":")
  kind = kind.strip()
  if kind not in PROJECTOR_KINDS:
    raise ValueError(f"unknown projector {kind!r}; known: {', '.join(PROJECTOR_KINDS)}")
  settings = dict(_SETTINGS.get(kind, {}))
  for pair in filter(None, (p.strip() for p in body.split(","))):
    key, eq, value = (part.strip() for part in pair.partition("="))
    if key not in settings:
      known = ", ".join(settings) or "none"
      raise ValueError(f"projector {kind!r}: unknown setting {key!r} in {spec!r}; known settings: {known}")
    if not eq or not value.lstrip("-").isdigit():
      raise ValueError(f"projector {kind!r}: {pair!r} in {spec!r} must be {key}=<integer>")
    settings[key] = int(value)
  return kind, settings


def packed_grid(spec: str, vision: VisionConfig) -> int | None:
  """Side of the token grid a packing projector hands on (None for per-token projectors).

  Raises ValueError when the projector does not fit the tower.
  """
  kind, settings = parse_projector(spec)
  return check_packing(vision, settings["scale"]) if kind == "tokenpacker" else None


def check_packing(vision: VisionConfig, s: int) -> int:
  """The packed grid side g / s for TokenPacker with region side s; raises unless it fits the tower."""
  g = vision.grid
  if s < 1 or g % s:
    raise ValueError(f"tokenpacker scale={s} must be >= 1 and divide the {g}x{g} patch grid "
                     "(each point query owns an s x s region)")
  if vision.num_registers or vision.keep_cls:
    raise ValueError("tokenpacker packs the patch grid: it needs a tower without registers and keep_cls=False "
                     f"(got num_registers={vision.num_registers}, keep_cls={vision.keep_cls})")
  return g // s


def region_indices(grid: int, scale: int) -> np.ndarray:
  """int32[M, s*s]: the raster patch indices of each s x s region, regions in raster order.

  Region (i, j) covers patch rows i*s..i*s+s-1 and columns j*s..j*s+s-1;
  its first entry is the region's top-left patch. M = (grid / s)^2.
  """
  m = grid // scale
  rows = (np.arange(m)[:, None] * scale + np.arange(scale)[None])  # [m, s]
  idx = rows[:, None, :, None] * grid + rows[None, :, None, :]  # [m, m, s, s]: row part + column part
  return idx.reshape(m * m, scale * scale).astype(np.int32)


def make_projector(spec: str, vision: VisionConfig, out_dim: int, dtype: str, param_dtype: str, name: str):
  """The projector module a `VLMConfig.projector` string names."""
  kind, settings = parse_projector(spec)
  if kind == "tokenpacker":
    return TokenPacker(vision, out_dim, settings["scale"], dtype, param_dtype, name=name)
  return Projector(kind, out_dim, dtype, param_dtype, name=name)


def _dense(features, axes, dtype, param_dtype, name, use_bias=True, axis=-1):
  n_in = 1 if axis == -1 else len(axis)
  return nn.DenseGeneral(features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                         kernel_init=c.param_axes(c.dense_init(), axes),
                         bias_init=c.param_axes(nn.initializers.zeros, axes[n_in:]))


class Projector(nn.Module):
  """float[B, N, Dv] -> float[B, N, D] applied per token.

  Attributes:
    kind: `mlp2x_gelu` (Linear, exact GELU, Linear, as LLaVA-1.5) or `linear`.
    out_dim: the language model's width D.
  """
  kind: str
  out_dim: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind not in ("mlp2x_gelu", "linear"):
      raise ValueError(f"unknown per-token projector {self.kind!r}; known: mlp2x_gelu, linear")
    # The hidden width is named `mlp` (tensor-parallel), the ends `embed`.
    dense = lambda name, axes: nn.Dense(
        self.out_dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=c.param_axes(c.dense_init(), axes),
        bias_init=c.param_axes(nn.initializers.zeros, axes[1:]))
    x = dense("linear_1", (c.EMBED, c.MLP))(x)
    if self.kind == "mlp2x_gelu":
      x = jax.nn.gelu(x, approximate=False)
      x = dense("linear_2", (c.MLP, c.EMBED))(x)
    return x


class TokenPacker(nn.Module):
  """TokenPacker (Li et al. 2024): region-to-point injection, then LLaVA's MLP.

  Following the reference (CircleRadon/TokenPacker, `TokenPacker` in
  multimodal_projector/builder.py):
    1. point queries: the last feature layer's g x g grid bilinearly
       downsampled to (g/s) x (g/s) (half-pixel centres, no antialiasing, as
       torch's `F.interpolate(mode='bilinear')`; for an integer s the sample
       points lie inside each query's own region), then a bias-free linear
       map and LayerNorm;
    2. keys and values: the features of all feature layers concatenated
       (multi-level; the reference reads CLIP layers 12/16/22/23 with the
       query from 23, LLaVA's penultimate), each through Linear-GELU-Linear
       and LayerNorm;
    3. each query attends only to the s x s keys of its own region (multi-head
       attention with q/k/v input and output projections, no residual), so a
       packed token depends on its region alone;
    4. Linear-GELU-Linear to the LLM width.
  The attention width E is the tower's hidden size (the reference's 1024 for
  CLIP-L); heads of 128 dims as in the reference (E/128), a single head when
  E is not a multiple of 128. LayerNorm eps 1e-6 as in the reference.

  Attributes:
    vision: the tower (grid size, feature layers, width).
    out_dim: the language model's width D.
    scale: region side s; g must be a multiple of s (checked by `packed_grid`).
  """
  vision: VisionConfig
  out_dim: int
  scale: int = 2
  dtype: str = "float32"
  param_dtype: str = "float32"

  def _norm(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                        scale_init=c.param_axes(nn.initializers.ones, (c.NORM,)),
                        bias_init=c.param_axes(nn.initializers.zeros, (c.NORM,)))

  def _mlp(self, x: jax.Array, width: int, name: str) -> jax.Array:
    x = _dense(width, (c.EMBED, c.MLP), self.dtype, self.param_dtype, f"{name}_1")(x)
    x = jax.nn.gelu(x, approximate=False)
    return _dense(width, (c.MLP, c.EMBED), self.dtype, self.param_dtype, f"{name}_2")(x)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """float[B, P, Dv * L] (the full patch grid, L feature layers) -> float[B, M, D], M = (g / s)^2."""
    v, s = self.vision, self.scale
    m = check_packing(v, s)
    g = v.grid
    b, p, _ = x.shape
    if p != g * g:
      raise ValueError(f"tokenpacker needs the full {g}x{g} patch grid ({g * g} tokens), got {p}")
    e = v.hidden_size
    heads = e // 128 if e % 128 == 0 else 1
    query = x[..., -e:].reshape(b, g, g, e)  # last feature layer: [B, P, Dv] -> [B, g, g, Dv]
    query = jax.image.resize(query, (b, m, m, e), method="bilinear", antialias=False)  # [B, m, m, Dv]
    query = query.reshape(b, m * m, e)  # [B, m, m, Dv] -> [B, M, Dv]
    q = self._norm("ln_q")(_dense(e, (c.EMBED, c.MLP), self.dtype, self.param_dtype, "q_proj", use_bias=False)(query))
    k = self._norm("ln_k")(self._mlp(x, e, "k_proj"))  # [B, P, E]
    val = self._norm("ln_v")(self._mlp(x, e, "v_proj"))
    regions = jnp.asarray(region_indices(g, s))  # [M, s*s]
    k, val = k[:, regions], val[:, regions]  # [B, P, E] -> [B, M, s*s, E]
    hd = (heads, e // heads)
    qh = _dense(hd, (c.EMBED, c.HEADS, c.HEAD_DIM), self.dtype, self.param_dtype, "attn_q")(q)  # [B, M, N, H]
    kh = _dense(hd, (c.EMBED, c.HEADS, c.HEAD_DIM), self.dtype, self.param_dtype, "attn_k")(k)  # [B, M, S, N, H]
    vh = _dense(hd, (c.EMBED, c.HEADS, c.HEAD_DIM), self.dtype, self.param_dtype, "attn_v")(val)
    logits = jnp.einsum("bmnh,bmsnh->bmns", qh, kh, preferred_element_type=jnp.float32) / math.sqrt(hd[1])
    probs = jax.nn.softmax(logits, axis=-1)  # over the s*s keys of the region
    out = jnp.einsum("bmns,bmsnh->bmnh", probs.astype(vh.dtype), vh)  # [B, M, N, H]
    out = _dense(e, (c.HEADS, c.HEAD_DIM, c.EMBED), self.dtype, self.param_dtype, "attn_out", axis=(-2, -1))(out)
    return self._mlp(out, self.out_dim, "linear")  # [B, M, E] -> [B, M, D]

  def pack(self, tokens: Tokens) -> Tokens:
    """The full patch grid's tokens -> one token per region.

    A packed token's position is its region's top-left patch, its size the
    sum of the region's sizes, valid when any of the region is.
    """
    g = self.vision.grid
    if tokens.count != g * g:
      raise ValueError(f"tokenpacker needs the full {g}x{g} patch grid ({g * g} tokens), got {tokens.count}; "
                       "run token-reducing methods after it, at the embed stage (name@embed)")
    regions = region_indices(g, self.scale)  # [M, s*s]
    return Tokens(self(tokens.x), tokens.positions[:, regions[:, 0]], jnp.any(tokens.valid[:, regions], axis=-1),
                  jnp.sum(tokens.size[:, regions], axis=-1))
