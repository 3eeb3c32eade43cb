"""vtr_jax.sharding: meshes, rules, shardings, the replication report; and on 8 CPU devices (a subprocess,
`tests/mesh_checks.py`): every method's prefill, a train step and a checkpoint restore equal the
single-device run, and the compiled prefill gathers no score array."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reduce_harness as H
from jax.sharding import NamedSharding, PartitionSpec as P

from vtr_jax import placement, sharding
from vtr_jax.models import common as c
from vtr_jax.reduce import registry

HERE = os.path.dirname(os.path.abspath(__file__))
# Compile-time flags for the subprocess: 8 host devices; LLVM at -O0 halves XLA:CPU compile time (numerics unchanged).
MESH_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
              "--xla_llvm_disable_expensive_passes=true")


def run_mesh_checks(tmp_path, *args, timeout=900) -> dict:
  out = tmp_path / "mesh_checks.json"
  env = {**os.environ, "XLA_FLAGS": MESH_FLAGS, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, os.path.join(HERE, "mesh_checks.py"), str(out), *args], env=env,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    raise AssertionError(f"mesh_checks.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  with open(out) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  """(2,2,2) fully; (8,1,1) and (1,1,8) on a few methods (all of them: the slow test below)."""
  return run_mesh_checks(tmp_path_factory.mktemp("mesh"), "2,2,2", "--quick", "8,1,1", "--quick", "1,1,8")


# ---- one device -------------------------------------------------------------------------------
def test_mesh_shape_resolves_one_free_axis_and_names_bad_shapes():
  assert sharding.mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert sharding.mesh_shape((2, 2, 2), 8) == (2, 2, 2)
  with pytest.raises(sharding.ShardingError, match=r"mesh shape \(2, 2, 1\) needs 4 devices, there are 8"):
    sharding.mesh_shape((2, 2, 1), 8)
  with pytest.raises(sharding.ShardingError, match=r"8 devices are not divisible by 3"):
    sharding.mesh_shape((-1, 3, 1), 8)
  with pytest.raises(sharding.ShardingError, match=r"at most one -1"):
    sharding.mesh_shape((-1, -1, 1), 8)
  with pytest.raises(sharding.ShardingError, match=r"one size per axis"):
    sharding.mesh_shape((8, 1), 8)


def test_rules_are_validated():
  assert sharding.normalize_rules([("embed", "fsdp"), ("mlp", None), ("act", ["data", "fsdp"])]) == (
      ("embed", ("fsdp",)), ("mlp", ()), ("act", ("data", "fsdp")))
  with pytest.raises(sharding.ShardingError, match=r"rule for 'embed' names mesh axes \['model'\]"):
    sharding.normalize_rules([("embed", "model")])
  with pytest.raises(sharding.ShardingError, match=r"'embed' has two rules"):
    sharding.normalize_rules([("embed", "fsdp"), ("embed", "tensor")])


def test_spec_splits_only_dividing_axes():
  mesh = sharding.abstract_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  assert sharding.spec((c.EMBED, c.MLP), (32, 64), mesh, rules) == P("fsdp", "tensor")
  assert sharding.spec((c.ACT_BATCH, None), (8, 5), mesh, rules) == P(("data", "fsdp"), None)
  assert sharding.spec((c.ACT_BATCH, None), (2, 5), mesh, rules) == P("data", None)  # the dividing prefix
  assert sharding.spec((c.HEADS, c.HEAD_DIM), (3, 8), mesh, rules) == P(None, None)  # 3 heads do not split
  assert sharding.spec((c.PATCH, c.PATCH), (4, 4), mesh, rules) == P(None, None)  # repeated names are fine
  # an axis is used once per array: the second `embed` dimension stays whole
  assert sharding.spec((c.EMBED, c.EMBED), (4, 4), mesh, rules) == P("fsdp", None)
  with pytest.raises(sharding.ShardingError, match=r"do not match shape"):
    sharding.spec((c.EMBED,), (4, 4), mesh, rules)


def test_replication_report_counts_bytes():
  mesh = sharding.abstract_mesh((2, 2, 2))
  params = {"w": jax.ShapeDtypeStruct((32, 64), jnp.float32), "norm": jax.ShapeDtypeStruct((32,), jnp.float32),
            "odd": jax.ShapeDtypeStruct((3, 5), jnp.bfloat16)}
  shardings = {"w": NamedSharding(mesh, P("fsdp", "tensor")), "norm": NamedSharding(mesh, P()),
               "odd": NamedSharding(mesh, P())}
  r = sharding.replication_report(params, shardings)
  assert r.devices == 8
  assert r.total_bytes == 32 * 64 * 4 + 32 * 4 + 15 * 2
  assert r.per_device_bytes == 32 * 64 * 4 // 4 + 32 * 4 + 15 * 2
  assert r.replicated_bytes == 32 * 4 + 15 * 2
  assert [name for name, _, _ in r.replicated] == ["['norm']", "['odd']"]  # largest first
  assert "replicated ['norm'] (32,)" in r.summary()


def test_model_parameters_mostly_split_on_a_2x2x2_mesh():
  model, _ = H.tiny_model("clip")
  mesh = sharding.abstract_mesh((2, 2, 2))
  abstract = jax.eval_shape(model.init, *placement.init_inputs(model.config))
  r = sharding.replication_report(nn.unbox(abstract), sharding.logical_shardings(abstract, mesh, sharding.DEFAULT_RULES))
  assert r.replicated_fraction < 0.05, r.summary()
  assert all(len(shape) == 1 for _, shape, _ in r.replicated), r.summary()  # only norms and biases stay whole


def test_per_sample_and_constrain_are_no_ops_without_a_mesh():
  x = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(sharding.per_sample(lambda a, n: a * n)(x, 2), x * 2)
  assert sharding.constrain(x, (c.ACT_BATCH, None)) is x


def test_batch_must_split_over_every_batch_axis():
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  assert sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, 3).spec == P(None)
  assert sharding.process_rows(sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, 3), 3) == range(0, 3)


def test_distributed_settings_are_complete_or_absent(monkeypatch):
  for name in ("VTR_COORDINATOR", "VTR_NUM_PROCESSES", "VTR_PROCESS_ID", "VTR_DISTRIBUTED"):
    monkeypatch.delenv(name, raising=False)
  assert sharding.initialize_distributed() is False
  monkeypatch.setenv("VTR_COORDINATOR", "localhost:1234")
  with pytest.raises(sharding.ShardingError, match=r"missing \['num_processes', 'process_id'\]"):
    sharding.initialize_distributed()
  monkeypatch.setenv("VTR_NUM_PROCESSES", "two")
  with pytest.raises(sharding.ShardingError, match=r"VTR_NUM_PROCESSES='two' is not an integer"):
    sharding.initialize_distributed()


# ---- 8 devices (subprocess) ---------------------------------------------------------------------
def _check_methods(entry, mesh):
  for name, m in entry["methods"].items():
    where = f"{name} ({m['spec']}) on mesh {mesh}"
    assert m["rows_equal"], f"{where}: different valid slots than on one device"
    assert m["positions_equal"], f"{where}: reduce/positions differ from one device"
    assert m["patches_equal"], f"{where}: llm/tok/patch differs from one device"
    assert m["logits_max_diff"] < 1e-5, f"{where}: logits differ by {m['logits_max_diff']}"


@pytest.mark.slow  # the module's mesh report: every method on three meshes, ~75 s
def test_every_method_is_checked(report):
  assert set(report["meshes"]["2,2,2"]["methods"]) == set(registry())


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2,2,2", "8,1,1", "1,1,8"])
def test_prefill_equals_single_device(report, mesh):
  _check_methods(report["meshes"][mesh], mesh)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2,2,2", "8,1,1", "1,1,8"])
def test_compiled_prefill_gathers_no_scores(report, mesh):
  entry = report["meshes"][mesh]
  assert not entry["score_gathers"], f"mesh {mesh}: score arrays gathered across devices: {entry['score_gathers']}"


@pytest.mark.slow  # the module's mesh report: every method on three meshes, ~75 s
def test_gather_check_catches_an_unwrapped_selection(report):
  found = report["unwrapped_fastv"]["score_gathers"]
  assert any(g["op"].endswith("top_k") for g in found), found


@pytest.mark.slow  # the module's mesh report: every method on three meshes, ~75 s
def test_train_step_equals_unsharded(report):
  step = report["meshes"]["2,2,2"]["train_step"]
  assert step["params_moved"] > 1e-4, step  # the steps really changed the parameters
  assert step["state_max_diff"] < 1e-5, step
  assert max(step["metric_diffs"].values()) < 1e-5, step


@pytest.mark.slow  # the module's mesh report: every method on three meshes, ~75 s
def test_pallas_kernels_run_per_device(report):
  kernels = report["meshes"]["2,2,2"]["kernels"]
  assert kernels["mass_max_diff"] < 1e-6 and kernels["similarity_max_diff"] < 1e-6 and kernels["index_equal"], kernels
  assert kernels["heads_summed_across_devices"], kernels  # 2 kv heads split over tensor=2, summed back


@pytest.mark.slow  # the module's mesh report: every method on three meshes, ~75 s
def test_checkpoint_restores_onto_another_mesh(report):
  restore = report["meshes"]["2,2,2"]["restore"]
  assert restore["values_equal"] and restore["shardings_match"], restore


@pytest.mark.slow
def test_every_method_train_step_and_restore_on_8_1_1_and_1_1_8(tmp_path):
  full = run_mesh_checks(tmp_path, "8,1,1", "1,1,8", timeout=1800)
  for mesh, entry in full["meshes"].items():
    assert set(entry["methods"]) == set(registry())
    _check_methods(entry, mesh)
    assert not entry["score_gathers"], f"mesh {mesh}: {entry['score_gathers']}"
    assert entry["train_step"]["state_max_diff"] < 1e-5, entry["train_step"]
    assert entry["restore"]["values_equal"] and entry["restore"]["shardings_match"], entry["restore"]
    assert entry["kernels"]["mass_max_diff"] < 1e-6 and entry["kernels"]["index_equal"], entry["kernels"]
