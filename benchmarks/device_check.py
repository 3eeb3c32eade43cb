r"""One command that checks an accelerator end to end and writes the numbers a GPU run must report.

  python benchmarks/device_check.py           # on one H100 / H200: benchmarks/results/device_check_gpu.{md,json}
  bash benchmarks/device_check.sh             # the same, with the environment a fresh machine needs
  python benchmarks/device_check.py --tiny    # the same code paths at toy sizes on any backend (CPU: < 1 min)
  python benchmarks/device_check.py --sections=correctness,video

Sections (`--sections`, all by default; about 6 minutes on one H200 is the
target, see `--methods` / `--budgets` / `--reps` to trim it):
  correctness  every attention implementation this backend runs (`xla`,
               `cudnn` on GPU, `pallas` on TPU, `chunked`) against `reference`
               on a causal prefill with left padding and pruned slots, a decode
               step at a traced offset and a per-key bias, grouped-query heads,
               forward and gradient; and the scoring kernels the ops dispatch
               to here (the GPU forms on GPU) against their references, forward
               and gradient. float32 at the highest matmul precision, 1e-5
               (cuDNN, which takes bfloat16 only: against float32, 2e-2).
  bandwidth    the device copy bandwidth (a jitted read + write of 1 GiB) and
               each scoring kernel's achieved GB/s and its fraction of it, at
               LLaVA (576) and video (16384) token counts (benchmarks/kernels.py
               cases).
  mfu          prefill of LLaVA-1.5-7B's geometry (CLIP-L/14-336 + a 7B LLaMA)
               with random bfloat16 weights, batch `--batch`: full, and
               `--methods` at `--budgets` visual tokens; time, model FLOP/s,
               MFU (of the bf16 dense peak the device names, and of a measured
               8192^3 matmul), and each method's speedup next to its FLOPs
               ratio (fraction = speedup / (full FLOPs / method FLOPs)).
  video        a 32-frame clip's prefill: 32 x 196 = 6272 visual tokens plus
               64 text tokens through the 7B decoder (bf16, batch 1; the
               visual block stands for the frames: multi-frame towers are not
               part of this check), per attention implementation: compiled
               temporaries, measured peak device memory and time.
With `--tiny` the geometries shrink (a 4-layer, 256-wide decoder; 1536 visual
tokens for the clip; one budget per method), the scoring kernels run their
GPU forms in interpret mode on a backend without them, and results go to
`--out` (default benchmarks/results) as device_check_<backend>_tiny.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import kernels as kernel_bench  # noqa: E402
from benchmarks import prefill as prefill_bench  # noqa: E402
from vtr_jax import flops  # noqa: E402
from vtr_jax.kernels import ops  # noqa: E402
from vtr_jax.kernels.attention_mass import attention_mass_reference  # noqa: E402
from vtr_jax.kernels.similarity import max_similarity_reference  # noqa: E402
from vtr_jax.models import attention as attn  # noqa: E402
from vtr_jax.models.decoder import Decoder  # noqa: E402
from vtr_jax.models.vlm import VLM, pad_prompts  # noqa: E402
from vtr_jax.reduce import parse, registry  # noqa: E402
from vtr_jax.seams import LLMState  # noqa: E402

SECTIONS = ("correctness", "bandwidth", "mfu", "video")
# bf16 dense peak TFLOP/s by device kind (vendor datasheets, SXM parts, no sparsity)
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "TPU v5 lite": 197.0, "TPU v4": 275.0, "TPU v5p": 459.0}
FRAMES, FRAME_TOKENS, TEXT = 32, 196, 64


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What `--tiny` shrinks."""
  geometry: Any = None  # VLMConfig of the mfu / video sections
  frames: int = FRAMES
  frame_tokens: int = FRAME_TOKENS
  kernel_scales: tuple = (("llava", 576), ("video", 16384))
  copy_bytes: int = 1 << 30
  matmul: int = 8192
  attn_tokens: int = 300


def sizes(tiny: bool) -> Sizes:
  if not tiny:
    cfg = flops.llava15_7b()
    bf16 = dict(dtype="bfloat16", param_dtype="bfloat16")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **bf16),
                              text=dataclasses.replace(cfg.text, **bf16))
    return Sizes(geometry=cfg)
  cfg = prefill_bench.geometry(8, 16)
  bf16 = dict(dtype="bfloat16", param_dtype="bfloat16")
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **bf16),
                            text=dataclasses.replace(cfg.text, **bf16))
  return Sizes(geometry=cfg, frames=16, frame_tokens=96, kernel_scales=(("llava", 64),), copy_bytes=1 << 22,
               matmul=1024, attn_tokens=40)


def device_kind() -> str:
  return kernel_bench.device_name()


def median_ms(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


# ---- correctness ----------------------------------------------------------------------------------
def attention_impls(backend: str) -> list[str]:
  return {"gpu": ["xla", "cudnn", "chunked"], "tpu": ["xla", "pallas", "chunked"]}.get(backend, ["xla", "chunked"])


def _max_err(a, b, rows=None) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if rows is not None:
    a, b = a[rows], b[rows]
  return float(np.max(np.abs(a - b))) if a.size else 0.0


def check_attention(backend: str, t: int) -> list[dict]:
  """Each implementation vs `reference`: prefill (padding + pruned slots), decode, bias; output and gradients."""
  rng = np.random.default_rng(0)
  b, n, kh, h = 2, 8, 2, 64
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, kh, kh))
  valid = np.ones((b, t), bool)
  valid[0, : t // 5] = False  # left padding
  valid[1, t // 3: t // 3 + t // 8] = False  # pruned slots
  bias = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
  end = t - 4
  cases = {"causal_prefill": (q, attn.Mask.causal_prefill(jnp.asarray(valid)), valid),
           "decode": (q[:, :2], attn.Mask.decode(jnp.asarray(valid).at[:, end:end + 2].set(True),
                                                 jnp.asarray(end, jnp.int32)), np.ones((b, 2), bool)),
           "key_bias": (q, attn.Mask(key_bias=bias), np.ones((b, t), bool))}
  rows = []
  for impl in attention_impls(backend):
    for case, (qc, mask, ok) in cases.items():
      why = _unsupported(impl, qc, k, mask)
      if why:
        rows.append({"check": f"attention/{impl}/{case}", "skipped": why})
        continue
      dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
      tol = 2e-2 if impl == "cudnn" else 1e-5
      w = jnp.asarray(rng.normal(size=qc.shape), jnp.float32) * jnp.asarray(ok)[:, :, None, None]

      def loss(fn, q, k, v):
        return jnp.sum(w * fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask).astype(jnp.float32))

      impl_fn = functools.partial(attn.attend, implementation=impl, interpret=backend != "tpu")
      with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda q, k, v: impl_fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask))(qc, k, v)
        want = jax.jit(lambda q, k, v: attn.reference(q, k, v, mask))(qc, k, v)
        g_got = jax.jit(jax.grad(functools.partial(loss, impl_fn), (0, 1, 2)))(qc, k, v)
        g_want = jax.jit(jax.grad(functools.partial(loss, attn.reference), (0, 1, 2)))(qc, k, v)
      err = _max_err(got, want, ok)
      grad_err = max(_max_err(a, r) / max(float(np.max(np.abs(np.asarray(r)))), 1.0) for a, r in zip(g_got, g_want))
      finite = bool(np.all(np.isfinite(np.asarray(got, np.float32))))
      rows.append({"check": f"attention/{impl}/{case}", "max_abs_err": err, "grad_max_rel_err": grad_err,
                   "tolerance": tol, "finite": finite, "ok": err <= tol and grad_err <= 10 * tol and finite})
  return rows


def _unsupported(impl: str, q, k, mask) -> str | None:
  try:
    attn.choose(impl, q.astype(jnp.bfloat16) if impl == "cudnn" else q, k, mask, interpret=True)
  except attn.AttentionError as e:
    return str(e)
  return None


def check_kernels(backend: str) -> list[dict]:
  """The scoring ops on this backend's kernel form vs their references: forward and gradient."""
  impl, interpret = {"tpu": ("pallas", False), "gpu": ("pallas_gpu", False)}.get(backend, ("pallas_gpu", True))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 37, 64)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(2, 300, 64)), jnp.float32)
  y_valid = jnp.asarray(rng.random((2, 300)) > 0.3)
  q = jnp.asarray(rng.normal(size=(2, 8, 5, 64)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 2, 300, 64)), jnp.float32)
  q_slots = jnp.asarray(rng.integers(150, 300, size=(2, 5)), jnp.int32)
  w_x, w_s = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((2, 37), (2, 300)))
  cases = {
      "max_similarity": (lambda x, y: ops.max_similarity(x, y, y_valid=y_valid, impl=impl, interpret=interpret)[0],
                         lambda x, y: max_similarity_reference(x, y, y_valid=y_valid)[0], (x, y), w_x),
      "attention_mass": (lambda q, k: ops.attention_mass(q, k, q_slots=q_slots, impl=impl, interpret=interpret),
                         lambda q, k: attention_mass_reference(q, k, q_slots=q_slots), (q, k), w_s),
  }
  rows = []
  with jax.default_matmul_precision("highest"):
    for name, (kernel, reference, args, w) in cases.items():
      got, want = jax.jit(kernel)(*args), jax.jit(reference)(*args)
      grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(w * f(*a)), (0, 1)))(*args) for f in (kernel, reference)]
      err = _max_err(got, want)
      grad_err = max(_max_err(a, r) for a, r in zip(*grads))
      rows.append({"check": f"kernel/{name} ({impl}{', interpret' if interpret else ''})", "max_abs_err": err,
                   "grad_max_rel_err": grad_err, "tolerance": 1e-5, "finite": True,
                   "ok": err <= 1e-5 and grad_err <= 1e-4})
  return rows


# ---- bandwidth ------------------------------------------------------------------------------------
def bandwidth(backend: str, s: Sizes, reps: int) -> dict:
  copy = kernel_bench.copy_bandwidth_gbps(reps, s.copy_bytes)
  key = jax.random.key(0)
  cases = []
  for scale, tokens in s.kernel_scales:
    for name, case in (("similarity", kernel_bench.similarity_case(tokens, jnp.bfloat16, key)),
                       ("attention_mass", kernel_bench.attention_case(tokens, min(kernel_bench.ROWS, tokens),
                                                                      jnp.bfloat16, key))):
      cases.append(kernel_bench.run_case(name, scale, case, backend, reps, copy))
  return {"copy_bandwidth_gbps": copy, "cases": cases}


# ---- MFU ------------------------------------------------------------------------------------------
def matmul_tflops(n: int, reps: int) -> float:
  a = jnp.ones((n, n), jnp.bfloat16)
  ms = median_ms(jax.jit(lambda a, b: a @ b), (a, a), reps)
  return 2 * n ** 3 / (ms * 1e-3) / 1e12


def named_peak() -> float | None:
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)


def mfu(s: Sizes, methods: list[str], budgets: list[int], batch: int, reps: int) -> dict:
  cfg = s.geometry
  model = VLM(cfg)
  rng = np.random.default_rng(0)
  side = cfg.vision.image_size
  prompts = [[1, cfg.image_token_id] + list(rng.integers(3, cfg.text.vocab_size, TEXT - 1)) for _ in range(batch)]
  tokens, valid = pad_prompts(prompts, cfg.pad_token_id)
  pixels = jnp.asarray(rng.standard_normal((batch, side, side, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), pixels, tokens, valid)  # random bf16 weights, made on the device
  peak_measured = matmul_tflops(s.matmul, reps)
  peak_named = named_peak()
  text_tokens = tokens.shape[1] - 1

  def run(spec):
    fn = jax.jit(lambda p, x, t, v: model.apply(p, x, t, v, reduction=spec, last_only=True, method=VLM.prefill)[0])
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, pixels, tokens, valid))
    compile_s = time.perf_counter() - t0
    return median_ms(fn, (params, pixels, tokens, valid), reps), compile_s

  full_flops = flops.prefill_cost(cfg, None, text_tokens=text_tokens, batch=batch).prefill
  t_full, c_full = run(None)
  rows = [{"method": "full", "tokens": cfg.vision.num_patches, "spec": "none", "ms": t_full, "compile_s": c_full,
           "flops": full_flops}]
  for name in methods:
    for k in budgets:
      method = registry()[name].for_budget(k / cfg.reducible_tokens, cfg)
      if method is None:
        continue
      spec = method.spec()
      ms, compile_s = run(parse(spec))
      rows.append({"method": name, "tokens": k, "spec": spec, "ms": ms, "compile_s": compile_s,
                   "flops": flops.prefill_cost(cfg, spec, text_tokens=text_tokens, batch=batch).prefill})
      print(f"  mfu {name}@{k}: {ms:.2f} ms", file=sys.stderr, flush=True)
  for r in rows:
    r["tflops"] = r["flops"] / (r["ms"] * 1e-3) / 1e12
    r["mfu_named"] = None if peak_named is None else r["tflops"] / peak_named
    r["mfu_measured"] = r["tflops"] / peak_measured
    r["speedup"] = t_full / r["ms"]
    r["flops_speedup"] = full_flops / r["flops"]
    r["fraction_of_flops_speedup"] = r["speedup"] / r["flops_speedup"]
  return {"batch": batch, "text_tokens": text_tokens, "peak_named_tflops": peak_named,
          "peak_measured_tflops": peak_measured, "rows": rows}


# ---- video-length prefill memory --------------------------------------------------------------------
def peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def video(backend: str, s: Sizes, reps: int) -> dict:
  cfg = dataclasses.replace(s.geometry.text, scan_layers=True)
  visual = s.frames * s.frame_tokens
  length = visual + TEXT
  rng = jax.random.key(1)
  x = jax.random.normal(rng, (1, length, cfg.hidden_size), jnp.bfloat16) * 0.02
  positions = jnp.arange(length, dtype=jnp.int32)[None]
  valid = jnp.ones((1, length), bool)
  is_visual = (jnp.arange(length) < visual)[None]
  tokens0 = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(Decoder(cfg).init)(jax.random.key(0), tokens0, jnp.arange(8)[None], jnp.ones((1, 8), bool))
  rows = []
  for impl in ["reference"] + attention_impls(backend):
    decoder = Decoder(dataclasses.replace(cfg, attention=impl))
    state = LLMState(x, positions, valid, is_visual)
    shape = jax.ShapeDtypeStruct((1, length, cfg.num_heads, cfg.dim_per_head), jnp.bfloat16)
    try:
      attn.choose(impl, shape, shape, attn.Mask.causal_prefill(valid), interpret=True)
    except attn.AttentionError as e:
      rows.append({"attention": impl, "skipped": str(e)})
      continue
    fn = jax.jit(lambda p, st, decoder=decoder: decoder.apply(p, st, last_only=True, method=Decoder.prefill)[0])
    compiled = fn.lower(params, state).compile()
    m = compiled.memory_analysis()
    before = peak_bytes()
    ms = median_ms(compiled, (params, state), reps)
    rows.append({"attention": impl, "temp_bytes": int(m.temp_size_in_bytes), "argument_bytes":
                 int(m.argument_size_in_bytes), "peak_bytes_in_use": peak_bytes(), "peak_before": before, "ms": ms})
    print(f"  video {impl}: {ms:.1f} ms, temp {m.temp_size_in_bytes / 2**30:.2f} GiB", file=sys.stderr, flush=True)
  return {"frames": s.frames, "frame_tokens": s.frame_tokens, "visual_tokens": visual, "text_tokens": TEXT,
          "rows": rows}


# ---- report -----------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
  gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
  lines = [f"# Device check ({report['backend']}{', tiny' if report['tiny'] else ''})", "",
           f"- device: {report['device']}; jax {report['jax']}; command `{report['command']}`; "
           f"{report['seconds']:.0f} s end to end"]
  lines += [f"- {n}" for n in report["notes"]]
  if "correctness" in report:
    lines += ["", "## Correctness (vs reference)", "", "| check | max abs err | grad max err | tol | ok |",
              "|---|---:|---:|---:|---|"]
    for r in report["correctness"]:
      if "skipped" in r:
        lines.append(f"| {r['check']} | - | - | - | skipped: {r['skipped']} |")
      else:
        lines.append(f"| {r['check']} | {r['max_abs_err']:.2e} | {r['grad_max_rel_err']:.2e} | {r['tolerance']:.0e} "
                     f"| {'yes' if r['ok'] else 'NO'} |")
  if "bandwidth" in report:
    bw = report["bandwidth"]
    lines += ["", "## Kernel bandwidth", "", f"Copy bandwidth {bw['copy_bandwidth_gbps']:,.0f} GB/s.", "",
              "| op | scale | shape | reference ms | kernel ms | kernel GB/s (of copy) | kernel TFLOP/s |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in bw["cases"]:
      gbps = r.get("kernel_achieved_gbps")
      share = "-" if gbps is None else f"{gbps:,.0f} ({gbps / bw['copy_bandwidth_gbps']:.0%})"
      tfl = r.get("kernel_tflops")
      lines.append(f"| {r['op']} | {r['scale']} | {r['shape']} | {kernel_bench.fmt_ms(r['reference_ms'])} | "
                   f"{kernel_bench.fmt_ms(r['kernel_ms'])} | {share} | {'-' if tfl is None else f'{tfl:.1f}'} |")
  if "mfu" in report:
    m = report["mfu"]
    named = "-" if m["peak_named_tflops"] is None else f"{m['peak_named_tflops']:.0f}"
    lines += ["", "## Prefill MFU (7B geometry, random bf16 weights)" if not report["tiny"] else
              "## Prefill MFU (tiny geometry)", "",
              f"Batch {m['batch']}, {m['text_tokens']} text tokens; peak bf16 TFLOP/s: named {named}, measured "
              f"{m['peak_measured_tflops']:.3g} (an {report['sizes']['matmul']}^3 matmul).", "",
              "| method | visual tokens | ms | TFLOP/s | MFU (named) | MFU (measured) | speedup | FLOPs ratio speedup "
              "| fraction | compile s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in m["rows"]:
      named_mfu = "-" if r["mfu_named"] is None else f"{r['mfu_named']:.1%}"
      lines.append(f"| {r['method']} | {r['tokens']} | {r['ms']:.2f} | {r['tflops']:.3g} | {named_mfu} | "
                   f"{r['mfu_measured']:.1%} | {r['speedup']:.2f}x | {r['flops_speedup']:.2f}x | "
                   f"{r['fraction_of_flops_speedup']:.2f} | {r['compile_s']:.1f} |")
  if "video" in report:
    v = report["video"]
    lines += ["", f"## Video-length prefill ({v['frames']} frames x {v['frame_tokens']} = {v['visual_tokens']} visual "
              f"+ {v['text_tokens']} text tokens, decoder only, bf16, batch 1)", "",
              "| attention | temporaries GiB | arguments GiB | peak in use GiB | ms |", "|---|---:|---:|---:|---:|"]
    for r in v["rows"]:
      if "skipped" in r:
        lines.append(f"| {r['attention']} | skipped: {r['skipped']} | | | |")
      else:
        lines.append(f"| {r['attention']} | {gib(r['temp_bytes'])} | {gib(r['argument_bytes'])} | "
                     f"{gib(r['peak_bytes_in_use'])} | {r['ms']:.1f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="toy sizes: the same code paths in under a minute on CPU")
  p.add_argument("--sections", default=",".join(SECTIONS))
  p.add_argument("--methods", default="visionzip,divprune,fastv")
  p.add_argument("--budgets", default="192,128,64")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--reps", type=int, default=0, help="timed calls per measurement (default 10; 1 with --tiny)")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  backend = jax.default_backend()
  s = sizes(args.tiny)
  reps = args.reps or (1 if args.tiny else 10)
  sections = [x for x in args.sections.split(",") if x]
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    raise SystemExit(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
  budgets = [int(b) for b in args.budgets.split(",") if b]
  if args.tiny:  # one budget per method: the same code paths, a quarter of the compiles
    budgets = budgets[-1:]
  notes = []
  if backend == "cpu":
    notes.append("no accelerator: kernel timings, bandwidth shares and cuDNN are not measured here; the GPU figures "
                 "are still to be measured (run this script without --tiny on an H100/H200)")
  report = {"backend": backend, "device": device_kind(), "jax": jax.__version__, "tiny": args.tiny,
            "command": "python benchmarks/device_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "notes": notes, "sizes": {"matmul": s.matmul, "frames": s.frames, "frame_tokens": s.frame_tokens}}
  if "correctness" in sections:
    report["correctness"] = check_attention(backend, s.attn_tokens) + check_kernels(backend)
    print(f"correctness: {sum(r.get('ok', False) for r in report['correctness'])} ok", file=sys.stderr, flush=True)
  if "bandwidth" in sections:
    report["bandwidth"] = bandwidth(backend, s, reps)
  if "mfu" in sections:
    report["mfu"] = mfu(s, [m for m in args.methods.split(",") if m], budgets, args.batch, reps)
  if "video" in sections:
    report["video"] = video(backend, s, reps)
  report["seconds"] = time.perf_counter() - t0
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"device_check_{backend}{'_tiny' if args.tiny else ''}")
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=1, default=str)
  table = markdown(report)
  with open(stem + ".md", "w") as f:
    f.write(table)
  print(table)
  bad = [r["check"] for r in report.get("correctness", []) if r.get("ok") is False]
  if bad:
    raise SystemExit(f"correctness checks failed: {bad}")
  return report


if __name__ == "__main__":
  main()
