"""benchmarks/prefill.py: each method's scoring-free twin removes the same tokens at the same places, and
the script runs end to end on a scaled-down geometry and writes its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import prefill as bench  # the repository root is on sys.path, as for `configs`
from vtr_jax import flops
from vtr_jax.reduce import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["visionzip", "tome", "fastv", "pdrop", "sparsevlm", "dart", "exit"])
def test_twin_keeps_the_same_token_counts(name):
  cfg = bench.geometry(4, 16)  # ToMe needs the ViT depth to reach 128 by halving at most per block
  n = cfg.vision.num_patches
  spec = registry()[name].for_budget(128 / n, cfg).spec()
  twin = bench.twin(cfg, spec)
  method_cost = flops.prefill_cost(cfg, spec, text_tokens=64)
  twin_cost = flops.prefill_cost(cfg, twin, text_tokens=64)
  # same tokens entering the LLM and the same count at every decoder layer
  assert twin_cost.mean_visual_tokens == pytest.approx(method_cost.mean_visual_tokens), (spec, twin)
  assert list(twin_cost.visual_tokens) == list(method_cost.visual_tokens), (spec, twin)


def test_script_writes_table(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "prefill.py"), "--methods=fastv,visionzip",
                         "--depth_scale=8", "--width_scale=16", "--reps=1", f"--outdir={tmp_path}"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "prefill_cpu.json") as f:
    rows = json.load(f)["rows"]
  assert [(r["method"], r["budget"]) for r in rows] == [("full", 576)] + [
      (m, k) for m in ("fastv", "visionzip") for k in (192, 128, 64)]
  assert all(r["ms"] > 0 and r["twin_ms"] > 0 for r in rows)
  ratios = {(r["method"], r["budget"]): r["flops_ratio"] for r in rows}
  assert ratios[("visionzip", 64)] < ratios[("visionzip", 128)] < ratios[("visionzip", 192)] < 1.0
  with open(tmp_path / "prefill_cpu.md") as f:
    assert "scoring overhead" in f.read()
