"""benchmarks/aot_memory.py on the scaled-down geometry: the train step and prefill compile ahead of time on
abstract inputs, and the per-device memory follows the mesh (FSDP splits parameters and Adam moments)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_small_geometry_table(tmp_path):
  # LLVM at -O0 roughly halves XLA:CPU compile time; buffer assignment (the memory numbers) is unchanged.
  env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "aot_memory.py"), "--geometry=small",
                         "--mesh=8,1,1", "--mesh=1,8,1", "--methods=fastv", f"--out={tmp_path}"],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "needed GiB" in proc.stdout and "fastv:layer=" in proc.stdout
  with open(tmp_path / "aot_memory_small_cpu.json") as f:
    rows = json.load(f)["rows"]
  by = {(tuple(r["mesh"].values()), r["program"], r["reduction"].split(":")[0]): r for r in rows}
  assert set(by) == {(m, p, r) for m in ((8, 1, 1), (1, 8, 1)) for p, r in
                     (("train", "none"), ("prefill", "none"), ("prefill", "fastv"))}
  assert all(r["needed"] > 0 and r["temporaries"] > 0 for r in rows)
  replicated, fsdp = by[((8, 1, 1), "train", "none")], by[((1, 8, 1), "train", "none")]
  # state (params + 2 Adam moments) is whole on each data-parallel device and 1/8 of it under FSDP
  assert fsdp["arguments"] < replicated["arguments"] / 4, (fsdp, replicated)
  assert fsdp["param_bytes_per_device"] < replicated["param_bytes_per_device"] / 4
  assert replicated["param_bytes_replicated"] == replicated["param_bytes_per_device"]  # data parallel: all whole
  with open(tmp_path / "aot_memory_small_cpu.md") as f:
    assert "needed GiB" in f.read()
