"""The library behind eval.py: every method x budget on one model and one dataset.

For each configuration it reports accuracy (overall and per question
family), % of the full model's accuracy, agreement with the full model's
answers, visual tokens kept (after the pre-LLM stages, and averaged over
decoder layers for in-LLM methods), analytical prefill FLOPs, measured
median prefill latency of one batch, and the compiled program's peak memory.

Budgets are fractions of the visual tokens the model sees. Each method gets
the config string that realises a budget (`spec_for`): `keep=` for pre-LLM
methods (PruMerge's `keep` caps its data-dependent count; the table shows the
measured mean of valid tokens), the nearest stride for pooling, and for
in-LLM methods the tokens left after the last drop (FastV and DART `keep=`,
PyramidDrop ratio (k/N)^(1/stages), SparseVLM's published schedule scaled so
its last stage keeps k, exit at 2 x budget of the depth); the table also
shows their average over decoder layers. Layers of in-LLM methods scale with
depth (FastV's and DART's K=2 of 32 layers, PyramidDrop's 8/16/24,
SparseVLM's 2/6/15). Compare methods on the accuracy-vs-FLOPs plot: FLOPs
account every stage.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax import flops as F
from vtr_jax import sharding
from vtr_jax.data import vqa
from vtr_jax.data.tokenizer import Tokenizer
from vtr_jax.models import common as c
from vtr_jax.models.vlm import VLM, VLMConfig
from vtr_jax.reduce import ReductionError, parse, registry

DEFAULT_BUDGETS = (0.5, 0.25, 0.125)
# Methods whose token count is decided by the data, run once at these settings.
ADAPTIVE = {"todre_llm": "todre_llm:start=1,threshold=0.1"}


# ---- budgets -> config strings -----------------------------------------------------------------
def _scaled_layer(published: int, of: int, num_layers: int, *, lo: int, hi: int) -> int:
  return int(min(hi, max(lo, round(published * num_layers / of))))


def spec_for(method: str, fraction: float, cfg: VLMConfig) -> str | None:
  """The config string giving `method` about `fraction` of the visual tokens (None: not expressible)."""
  n = cfg.vision.num_patches
  layers = cfg.text.num_layers
  k = max(1, int(round(fraction * n)))
  cls = registry()[method]
  fields = {f.name for f in dataclasses.fields(cls)}
  if method == "pool":
    stride = int(round(1 / math.sqrt(fraction)))
    return f"pool:stride={stride}" if stride >= 2 else None
  if method == "llavolta":  # pooled before the scaled layer 2 of 32; the stride whose count is nearest
    if int(round(1 / math.sqrt(fraction))) < 2:
      return None
    m = cls()
    stride = min(range(2, m.kept(n) + 1), key=lambda s: abs(dataclasses.replace(m, stride=s).kept(n) - fraction * n))
    return f"llavolta:layer={_scaled_layer(2, 32, layers, lo=1, hi=layers - 1)},stride={stride}"
  if method in ("fastv", "dart"):
    layer = _scaled_layer(2, 32, layers, lo=1, hi=layers - 1)
    return f"{method}:layer={layer},keep={k}"
  if method == "pdrop":
    stages = sorted({_scaled_layer(l, 32, layers, lo=1, hi=layers - 1) for l in (8, 16, 24)})
    ratio = (k / n) ** (1 / len(stages))
    return f"pdrop:layers={'/'.join(map(str, stages))},ratio={ratio:.4f}"
  if method == "sparsevlm":
    stages = sorted({_scaled_layer(l, 32, layers, lo=0, hi=layers - 2) for l in (2, 6, 15)})
    shape = (303, 110, 36)[-len(stages):]
    keep = "/".join(str(min(n, max(1, round(v * k / shape[-1])))) for v in shape)
    return f"sparsevlm:layers={'/'.join(map(str, stages))},keep={keep}"
  if method == "exit":
    return f"exit:layer={int(min(layers - 1, max(1, round(2 * fraction * layers))))}"
  if method == "prumerge_plus":  # outliers plus about three spatial tokens per outlier: cap at k / 4
    return f"prumerge_plus:keep={max(1, round(k / 4))}"
  if "keep" in fields:
    return f"{method}:keep={k}"
  return None


# ---- measuring ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
  method: str
  budget: float | None
  spec: str
  accuracy: float
  per_family: dict[str, float]
  relative: float  # % of the full model's accuracy
  agreement: float  # fraction of answers equal to the full model's
  visual_tokens: float  # valid visual tokens entering the LLM (measured mean)
  layer_mean_tokens: float
  prefill_gflops: float
  flops_ratio: float
  latency_ms: float
  peak_memory_mb: float


# ---- the model on a mesh -------------------------------------------------------------------------
def init_inputs(cfg: VLMConfig, seed: int = 0) -> tuple:
  """(key, pixels, tokens, valid): a one-sample example for `VLM.init` (shapes of the parameters only)."""
  s = cfg.vision.image_size
  tokens = jnp.array([[cfg.image_token_id, cfg.pad_token_id]], jnp.int32)
  return jax.random.key(seed), jnp.zeros((1, s, s, 3)), tokens, jnp.ones((1, 2), bool)


def param_shardings(model: VLM, mesh, rules: sharding.Rules):
  """NamedShardings of the model's parameters on `mesh`, from their logical names (nothing allocated)."""
  return sharding.logical_shardings(jax.eval_shape(model.init, *init_inputs(model.config)), mesh, rules)


def placed(model: VLM, params, mesh, rules: sharding.Rules):
  """`params` (host arrays, or arrays on devices) laid out in their shardings on `mesh`."""
  return sharding.put(params, param_shardings(model, mesh, rules))


@functools.lru_cache(maxsize=64)
def predictor(model: VLM, spec: str, mesh, rules: sharding.Rules, batch_size: int):
  """jit(params, pixels, tokens, valid) -> (answer token int32[B], valid visual tokens int32[B]).

  Parameters and inputs are sharded (batch over the batch axes); the two
  small results come back replicated, so every process reads all of them.
  """
  plan = parse(spec)

  def run(params, pixels, tokens, valid):
    with sharding.activate(mesh, rules):
      logits, _, aux = model.apply(params, pixels, tokens, valid, reduction=plan, last_only=True,
                                   method=VLM.prefill)
      return jnp.argmax(logits, axis=-1), jnp.sum(aux["reduce/valid"], axis=1)

  batch = sharding.batch_sharding(mesh, rules, batch_size)
  return jax.jit(run, in_shardings=(param_shardings(model, mesh, rules), batch, batch, batch),
                 out_shardings=sharding.replicated(mesh))


def batch_size_for(requested: int, mesh, rules: sharding.Rules) -> int:
  """`requested` rounded up to a multiple of the devices the batch splits over."""
  n = math.prod(mesh.shape[a] for a in dict(rules).get(c.ACT_BATCH, ()))
  return -(-requested // n) * n


def prompt_batches(rows, tok: Tokenizer, cfg: VLMConfig, batch_size: int, mesh, rules: sharding.Rules
                   ) -> list[dict[str, jax.Array]]:
  """Global batches of `rows` ({'pixels', 'tokens', 'valid', 'answers'}), the last padded by repeating a row.

  Each process makes the inputs of its own rows of every batch only
  (`sharding.process_rows`).
  """
  split = sharding.batch_sharding(mesh, rules, batch_size)
  mine = sharding.process_rows(split, batch_size)
  out = []
  for i in range(0, len(rows), batch_size):
    index = [min(i + j, len(rows) - 1) for j in mine]  # one shape: one compile
    b = vqa.prompt_batch([rows[j] for j in index], tok, cfg.vision, length=vqa.PROMPT_LENGTH)
    local = {"pixels": b.pixels, "tokens": b.tokens, "valid": b.valid, "answers": b.answer_ids}
    out.append(sharding.global_batch(local, split, batch_size))
  return out


# ---- measuring ---------------------------------------------------------------------------------
def measure(model: VLM, params, batches: Sequence[dict[str, jax.Array]], n_rows: int, spec: str, *, mesh,
            rules: sharding.Rules, timing_runs: int = 5) -> tuple[np.ndarray, float, float, float]:
  """(predictions int32[n_rows], mean valid visual tokens entering the LLM, median latency of one batch
  in ms, peak memory per device in MB). `params` are already placed (`placed`)."""
  b0 = batches[0]
  fn = predictor(model, spec, mesh, sharding.normalize_rules(rules), b0["tokens"].shape[0])
  compiled = fn.lower(params, b0["pixels"], b0["tokens"], b0["valid"]).compile()
  mem = compiled.memory_analysis()
  peak = 0.0
  if mem is not None:
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes) / 2 ** 20
  outs = sharding.fetch([compiled(params, b["pixels"], b["tokens"], b["valid"]) for b in batches])
  preds = np.concatenate([p for p, _ in outs])[:n_rows]
  tokens = float(np.concatenate([n for _, n in outs])[:n_rows].mean())
  times = []
  for _ in range(timing_runs):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, b0["pixels"], b0["tokens"], b0["valid"]))
    times.append(time.perf_counter() - t0)
  return preds, tokens, 1e3 * float(np.median(times)), peak


def evaluate(model: VLM, params, rows, tok: Tokenizer, *, methods: Sequence[str] | None = None,
             budgets: Sequence[float] = DEFAULT_BUDGETS, batch_size: int = 50, progress: bool = True,
             log: Callable[[str], None] = print, mesh=None,
             rules: sharding.Rules = sharding.DEFAULT_RULES) -> list[Result]:
  """The full model, then every method at every budget, on `rows` (a list or datasets.Dataset).

  On `mesh` (default: every device, data parallel) with `rules`; the batch
  size is rounded up to a multiple of the devices the batch splits over.
  """
  from tqdm import tqdm

  cfg = model.config
  methods = list(registry()) if methods is None else list(methods)
  unknown = [m for m in methods if m not in registry()]
  if unknown:
    raise ReductionError(f"unknown methods {unknown}; known: {', '.join(registry())}")
  mesh = sharding.make_mesh() if mesh is None else mesh
  rules = sharding.normalize_rules(rules)
  params = placed(model, params, mesh, rules)
  batches = prompt_batches(rows, tok, cfg, batch_size_for(batch_size, mesh, rules), mesh, rules)
  answers = np.concatenate(sharding.fetch([b["answers"] for b in batches]))[:len(rows)]
  families = np.array([rows[i]["family"] for i in range(len(rows))])
  text_tokens = vqa.PROMPT_LENGTH - 1
  full_cost = F.prefill_cost(cfg, None, text_tokens=text_tokens)
  jobs = [("full", None, "none")]
  for m in methods:
    specs = [(b, spec_for(m, b, cfg)) for b in budgets]
    if all(spec is None for _, spec in specs) and m in ADAPTIVE:  # no budget knob: once, at its defaults
      jobs.append((m, None, ADAPTIVE[m]))
      continue
    for b, spec in specs:
      if spec is None:
        log(f"skipping {m} at {b:.3f}: no budget setting")
        continue
      jobs.append((m, b, spec))
  results: list[Result] = []
  full_pred = None
  for method, budget, spec in tqdm(jobs, desc="eval", disable=not progress, dynamic_ncols=True):
    try:
      cost = F.prefill_cost(cfg, spec, text_tokens=text_tokens)
      pred, n_visual, latency, peak = measure(model, params, batches, len(rows), spec, mesh=mesh, rules=rules)
    except ReductionError as e:
      log(f"skipping {spec}: {e}")
      continue
    correct = pred == answers
    if full_pred is None:
      full_pred = pred
    full_acc = results[0].accuracy if results else float(correct.mean())
    relative = 100 * float(correct.mean()) / full_acc if full_acc > 0 else float("nan")
    per_family = {f: float(correct[families == f].mean()) for f in sorted(set(families))}
    results.append(Result(method=method, budget=budget, spec=spec, accuracy=float(correct.mean()),
                          per_family=per_family, relative=100.0 if not results else relative,
                          agreement=float((pred == full_pred).mean()), visual_tokens=n_visual,
                          layer_mean_tokens=_layer_mean(cost, n_visual), prefill_gflops=cost.prefill / 1e9,
                          flops_ratio=cost.prefill / full_cost.prefill, latency_ms=latency, peak_memory_mb=peak))
  return results


def _layer_mean(cost: F.Cost, measured: float) -> float:
  """Visual tokens averaged over decoder layers, counting valid tokens (PruMerge's slots may be empty)."""
  first = cost.visual_tokens[0]
  return cost.mean_visual_tokens * (measured / first if first else 1.0)


# ---- reporting ---------------------------------------------------------------------------------
def table(results: Sequence[Result]) -> str:
  families = sorted({f for r in results for f in r.per_family})
  head = (f"{'method':<14}{'budget':>7}{'acc%':>7}{'%full':>7}{'agree%':>8}{'tokens':>8}{'layer-avg':>10}"
          f"{'GFLOPs':>8}{'FLOPs%':>8}{'ms':>8}{'MB':>7}  " + " ".join(f"{f[:7]:>7}" for f in families))
  lines = [head, "-" * len(head)]
  for r in results:
    b = "-" if r.budget is None else f"{100 * r.budget:.1f}%"
    lines.append(f"{r.method:<14}{b:>7}{100 * r.accuracy:>7.1f}{r.relative:>7.1f}{100 * r.agreement:>8.1f}"
                 f"{r.visual_tokens:>8.0f}{r.layer_mean_tokens:>10.1f}{r.prefill_gflops:>8.3f}"
                 f"{100 * r.flops_ratio:>8.1f}{r.latency_ms:>8.1f}{r.peak_memory_mb:>7.1f}  "
                 + " ".join(f"{100 * r.per_family.get(f, float('nan')):>7.1f}" for f in families))
  return "\n".join(lines)


def write(results: Sequence[Result], outdir: str, meta: dict[str, Any]) -> dict[str, str]:
  """results.json, results.csv and accuracy_vs_flops.png under outdir; returns their paths."""
  os.makedirs(outdir, exist_ok=True)
  paths = {k: os.path.join(outdir, v) for k, v in
           (("json", "results.json"), ("csv", "results.csv"), ("plot", "accuracy_vs_flops.png"))}
  with open(paths["json"], "w") as f:
    json.dump({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
  families = sorted({k for r in results for k in r.per_family})
  with open(paths["csv"], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["method", "budget", "spec", "accuracy", "relative", "agreement", "visual_tokens",
                "layer_mean_tokens", "prefill_gflops", "flops_ratio", "latency_ms", "peak_memory_mb", *families])
    for r in results:
      w.writerow([r.method, r.budget, r.spec, r.accuracy, r.relative, r.agreement, r.visual_tokens,
                  r.layer_mean_tokens, r.prefill_gflops, r.flops_ratio, r.latency_ms, r.peak_memory_mb,
                  *(r.per_family.get(k) for k in families)])
  plot(results, paths["plot"], title=meta.get("title", "accuracy vs prefill FLOPs"))
  return paths


def plot(results: Sequence[Result], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
  full = [r for r in results if r.method == "full"]
  by_method: dict[str, list[Result]] = {}
  for r in results:
    if r.method != "full":
      by_method.setdefault(r.method, []).append(r)
  cmap = plt.get_cmap("tab20")
  for i, (m, rs) in enumerate(sorted(by_method.items())):
    rs = sorted(rs, key=lambda r: r.prefill_gflops)
    ax.plot([r.prefill_gflops for r in rs], [100 * r.accuracy for r in rs], marker="o", ms=4, lw=1.2,
            color=cmap(i % 20), label=m)
  for r in full:
    ax.scatter([r.prefill_gflops], [100 * r.accuracy], marker="*", s=180, color="black", zorder=5, label="full")
  ax.set_xlabel("prefill GFLOPs per image (analytical)")
  ax.set_ylabel("accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2, loc="lower right")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# ---- the whole job -----------------------------------------------------------------------------
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes_tiny")


def load_rows(dataset: str, split: str, num_examples: int, cfg: VLMConfig, columns=None):
  """The bundled benchmark (generated, seeded) or a local dataset, limited to num_examples (0: all)."""
  if dataset == "bundled":
    from vtr_jax.data import scenes
    n = num_examples or vqa.DEFAULT_SIZES[split]
    return vqa.build_split(split, n, scenes.SceneConfig(image_size=cfg.vision.image_size))
  rows = vqa.load(dataset, split, columns=columns)
  if num_examples:
    rows = rows.select(range(min(num_examples, len(rows))))
  return rows


def main(*, checkpoint: str | None = None, dataset: str = "bundled", split: str = "test", columns=None,
         num_examples: int = 490, methods=None, budgets=DEFAULT_BUDGETS, batch_size: int = 70,
         outdir: str = "outputs/eval", progress: bool = True, mesh_shape=(-1, 1, 1),
         rules: sharding.Rules = sharding.DEFAULT_RULES) -> list[Result]:
  """Loads, evaluates, prints the table and writes the outputs (what eval.py runs).

  The model runs on a (data, fsdp, tensor) mesh of `mesh_shape` over every
  device of every process; with several processes, process 0 prints and writes.
  """
  import vtr_jax
  path = checkpoint or SHIPPED
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist" + (
        "; the shipped model is missing from this install (train it: see README, 'The shipped model')"
        if checkpoint is None else ""))
  cfg, params, tok = vtr_jax.load(path)
  rows = load_rows(dataset, split, num_examples, cfg, columns)
  mesh = sharding.make_mesh(mesh_shape)
  lead = jax.process_index() == 0
  say = print if lead else (lambda *_: None)
  say(f"model {cfg.name} from {path}: {cfg.vision.num_patches} visual tokens per image; "
      f"{len(rows)} examples of {dataset}/{split}; {jax.device_count()} {jax.devices()[0].platform} devices, "
      f"mesh {dict(mesh.shape)}")
  results = evaluate(VLM(cfg), params, rows, tok, methods=methods, budgets=budgets, batch_size=batch_size,
                     progress=progress and lead, log=say, mesh=mesh, rules=rules)
  if lead:
    print(table(results))
    paths = write(results, outdir, {"checkpoint": path, "dataset": dataset, "split": split,
                                    "examples": len(rows), "device": str(jax.devices()[0]),
                                    "mesh": dict(mesh.shape), "processes": jax.process_count(),
                                    "title": f"{cfg.name} on {dataset}/{split} ({len(rows)} examples)"})
    print("wrote " + ", ".join(paths.values()))
  return results
