"""LLaVA-style vision-language model: tower -> projector -> decoder.

Prompts are left-padded token arrays with exactly one image placeholder per
sample (`image_token_id`); the model replaces that one slot with the visual
tokens (however many a reduction plan keeps), so the text never depends on
the number of visual tokens. Seams, each returning `(result, aux)`:

  encode_image   pixels -> projected visual `Tokens`   (vision/embed stages)
  prefill        pixels + prompt -> logits, KV cache    (llm stage inside)
  decode_step    one token per sample with the cache

`generate` drives prefill + decode under one `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax import sharding
from vtr_jax.models import common as c
from vtr_jax.models.decoder import Decoder, DecoderConfig, KVCache
from vtr_jax.models.projector import TokenPacker, make_projector, packed_grid
from vtr_jax.models import inputs
from vtr_jax.models.inputs import check_pixels, check_prompts  # noqa: F401  (public here)
from vtr_jax.models.vit import VisionConfig, VisionTower
from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import Context, Plan, ReductionError, implements, llm_boundary_hook, parse
from vtr_jax.seams import TEXT, LLMState, Tokens, splice

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """A whole model.

  Attributes:
    vision, text: the tower's and the decoder's geometry (the tower may carry
      FALCON's visual registers: then its features are the registers).
    projector: `mlp2x_gelu`, `linear`, or `tokenpacker[:scale=s]` (packs each
      s x s region of the patch grid into one token).
    image_token_id: the placeholder id in prompts (one per sample).
    pad_token_id: id used to fill padding and finished sequences.
    eos_token_ids: generation stops for a sample after any of these.
  """
  vision: VisionConfig = VisionConfig()
  text: DecoderConfig = DecoderConfig()
  projector: str = "mlp2x_gelu"
  image_token_id: int = 32000
  pad_token_id: int = 0
  eos_token_ids: tuple[int, ...] = (2,)
  name: str = "llava"

  def __post_init__(self):
    packed_grid(self.projector, self.vision)  # raises for an unknown or ill-fitting projector

  @property
  def num_image_tokens(self) -> int:
    """Visual tokens the LLM receives for one image without a reduction plan."""
    side = packed_grid(self.projector, self.vision)
    return self.vision.num_features if side is None else side * side

  @property
  def image_class_tokens(self) -> int:
    """1 when the tower hands its class token on to the LLM (it leads the visual block), else 0."""
    return int(self.vision.has_cls and self.vision.keep_cls and not self.vision.num_registers)

  @property
  def reducible_tokens(self) -> int:
    """Visual tokens per image the LLM receives that reduction budgets count: registers or packed
    tokens where the model makes them, never a class token (methods always keep it)."""
    return self.num_image_tokens - self.image_class_tokens

  def tokens_at(self, stage: str) -> int:
    """Tokens per image a method at `stage` receives without earlier reduction (class token aside)."""
    if stage == "vision":
      return self.vision.num_features - self.image_class_tokens
    return self.reducible_tokens

  @property
  def image_positions(self) -> int:
    """Position ids one image spans under the `keep` policy: the tower's feature tokens.

    Visual token positions index the tower's features (patches, or registers),
    so a packed token (TokenPacker) sits at its region's top-left patch.
    """
    return self.vision.num_features


class PromptLayout(NamedTuple):
  """Where things sit in the assembled LLM input (all [B, T'])."""
  x: Array          # float[B, T', D]
  positions: Array  # int32[B, T']
  valid: Array      # bool[B, T']
  visual: Array     # bool[B, T'] the slot holds a visual token
  image_start: Array  # int32[B] first visual slot
  patch: Array      # int32[B, T'] original patch of a visual token (-1 class token), -2 for text


def assemble(text_x: Array, text_valid: Array, image_slot: Array, vis: Tokens, *,
             keep_positions: bool, num_original: int) -> PromptLayout:
  """Replaces each sample's placeholder slot with its K visual tokens (`seams.splice`).

  Args:
    text_x: float[B, T, D] prompt embeddings (placeholder included).
    text_valid: bool[B, T].
    image_slot: int32[B] index of the placeholder.
    vis: K visual tokens (`Tokens`).
    keep_positions: True: visual tokens take position ids from their original
      patch index and the text after the image continues after all
      `num_original` image positions (gaps remain); False: contiguous ids over
      the valid tokens.
    num_original: visual tokens before any reduction (the image's width in
      positions under `keep_positions`).
  Returns:
    the layout of the T - 1 + K slot sequence.
  """
  b, t = text_valid.shape
  k = vis.count
  place = lambda text, visual: splice(text, image_slot, 1, visual)  # noqa: E731
  x = place(text_x, vis.x)
  valid = place(text_valid, vis.valid)
  visual = place(jnp.zeros((b, t), bool), jnp.ones((b, k), bool))
  if keep_positions:
    text_pos = jnp.cumsum(text_valid, axis=1) - 1  # [B, T]; the placeholder counts as one position
    before = P.take(text_pos, image_slot[:, None])  # [B, 1] valid text tokens before the image
    after = jnp.arange(t)[None] > image_slot[:, None]
    text_pos = jnp.where(after, text_pos + num_original - 1, text_pos)
    first_vis = jnp.min(jnp.where(vis.valid, vis.positions, np.iinfo(np.int32).max), axis=1, keepdims=True)
    offset = jnp.minimum(first_vis, 0)  # a kept class token sits at -1
    positions = place(text_pos, before + vis.positions - offset)
  else:
    positions = jnp.cumsum(valid, axis=1) - 1
  positions = jnp.where(valid, jnp.maximum(positions, 0), 0).astype(jnp.int32)
  patch = place(jnp.full((b, t), TEXT, jnp.int32), vis.positions.astype(jnp.int32))
  return PromptLayout(x, positions, valid, visual, image_slot.astype(jnp.int32), patch)


def to_slots(values: Array, image_slot: Array, k: int) -> Array:
  """Per-token values [B, T, ...] -> per-slot [B, T - 1 + k, ...]; visual slots copy the placeholder's."""
  at_slot = P.take(values, image_slot[:, None])  # [B, 1, ...]
  return splice(values, image_slot, 1, jnp.repeat(at_slot, k, axis=1))


class VLM(nn.Module):
  """LLaVA-style VLM; use functionally: `VLM(cfg).apply(params, ..., method=...)`."""
  config: VLMConfig

  def setup(self):
    cfg = self.config
    self.vision = VisionTower(cfg.vision, name="vision")
    self.projector = make_projector(cfg.projector, cfg.vision, cfg.text.hidden_size, cfg.text.dtype,
                                    cfg.text.param_dtype, name="projector")
    self.decoder = Decoder(cfg.text, name="decoder")

  def encode_image(self, pixels: Array, *, reduction: str | Plan | None = None,
                   text: tuple[Array, Array, Array] | None = None) -> tuple[Tokens, dict[str, Any]]:
    """Pixels -> projected visual tokens, after the plan's vision and embed stages.

    Args:
      pixels: float[B, S, S, C] normalised images.
      reduction: a `Plan` or config string (only its vision/embed stages run).
      text: (prompt embeddings float[B, T, D], valid bool[B, T], placeholder
        slot int32[B]) for text-aware embed-stage methods.
    Returns:
      (Tokens with x float[B, K, D], aux). aux adds `reduce/<method>/...`
      entries and `reduce/positions` int32[B, K] (which original patch each
      surviving token stands for, -1 = class token; for a tower with
      registers, which register; for TokenPacker, the region's top-left patch).
    """
    cfg = self.config
    vcfg = cfg.vision
    plan = parse(reduction)
    check_pixels(vcfg, pixels)
    vision_methods, embed_methods = plan.at("vision"), plan.at("embed")
    needs = {m.name: m.vision_extras(vcfg) | ({("block", -1)} if implements(m, "block_hook") else set())
             for m in vision_methods + embed_methods}
    if vcfg.num_registers and any(needs.values()):  # the tower hands on registers, not the patch grid
      names = sorted(name for name, need in needs.items() if need)
      raise ReductionError(f"{', '.join(names)} read the tower's patch grid (attention extras or in-block merging), "
                           f"but this tower hands {vcfg.num_features} visual registers to the LLM; use methods that "
                           "need no extras (random, uniform, divprune, ...) at the embed stage (name@embed)")
    extras = frozenset().union(*(m.vision_extras(vcfg) for m in vision_methods + embed_methods))
    hook = next((h for h in (m.block_hook(vcfg) for m in vision_methods) if h is not None), None)
    if hook is not None:  # selections run per device on its own samples (no cross-device gathers)
      hook = dataclasses.replace(hook, fn=sharding.per_sample(hook.fn))
    feats, aux = self.vision(pixels, extras=extras, hook=hook)
    aux["vision/features"] = feats  # the tower's output before any reduction (training supervision reads it)
    n_cls = int(vcfg.has_cls)
    b, t = feats.shape[:2]
    if hook is not None and "vision/hook/positions" in aux:
      positions = aux["vision/hook/positions"] - n_cls  # tower indices -> patch indices (class token -1)
      size = aux["vision/size"]
      if vcfg.has_cls and not vcfg.keep_cls:
        positions, size = positions[:, 1:], size[:, 1:]
    else:
      first = -1 if (vcfg.has_cls and vcfg.keep_cls) else 0
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + first, (b, t))
      size = jnp.ones((b, t), jnp.float32)
    tokens = Tokens(feats, positions.astype(jnp.int32), jnp.ones((b, t), bool), size.astype(jnp.float32))
    cls = None
    if vcfg.has_cls and vcfg.keep_cls:  # the class token is not a patch: methods never see or drop it
      cls, tokens = _split_first(tokens)
    text_x, text_valid, image_slot = text if text is not None else (None, None, None)
    ctx = Context(vcfg, aux, text_x, text_valid, image_slot, P.fingerprint(pixels))
    for m in vision_methods:
      if not implements(m, "reduce"):  # acts inside the tower blocks only (its `block_hook`)
        continue
      tokens, method_aux = sharding.per_sample(m.reduce)(tokens, ctx)
      aux.update({f"reduce/{m.name}/{k}": v for k, v in method_aux.items()})
    if isinstance(self.projector, TokenPacker):  # regions of the grid -> one token each
      if vision_methods and tokens.count != vcfg.num_patches:
        raise ReductionError(f"{', '.join(m.name for m in vision_methods)} left {tokens.count} of the "
                             f"{vcfg.num_patches} patches before the tokenpacker projector, which packs the full "
                             "grid; run them after it, at the embed stage (name@embed)")
      tokens = self.projector.pack(tokens)
    else:
      tokens = tokens.replace(x=self.projector(tokens.x))
    if cls is not None:
      cls = cls.replace(x=self.projector(cls.x))
    for m in embed_methods:
      tokens, method_aux = sharding.per_sample(m.reduce)(tokens, ctx)
      aux.update({f"reduce/{m.name}/{k}": v for k, v in method_aux.items()})
    if cls is not None:
      tokens = jax.tree_util.tree_map(lambda a, c: jnp.concatenate([a, c], axis=1), cls, tokens)
    aux["reduce/positions"] = tokens.positions
    aux["reduce/valid"] = tokens.valid
    return tokens, aux

  def prefill(self, pixels: Array, tokens: Array, valid: Array, *, reduction: str | Plan | None = None,
              cache_extra: int | None = None, last_only: bool = False, llm_extras: dict | None = None
              ) -> tuple[Array, KVCache | None, dict[str, Any]]:
    """Image + prompt through the decoder, with an optional reduction plan.

    Args:
      pixels: float[B, S, S, C] normalised images.
      tokens: int32[B, T] left-padded prompts, one image placeholder each.
      valid: bool[B, T] False on padding.
      reduction: a `Plan` or config string such as "visionzip:keep=64".
      cache_extra: free KV slots per layer for decoding (None: no cache).
      last_only: logits of the last slot only (float32[B, V]).
      llm_extras: per-token entries ([B, T] like `tokens`) for in-LLM methods
        and training, carried in `LLMState.tokens` (visual slots take the
        placeholder's value): `prompt` (False on tokens appended after the
        prompt), `query` (PyramidDrop's training rows), `target`, `loss`.
    Returns:
      (logits float32[B, T', V] or [B, V], cache, aux). T' = T - 1 + visual
      tokens kept (fewer after in-LLM reduction); aux holds `prompt/visual`,
      `prompt/valid`, `prompt/positions` of the decoder input, the final
      in-LLM state (`llm/valid`, `llm/visual`, `llm/positions`, per-token
      entries as `llm/tok/<name>`: `llm/tok/patch` says which patches reach
      the last layer) and the methods' reports (`llm/<method>/<name>`).
    """
    plan = parse(reduction)
    cfg = self.config
    check_pixels(cfg.vision, pixels)
    check_prompts(tokens, valid, cfg.image_token_id, cfg.text.vocab_size)
    inputs.check_batch(pixels, tokens)
    seq = (c.ACT_BATCH, c.ACT_LENGTH, c.ACT_EMBED)  # activation sharding at the seams (vtr_jax.sharding)
    text_x = c.constrain(self.decoder.embed(tokens), seq)
    image_slot = jnp.argmax(tokens == self.config.image_token_id, axis=1).astype(jnp.int32)
    vis, aux = self.encode_image(pixels, reduction=plan, text=(text_x, valid, image_slot))
    vis = vis.replace(x=c.constrain(vis.x, seq))
    layout = assemble(text_x, valid, image_slot, vis, keep_positions=plan.keep_positions,
                      num_original=self.config.image_positions)
    aux.update({"prompt/visual": layout.visual, "prompt/valid": layout.valid,
                "prompt/positions": layout.positions})
    per_token = {"patch": layout.patch}
    for key, value in (llm_extras or {}).items():
      if key in per_token or "/" in key:
        raise ValueError(f"llm_extras: {key!r} is reserved or not a plain name; give per-token entries such as "
                         "'prompt', 'query', 'target', 'loss'")
      per_token[key] = to_slots(jnp.asarray(value), image_slot, vis.count)
    state = LLMState(layout.x, layout.positions, layout.valid, layout.visual, tokens=per_token,
                     n_visual=vis.count, n_cls=self.config.image_class_tokens)
    logits, cache, state = self.decoder.prefill(
        state, cache_extra=cache_extra, last_only=last_only,
        hook=llm_boundary_hook(plan, self.config.text.num_layers))
    aux.update({"llm/valid": state.valid, "llm/visual": state.visual, "llm/positions": state.positions})
    aux.update({f"llm/tok/{k}": v for k, v in state.tokens.items()})
    aux.update({f"llm/{k}": v for k, v in state.reports.items()})
    return logits, cache, aux

  def layout(self, tokens: Array, valid: Array, vis: Tokens, *, keep_positions: bool) -> PromptLayout:
    image_slot = jnp.argmax(tokens == self.config.image_token_id, axis=1)
    return assemble(self.decoder.embed(tokens), valid, image_slot, vis, keep_positions=keep_positions,
                    num_original=self.config.image_positions)

  def decode_step(self, tokens: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """int32[B] -> (logits float32[B, V], cache)."""
    return self.decoder.decode_step(tokens, cache)

  def __call__(self, pixels: Array, tokens: Array, valid: Array, *,
               reduction: str | Plan | None = None) -> Array:
    """Full-sequence logits (training / init): float32[B, T', V]."""
    logits, _, _ = self.prefill(pixels, tokens, valid, reduction=reduction)
    return logits


def _split_first(tokens: Tokens) -> tuple[Tokens, Tokens]:
  head = jax.tree_util.tree_map(lambda a: a[:, :1], tokens)
  rest = jax.tree_util.tree_map(lambda a: a[:, 1:], tokens)
  return head, rest


def pad_prompts(prompts: list[list[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists: -> (int32[B, T], bool[B, T])."""
  longest = max(len(p) for p in prompts)
  length = length or longest
  if longest > length:
    raise ValueError(f"a prompt has {longest} tokens, more than the length {length}")
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  valid = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, length - len(p):] = p
      valid[i, length - len(p):] = True
  return tokens, valid


class Generation(NamedTuple):
  tokens: Array  # int32[B, L] generated ids (pad after a sample's EOS)
  logits: Array | None  # float32[B, L, V] logits that produced each token
  done: Array  # bool[B] the sample emitted EOS


def generate(model: VLM, params, pixels: Array, tokens: Array, valid: Array, *, max_new_tokens: int,
             reduction: str | Plan | None = None, temperature: float = 0.0, top_k: int = 0,
             rng: Array | None = None, return_logits: bool = False) -> Generation:
  """Greedy (temperature 0) or sampled decoding with the KV cache.

  Args:
    model: the `VLM`; params: its parameters.
    pixels: float[B, S, S, C]; tokens, valid: left-padded prompts.
    max_new_tokens: tokens to produce per sample (static).
    reduction: a `Plan` or config string ("fastv:layer=2,keep=64").
    temperature, top_k: sampling controls (top_k 0 = no truncation).
    rng: PRNG key, required when temperature > 0.
  """
  cfg = model.config
  check_pixels(cfg.vision, pixels)
  check_prompts(tokens, valid, cfg.image_token_id, cfg.text.vocab_size)
  inputs.check_batch(pixels, tokens)
  inputs.check_generation(cfg, tokens, valid, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          rng=rng)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, params, pixels, jnp.asarray(tokens, jnp.int32), jnp.asarray(valid, bool), rng,
                   max_new_tokens=max_new_tokens, reduction=parse(reduction), temperature=float(temperature), top_k=int(top_k),
                   return_logits=return_logits)


def _pick(logits: Array, rng: Array, temperature: float, top_k: int) -> Array:
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "reduction", "temperature", "top_k",
                                             "return_logits"))
def _generate(model: VLM, params, pixels, tokens, valid, rng, *, max_new_tokens: int, reduction: Plan,
              temperature: float, top_k: int, return_logits: bool) -> Generation:
  cfg = model.config
  logits, cache, _ = model.apply(params, pixels, tokens, valid, reduction=reduction,
                                 cache_extra=max_new_tokens - 1, last_only=True, method=VLM.prefill)
  eos = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)
  rngs = jax.random.split(rng, max_new_tokens)
  first = _pick(logits, rngs[0], temperature, top_k)
  done = jnp.isin(first, eos)

  def step(carry, key):
    token, cache, done = carry
    logits, cache = model.apply(params, token, cache, method=VLM.decode_step)
    nxt = _pick(logits, key, temperature, top_k)
    nxt = jnp.where(done, cfg.pad_token_id, nxt)
    out = (nxt, logits if return_logits else None)
    return (nxt, cache, done | jnp.isin(nxt, eos)), out

  (_, _, done), (rest, rest_logits) = jax.lax.scan(step, (first, cache, done), rngs[1:])
  out_tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
  out_logits = None
  if return_logits:
    out_logits = jnp.concatenate([logits[:, None], jnp.swapaxes(rest_logits, 0, 1)], axis=1)
  return Generation(out_tokens, out_logits, done)
