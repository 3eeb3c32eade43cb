"""CLIP- and SigLIP-style vision towers (Flax Linen, used functionally).

One module covers both families:

| kind     | class token | pre-LN on embeddings | activation  | post-LN   | patch bias |
|----------|-------------|----------------------|-------------|-----------|------------|
| `clip`   | yes         | yes (`pre_layrnorm`) | quick-GELU  | pooled    | no         |
| `siglip` | no          | no                   | GELU (tanh) | all       | yes        |

As in LLaVA, the tower returns the hidden states of a chosen layer
(`feature_layer`, Hugging Face's `hidden_states` indexing: 0 = embeddings,
-2 = penultimate) and runs only the layers it needs. Layers are a Python loop
so that a reduction method can merge or drop tokens between (and inside)
blocks; the per-layer extras a method needs are computed only on request.

FALCON's visual registers (Zhang et al. 2025, JiuTian-VL/FALCON) are part of
the tower: with `num_registers` R > 0, R learnable tokens are appended after
the patch tokens of every view and attend with them in every block
(ReCompact), and only the registers' features leave the tower. With `crops`
c > 1 the input image (side c * S) is split into c x c views of the tower's
native side S (`split_crops`, plus an optional downscaled whole-image
`thumbnail`); with `reatten`, every block lets the registers of all views
of one image attend to each other (ReAtten), so the LLM receives
`num_crops` * R register tokens per image that each saw the whole image.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.models import attention as attn
from vtr_jax.models import common as c
from vtr_jax.models.inputs import check_pixels
from vtr_jax.processors import ProcessorError, clip as clip_processor
from vtr_jax.seams import BlockHook

Array = jax.Array

# Extras a caller may request, per layer (see `VisionTower.__call__`).
EXTRA_NAMES = ("cls_attn", "keys", "received_attn", "qk")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Geometry of a vision tower.

  Attributes:
    kind: `clip` or `siglip`.
    image_size: input side in pixels (square images).
    patch_size: patch side in pixels.
    feature_layers: Hugging Face `hidden_states` indices to read (0 = the
      embeddings, -1 = last layer, -2 = penultimate); several are concatenated
      along features, as LLaVA does with a list of layers.
    keep_cls: keep the class token in the features (`full` in HF) or drop it
      (`default`). Ignored for towers without a class token.
    use_head: SigLIP's attention-pooling head (pooled output only).
    num_registers: FALCON's visual registers per view (0 = off). With R > 0
      only the registers' features are handed on: [B, num_crops * R, D].
    crops: views per side; the input image of side `image_size` is split into
      crops x crops views of side `crop_size` = image_size / crops, each run
      through the tower (needs registers: only they leave the tower).
    thumbnail: add the whole image resized to `crop_size` as a last view
      (FALCON's global image).
    reatten: FALCON's register interactive attention in every block: the
      registers of all views of one image attend to each other (needs
      registers).
    attention: an implementation name of `vtr_jax.models.attention` for
      every attention of the tower (`auto` picks per backend and length).
  """
  kind: str = "clip"
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  layer_norm_eps: float = 1e-5
  feature_layers: tuple[int, ...] = (-2,)
  keep_cls: bool = False
  use_head: bool = False
  image_mean: tuple[float, ...] | None = None  # None: the family's default
  image_std: tuple[float, ...] | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  num_registers: int = 0
  crops: int = 1
  thumbnail: bool = False
  reatten: bool = False
  attention: str = "auto"

  def __post_init__(self):
    if self.kind not in ("clip", "siglip"):
      raise ValueError(f"VisionConfig.kind must be 'clip' or 'siglip', got {self.kind!r}")
    if self.attention not in attn.IMPLEMENTATIONS:
      raise ValueError(f"VisionConfig.attention {self.attention!r} is not one of {', '.join(attn.IMPLEMENTATIONS)}")
    clip = self.kind == "clip"
    if self.image_mean is None:
      object.__setattr__(self, "image_mean", CLIP_MEAN if clip else SIGLIP_MEAN)
    if self.image_std is None:
      object.__setattr__(self, "image_std", CLIP_STD if clip else SIGLIP_STD)
    if self.crops < 1 or self.image_size % self.crops:
      raise ValueError(f"crops={self.crops} must be >= 1 and divide image_size {self.image_size}")
    if self.crop_size % self.patch_size:
      side = (f"image_size {self.image_size}" if self.crops == 1 else
              f"the crop size {self.crop_size} (image_size {self.image_size} / crops {self.crops})")
      raise ValueError(f"{side} is not a multiple of patch_size {self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    for layer in self.feature_layers:
      if not -(self.num_layers + 1) <= layer <= self.num_layers:
        raise ValueError(f"feature layer {layer} is outside the {self.num_layers + 1} hidden states "
                         f"(0..{self.num_layers} or -1..-{self.num_layers + 1})")
    if self.num_registers < 0:
      raise ValueError(f"num_registers={self.num_registers} must be >= 0")
    if not self.num_registers:
      needs = [f for f, on in (("crops", self.crops > 1), ("thumbnail", self.thumbnail), ("reatten", self.reatten))
               if on]
      if needs:
        raise ValueError(f"{', '.join(needs)} need visual registers (num_registers > 0): only the registers of "
                         "the views leave the tower")
    elif self.keep_cls:
      raise ValueError(f"keep_cls=True with num_registers={self.num_registers}: only the registers reach the "
                       "LLM; set keep_cls=False")
    if self.thumbnail and self.crops == 1:
      raise ValueError("thumbnail=True needs crops > 1 (with one crop the thumbnail is the image itself)")

  @property
  def has_cls(self) -> bool:
    return self.kind == "clip"

  @property
  def crop_size(self) -> int:
    """Side of one view in pixels: the tower's native input size."""
    return self.image_size // self.crops

  @property
  def num_crops(self) -> int:
    """Views per image: crops x crops sub-images, plus the thumbnail."""
    return self.crops ** 2 + int(self.thumbnail)

  @property
  def grid(self) -> int:
    """Patches per side of one view."""
    return self.crop_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def num_tokens(self) -> int:
    """Tokens of one view with position embeddings (patches, plus the class token if any); registers follow."""
    return self.num_patches + int(self.has_cls)

  @property
  def num_features(self) -> int:
    """Tokens the tower hands to the projector."""
    if self.num_registers:
      return self.num_crops * self.num_registers
    return self.num_patches + int(self.has_cls and self.keep_cls)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def feature_dim(self) -> int:
    return self.hidden_size * len(self.feature_layers)

  @property
  def feature_indices(self) -> tuple[int, ...]:
    """Absolute `hidden_states` indices of the feature layers."""
    return tuple(l % (self.num_layers + 1) for l in self.feature_layers)

  @property
  def layers_run(self) -> int:
    """How many blocks must run to produce the features."""
    return max(self.feature_indices)


def _act(kind: str) -> Callable[[Array], Array]:
  if kind == "clip":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)  # quick-GELU
  return lambda x: jax.nn.gelu(x, approximate=True)


class VisionAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections."""
  config: VisionConfig

  def setup(self):
    cfg = self.config
    dense = lambda name, feats, axes, axis=-1: nn.DenseGeneral(
        feats, axis=axis, use_bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
        kernel_init=c.param_axes(c.dense_init(), axes),
        bias_init=c.param_axes(nn.initializers.zeros, axes[1:] if axis == -1 else axes[2:]))
    hd = (cfg.num_heads, cfg.head_dim)
    self.q_proj = dense("q_proj", hd, (c.EMBED, c.HEADS, c.HEAD_DIM))
    self.k_proj = dense("k_proj", hd, (c.EMBED, c.HEADS, c.HEAD_DIM))
    self.v_proj = dense("v_proj", hd, (c.EMBED, c.HEADS, c.HEAD_DIM))
    self.out_proj = dense("out_proj", cfg.hidden_size, (c.HEADS, c.HEAD_DIM, c.EMBED), axis=(-2, -1))

  def qk(self, x: Array) -> tuple[Array, Array]:
    """float[B, T, D] (already normed) -> q, k: float[B, T, N, H]."""
    return self.q_proj(x), self.k_proj(x)

  def __call__(self, x: Array, bias: Array | None) -> tuple[Array, Array, Array]:
    """float[B, T, D] -> (out float[B, T, D], q, k float[B, T, N, H])."""
    q, k = self.qk(x)
    v = self.v_proj(x)
    out = attn.attend(q, k, v, attn.Mask(key_bias=bias), implementation=self.config.attention)
    return self.out_proj(out), q, k


class VisionMLP(nn.Module):
  config: VisionConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    x = nn.Dense(cfg.intermediate_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="fc1",
                 kernel_init=c.param_axes(c.dense_init(), (c.EMBED, c.MLP)),
                 bias_init=c.param_axes(nn.initializers.zeros, (c.MLP,)))(x)
    x = _act(cfg.kind)(x)
    return nn.Dense(cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="fc2",
                    kernel_init=c.param_axes(c.dense_init(), (c.MLP, c.EMBED)),
                    bias_init=c.param_axes(nn.initializers.zeros, (c.EMBED,)))(x)


def _layer_norm(cfg: VisionConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                      scale_init=c.param_axes(nn.initializers.ones, (c.NORM,)),
                      bias_init=c.param_axes(nn.initializers.zeros, (c.NORM,)))


class VisionBlock(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)); [hook]; x + mlp(ln2(x)).

  With `reatten` the attention output of the registers also passes through
  FALCON's register interaction (`interact_attn`, see `register_interaction`).
  """
  config: VisionConfig

  def setup(self):
    self.layer_norm1 = _layer_norm(self.config, "layer_norm1")
    self.self_attn = VisionAttention(self.config, name="self_attn")
    self.layer_norm2 = _layer_norm(self.config, "layer_norm2")
    self.mlp = VisionMLP(self.config, name="mlp")
    if self.config.reatten:
      self.interact_attn = VisionAttention(self.config, name="interact_attn")

  def qk(self, x: Array) -> tuple[Array, Array]:
    """This block's q, k for input hidden states x: float[B, T, D]."""
    return self.self_attn.qk(self.layer_norm1(x))

  def attend(self, x: Array, bias: Array | None) -> tuple[Array, Array, Array]:
    out, q, k = self.self_attn(self.layer_norm1(x), bias)
    if self.config.reatten:
      out = self.register_interaction(out)
    return x + out, q, k

  def register_interaction(self, out: Array) -> Array:
    """FALCON's ReAtten on the attention output float[B * V, T + R, D].

    The R registers of the V views of one image form one sequence of V * R
    tokens that goes through this block's `interact_attn` (no norm in
    front, as in the reference); the result is added to the registers'
    attention output, before the block's residual. Patch tokens pass
    unchanged.
    """
    cfg = self.config
    r, v = cfg.num_registers, cfg.num_crops
    regs = out[:, -r:]  # [B * V, R, D]
    bv, _, d = regs.shape
    mixed, _, _ = self.interact_attn(regs.reshape(bv // v, v * r, d), None)  # [B * V, R, D] -> [B, V * R, D]
    regs = regs + mixed.reshape(bv, r, d)  # [B, V * R, D] -> [B * V, R, D]
    return jnp.concatenate([out[:, :-r], regs], axis=1)

  def feed_forward(self, x: Array) -> Array:
    return x + self.mlp(self.layer_norm2(x))

  def __call__(self, x: Array, bias: Array | None = None) -> Array:
    x, _, _ = self.attend(x, bias)
    return self.feed_forward(x)


class AttentionPoolingHead(nn.Module):
  """SigLIP's multi-head attention pooling (one learned probe)."""
  config: VisionConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    d = cfg.hidden_size
    probe = self.param("probe", c.param_axes(c.dense_init(), (None, None, c.EMBED)), (1, 1, d),
                       cfg.param_dtype)
    in_proj = self.param("in_proj_kernel", c.param_axes(c.dense_init(), (c.EMBED, None, c.HEADS, c.HEAD_DIM)),
                         (d, 3, cfg.num_heads, cfg.head_dim), cfg.param_dtype)
    in_bias = self.param("in_proj_bias", c.param_axes(nn.initializers.zeros, (None, c.HEADS, c.HEAD_DIM)),
                         (3, cfg.num_heads, cfg.head_dim), cfg.param_dtype)
    q = jnp.einsum("btd,dnh->btnh", jnp.broadcast_to(probe, (x.shape[0], 1, d)), in_proj[:, 0]) + in_bias[0]
    k = jnp.einsum("bsd,dnh->bsnh", x, in_proj[:, 1]) + in_bias[1]
    v = jnp.einsum("bsd,dnh->bsnh", x, in_proj[:, 2]) + in_bias[2]
    out = attn.attend(q, k, v, implementation=cfg.attention)
    h = nn.DenseGeneral(d, axis=(-2, -1), dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="out_proj",
                        kernel_init=c.param_axes(c.dense_init(), (c.HEADS, c.HEAD_DIM, c.EMBED)),
                        bias_init=c.param_axes(nn.initializers.zeros, (c.EMBED,)))(out)
    h = h + VisionMLP(cfg, name="mlp")(_layer_norm(cfg, "layernorm")(h))
    return h[:, 0]


class VisionTower(nn.Module):
  """Image -> features of the chosen layer(s), with optional extras."""
  config: VisionConfig

  def setup(self):
    cfg = self.config
    p, d = cfg.patch_size, cfg.hidden_size
    self.patch_embedding = nn.Conv(
        d, (p, p), strides=(p, p), padding="VALID", use_bias=cfg.kind == "siglip", dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, name="patch_embedding",
        kernel_init=c.param_axes(c.dense_init(), (c.PATCH, c.PATCH, c.CHANNELS, c.EMBED)),
        bias_init=c.param_axes(nn.initializers.zeros, (c.EMBED,)))
    self.position_embedding = self.param(
        "position_embedding", c.param_axes(c.dense_init(), (c.POSITIONS, c.EMBED)),
        (cfg.num_tokens, d), cfg.param_dtype)
    if cfg.has_cls:
      self.class_embedding = self.param("class_embedding", c.param_axes(c.dense_init(), (c.EMBED,)), (d,),
                                        cfg.param_dtype)
      self.pre_layrnorm = _layer_norm(cfg, "pre_layrnorm")
    if cfg.num_registers:
      self.registers = self.param("registers", c.param_axes(c.dense_init(), (None, c.EMBED)),
                                  (cfg.num_registers, d), cfg.param_dtype)
      if cfg.num_crops > 1:
        self.crop_embedding = self.param("crop_embedding", c.param_axes(c.dense_init(), (None, c.EMBED)),
                                         (cfg.num_crops, d), cfg.param_dtype)
    self.layers = [VisionBlock(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.post_layernorm = _layer_norm(cfg, "post_layernorm")
    if cfg.use_head:
      self.head = AttentionPoolingHead(cfg, name="head")

  def embed(self, pixels: Array) -> Array:
    """float[B, S', S', C] -> float[B * V, T + R, D], V views per image (`split_crops`).

    Per view: class token first (CLIP), patches with position embeddings,
    then the R registers. As in FALCON the registers carry no per-register
    position embedding (each register is its own learned vector) but, with
    several views, a learned embedding of their view (FALCON embeds a crop's
    row and column, averaged, to serve many crop layouts; with one fixed
    layout a table per view is the same idea). CLIP's pre-LayerNorm covers
    the registers too (FALCON's CLIP tower appends them before it).
    """
    cfg = self.config
    check_pixels(cfg, pixels)
    views = split_crops(pixels.astype(cfg.dtype), cfg)  # [B, S', S', C] -> [B * V, S, S, C]
    x = self.patch_embedding(views)  # [B * V, S, S, C] -> [B * V, g, g, D]
    b = x.shape[0]
    x = x.reshape(b, cfg.num_patches, cfg.hidden_size)  # [B * V, g, g, D] -> [B * V, P, D]
    if cfg.has_cls:
      cls = jnp.broadcast_to(self.class_embedding.astype(x.dtype), (b, 1, cfg.hidden_size))
      x = jnp.concatenate([cls, x], axis=1)  # [B * V, 1 + P, D]
    x = x + self.position_embedding.astype(x.dtype)[None]
    if cfg.num_registers:
      regs = self.registers.astype(x.dtype)[None]  # [1, R, D]
      if cfg.num_crops > 1:
        regs = regs + self.crop_embedding.astype(x.dtype)[:, None]  # [V, R, D]
      regs = jnp.tile(regs, (b // regs.shape[0], 1, 1))  # [B * V, R, D], views of one image together
      x = jnp.concatenate([x, regs], axis=1)  # [B * V, T + R, D]
    if cfg.has_cls:
      x = self.pre_layrnorm(x)
    return x

  def block_qk(self, layer: int, x: Array) -> tuple[Array, Array]:
    """q, k (float[B, T, N, H]) of block `layer` applied to hidden states x."""
    return self.layers[layer].qk(x)

  def pooled(self, x: Array) -> Array:
    """Pooled output of the last hidden states: CLIP's class token, SigLIP's head (without a head,
    as transformers' `vision_use_head=False`, the normed tokens themselves)."""
    if self.config.has_cls:
      return self.post_layernorm(x[:, 0])
    if not self.config.use_head:
      return self.post_layernorm(x)
    return self.head(self.post_layernorm(x))

  def __call__(self, pixels: Array, *, extras: frozenset = frozenset(),
               hook: BlockHook | None = None) -> tuple[Array, dict[str, Any]]:
    """Runs the tower up to the feature layer.

    Args:
      pixels: float[B, S, S, C], normalised (see `preprocess`).
      extras: pairs (name, layer) to compute, name in EXTRA_NAMES, layer an
        absolute block index or negative relative to the blocks run (-1 = the
        block that produces the (last) feature layer). `qk` may also name the
        block right after the features (`layers_run`), applied to them.
          cls_attn: float32[B, N, T] the class token's attention row, per head.
          keys: float[B, T, H] head-mean keys.
          received_attn: float32[B, T] attention each token receives, mean over
            heads and query rows.
          qk: (q, k) float[B, T, N, H].
      hook: optional `BlockHook` (token merging inside blocks).
    Extras and hooks need the patch grid: a tower with registers refuses them.
    Returns:
      (features float[B, P(+1), D * len(feature_layers)], or the registers
      float[B, V * R, D * len(feature_layers)] (view-major) when the tower has
      them, aux) with aux keys
      `vision/<name>/<layer>`, `vision/cls_feature` float[B, D * layers] (the
      class token's features, towers with one), `vision/size` float[B, T] when
      a hook ran, and the hook's own entries under `vision/hook/...` (tower
      token indexing: the class token, if any, first).
    """
    cfg = self.config
    run = cfg.layers_run
    if cfg.num_registers and (extras or hook is not None):
      raise ValueError(f"vision extras {sorted(extras)} / in-block hooks are not available for a tower with "
                       f"num_registers={cfg.num_registers}: its features are the registers, not the patch grid; "
                       "act on the registers at the embed stage (name@embed) instead")
    wanted = {}
    for name, layer in extras:
      if name not in EXTRA_NAMES:
        raise ValueError(f"unknown vision extra {name!r}; known: {', '.join(EXTRA_NAMES)}")
      if name == "cls_attn" and not cfg.has_cls:
        raise ValueError("cls_attn was requested but a SigLIP tower has no class token; "
                         "use 'received_attn' (the attention each token receives) instead")
      absolute = layer if layer >= 0 else run + layer
      limit = min(run, cfg.num_layers - 1) if name == "qk" else run - 1
      if not 0 <= absolute <= limit:
        raise ValueError(f"extra {name!r} at layer {layer}: only blocks 0..{limit} are available "
                         f"(the tower runs {run} blocks for feature layers {cfg.feature_layers})")
      wanted.setdefault(absolute, set()).add(name)

    x = self.embed(pixels)
    aux: dict[str, Any] = {}
    hidden = {0: x}
    state = {"size": None, "proportional": False}
    # During init every block (and the head) is created so checkpoints fill all parameters.
    n_blocks = cfg.num_layers if self.is_initializing() else run
    for i in range(n_blocks):
      block = self.layers[i]
      bias = None
      if state["proportional"] and state["size"] is not None:
        bias = jnp.log(state["size"])
      x, q, k = block.attend(x, bias)
      self._record(aux, i, wanted.get(i, ()), q, k)
      if hook is not None:
        size = state["size"] if state["size"] is not None else jnp.ones(x.shape[:2], jnp.float32)
        state = dict(hook.fn(i, {**state, "x": x, "q": q, "k": k, "metric": k.mean(axis=2), "size": size}))
        x = state["x"]
      x = block.feed_forward(x)
      hidden[i + 1] = x
    if run in wanted:  # q/k of the block after the features, applied to them
      self._record(aux, run, wanted[run], *self.block_qk(run, x))
    if self.is_initializing():
      self.pooled(x)

    feats = [hidden[i] for i in cfg.feature_indices]
    if hook is not None and len({f.shape[1] for f in feats}) > 1:
      raise ValueError(f"feature layers {cfg.feature_layers} hold different token counts after in-block "
                       "merging; use a single feature layer with a merging method")
    if cfg.num_registers:  # ReCompact: only the registers leave the tower
      b = pixels.shape[0]
      feats = [f[:, -cfg.num_registers:].reshape(b, cfg.num_features, cfg.hidden_size) for f in feats]
      # [B * V, R, D] -> [B, V * R, D]
    elif cfg.has_cls:
      aux["vision/cls_feature"] = jnp.concatenate([f[:, 0] for f in feats], axis=-1)
      if not cfg.keep_cls:
        feats = [f[:, 1:] for f in feats]
    if hook is not None:
      aux["vision/size"] = state["size"]
      for key, value in state.items():
        if key not in ("x", "q", "k", "metric", "size", "proportional"):
          aux[f"vision/hook/{key}"] = value
    return jnp.concatenate(feats, axis=-1), aux

  def _record(self, aux: dict, layer: int, names, q: Array, k: Array) -> None:
    for name in names:
      key = f"vision/{name}/{layer}"
      if name == "qk":
        aux[key] = (q, k)
      elif name == "keys":
        aux[key] = k.mean(axis=2)
      elif name == "cls_attn":
        logits = c.attention_logits(q[:, :1], k)  # [B, N, 1, T]
        aux[key] = c.masked_softmax(logits, None)[:, :, 0]
      elif name == "received_attn":
        probs = c.masked_softmax(c.attention_logits(q, k), None)  # [B, N, T, T]
        aux[key] = probs.mean(axis=(1, 2))


def split_crops(pixels: Array, config: VisionConfig) -> Array:
  """The tower's views of each image: float[B, c*S, c*S, C] -> float[B * V, S, S, C].

  The c x c crops in raster order, then (with `thumbnail`) the whole image
  resized to S x S (antialiased bilinear), views of one image consecutive.
  With crops == 1 the pixels are returned as they are.
  """
  c, s = config.crops, config.crop_size
  if c == 1:
    return pixels
  b, ch = pixels.shape[0], pixels.shape[-1]
  views = pixels.reshape(b, c, s, c, s, ch).transpose(0, 1, 3, 2, 4, 5)  # [B, cS, cS, C] -> [B, c, c, S, S, C]
  views = views.reshape(b, c * c, s, s, ch)  # -> [B, c*c, S, S, C]
  if config.thumbnail:
    thumb = jax.image.resize(pixels, (b, s, s, ch), method="bilinear", antialias=True)
    views = jnp.concatenate([views, thumb[:, None].astype(views.dtype)], axis=1)  # [B, V, S, S, C]
  return views.reshape(b * config.num_crops, s, s, ch)


def preprocess(images, config: VisionConfig) -> Array:
  """uint8[B, h, w, C] (or [h, w, C], or a list of images of any sizes) -> normalised float32[B, S, S, C].

  The tower's Hugging Face image processor, PIL backend (`vtr_jax.processors.clip`): a CLIP tower resizes
  the shortest edge to S (bicubic, aspect kept) and center-crops S x S (`CLIPImageProcessor`); a SigLIP
  tower resizes to S x S (bicubic, `SiglipImageProcessor`). Then x / 255 and the tower's mean and std.
  """
  if not isinstance(images, (list, tuple)):
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[-1] != config.num_channels:
      raise ProcessorError(f"images must be [B, h, w, {config.num_channels}] (channels last), "
                          f"got shape {tuple(images.shape)}")
  make = clip_processor.clip_settings if config.kind == "clip" else clip_processor.siglip_settings
  return jnp.asarray(clip_processor.process(images, make(config.image_size, config.image_mean, config.image_std)))
