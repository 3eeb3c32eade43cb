r"""Measured prefill time of every method at 192 / 128 / 64 visual tokens, next to its FLOPs ratio.

The model has LLaVA-1.5-7B's token geometry (CLIP-L/14 at 336 px: 576 visual
tokens, a prompt of 64 text tokens) at a depth and width this machine runs:
    python benchmarks/prefill.py                   # all methods, batch 1
    python benchmarks/prefill.py --methods=fastv,visionzip --batch=4 --reps=10

Scoring overhead: each method is also timed against its *fixed-selection
twin*, a plan that removes the same number of tokens at the same places
(`uniform` before the LLM; drops of the first tokens at the same decoder
layers inside it) without computing any score. overhead = (t_method -
t_twin) / t_method. Results go to benchmarks/results/prefill_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax import flops
from vtr_jax.models.vlm import VLM, VLMConfig, pad_prompts
from vtr_jax.reduce import Plan, parse, registry
from vtr_jax.reduce.in_llm import common as C

BUDGETS = (192, 128, 64)


def geometry(depth_scale: int = 4, width_scale: int = 4) -> VLMConfig:
  """LLaVA-1.5-7B with layers / depth_scale and widths / width_scale (576 visual tokens kept)."""
  full = flops.llava15_7b()
  v, t = full.vision, full.text
  vision = dataclasses.replace(v, hidden_size=v.hidden_size // width_scale,
                               intermediate_size=v.intermediate_size // width_scale,
                               num_layers=v.num_layers // depth_scale, num_heads=v.num_heads // width_scale)
  text = dataclasses.replace(t, hidden_size=t.hidden_size // width_scale,
                             intermediate_size=t.intermediate_size // width_scale,
                             num_layers=t.num_layers // depth_scale, num_heads=t.num_heads // width_scale,
                             num_kv_heads=t.num_kv_heads // width_scale)
  return dataclasses.replace(full, vision=vision, text=text, name="llava-1.5-geometry-small")


@dataclasses.dataclass(frozen=True)
class FixedDrops(C.LLMMethod):
  """Benchmark-only (unregistered): keeps the first `counts[l]` visual tokens entering each layer."""
  name = "fixed_drops"
  positions = "keep"
  summary = "fixed selection, no scoring"
  counts: tuple[int, ...] = ()

  def layer_counts(self, n, num_layers, n_cls=0):
    return list(self.counts)

  def boundaries(self, num_layers):
    return tuple(i for i in range(num_layers) if i == 0 or self.counts[i] != self.counts[i - 1])

  def at_boundary(self, layer, state, access):
    keep = self.counts[layer] - state.n_cls
    if keep >= state.n_patches:
      return state
    order = -jnp.cumsum(state.visual.astype(jnp.float32), axis=1)  # first visual tokens score highest
    return self.drop(state, order, keep)[0]


def twin(cfg: VLMConfig, spec: str) -> Plan:
  """The scoring-free plan with the same token counts as `spec`."""
  n = cfg.vision.num_patches
  parts = []
  for m in parse(spec).methods:
    if m.stage in ("vision", "embed"):
      parts.append(parse(f"uniform@{m.stage}:keep={m.kept(n)}").methods[0])
      n = m.kept(n)
    elif m.stage == "llm":
      parts.append(FixedDrops(counts=tuple(m.layer_counts(n, cfg.text.num_layers, cfg.image_class_tokens))))
  return Plan(tuple(parts))


def timed(fns, args, reps: int) -> list[float]:
  """Median ms of each function over `reps` calls, interleaved (a, b, a, b, ...) after one warm-up
  call each, so that drift in the machine's load hits every function alike."""
  for fn in fns:
    jax.block_until_ready(fn(*args))
  times = [[] for _ in fns]
  for _ in range(reps):
    for fn, ts in zip(fns, times):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - t0)
  return [1e3 * float(np.median(ts)) for ts in times]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--methods", default="", help="comma-separated (default: all registered)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--reps", type=int, default=11)
  parser.add_argument("--depth_scale", type=int, default=4)
  parser.add_argument("--width_scale", type=int, default=8)
  parser.add_argument("--outdir", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()

  cfg = geometry(args.depth_scale, args.width_scale)
  model = VLM(cfg)
  s = cfg.vision.image_size
  rng = np.random.default_rng(0)
  prompts = [[1] + [cfg.image_token_id] + list(rng.integers(3, 30000, 63)) for _ in range(args.batch)]
  tokens, valid = pad_prompts(prompts, cfg.pad_token_id)
  pixels = jnp.asarray(rng.standard_normal((args.batch, s, s, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), pixels, tokens, valid)

  def prefill_fn(plan):
    return jax.jit(lambda p, x, t, v: model.apply(p, x, t, v, reduction=plan, last_only=True,
                                                  method=VLM.prefill)[0])

  text_tokens = tokens.shape[1] - 1
  full_cost = flops.prefill_cost(cfg, None, text_tokens=text_tokens, batch=args.batch)
  load_start = os.getloadavg()[0]
  t_full, = timed([prefill_fn(Plan())], (params, pixels, tokens, valid), args.reps)
  methods = [m for m in (args.methods.split(",") if args.methods else registry()) if m]
  rows = [{"method": "full", "budget": 576, "spec": "none", "ms": t_full, "twin_ms": t_full, "overhead": 0.0,
           "flops_ratio": 1.0, "layer_mean_tokens": 576.0}]
  for name in methods:
    for k in BUDGETS:
      cls = registry()[name]
      method = cls.for_budget(k / cfg.reducible_tokens, cfg)
      if method is None and k == BUDGETS[0]:  # no budget knob: once, at its own setting
        method = cls.unbudgeted(cfg)
      if method is None:
        continue
      spec = method.spec()
      cost = flops.prefill_cost(cfg, spec, text_tokens=text_tokens, batch=args.batch)
      t, t_twin = timed([prefill_fn(parse(spec)), prefill_fn(twin(cfg, spec))], (params, pixels, tokens, valid),
                        args.reps)
      rows.append({"method": name, "budget": k, "spec": spec, "ms": t, "twin_ms": t_twin,
                   "overhead": (t - t_twin) / t, "flops_ratio": cost.prefill / full_cost.prefill,
                   "layer_mean_tokens": cost.mean_visual_tokens})
      print(f"{name:<14} {k:>4}  {t:8.2f} ms  (twin {t_twin:8.2f} ms, overhead {100 * rows[-1]['overhead']:6.1f} %)"
            f"  FLOPs {100 * rows[-1]['flops_ratio']:5.1f} %", flush=True)

  device = jax.devices()[0]
  lines = [f"# Prefill time by method ({device.platform})", "",
           f"- device: {device.device_kind} ({platform.processor() or platform.machine()}), jax {jax.__version__}",
           f"- model: LLaVA-1.5-7B geometry (576 visual + {text_tokens} text tokens) with depth / "
           f"{args.depth_scale} and width / {args.width_scale}: vision {cfg.vision.num_layers} x "
           f"{cfg.vision.hidden_size}, LLM {cfg.text.num_layers} x {cfg.text.hidden_size}; batch {args.batch}; "
           f"median of {args.reps} calls, each method interleaved with its twin",
           f"- 1-minute load average at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f}",
           f"- command: `python benchmarks/prefill.py --batch={args.batch} --reps={args.reps}`", "",
           "| method | tokens | spec | prefill ms | FLOPs % | time % | layer-avg tokens | twin ms | scoring overhead % |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['budget']} | `{r['spec']}` | {r['ms']:.2f} | {100 * r['flops_ratio']:.1f} | "
                 f"{100 * r['ms'] / t_full:.1f} | {r['layer_mean_tokens']:.0f} | {r['twin_ms']:.2f} | "
                 f"{100 * r['overhead']:.1f} |")
  table = "\n".join(lines)
  print(table)
  os.makedirs(args.outdir, exist_ok=True)
  stem = os.path.join(args.outdir, f"prefill_{device.platform}")
  with open(stem + ".md", "w") as f:
    f.write(table + "\n")
  with open(stem + ".json", "w") as f:
    json.dump({"device": str(device), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
