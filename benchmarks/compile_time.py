"""Compile time of a 32-layer tiny decoder: layers as a Python loop vs `lax.scan` runs between boundaries.

  python benchmarks/compile_time.py            # writes benchmarks/results/compile_time_<backend>.{json,md}
  python benchmarks/compile_time.py --layers=16 --widths=64 --reps=1

The model is LLaVA-shaped but tiny (a 2-block ViT, a `--layers`-layer
decoder of each of `--widths`), so compile time is all there is to measure. Programs:
`prefill` (the VLM's prefill, last-slot logits) and `grad` (the gradient of a
loss over every logit, what a train step compiles), each without reduction
and with FastV at layer 2 (a boundary hook there: two scanned runs). Each
cell is `jax.jit(...).lower(...)` plus `.compile()` of a fresh function,
the median of `--reps`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def config(layers: int, width: int, scan: bool):
  from vtr_jax.models.decoder import DecoderConfig
  from vtr_jax.models.vit import VisionConfig
  from vtr_jax.models.vlm import VLMConfig
  vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                        feature_layers=(-1,))
  text = DecoderConfig(vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_layers=layers, num_heads=4,
                       num_kv_heads=2, scan_layers=scan)
  return VLMConfig(vision=vision, text=text, image_token_id=5, pad_token_id=0, eos_token_ids=())


def compile_seconds(fn, args, reps: int) -> tuple[float, float]:
  """Median (lower s, compile s) of a freshly jitted fn."""
  import jax
  lowers, compiles = [], []
  for _ in range(reps):
    jitted = jax.jit(lambda *a: fn(*a))  # a new function object: nothing cached
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    lowers.append(t1 - t0)
    compiles.append(time.perf_counter() - t1)
  return statistics.median(lowers), statistics.median(compiles)


def measure(layers: int, width: int, reps: int) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from vtr_jax.models.vlm import VLM, pad_prompts
  tokens, valid = pad_prompts([[1, 5] + list(range(10, 40))], 0)
  pixels = jnp.zeros((1, 32, 32, 3))
  rows = []
  for scan in (False, True):
    model = VLM(config(layers, width, scan))
    params = jax.eval_shape(model.init, jax.random.key(0), pixels, tokens, valid)
    for reduction in ("none", "fastv:layer=2,keep=8"):
      def prefill(p, x, t, v, model=model, reduction=reduction):
        return model.apply(p, x, t, v, reduction=reduction, last_only=True, method=VLM.prefill)[0]

      def grad(p, x, t, v, model=model, reduction=reduction):
        return jax.grad(lambda p: jnp.mean(model.apply(p, x, t, v, reduction=reduction, method=VLM.prefill)[0] ** 2))(p)

      for program, fn in (("prefill", prefill), ("grad", grad)):
        lower, comp = compile_seconds(fn, (params, pixels, tokens, valid), reps)
        rows.append({"layers": layers, "width": width, "scan_layers": scan, "reduction": reduction, "program": program,
                     "lower_s": round(lower, 3), "compile_s": round(comp, 3)})
        print(rows[-1], flush=True)
  return rows


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=32)
  p.add_argument("--widths", default="64,512", help="decoder widths (comma list)")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  args = p.parse_args(argv)
  import jax
  widths = [int(w) for w in args.widths.split(",")]
  rows = [r for w in widths for r in measure(args.layers, w, args.reps)]
  by = {(r["width"], r["scan_layers"], r["reduction"], r["program"]): r for r in rows}
  lines = [f"# Compile time of a {args.layers}-layer tiny decoder: Python loop vs scanned layer runs "
           f"({jax.default_backend()})", "",
           f"- jax {jax.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible; "
           f"median of {args.reps}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
           f"1-minute load average at the end {os.getloadavg()[0]:.1f}",
           f"- command: `python benchmarks/compile_time.py --layers={args.layers} --widths={args.widths} "
           f"--reps={args.reps}`", "",
           "| width | program | reduction | loop: lower + compile s | scan: lower + compile s | speed-up |",
           "|---:|---|---|---:|---:|---:|"]
  for width in widths:
    for reduction in ("none", "fastv:layer=2,keep=8"):
      for program in ("prefill", "grad"):
        loop, scan = by[width, False, reduction, program], by[width, True, reduction, program]
        tl, ts = loop["lower_s"] + loop["compile_s"], scan["lower_s"] + scan["compile_s"]
        lines.append(f"| {width} | {program} | `{reduction}` | {loop['lower_s']:.2f} + {loop['compile_s']:.2f} | "
                     f"{scan['lower_s']:.2f} + {scan['compile_s']:.2f} | {tl / ts:.1f}x |")
  table = "\n".join(lines)
  print(table)
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"compile_time_{jax.default_backend()}")
  with open(stem + ".md", "w") as f:
    f.write(table + "\n")
  with open(stem + ".json", "w") as f:
    json.dump({"jax": jax.__version__, "rows": rows}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
