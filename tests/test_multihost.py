"""Two processes on localhost (CPU, gloo collectives) train and evaluate through train.py / eval.py, with
jax.distributed; their results equal one process driving the same four devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import vtr_jax
from vtr_jax import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--config=configs/shapes_tiny.py:test", "--config.train.steps=3", "--config.train.eval_every=3",
         "--config.train.log_every=1"]
EVAL = ["--num_examples=14", "--methods=fastv", "--budgets=0.25", "--batch_size=8"]
# LLVM at -O0 roughly halves XLA:CPU compile time; numerics are unchanged.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(script: str, args: list[str], devices: int, log: str) -> subprocess.Popen:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}
  return subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env, stdout=open(log, "w"),
                          stderr=subprocess.STDOUT)


def _run_together(jobs: list[tuple[str, list[str], int, str]], timeout: int = 600) -> None:
  """Starts every job at once (the two ranks must meet); fails naming the job and its log's tail."""
  procs = [(_start(*job), job) for job in jobs]
  for proc, (script, args, _, log) in procs:
    try:
      rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p, _ in procs:
        p.kill()
      rc = "timeout"
    if rc != 0:
      with open(log) as f:
        tail = f.read()[-3000:]
      raise AssertionError(f"{script} {' '.join(args)} ended with {rc}:\n{tail}")


@pytest.mark.slow  # two JAX processes, ~40 s
def test_two_processes_equal_one(tmp_path):
  port = _free_port()
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  ranks = [f"--coordinator=localhost:{port}", "--num_processes=2"]
  _run_together([("train.py", [*TRAIN, f"--workdir={two}", *ranks, f"--process_id={i}"], 2,
                  str(tmp_path / f"train{i}.log")) for i in range(2)]
                + [("train.py", [*TRAIN, f"--workdir={one}"], 4, str(tmp_path / "train.log"))])
  m2, m1 = training.read_metrics(two), training.read_metrics(one)
  assert [r["step"] for r in m2] == [1, 2, 3]  # one writer: process 0
  for a, b in zip(m2, m1):
    np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], rtol=1e-5,
                               err_msg=f"step {a['step']}")
  assert m2[-1]["val"] == m1[-1]["val"]
  _, p2, _ = vtr_jax.load(os.path.join(two, "export"))
  _, p1, _ = vtr_jax.load(os.path.join(one, "export"))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p2), jax.tree_util.tree_leaves(p1)):
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=str(path))

  port = _free_port()
  ranks = [f"--coordinator=localhost:{port}", "--num_processes=2"]
  out2, out1 = str(tmp_path / "eval2"), str(tmp_path / "eval1")
  _run_together([("eval.py", [*EVAL, f"--checkpoint={two}/export", f"--outdir={out2}", *ranks,
                              f"--process_id={i}"], 2, str(tmp_path / f"eval{i}.log")) for i in range(2)]
                + [("eval.py", [*EVAL, f"--checkpoint={one}/export", f"--outdir={out1}"], 4,
                    str(tmp_path / "eval.log"))])
  with open(os.path.join(out2, "results.json")) as f:
    r2 = json.load(f)
  with open(os.path.join(out1, "results.json")) as f:
    r1 = json.load(f)
  assert r2["meta"]["processes"] == 2 and r1["meta"]["processes"] == 1
  assert [r["spec"] for r in r2["results"]] == [r["spec"] for r in r1["results"]] == [
      "none", "fastv:layer=1,keep=4"]
  for a, b in zip(r2["results"], r1["results"]):
    for key in ("accuracy", "agreement", "visual_tokens", "per_family"):
      assert a[key] == b[key], f"{a['spec']}: {key} {a[key]} (two processes) vs {b[key]} (one)"
