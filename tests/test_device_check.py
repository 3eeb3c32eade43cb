"""benchmarks/device_check.py --tiny: every section runs end to end on CPU and writes its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # about 50 s of CPU: every section compiles its own programs
def test_tiny_device_check_runs_every_section(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "device_check.py"), "--tiny",
                         f"--out={tmp_path}"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "device_check_cpu_tiny.json") as f:
    report = json.load(f)
  checks = {r["check"]: r for r in report["correctness"]}
  assert {"attention/xla/causal_prefill", "attention/chunked/decode", "attention/chunked/key_bias"} <= set(checks)
  assert any(name.startswith("kernel/attention_mass (pallas_gpu, interpret)") for name in checks)
  assert all(r["ok"] for r in checks.values())
  assert report["bandwidth"]["copy_bandwidth_gbps"] > 0 and report["bandwidth"]["cases"]
  rows = report["mfu"]["rows"]
  assert [(r["method"], r["tokens"]) for r in rows] == [("full", 576)] + [(m, 64) for m in ("visionzip", "divprune",
                                                                                          "fastv")]
  assert all(r["ms"] > 0 and r["flops_speedup"] >= 1 for r in rows)
  video = {r["attention"]: r for r in report["video"]["rows"]}
  assert set(video) == {"reference", "xla", "chunked"}
  assert video["chunked"]["temp_bytes"] < video["reference"]["temp_bytes"]
  with open(tmp_path / "device_check_cpu_tiny.md") as f:
    text = f.read()
  assert "## Prefill MFU" in text and "GPU figures are still to be measured" in text
