"""Reference vs Pallas kernel: time and compiled memory of the scoring ops, at LLaVA and video scale.

  python benchmarks/kernels.py  # both scales; writes benchmarks/results/kernels_<backend>.{json,md}
  python benchmarks/kernels.py --scales=llava --reps=5

Cases (B = 1):
  similarity      max_similarity, cosine, N = M = tokens, D = 1024 (CLIP-L / SigLIP width)
  attention_mass  attention_mass, 32 query heads on 8 kv heads (GQA), head dim 128,
                  64 query rows (text / rater rows), S = tokens keys, causal
  attention_all   attention_mass with every token a query row (R = S: ToMe / Turbo-style
                  received attention), LLaVA scale only
  topk_probe      (no kernel; see kernels/topk.py) lax.top_k over a materialised
                  float32 score block ([576, 576] at LLaVA scale, a [576, 16384] row block
                  at video scale) vs k masked max-extraction passes over the same block,
                  the only exact top-k a Mosaic TPU kernel can express (no sort lowering)

On TPU (the Mosaic kernels) and GPU (their GPU forms, `kernels/*_gpu.py`)
both paths are compiled and timed, and the script also measures the device's
copy bandwidth (a jitted read + write of a 1 GiB array) and reports each
kernel's achieved bandwidth (compulsory bytes: inputs read once, outputs
written once, over the measured time) and FLOP rate next to it. On CPU the
kernel can only run in interpret mode, which is not a meaningful timing: only
the reference is timed, and both paths' compiled temporary memory is reported
(the kernel's from its interpret-mode program, whose temporaries are block
buffers and O(N + M) vectors, as on TPU). `benchmarks/device_check.py` runs
these cases on a GPU as part of its check.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.kernels import ops, similarity
from vtr_jax.kernels.attention_mass import attention_mass_reference

SCALES = {"llava": 576, "video": 16384}
KERNEL_IMPL = {"tpu": "pallas", "gpu": "pallas_gpu"}  # backends with a compiled kernel form
FEATURES = 1024
HEADS, KV_HEADS, HEAD_DIM, ROWS = 32, 8, 128, 64
PROBE_ROWS = 576
COPY_BYTES = 1 << 30


def device_name() -> str:
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    return f"{dev.platform}: {dev.device_kind} x{jax.device_count()}"
  model = platform.processor() or "unknown cpu"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
  return f"cpu: {model}, {os.cpu_count()} logical cores visible"


def time_ms(fn, args, reps: int) -> float:
  """Median wall time of a compiled call in ms (one warm-up call excluded)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def temp_bytes(fn, args) -> int:
  return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def copy_bandwidth_gbps(reps: int, nbytes: int = COPY_BYTES) -> float:
  """Device copy bandwidth: bytes read + written by a jitted elementwise pass over nbytes (1 GiB), per second."""
  a = jnp.ones((nbytes // 4,), jnp.float32)
  ms = time_ms(jax.jit(lambda a: a * 2.0), (a,), reps)
  return 2 * nbytes / (ms * 1e-3) / 1e9


def similarity_case(tokens, dtype, key):
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (1, tokens, FEATURES), dtype)
  y = jax.random.normal(ky, (1, tokens, FEATURES), dtype)
  item = jnp.dtype(dtype).itemsize
  return dict(
      shape=f"x [1, {tokens}, {FEATURES}], y [1, {tokens}, {FEATURES}], {jnp.dtype(dtype).name}",
      args=(x, y),
      reference=jax.jit(functools.partial(similarity.max_similarity_reference, metric="cosine")),
      kernel=lambda impl, interpret: jax.jit(functools.partial(ops.max_similarity, metric="cosine", impl=impl,
                                                               interpret=interpret)),
      flops=2 * tokens * tokens * FEATURES,
      bytes=2 * tokens * FEATURES * item + tokens * 8)


def attention_case(tokens, rows, dtype, key):
  kq, kk = jax.random.split(key)
  q = jax.random.normal(kq, (1, HEADS, rows, HEAD_DIM), dtype)
  k = jax.random.normal(kk, (1, KV_HEADS, tokens, HEAD_DIM), dtype)
  q_slots = jnp.linspace(tokens - rows, tokens - 1, rows).astype(jnp.int32)[None]  # the last rows, causal
  item = jnp.dtype(dtype).itemsize
  return dict(
      shape=f"q [1, {HEADS}, {rows}, {HEAD_DIM}], k [1, {KV_HEADS}, {tokens}, {HEAD_DIM}], {jnp.dtype(dtype).name}",
      args=(q, k, q_slots),
      reference=jax.jit(lambda q, k, s: attention_mass_reference(q, k, q_slots=s)),
      kernel=lambda impl, interpret: jax.jit(lambda q, k, s: ops.attention_mass(q, k, q_slots=s, impl=impl,
                                                                                interpret=interpret)),
      flops=2 * 2 * HEADS * rows * tokens * HEAD_DIM,  # two passes over the logits
      bytes=(HEADS * rows + KV_HEADS * tokens) * HEAD_DIM * item + tokens * 4)


def topk_probe(rows, cols, k, dtype, key, reps):
  """ms of lax.top_k vs k masked max passes over one materialised float32[rows, cols] score block."""
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (rows, FEATURES), dtype)
  y = jax.random.normal(ky, (cols, FEATURES), dtype)
  scores = jax.jit(lambda x, y: similarity.pairwise(x[None], y[None], "cosine")[0])(x, y)

  def extract(s):
    col = jnp.arange(s.shape[1])[None, :]

    def step(s, _):
      best = jnp.max(s, axis=1, keepdims=True)
      arg = jnp.min(jnp.where(s == best, col, s.shape[1]), axis=1, keepdims=True)
      return jnp.where(col == arg, -jnp.inf, s), (best[:, 0], arg[:, 0])

    _, (values, index) = jax.lax.scan(step, s, None, length=k)
    return values.T, index.T

  want, got = jax.lax.top_k(scores, k), jax.jit(extract)(scores)
  assert np.array_equal(np.asarray(want[1]), np.asarray(got[1])), "k-pass extraction disagrees with lax.top_k"
  return dict(top_k_ms=time_ms(jax.jit(lambda s: jax.lax.top_k(s, k)), (scores,), reps),
              k_pass_ms=time_ms(jax.jit(extract), (scores,), reps))


def run_case(name, scale, case, backend, reps, copy_gbps):
  args = case["args"]
  row = dict(op=name, scale=scale, shape=case["shape"], reference_ms=time_ms(case["reference"], args, reps),
             kernel_ms=None)
  row["reference_temp_bytes"] = temp_bytes(case["reference"], args)
  impl = KERNEL_IMPL.get(backend, "pallas")
  compiled_kernel = case["kernel"](impl, backend not in KERNEL_IMPL)
  row["kernel_temp_bytes"] = temp_bytes(compiled_kernel, args)
  row["kernel_memory_from"] = ({"tpu": "compiled Mosaic TPU", "gpu": "compiled GPU form (Triton)"}.get(backend)
                               or f"interpret-mode program compiled for {backend.upper()}")
  if backend in KERNEL_IMPL:
    row["kernel_ms"] = time_ms(compiled_kernel, args, reps)
    row["kernel_tflops"] = case["flops"] / (row["kernel_ms"] * 1e-3) / 1e12
    row["kernel_achieved_gbps"] = case["bytes"] / (row["kernel_ms"] * 1e-3) / 1e9
    row["kernel_fraction_of_copy_bandwidth"] = row["kernel_achieved_gbps"] / copy_gbps
  else:
    row["kernel_ms_note"] = "not timed: the Pallas kernel runs only in interpret mode on this backend"
  return row


def fmt_bytes(n):
  return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def fmt_ms(v):
  return "-" if v is None else f"{v:,.2f}"


def markdown(report) -> str:
  lines = [f"# Kernel benchmark ({report['backend']})", "",
           f"- device: {report['device']}", f"- jax {report['jax_version']}, dtype {report['dtype']}, "
           f"median of {report['reps']} timed calls after one warm-up",
           f"- command: `{report['command']}`"]
  lines += [f"- {note}" for note in report["notes"]]
  if report["copy_bandwidth_gbps"] is not None:
    lines.append(f"- copy bandwidth: {report['copy_bandwidth_gbps']:.0f} GB/s")
  lines += ["", "| op | scale | shape | reference ms | kernel ms | reference temp | kernel temp "
            "| kernel GB/s (of copy) | kernel TFLOP/s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in report["cases"]:
    gbps, tflops = r.get("kernel_achieved_gbps"), r.get("kernel_tflops")
    bandwidth = "-" if gbps is None else f"{gbps:,.0f} ({r['kernel_fraction_of_copy_bandwidth']:.0%})"
    lines.append(f"| {r['op']} | {r['scale']} | {r['shape']} | {fmt_ms(r['reference_ms'])} | {fmt_ms(r['kernel_ms'])} "
                 f"| {fmt_bytes(r['reference_temp_bytes'])} | {fmt_bytes(r['kernel_temp_bytes'])} "
                 f"| {bandwidth} | {'-' if tflops is None else f'{tflops:.1f}'} |")
  if report["topk_probe"]:
    lines += ["", "| topk probe | score block | k | lax.top_k ms | k-pass extraction ms |", "|---|---|---|---:|---:|"]
    for r in report["topk_probe"]:
      lines.append(f"| {r['scale']} | {r['block']} | {r['k']} | {fmt_ms(r['top_k_ms'])} | {fmt_ms(r['k_pass_ms'])} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--scales", default="llava,video", help=f"comma list of {', '.join(SCALES)}")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--topk_k", type=int, default=32)
  parser.add_argument("--out", default=None, help="output stem (default benchmarks/results/kernels_<backend>)")
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  dtype = jnp.dtype(args.dtype)
  key = jax.random.key(0)
  notes = []
  if hasattr(os, "getloadavg"):
    notes.append(f"1-minute load average at start: {os.getloadavg()[0]:.1f} (other processes share the machine)")
  if backend == "cpu":
    notes.append("no accelerator (GPU/TPU) was available: only the reference is timed; kernel timings, copy "
                 "bandwidth and achieved bandwidth are not measured")
  if backend not in KERNEL_IMPL:
    notes.append("kernel temp = its interpret-mode program compiled for this backend; interpret mode pads each input "
                 "to a multiple of its block, so at small N it can exceed the reference; what carries over to TPU is "
                 "the growth with N (linear, vs the reference's quadratic [N, M] / [H, R, S])")
  report = dict(device=device_name(), backend=backend, jax_version=jax.__version__, dtype=dtype.name, reps=args.reps,
                command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
                notes=notes, copy_bandwidth_gbps=copy_bandwidth_gbps(args.reps) if backend in KERNEL_IMPL else None,
                cases=[], topk_probe=[])
  for scale in args.scales.split(","):
    tokens = SCALES[scale]
    cases = [("similarity", similarity_case(tokens, dtype, key)),
             ("attention_mass", attention_case(tokens, ROWS, dtype, key))]
    if scale == "llava":
      cases.append(("attention_all", attention_case(tokens, tokens, dtype, key)))
    for name, case in cases:
      print(f"{name} @ {scale}: {case['shape']}", file=sys.stderr, flush=True)
      report["cases"].append(run_case(name, scale, case, backend, args.reps, report["copy_bandwidth_gbps"]))
    rows = min(tokens, PROBE_ROWS)
    probe = topk_probe(rows, tokens, args.topk_k, dtype, key, args.reps)
    report["topk_probe"].append(dict(scale=scale, block=f"[{rows}, {tokens}]", k=args.topk_k, **probe))
  stem = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels_{backend}")
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=2)
  table = markdown(report)
  with open(stem + ".md", "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
