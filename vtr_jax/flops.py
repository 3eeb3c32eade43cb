"""Analytical prefill / decode cost of a model config under a reduction plan.

FLOPs count a multiply-add as 2. Per decoder layer with n tokens (FastV's
and SparseVLM's accounting, times 2): q/k/v/o projections 2n(2D^2 + 2D*Dkv),
attention 4n^2 * N*H (QK^T and AV over the full n x n square, as the papers
count it), SwiGLU MLP 6nDF. Vision blocks likewise with their own widths and
a 4nDF MLP. KV-cache bytes are 2 (k and v) x slots x kv heads x head dim x
bytes per element, per layer.

    from vtr_jax import flops
    cost = flops.prefill_cost(cfg, "fastv:layer=2,ratio=0.5", text_tokens=64)
    print(flops.report(cost))
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.models.projector import make_projector, packed_grid
from vtr_jax.models.vlm import VLMConfig
from vtr_jax.reduce import Plan, parse


@dataclasses.dataclass(frozen=True)
class Cost:
  """Cost of one prefill (batch 1 unless `batch` says otherwise) and the first decode step.

  Attributes:
    vision, projector, llm, lm_head: prefill FLOPs by part (lm_head: last token only).
    visual_tokens: visual tokens entering each decoder layer.
    vision_tokens: tokens entering each vision block.
    kv_slots: cache slots per decoder layer after prefill (text slots + visual).
    kv_bytes: KV-cache bytes per layer after prefill.
    decode: FLOPs of the first decode step (one token per sample).
  """
  vision: float
  projector: float
  llm: float
  lm_head: float
  visual_tokens: tuple[int, ...]
  vision_tokens: tuple[int, ...]
  kv_slots: tuple[int, ...]
  kv_bytes: tuple[int, ...]
  decode: float

  @property
  def prefill(self) -> float:
    return self.vision + self.projector + self.llm + self.lm_head

  @property
  def mean_visual_tokens(self) -> float:
    """Visual tokens averaged over decoder layers (the in-LLM methods' headline count)."""
    return float(np.mean(self.visual_tokens))

  @property
  def kv_total(self) -> int:
    return int(sum(self.kv_bytes))


def _llm_layer(n: int, cfg) -> float:
  d, hd = cfg.hidden_size, cfg.dim_per_head
  dq, dkv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  proj = 2 * n * d * (2 * dq + 2 * dkv)
  attn = 4 * n * n * dq
  mlp = 6 * n * d * cfg.intermediate_size
  return proj + attn + mlp


def _vision_block(n_attn: int, n_mlp: int, cfg) -> float:
  d = cfg.hidden_size
  return 8 * n_attn * d * d + 4 * n_attn * n_attn * d + 4 * n_mlp * d * cfg.intermediate_size


@functools.lru_cache(maxsize=256)
def _projector_flops(cfg: VLMConfig, tokens: int) -> float:
  """FLOPs of the projector on `tokens` input tokens: closed form for the per-token MLPs, XLA's cost
  analysis of the compiled module for the others (TokenPacker's region attention)."""
  d_in, d = cfg.vision.feature_dim, cfg.text.hidden_size
  if cfg.projector in ("linear", "mlp2x_gelu"):
    return tokens * (2 * d_in * d + (2 * d * d if cfg.projector == "mlp2x_gelu" else 0))
  proj = make_projector(cfg.projector, cfg.vision, d, "float32", "float32", name="projector")
  x = jax.ShapeDtypeStruct((1, tokens, d_in), jnp.float32)
  params = jax.eval_shape(proj.init, jax.random.key(0), x)
  cost = jax.jit(proj.apply).lower(params, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _decode_layer(cache_len: int, cfg) -> float:
  d, hd = cfg.hidden_size, cfg.dim_per_head
  dq, dkv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  return 2 * d * (2 * dq + 2 * dkv) + 4 * (cache_len + 1) * dq + 6 * d * cfg.intermediate_size


def prefill_cost(cfg: VLMConfig, plan: str | Plan | None = None, *, text_tokens: int, batch: int = 1,
                 bytes_per_element: int = 2) -> Cost:
  """Prefill and first-decode-step cost of `batch` prompts of `text_tokens` text slots each.

  Args:
    cfg: the model.
    plan: a reduction plan or config string.
    text_tokens: text slots in the LLM input besides the visual tokens (the
      prompt without its image placeholder, padding included).
    bytes_per_element: KV-cache element size (2 for bf16).
  """
  plan = parse(plan)
  v, t = cfg.vision, cfg.text
  n = v.num_patches  # what vision-stage methods see: the patches of one view
  n_cls = int(v.has_cls)
  views = v.num_crops
  per_view = n + n_cls + v.num_registers
  vision_tokens = [per_view] * v.layers_run
  tower_out = per_view
  for m in plan.at("vision"):
    counts = m.vision_counts(v)
    if counts is not None:  # merging inside the blocks (ToMe)
      vision_tokens, tower_out = list(counts), m.kept(n) + n_cls
    n = m.kept(n)
  patch_flops = 2 * v.num_patches * v.patch_size ** 2 * v.num_channels * v.hidden_size
  after_merge = vision_tokens[1:] + [tower_out]  # the MLP runs on the tokens left after merging
  vision = views * (patch_flops + sum(_vision_block(a, b, v) for a, b in zip(vision_tokens, after_merge)))
  if v.reatten:  # FALCON's register interaction: attention over all views' registers, every block
    r = views * v.num_registers
    vision += v.layers_run * (8 * r * v.hidden_size ** 2 + 4 * r * r * v.hidden_size)
  side = packed_grid(cfg.projector, v)
  if v.num_registers:
    n = v.num_features
  llm_cls = cfg.image_class_tokens
  projector = _projector_flops(cfg, n + llm_cls)
  if side is not None:
    n = side * side
  for m in plan.at("embed"):
    n = m.kept(n)
  n_llm = n + llm_cls
  visual = [n_llm] * t.num_layers
  for m in plan.at("llm"):
    visual = [min(a, b) for a, b in zip(visual, m.layer_counts(n, t.num_layers, llm_cls))]
  slots = [text_tokens + c for c in visual]
  llm = sum(_llm_layer(s, t) for s in slots)
  lm_head = 2 * t.hidden_size * t.vocab_size
  kv_bytes = [2 * batch * s * t.num_kv_heads * t.dim_per_head * bytes_per_element for s in slots]
  decode = sum(_decode_layer(s, t) for s in slots) + lm_head
  return Cost(vision=batch * vision, projector=batch * projector, llm=batch * llm, lm_head=batch * lm_head,
              visual_tokens=tuple(visual), vision_tokens=tuple(vision_tokens), kv_slots=tuple(slots),
              kv_bytes=tuple(kv_bytes), decode=batch * decode)


def report(cost: Cost, baseline: Cost | None = None) -> str:
  """A short human-readable summary (ratios against `baseline` when given)."""
  lines = [f"prefill {cost.prefill / 1e12:.3f} TFLOPs (vision {cost.vision / 1e12:.3f}, projector "
           f"{cost.projector / 1e12:.4f}, LLM {cost.llm / 1e12:.3f}); visual tokens in the LLM: "
           f"{cost.visual_tokens[0]} -> {cost.visual_tokens[-1]} (layer mean {cost.mean_visual_tokens:.1f}); "
           f"KV cache {cost.kv_total / 2 ** 20:.1f} MiB; decode step {cost.decode / 1e9:.2f} GFLOPs"]
  if baseline is not None:
    lines.append(f"vs full: prefill {100 * cost.prefill / baseline.prefill:.1f} %, LLM "
                 f"{100 * cost.llm / baseline.llm:.1f} %, KV {100 * cost.kv_total / baseline.kv_total:.1f} %")
  return "\n".join(lines)


def llava15_7b() -> VLMConfig:
  """The LLaVA-1.5-7B geometry (CLIP ViT-L/14 at 336 px, Vicuna-7B)."""
  from vtr_jax.models.decoder import DecoderConfig
  from vtr_jax.models.vit import VisionConfig
  return VLMConfig(vision=VisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                       num_layers=24, num_heads=16, feature_layers=(-2,)),
                   text=DecoderConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_layers=32,
                                      num_heads=32, num_kv_heads=32, max_positions=4096),
                   image_token_id=32000, pad_token_id=0, eos_token_ids=(2,), name="llava-1.5-7b")
