"""Checks on 8 CPU devices, run by tests/test_sharding.py in a subprocess (the device count is fixed at start-up).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_checks.py OUT.json 2,2,2 --quick 8,1,1

For every mesh it compares with the single-device run: the prefill of every
registered method (logits of the valid slots, `reduce/positions`,
`llm/tok/patch`), one train step, a checkpoint restored from another
mesh, and the Pallas kernels (interpret mode) in their shard_map; and it lists the all-gathers of the compiled prefill. Results go to
OUT.json for the test to assert on; `--methods a,b` limits the methods.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import reduce_harness as H  # noqa: E402
from vtr_jax import placement, sharding, training  # noqa: E402
from vtr_jax.models.vlm import VLM, pad_prompts  # noqa: E402
from vtr_jax.reduce import registry, setting_for  # noqa: E402

BATCH = 8
RULES = sharding.DEFAULT_RULES
# Ops whose operands XLA gathers when it cannot partition a per-sample selection.
SELECTION_OPS = ("top_k", "sort", "argsort", "scatter", "scatter-add", "cumsum", "argmax", "argmin")


def method_specs(model, names) -> dict[str, str]:
  """One config string per method: its 25 % budget, else its unbudgeted setting, else its defaults."""
  return {name: setting_for(name, 0.25, model.config) or name for name in names}


def inputs():
  prompts, pixels = H.batch_inputs(lengths=(5, 9, 3, 12, 4, 6, 7, 8))
  tokens, valid = pad_prompts(prompts, 0)
  return pixels, tokens, valid


def prefill_all(model, specs, mesh=None):
  """f(params, pixels, tokens, valid) -> {name: (logits, valid slots, positions, patches)} for every spec."""
  def run(params, pixels, tokens, valid):
    out = {}
    for name, spec in specs.items():
      logits, _, aux = model.apply(params, pixels, tokens, valid, reduction=spec, method=VLM.prefill)
      rows = aux.get("llm/valid", aux["prompt/valid"])
      out[name] = (logits, rows, aux["reduce/positions"], aux.get("llm/tok/patch", aux["prompt/valid"]))
    return out

  if mesh is None:
    return jax.jit(run)

  def sharded(params, pixels, tokens, valid):
    with sharding.activate(mesh, RULES):
      return run(params, pixels, tokens, valid)

  batch = sharding.batch_sharding(mesh, RULES, BATCH)
  return jax.jit(sharded, in_shardings=(placement.param_shardings(model, mesh, RULES), batch, batch, batch))


def gathers(hlo: str) -> list[dict]:
  """Every all-gather of a compiled module: result type, gathered dimension, the op that caused it."""
  out = []
  for line in hlo.splitlines():
    m = re.search(r"= (\w+)\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", line)
    if not m:
      continue
    dims = re.search(r"dimensions=\{(\d+)\}", line)
    op = re.search(r'op_name="([^"]*)"', line)
    out.append({"dtype": m.group(1), "shape": [int(d) for d in m.group(2).split(",") if d],
                "dim": int(dims.group(1)) if dims else -1, "op": op.group(1) if op else ""})
  return out


def score_gathers(found: list[dict], batch: int) -> list[dict]:
  """All-gathers of score arrays: forced by a selection op, or a per-token float array gathered whole over the batch."""
  def is_score(g):
    forced = g["op"].rsplit("/", 1)[-1] in SELECTION_OPS
    per_token = g["dtype"] == "f32" and len(g["shape"]) == 2 and g["shape"][0] == batch and g["dim"] == 0
    return forced or per_token
  return [g for g in found if is_score(g)]


def compare_prefill(model, params, specs, mesh, reference):
  pixels, tokens, valid = inputs()
  fn = prefill_all(model, specs, mesh)
  split = sharding.batch_sharding(mesh, RULES, BATCH)
  batch = sharding.global_batch({"pixels": pixels, "tokens": tokens, "valid": valid}, split, BATCH)
  params = placement.placed(model, params, mesh, RULES)
  t0 = time.perf_counter()
  compiled = fn.lower(params, batch["pixels"], batch["tokens"], batch["valid"]).compile()
  seconds = time.perf_counter() - t0
  out = sharding.fetch(compiled(params, batch["pixels"], batch["tokens"], batch["valid"]))
  methods = {}
  for name in specs:
    logits, rows, positions, patches = out[name]
    ref_logits, ref_rows, ref_positions, ref_patches = reference[name]
    methods[name] = {
        "spec": specs[name],
        "rows_equal": bool(np.array_equal(rows, ref_rows)),
        "logits_max_diff": float(np.max(np.abs(np.where(ref_rows[..., None], logits - ref_logits, 0.0)))),
        "positions_equal": bool(np.array_equal(positions, ref_positions)),
        "patches_equal": bool(np.array_equal(patches, ref_patches)),
    }
  found = gathers(compiled.as_text())
  return {"methods": methods, "compile_seconds": seconds, "gathers": len(found),
          "score_gathers": score_gathers(found, BATCH)}


def compare_train_step(mesh, single):
  """Two train steps of the tiny training config (PyramidDrop's training mode, scene supervision) on `mesh`
  against a one-device mesh: max |difference| over the whole new state (parameters, Adam moments) and metrics.
  (The first step runs at learning rate 0 after warm-up starts; the second moves the parameters.)"""
  from configs import shapes_tiny
  from vtr_jax.data import vqa
  config = shapes_tiny.get_config("test,pdrop")
  tok = vqa.tokenizer()
  cfg = training.model_config(config, tok)
  model = VLM(cfg)
  aux_weight = float(config.train.aux_weight)
  rows = vqa.build_split("train", 2 * BATCH, training.scene_config(config, cfg))
  steps = [training.step_inputs([rows[i] for i in range(s * BATCH, (s + 1) * BATCH)], tok, cfg, aux_weight)
           for s in range(2)]
  results = []
  for m in (single, mesh):
    _, shardings = training.state_shardings(model, config, aux_weight, m, RULES)
    state = jax.jit(lambda: training._fresh_state(model, config, aux_weight, config.seed), out_shardings=shardings)()
    start = sharding.fetch(state.params)
    step = training.make_train_step(model, config, config.train.reduction, query_rows=True, aux_weight=aux_weight,
                                    mesh=m, rules=RULES, batch_size=BATCH)
    for local in steps:
      state, metrics = step(state, sharding.global_batch(local, sharding.batch_sharding(m, RULES, BATCH), BATCH))
    results.append(sharding.fetch((state, metrics)))
  (s0, m0), (s1, m1) = results
  leaves = lambda tree: [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]  # noqa: E731
  state_diff = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves(s0), leaves(s1)))
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves(s0.params), leaves(start)))
  metric_diff = {k: float(abs(m0[k] - m1[k])) for k in m0}
  return {"state_max_diff": state_diff, "params_moved": moved, "metric_diffs": metric_diff, "loss": float(m0["loss"])}


def compare_kernels(mesh):
  """The Pallas kernels (interpret mode) inside their shard_map on `mesh` against the one-device references:
  attention_mass with grouped heads (split over `tensor` where they divide) and max_similarity."""
  from vtr_jax.kernels import ops
  rng = np.random.default_rng(0)
  q = rng.standard_normal((BATCH, 4, 3, 8)).astype(np.float32)  # [B, N, R, H], 4 heads on 2 kv heads
  k = rng.standard_normal((BATCH, 2, 20, 8)).astype(np.float32)  # [B, K, S, H]
  key_valid = rng.random((BATCH, 20)) > 0.2
  slots = np.tile(np.array([[5, 12, 19]], np.int32), (BATCH, 1))
  x, y = rng.standard_normal((BATCH, 12, 16)).astype(np.float32), rng.standard_normal((BATCH, 9, 16)).astype(np.float32)

  def run(q, k, key_valid, slots, x, y):
    mass = ops.attention_mass(q, k, key_valid=key_valid, q_slots=slots, impl="pallas", interpret=True)
    sim, idx = ops.max_similarity(x, y, impl="pallas", interpret=True)
    return mass, sim, idx

  def sharded(*args):
    with sharding.activate(mesh, RULES):
      return run(*args)

  split = sharding.batch_sharding(mesh, RULES, BATCH)
  args = [jax.device_put(a, split) for a in (q, k, key_valid, slots, x, y)]
  compiled = jax.jit(sharded).lower(*args).compile()
  got = sharding.fetch(compiled(*args))
  want = (ops.attention_mass(q, k, key_valid=key_valid, q_slots=slots, impl="reference"),
          *ops.max_similarity(x, y, impl="reference"))
  heads_split = "psum" in compiled.as_text() or "all-reduce" in compiled.as_text()
  return {"mass_max_diff": float(np.max(np.abs(got[0] - want[0]))),
          "similarity_max_diff": float(np.max(np.abs(got[1] - want[1]))),
          "index_equal": bool(np.array_equal(got[2], want[2])), "heads_summed_across_devices": heads_split}


def compare_restore(mesh, other):
  """Save a sharded train state from `other`, restore it onto `mesh`: equal values, `mesh`'s shardings."""
  from configs import shapes_tiny
  from vtr_jax.data import vqa
  config = shapes_tiny.get_config("test")
  cfg = training.model_config(config, vqa.tokenizer())
  model = VLM(cfg)
  aux_weight = float(config.train.aux_weight)
  with tempfile.TemporaryDirectory() as tmp:
    mgr = training.checkpoint_manager(tmp, config)
    saved = training.restore_or_init(mgr, model, config, aux_weight, other, RULES)
    mgr.save(1, args=training.ocp.args.StandardSave(saved), force=True)
    mgr.wait_until_finished()
    restored = training.restore_or_init(mgr, model, config, aux_weight, mesh, RULES)
    mgr.close()
  _, shardings = training.state_shardings(model, config, aux_weight, mesh, RULES)
  same_values = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(sharding.fetch(saved)),
                                                         jax.tree_util.tree_leaves(sharding.fetch(restored))))
  same_layout = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(jax.tree_util.tree_leaves(restored),
                                                                           jax.tree_util.tree_leaves(shardings)))
  return {"from": dict(other.shape), "values_equal": same_values, "shardings_match": same_layout}


QUICK_METHODS = ("turbo", "visionzip", "fastv", "sparsevlm", "dart")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("meshes", nargs="*", help="meshes checked fully: every method, train step, restore")
  parser.add_argument("--quick", action="append", default=[], help=f"meshes checked on {QUICK_METHODS} only")
  parser.add_argument("--methods", default="", help="limit the methods (comma-separated)")
  args = parser.parse_args()
  if jax.device_count() != 8:
    raise SystemExit(f"needs 8 devices, got {jax.device_count()} (set XLA_FLAGS before starting)")
  model, params = H.tiny_model("clip", text_layers=3)
  specs = method_specs(model, args.methods.split(",") if args.methods else registry())
  quick = {k: v for k, v in specs.items() if k in QUICK_METHODS}
  pixels, tokens, valid = inputs()
  t0 = time.perf_counter()
  reference = jax.device_get(prefill_all(model, specs)(params, pixels, tokens, valid))
  report = {"reference_seconds": time.perf_counter() - t0, "meshes": {}}
  single = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  for text in args.meshes + args.quick:
    shape = tuple(int(x) for x in text.split(","))
    mesh = sharding.make_mesh(shape)
    full = text in args.meshes
    entry = compare_prefill(model, params, specs if full else quick, mesh, reference)
    if full:
      t0 = time.perf_counter()
      entry["train_step"] = compare_train_step(mesh, single)
      other = sharding.make_mesh((8, 1, 1) if shape != (8, 1, 1) else (1, 1, 8))
      entry["restore"] = compare_restore(mesh, other)
      entry["kernels"] = compare_kernels(mesh)
      entry["train_and_restore_seconds"] = time.perf_counter() - t0
    report["meshes"][text] = entry
  if "fastv" in specs and (args.meshes or args.quick):  # the gather check must catch an unwrapped selection
    mesh = sharding.make_mesh(tuple(int(x) for x in (args.meshes + args.quick)[0].split(",")))
    wrapped, sharding.per_sample = sharding.per_sample, lambda fn: fn
    try:
      report["unwrapped_fastv"] = compare_prefill(model, params, {"fastv": specs["fastv"]}, mesh, reference)
    finally:
      sharding.per_sample = wrapped
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
