"""The library behind eval.py: every method x budget on one model and one dataset.

For each configuration it reports accuracy (overall and per question
family), % of the full model's accuracy, agreement with the full model's
answers, visual tokens kept (after the pre-LLM stages, and averaged over
decoder layers for in-LLM methods), analytical prefill FLOPs, measured
median prefill latency of one batch, and the compiled program's peak memory.

Budgets are fractions of the visual tokens the LLM receives without
reduction (`VLMConfig.reducible_tokens`: patches, or the registers / packed
tokens of models that make them; a class token the tower hands on is never
counted, methods keep it). Each method maps a budget to its own setting
(`Method.for_budget`: `keep=` for most pre-LLM methods -- PruMerge's `keep`
caps its data-dependent count, the table shows the measured mean of valid
tokens --, the nearest stride for pooling, and for in-LLM methods the
tokens left after the last drop, their layers scaled with depth); methods
without a budget knob run once at `Method.unbudgeted`. The table shows the
tokens entering the LLM and their average over decoder layers. Compare
methods on the accuracy-vs-FLOPs plot: FLOPs account every stage.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from vtr_jax import flops as F
from vtr_jax import sharding
from vtr_jax.data import vqa
from vtr_jax.data.tokenizer import Tokenizer
from vtr_jax.models.vlm import VLM, VLMConfig
from vtr_jax.placement import batch_size_for, placed, predictor, prompt_batches
from vtr_jax.reduce import ReductionError, registry
from vtr_jax.reduce.api import target_tokens

DEFAULT_BUDGETS = (0.5, 0.25, 0.125)


def jobs(cfg: VLMConfig, methods: Sequence[str], budgets: Sequence[float],
         log: Callable[[str], None] = print) -> list[tuple[str, float | None, str]]:
  """(method, budget or None, config string) to run: the full model, then each method at each budget
  its `for_budget` can express (or once at `unbudgeted` when it expresses none)."""
  out = [("full", None, "none")]
  for name in methods:
    cls = registry()[name]
    specs = [(b, cls.for_budget(b, cfg)) for b in budgets]
    if all(m is None for _, m in specs):
      once = cls.unbudgeted(cfg)
      if once is not None:
        out.append((name, None, once.spec()))
        continue
    for b, m in specs:
      if m is None:
        log(f"skipping {name} at {b:.3f}: no budget setting")
        continue
      out.append((name, b, m.spec()))
  return out


# ---- measuring ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
  method: str
  budget: float | None  # share of the visual tokens the LLM receives (`VLMConfig.reducible_tokens`)
  budget_tokens: int | None  # that share in tokens
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
  results: list[Result] = []
  full_pred = None
  for method, budget, spec in tqdm(jobs(cfg, methods, budgets, log), desc="eval", disable=not progress, dynamic_ncols=True):
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
    results.append(Result(method=method, budget=budget, spec=spec,
                          budget_tokens=None if budget is None else target_tokens(method, budget, cfg), accuracy=float(correct.mean()),
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
def budget_note(cfg: VLMConfig) -> str:
  """What a budget is a share of, for this model (printed above the table)."""
  v = cfg.vision
  kind = ("visual registers" if v.num_registers else "packed tokens" if cfg.num_image_tokens != v.num_features
          else "patch tokens")
  cls = " (the class token it also receives is always kept and not counted)" if cfg.image_class_tokens else ""
  return f"budget = share of the {cfg.reducible_tokens} {kind} per image the LLM receives{cls}"


def table(results: Sequence[Result]) -> str:
  families = sorted({f for r in results for f in r.per_family})
  head = (f"{'method':<14}{'budget':>7}{'of':>5}{'acc%':>7}{'%full':>7}{'agree%':>8}{'tokens':>8}{'layer-avg':>10}"
          f"{'GFLOPs':>8}{'FLOPs%':>8}{'ms':>8}{'MB':>7}  " + " ".join(f"{f[:7]:>7}" for f in families))
  lines = [head, "-" * len(head)]
  for r in results:
    b = "-" if r.budget is None else f"{100 * r.budget:.1f}%"
    k = "-" if r.budget_tokens is None else str(r.budget_tokens)
    lines.append(f"{r.method:<14}{b:>7}{k:>5}{100 * r.accuracy:>7.1f}{r.relative:>7.1f}{100 * r.agreement:>8.1f}"
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
    w.writerow(["method", "budget", "budget_tokens", "spec", "accuracy", "relative", "agreement", "visual_tokens",
                "layer_mean_tokens", "prefill_gflops", "flops_ratio", "latency_ms", "peak_memory_mb", *families])
    for r in results:
      w.writerow([r.method, r.budget, r.budget_tokens, r.spec, r.accuracy, r.relative, r.agreement, r.visual_tokens,
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


# ---- real tasks ---------------------------------------------------------------------------------
def evaluate_task(model: VLM, params, tok: Tokenizer, template, task: str, data_dir: str, *,
                  methods: Sequence[str] | None = None, budgets: Sequence[float] = DEFAULT_BUDGETS,
                  num_examples: int = 0, batch_size: int = 8, max_new_tokens: int | None = None,
                  log: Callable[[str], None] = print, progress: bool = True) -> tuple[list[Result], dict]:
  """A benchmark task (`vtr_jax.tasks`, generated answers and its official metric) under the full model and every
  method at every budget.

  Returns (results, predictions by config string). `accuracy` is the task's headline metric, `per_family` its
  other values (e.g. POPE precision / recall / F1), `agreement` the share of answers equal to the full model's,
  `latency_ms` the warm wall time of one batch of generation, FLOPs at the mean prompt length.
  """
  from vtr_jax import tasks as T
  cfg = model.config
  methods = list(registry()) if methods is None else list(methods)
  results: list[Result] = []
  predictions: dict[str, list[dict]] = {}
  full_answers = None
  for method, budget, spec in jobs(cfg, methods, budgets, log):
    try:
      preds, values = T.run_task(model, params, tok, task, data_dir, reduction=spec, num_examples=num_examples,
                                 batch_size=batch_size, template=template, max_new_tokens=max_new_tokens,
                                 progress=progress)
    except ReductionError as e:
      log(f"skipping {spec}: {e}")
      continue
    t0 = time.perf_counter()  # the first batch again, compiled: the warm latency of one batch
    T.run_task(model, params, tok, task, data_dir, reduction=spec, num_examples=min(batch_size, len(preds)),
               batch_size=batch_size, template=template, max_new_tokens=max_new_tokens)
    latency = 1e3 * (time.perf_counter() - t0)
    answers = [p["prediction"] for p in preds]
    full_answers = answers if full_answers is None else full_answers
    text_tokens = int(round(np.mean([p["prompt_tokens"] for p in preds]))) - 1
    cost, full_cost = F.prefill_cost(cfg, spec, text_tokens=text_tokens), F.prefill_cost(cfg, None,
                                                                                         text_tokens=text_tokens)
    score = values["score"]
    full_score = results[0].accuracy if results else score
    extra = {k: v for k, v in values.items() if k not in ("score", "examples")}
    results.append(Result(method=method, budget=budget, spec=spec,
                          budget_tokens=None if budget is None else target_tokens(method, budget, cfg),
                          accuracy=score, per_family=extra,
                          relative=100.0 if not results else (100 * score / full_score if full_score else float("nan")),
                          agreement=float(np.mean([a == b for a, b in zip(answers, full_answers)])),
                          visual_tokens=float(cost.visual_tokens[0]), layer_mean_tokens=cost.mean_visual_tokens,
                          prefill_gflops=cost.prefill / 1e9, flops_ratio=cost.prefill / full_cost.prefill,
                          latency_ms=latency, peak_memory_mb=0.0))
    predictions[spec] = preds
  return results, predictions


def import_methods(modules: Sequence[str]) -> list[str]:
  """Imports user modules that register methods (`eval.py --import=my_methods`); returns the new method names."""
  import importlib
  before = set(registry())
  for name in modules:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise EvalError(f"--import {name!r} could not be imported ({e}); put its directory on PYTHONPATH") from None
  return sorted(set(registry()) - before)


# ---- the whole job -----------------------------------------------------------------------------
class EvalError(ValueError):
  """Settings eval.py cannot run with (named in the message)."""


def check_settings(*, methods, budgets, num_examples: int, batch_size: int, outdir: str) -> None:
  """Refuses, before anything is loaded or compiled, what would fail late or silently: unknown methods, budgets
  outside (0, 1], negative counts, and an output directory that cannot be written."""
  unknown = [m for m in (methods or ()) if m not in registry()]
  if unknown:
    raise EvalError(f"unknown methods {unknown}; known: {', '.join(registry())}")
  bad = [b for b in budgets if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0 < b <= 1]
  if bad or not budgets:
    raise EvalError(f"budgets {bad or list(budgets)} must be fractions of the visual tokens in (0, 1] "
                    "(e.g. 0.5,0.25,0.125)")
  if num_examples < 0:
    raise EvalError(f"num_examples={num_examples} must be >= 0 (0: the whole split)")
  if batch_size < 1:
    raise EvalError(f"batch_size={batch_size} must be >= 1")
  try:
    os.makedirs(outdir, exist_ok=True)
    probe = os.path.join(outdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("")
    os.remove(probe)
  except OSError as e:
    raise EvalError(f"--outdir {outdir!r} cannot be written ({e.strerror}); choose a writable directory") from None



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
         rules: sharding.Rules = sharding.DEFAULT_RULES, task: str | None = None, data: str | None = None,
         imports: Sequence[str] = (), max_new_tokens: int | None = None,
         chat_template: str | None = None) -> list[Result]:
  """Loads, evaluates, prints the table and writes the outputs (what eval.py runs).

  The model runs on a (data, fsdp, tensor) mesh of `mesh_shape` over every
  device of every process; with several processes, process 0 prints and writes.
  With `task` (a `vtr_jax.tasks` name) and `data` (its local dataset directory)
  it evaluates that benchmark with generated answers and its official metric
  instead (`evaluate_task`; one device), rendering prompts with the checkpoint's
  chat template (`chat_template`: a template name or "llava-1.5" for the fallback).
  `imports` are user modules that register more methods.
  """
  import_methods(imports)
  if task is not None:
    return _main_task(checkpoint=checkpoint, task=task, data=data, methods=methods, budgets=budgets,
                      num_examples=num_examples, batch_size=batch_size, outdir=outdir, progress=progress,
                      max_new_tokens=max_new_tokens, chat_template=chat_template)
  from vtr_jax.convert import load  # the loaders sit below evaluation; imported here to keep this module light
  check_settings(methods=methods, budgets=budgets, num_examples=num_examples, batch_size=batch_size, outdir=outdir)
  path = checkpoint or SHIPPED
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist" + (
        "; the shipped model is missing from this install (train it: see README, 'The shipped model')"
        if checkpoint is None else ""))
  cfg, params, tok = load(path)
  rows = load_rows(dataset, split, num_examples, cfg, columns)
  mesh = sharding.make_mesh(mesh_shape)
  lead = jax.process_index() == 0
  say = print if lead else (lambda *_: None)
  say(f"model {cfg.name} from {path}: {cfg.num_image_tokens} visual tokens per image; "
      f"{len(rows)} examples of {dataset}/{split}; {jax.device_count()} {jax.devices()[0].platform} devices, "
      f"mesh {dict(mesh.shape)}")
  results = evaluate(VLM(cfg), params, rows, tok, methods=methods, budgets=budgets, batch_size=batch_size,
                     progress=progress and lead, log=say, mesh=mesh, rules=rules)
  if lead:
    print(budget_note(cfg))
    print(table(results))
    paths = write(results, outdir, {"checkpoint": path, "dataset": dataset, "split": split,
                                    "examples": len(rows), "device": str(jax.devices()[0]),
                                    "mesh": dict(mesh.shape), "processes": jax.process_count(),
                                    "budget": budget_note(cfg),
                                    "title": f"{cfg.name} on {dataset}/{split} ({len(rows)} examples)"})
    print("wrote " + ", ".join(paths.values()))
  return results


def _main_task(*, checkpoint, task, data, methods, budgets, num_examples, batch_size, outdir, progress,
               max_new_tokens, chat_template) -> list[Result]:
  from vtr_jax import chat, tasks
  from vtr_jax.convert import load
  check_settings(methods=methods, budgets=budgets, num_examples=num_examples, batch_size=batch_size, outdir=outdir)
  if task not in tasks.known():
    raise EvalError(f"unknown task {task!r}; known tasks: {', '.join(tasks.known())}")
  tasks.get(task).check_supported()
  if data is None:
    raise EvalError(f"--task={task} needs --data=DIR, a local copy of the dataset in its Hub layout")
  path = checkpoint or SHIPPED
  cfg, params, tok = load(path)
  # LLaVA-1.5's conversation format where a LLaVA-1.5 (CLIP + LLaMA) checkpoint has no template; no silent guess
  # for other families: the error says to give --chat_template
  llava15 = cfg.vision.kind == "clip" and cfg.text.kind == "llama"
  fallback = None if chat_template == "none" else chat_template or ("llava-1.5" if llava15 else None)
  template = chat.load(path, fallback=fallback)
  print(f"model {cfg.name} from {path}; task {task} from {data}; chat template from {template.origin}")
  results, predictions = evaluate_task(VLM(cfg), params, tok, template, task, data, methods=methods,
                                       budgets=budgets, num_examples=num_examples, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens, progress=progress)
  print(budget_note(cfg))
  print(table(results))
  paths = write(results, outdir, {"checkpoint": path, "task": task, "data": data, "examples": num_examples,
                                  "device": str(jax.devices()[0]), "budget": budget_note(cfg),
                                  "title": f"{cfg.name} on {task} ({len(next(iter(predictions.values())))} examples)"})
  with open(os.path.join(outdir, "predictions.json"), "w") as f:
    json.dump(predictions, f, indent=2)
  print("wrote " + ", ".join(paths.values()) + ", " + os.path.join(outdir, "predictions.json"))
  return results
