"""LLaMA-family decoder (and the Qwen2 variant) with per-layer KV caches.

Einsum letters: B batch, T query length, S key/value length, N query heads,
K kv heads, H head dim, D model dim, F mlp dim, V vocabulary.

- RMSNorm, RoPE from *explicit* position ids (never an implicit arange: some
  reduction methods keep original positions with gaps), grouped-query
  attention, SwiGLU MLP. Qwen2 adds q/k/v biases and its own RoPE base.
- M-RoPE (Qwen2-VL / Qwen2.5-VL): with `mrope_section` set, positions may be
  int32[B, T, 3] (t, h, w); frequency chunk i of the section split rotates by
  axis i % 3 (`rope`). The causal mask still follows slot (sequence) order.
- The KV cache is one `LayerCache` per layer, each with its own static length,
  because in-LLM token reduction shortens the caches of later layers.
- `prefill` runs the layers over an `LLMState` and calls an optional
  `BoundaryHook` before the layers it names: the seam where in-LLM methods
  score, drop or merge tokens (`vtr_jax.seams`, `vtr_jax.reduce`). Between
  two boundaries the layers see sequences of one length, so each such run
  goes through `lax.scan` over the run's parameters stacked at call time
  (`scan_layers`), optionally rematerialised (`remat`): a 32-layer decoder
  with a boundary at layer 2 compiles two layer bodies, not 32. Parameters
  stay one `layers_{i}` subtree per layer (what `vtr_jax.convert` writes and
  reads); the stacked copy is cast to the compute dtype first, a cast each
  layer's matmuls would make anyway.
- Attention goes through `vtr_jax.models.attention.attend` with the
  implementation `attention` names (`auto` picks per backend and length).
"""

from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.models import attention as attn
from vtr_jax.models import common as c
from vtr_jax.seams import BoundaryHook, LayerAccess, LLMState

Array = jax.Array


# `DecoderConfig.remat` -> the `jax.checkpoint` policy of each layer (None: no rematerialisation).
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_saveable,
                  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Geometry of the language model.

  Attributes:
    kind: `llama` or `qwen2` (q/k/v projections with bias).
    head_dim: per-head width; 0 means hidden_size // num_heads.
    tie_embeddings: the output head reuses the input embedding matrix.
    mrope_section: M-RoPE's split of the head_dim // 2 rotary frequencies over
      the (t, h, w) position axes (Qwen2.5-VL: (16, 24, 24)); () = 1-D RoPE.
    attention: an implementation name of `vtr_jax.models.attention` (`auto`,
      `reference`, `xla`, `cudnn`, `pallas`, `chunked`).
    scan_layers: prefill runs each stretch of layers between boundaries
      under `lax.scan` (False: a Python loop, one traced body per layer).
    remat: rematerialisation of each layer in prefill (training): `none`,
      `full` (save nothing), `dots` (save matmul outputs), `dots_no_batch`
      (save matmul outputs without batch dimensions: the projections).
  """
  kind: str = "llama"
  vocab_size: int = 32064
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 0
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  tie_embeddings: bool = False
  max_positions: int = 4096
  dtype: str = "float32"
  param_dtype: str = "float32"
  mrope_section: tuple[int, ...] = ()
  attention: str = "auto"
  scan_layers: bool = True
  remat: str = "none"

  def __post_init__(self):
    if self.kind not in ("llama", "qwen2"):
      raise ValueError(f"DecoderConfig.kind must be 'llama' or 'qwen2', got {self.kind!r}")
    if self.attention not in attn.IMPLEMENTATIONS:
      raise ValueError(f"DecoderConfig.attention {self.attention!r} is not one of {', '.join(attn.IMPLEMENTATIONS)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"DecoderConfig.remat {self.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
    if not self.head_dim and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                       "set head_dim explicitly")
    object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
    if self.mrope_section and (sum(self.mrope_section) != self.dim_per_head // 2
                               or min(self.mrope_section) < 1):
      raise ValueError(f"mrope_section {list(self.mrope_section)} must be positive and sum to head_dim // 2 = "
                       f"{self.dim_per_head // 2} (head_dim {self.dim_per_head}); it sums to "
                       f"{sum(self.mrope_section)}")

  @property
  def qkv_bias(self) -> bool:
    return self.kind == "qwen2"

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads


@flax.struct.dataclass
class LayerCache:
  """Keys and values of one layer.

  Attributes:
    k, v: float[B, S, K, H]; slot order is sequence order.
    valid: bool[B, S] slots holding a real token.
    end: int32[] slots filled so far (the next write goes to slot `end`).
    next_position: int32[B] the RoPE position the next token takes *in this
      layer*: one more than the largest position the layer saw. Methods that
      re-number positions mid-network make it differ between layers, so a
      decoded token sits exactly where a re-run prefill would put it.
  """
  k: Array
  v: Array
  valid: Array
  end: Array
  next_position: Array

  @property
  def length(self) -> int:
    return self.k.shape[1]


@flax.struct.dataclass
class KVCache:
  """One `LayerCache` per decoder layer."""
  layers: tuple[LayerCache, ...]


def rope(x: Array, positions: Array, theta: float, mrope_section: tuple[int, ...] = ()) -> Array:
  """Rotary embedding, Hugging Face's rotate-half layout (1-D RoPE or M-RoPE).

  Args:
    x: float[B, T, N, H].
    positions: int32[B, T], or int32[B, T, 3] (t, h, w) with `mrope_section`:
      the H/2 frequencies are split into chunks of those sizes and chunk i
      rotates by position axis i % 3 (transformers' `recomposition_frequencies`).
      1-D positions with a section are the text case (all three axes equal).
    theta: RoPE base.
    mrope_section: static chunk sizes summing to H/2; () for 1-D RoPE.
  """
  h = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
  if positions.ndim == 3:
    if not mrope_section:
      raise ValueError(f"positions of shape {tuple(positions.shape)} are 3-D (t, h, w) but the decoder has no "
                       "mrope_section; pass int32[B, T] positions or configure M-RoPE")
    axis_of_freq = np.repeat(np.arange(len(mrope_section)) % 3, mrope_section)  # [H/2] static
    positions = positions[..., axis_of_freq]  # [B, T, 3] -> [B, T, H/2]
    angles = positions.astype(jnp.float32) * inv_freq  # [B, T, H/2]
  else:
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  return apply_rotary(x, angles[:, :, None, :])


def apply_rotary(x: Array, angles: Array) -> Array:
  """x * cos + rotate_half(x) * sin with angles float32[..., H/2] broadcast against x float[..., H]."""
  angles = jnp.concatenate([angles, angles], axis=-1)  # [..., H]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


class RMSNorm(nn.Module):
  eps: float
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param("weight", c.param_axes(nn.initializers.ones, (c.NORM,)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return w.astype(self.dtype) * y.astype(self.dtype)


class DecoderAttention(nn.Module):
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    h = cfg.dim_per_head

    def proj(name, heads, head_axis):
      return nn.DenseGeneral(
          (heads, h), use_bias=cfg.qkv_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
          kernel_init=c.param_axes(c.dense_init(), (c.EMBED, head_axis, c.HEAD_DIM)),
          bias_init=c.param_axes(nn.initializers.zeros, (head_axis, c.HEAD_DIM)))

    self.q_proj = proj("q_proj", cfg.num_heads, c.HEADS)
    self.k_proj = proj("k_proj", cfg.num_kv_heads, c.KV_HEADS)
    self.v_proj = proj("v_proj", cfg.num_kv_heads, c.KV_HEADS)
    self.o_proj = nn.DenseGeneral(
        cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        name="o_proj", kernel_init=c.param_axes(c.dense_init(), (c.HEADS, c.HEAD_DIM, c.EMBED)))

  def qk(self, x: Array, positions: Array) -> tuple[Array, Array]:
    """Normed hidden float[B, T, D] -> roped q float[B, T, N, H], k float[B, T, K, H]."""
    theta, section = self.config.rope_theta, self.config.mrope_section
    return rope(self.q_proj(x), positions, theta, section), rope(self.k_proj(x), positions, theta, section)

  def __call__(self, x: Array, positions: Array, mask: attn.Mask | None,
               cache: LayerCache | None = None) -> tuple[Array, Array, Array, LayerCache | None]:
    """Attention over x (prefill) or over the cache plus x (decode).

    Args:
      x: float[B, T, D] normed hidden states.
      positions: int32[B, T] (or int32[B, T, 3] with M-RoPE).
      mask: the prefill's mask (`attn.Mask.causal_prefill`); None when
        decoding (the cache's filled slots and x's own, causal from `end`).
      cache: for decoding, the layer's cache; x's keys are written at `end`.
    Returns:
      (out float[B, T, D], k float[B, T, K, H], v, updated cache or None).
    """
    q, k = self.qk(x, positions)
    v = self.v_proj(x)
    implementation = self.config.attention
    if cache is None:
      out = attn.attend(q, k, v, mask, implementation=implementation)
      return self.o_proj(out), k, v, None
    t = x.shape[1]
    new_k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), cache.end, axis=1)
    new_v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache.end, axis=1)
    new_valid = jax.lax.dynamic_update_slice_in_dim(
        cache.valid, jnp.ones((x.shape[0], t), bool), cache.end, axis=1)
    out = attn.attend(q, new_k, new_v, attn.Mask.decode(new_valid, cache.end), implementation=implementation)
    cache = LayerCache(new_k, new_v, new_valid, cache.end + t, cache.next_position + t)
    return self.o_proj(out), k, v, cache


class DecoderMLP(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dense = lambda name, feats, axes: nn.Dense(
        feats, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
        kernel_init=c.param_axes(c.dense_init(), axes))
    gate = dense("gate_proj", cfg.intermediate_size, (c.EMBED, c.MLP))(x)
    up = dense("up_proj", cfg.intermediate_size, (c.EMBED, c.MLP))(x)
    return dense("down_proj", cfg.hidden_size, (c.MLP, c.EMBED))(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    self.input_layernorm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="input_layernorm")
    self.self_attn = DecoderAttention(cfg, name="self_attn")
    self.post_attention_layernorm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype,
                                            name="post_attention_layernorm")
    self.mlp = DecoderMLP(cfg, name="mlp")

  def qk(self, x: Array, positions: Array) -> tuple[Array, Array]:
    """This layer's roped q, k for hidden states entering it (float[B, T, D])."""
    return self.self_attn.qk(self.input_layernorm(x), positions)

  def __call__(self, x: Array, positions: Array, mask: attn.Mask | None, cache: LayerCache | None = None):
    """Returns (x float[B, T, D], k, v float[B, T, K, H], cache)."""
    attended, k, v, cache = self.self_attn(self.input_layernorm(x), positions, mask, cache)
    x = x + attended
    x = x + self.mlp(self.post_attention_layernorm(x))
    x = c.constrain(x, (c.ACT_BATCH, c.ACT_LENGTH, c.ACT_EMBED))
    return x, k, v, cache


class Decoder(nn.Module):
  config: DecoderConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                 embedding_init=c.param_axes(c.dense_init(), (c.VOCAB, c.EMBED)),
                                 name="embed_tokens")
    self.layers = [DecoderLayer(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              kernel_init=c.param_axes(c.dense_init(), (c.EMBED, c.VOCAB)), name="lm_head")

  def embed(self, tokens: Array) -> Array:
    """int32[B, T] -> float[B, T, D]."""
    return self.embed_tokens(tokens)

  def logits(self, x: Array) -> Array:
    """Final norm and output head: float[B, T, D] -> float32[B, T, V]."""
    x = self.norm(x)
    if self.config.tie_embeddings:
      out = self.embed_tokens.attend(x)
    else:
      out = self.lm_head(x)
    return out.astype(jnp.float32)

  def layer_qk(self, layer: int, x: Array, positions: Array) -> tuple[Array, Array]:
    return self.layers[layer].qk(x, positions)

  def __call__(self, tokens: Array, positions: Array, valid: Array) -> Array:
    """Text-only forward (used by `init`): int32[B, T] -> float32[B, T, V]."""
    x = self.embed(tokens)
    logits, _, _ = self.prefill(LLMState(x, positions, valid, jnp.zeros(valid.shape, bool)))
    return logits

  def prefill(self, state: LLMState, *, cache_extra: int | None = None, hook: BoundaryHook | None = None,
              last_only: bool = False, next_position: Array | None = None) -> tuple[Array, KVCache | None, LLMState]:
    """Runs every layer over a left-padded sequence.

    Args:
      state: the input: embeddings `x` float[B, T, D], RoPE `positions`
        int32[B, T], `valid` bool[B, T] (False for padding), `visual` and the
        per-token entries in-LLM methods read (see `LLMState`).
      cache_extra: build a KV cache with this many free slots per layer for
        decoding (None: no cache).
      hook: optional boundary hook (in-LLM token reduction), called before the
        layers in `hook.layers`.
      last_only: return only the last slot's logits, float32[B, V].
      next_position: int32[B], the position of the first decoded token in
        every layer's cache. None: one more than the largest position (over
        the valid slots, and over t/h/w with M-RoPE) each layer saw. M-RoPE
        decoding continues 1-D from the *full* prompt's `n_valid + delta`
        (`vtr_jax.models.mrope.next_position`), which a pruned prompt no longer
        shows when the token holding the largest id was dropped: pass it then.
    Returns:
      (logits float32[B, T', V] or [B, V], cache or None, final state).
    """
    caches: list[LayerCache] = []
    for start, stop in layer_runs(self.config.num_layers, hook.layers if hook is not None else ()):
      if hook is not None and start in hook.layers:
        access = LayerAccess(qk=self.layer_qk, final_norm=self.norm, caches=tuple(caches),
                             num_layers=self.config.num_layers)
        state = hook.fn(start, state.replace(layer=start), access)
      x, ks, vs = self.run_layers(start, stop, state.x, state.positions, attn.Mask.causal_prefill(state.valid))
      state = state.replace(x=x)
      if cache_extra is not None:
        caches.extend(_new_cache(k, v, state.valid, state.positions, cache_extra, next_position)
                      for k, v in zip(ks, vs))
    x = state.x
    logits = self.logits(x[:, -1:])[:, 0] if last_only else self.logits(x)
    cache = KVCache(tuple(caches)) if cache_extra is not None else None
    return logits, cache, state

  def run_layers(self, start: int, stop: int, x: Array, positions: Array, mask: attn.Mask
                 ) -> tuple[Array, list[Array], list[Array]]:
    """Layers start..stop-1 over one sequence: (x float[B, T, D], per layer k and v float[B, T, K, H]).

    At init a Python loop over the bound layers (it creates their
    parameters); afterwards each layer is `DecoderLayer.apply` on its own
    parameters, the run's stacked under `lax.scan` when `scan_layers` and
    the run is longer than one layer, each wrapped in `jax.checkpoint` when
    `remat` says so.
    """
    cfg = self.config
    if self.is_initializing():
      ks, vs = [], []
      for layer in self.layers[start:stop]:
        x, k, v, _ = layer(x, positions, mask)
        ks.append(k)
        vs.append(v)
      return x, ks, vs

    unbound = DecoderLayer(cfg, parent=None)  # a pure function of its parameters

    def body(x, params):
      x, k, v, _ = unbound.apply({"params": params}, x, positions, mask)
      return x, (k, v)

    policy = REMAT_POLICIES[cfg.remat]
    if policy is not None:
      body = jax.checkpoint(body, policy=policy)
    params = [nn.unbox(self.layers[i].variables["params"]) for i in range(start, stop)]
    if not cfg.scan_layers or stop - start == 1:
      ks, vs = [], []
      for p in params:
        x, (k, v) = body(x, p)
        ks.append(k)
        vs.append(v)
      return x, ks, vs
    compute = jnp.dtype(cfg.dtype)
    cast = lambda a: a.astype(compute) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack([cast(p) for p in a]), *params)  # leaves [L, ...]
    x, (k, v) = jax.lax.scan(body, x, stacked)  # k, v: [L, B, T, K, H]
    return x, list(k), list(v)

  def decode_step(self, tokens: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """One token per sample: int32[B] -> (logits float32[B, V], cache).

    A Python loop over the layers: their caches differ in length after
    in-LLM reduction, and stacking caches per step would copy them.
    """
    x = self.embed(tokens[:, None])  # [B, 1, D]
    new_layers = []
    for layer, lc in zip(self.layers, cache.layers):
      x, _, _, lc = layer(x, lc.next_position[:, None], None, lc)
      new_layers.append(lc)
    logits = self.logits(x)[:, 0]
    return logits, KVCache(tuple(new_layers))


def layer_runs(num_layers: int, boundaries) -> list[tuple[int, int]]:
  """[(start, stop), ...]: the stretches of layers between boundaries (each boundary starts one)."""
  cuts = sorted({0, num_layers} | {b for b in boundaries if 0 < b < num_layers})
  return list(zip(cuts[:-1], cuts[1:]))


def _new_cache(k: Array, v: Array, valid: Array, positions: Array, extra: int,
               next_position: Array | None = None) -> LayerCache:
  pad = ((0, 0), (0, extra), (0, 0), (0, 0))
  if next_position is None:
    largest = positions if positions.ndim == 2 else jnp.max(positions, axis=-1)  # M-RoPE: over (t, h, w)
    next_position = jnp.max(jnp.where(valid, largest, -1), axis=1) + 1
  return LayerCache(jnp.pad(k, pad), jnp.pad(v, pad), jnp.pad(valid, ((0, 0), (0, extra))),
                    jnp.asarray(k.shape[1], jnp.int32), next_position.astype(jnp.int32))
