"""train.py's library: the loss goes down, interruption resumes exactly, errors, compressor setups."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from configs import shapes_tiny
from vtr_jax import training


def _config(**train):
  c = shapes_tiny.get_config("test")
  c.train.update(**train)
  return c


def _params(workdir):
  import vtr_jax
  _, params, _ = vtr_jax.load(os.path.join(workdir, "export"))
  return params


def test_few_steps_lower_the_loss_and_export(tmp_path):
  c = _config(steps=10, log_every=1, eval_every=5, checkpoint_every=5)
  training.train(c, str(tmp_path), progress=False)
  m = training.read_metrics(str(tmp_path))
  assert [r["step"] for r in m] == list(range(1, 11))
  assert np.mean([r["loss"] for r in m[-3:]]) < m[0]["loss"] - 0.1
  assert 0.0 <= m[-1]["val"]["overall"] <= 1.0 and set(m[-1]["val"]) >= {"colour", "reading", "overall"}
  assert os.path.exists(os.path.join(tmp_path, "export", "model.safetensors"))
  with open(os.path.join(tmp_path, "export", "training.json")) as f:
    info = json.load(f)  # what the export says of its run: the step and the last validation
  assert info["step"] == info["steps"] == 10 and info["last_val"] == {"step": 10, **m[-1]["val"]}


def test_interrupt_and_resume_equals_uninterrupted(tmp_path):
  c = _config(steps=5, checkpoint_every=2, eval_every=0, log_every=1)
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  training.train(c, whole, progress=False)
  training.train(c, split, stop_after=3, progress=False)  # checkpoint at 2; steps 3.. are redone
  assert not os.path.exists(os.path.join(split, "export"))
  training.train(c, split, stop_at=4, progress=False)  # a snapshot of the same run, exported
  with open(os.path.join(split, "export", "training.json")) as f:
    assert json.load(f)["step"] == 4
  with pytest.raises(training.TrainingError, match=r"stop_at=6 must be in 1\.\.train\.steps=5"):
    training.train(c, split, stop_at=6, progress=False)
  training.train(c, split, progress=False)
  with open(os.path.join(split, "export", "training.json")) as f:
    assert json.load(f)["step"] == 5
  a, b = _params(whole), _params(split)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [r["loss"] for r in training.read_metrics(whole)][-2:] == [r["loss"] for r in training.read_metrics(split)][-2:]


def test_config_mismatch_names_the_field(tmp_path):
  training.train(_config(steps=2, eval_every=0), str(tmp_path), progress=False)
  other = _config(steps=4, eval_every=0)
  other.model.text.hidden_size = 48
  with pytest.raises(training.TrainingError, match=r"model\.text\.hidden_size: checkpoint 32, config 48"):
    training.train(other, str(tmp_path), progress=False)


def test_nan_stops_training(tmp_path):
  c = _config(steps=3, eval_every=0)
  c.optim.lr = float("nan")
  with pytest.raises(training.TrainingError, match="non-finite"):
    training.train(c, str(tmp_path), progress=False)


def test_projector_only_freezes_the_rest(tmp_path):
  c = shapes_tiny.get_config("test,projector")
  c.train.update(steps=2, eval_every=0)
  training.train(c, str(tmp_path), progress=False)
  trained = _params(str(tmp_path))["params"]
  from vtr_jax.data import vqa
  from vtr_jax.models.vlm import VLM
  cfg = training.model_config(c, vqa.tokenizer())
  init = training.init_params(VLM(cfg), cfg, c.seed)["params"]
  same = lambda a, b: all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                          zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
  assert same(trained["vision"], init["vision"]) and same(trained["decoder"], init["decoder"])
  assert not same(trained["projector"], init["projector"])


@pytest.mark.slow
def test_pdrop_training_mode_runs(tmp_path):
  c = shapes_tiny.get_config("test,pdrop")
  c.train.update(steps=3, eval_every=0, log_every=1)
  training.train(c, str(tmp_path), progress=False)
  assert all(np.isfinite(r["loss"]) for r in training.read_metrics(str(tmp_path)))


def test_unknown_trainable_part():
  c = _config(trainable="projector+llm")
  with pytest.raises(ValueError, match=r"names \['llm'\]; the model's parts are \['decoder', 'projector', 'vision'\]"):
    from vtr_jax.data import vqa
    from vtr_jax.models.vlm import VLM
    cfg = training.model_config(c, vqa.tokenizer())
    training.optimizer(c, training.init_params(VLM(cfg), cfg, 0), {})


def test_reduction_schedule_parsing():
  sched = training.reduction_schedule("3:pool:stride=4|6:pool:stride=2|none")
  assert sched == [(3, "pool:stride=4"), (6, "pool:stride=2"), (None, "none")]
  assert [training.spec_at(sched, s) for s in (0, 2, 3, 5, 6, 99)] == ["pool:stride=4"] * 2 + ["pool:stride=2"] * 2 + ["none"] * 2
  with pytest.raises(ValueError, match="must increase"):
    training.reduction_schedule("6:pool:stride=4|3:none|none")
  with pytest.raises(ValueError, match="needs 'until_step:'"):
    training.reduction_schedule("pool:stride=4|none")


@pytest.mark.slow
def test_scheduled_training_switches_plans_at_the_boundary(tmp_path):
  """Steps before the boundary train exactly as a run under the first plan, the step after it differs from it."""
  losses = {}
  for name, reduction in (("scheduled", "2:pool:stride=2|none"), ("pool", "pool:stride=2")):
    c = _config(steps=3, eval_every=0, log_every=1, reduction=reduction)
    training.train(c, str(tmp_path / name), progress=False)
    losses[name] = [r["loss"] for r in training.read_metrics(str(tmp_path / name))]
  assert losses["scheduled"][:2] == losses["pool"][:2]
  assert losses["scheduled"][2] != losses["pool"][2]


def test_auxiliary_scene_supervision_trains_heads_but_exports_only_the_model(tmp_path):
  c = _config(steps=4, eval_every=0, log_every=1, aux_weight=1.0)
  training.train(c, str(tmp_path), progress=False)
  m = training.read_metrics(str(tmp_path))
  assert all(np.isfinite(r["loss"]) for r in m)
  params = _params(str(tmp_path))
  assert set(params["params"]) == {"vision", "projector", "decoder"}


def test_non_finite_step_is_named_though_checked_only_at_log_steps(tmp_path):
  """The loop reads the device only at log / checkpoint steps; a NaN learning rate makes step 2's loss
  non-finite (step 1 runs on the initial parameters), found at the log step 4 and named."""
  c = _config(steps=8, eval_every=0, log_every=4, checkpoint_every=100)
  c.optim.lr = float("nan")
  with pytest.raises(training.TrainingError, match=r"at step 2; stopping \(found at step 4;"):
    training.train(c, str(tmp_path), progress=False)
  assert training.read_metrics(str(tmp_path)) == []


def test_no_device_read_between_log_steps(tmp_path):
  """Every read from the device is an explicit one at a log step: an implicit transfer anywhere in the
  loop (a float() of a metric per step) raises under the guard."""
  c = _config(steps=8, eval_every=0, log_every=2, checkpoint_every=100)
  with jax.transfer_guard_device_to_host("disallow"):
    training.train(c, str(tmp_path), stop_after=4, progress=False)
  assert [r["step"] for r in training.read_metrics(str(tmp_path))] == [2, 4]


def test_bf16_compute_over_f32_master_weights():
  """config.model.dtype=bfloat16 runs the model in bfloat16 over float32 parameters: the same parameters give a
  loss close to the float32 model's, not equal to it, and gradients in float32 for the optimizer."""
  from vtr_jax.data import vqa
  from vtr_jax.models.vlm import VLM
  tok = vqa.tokenizer()
  c = _config()
  rows = next(vqa.stream("train", 2, config=training.scene_config(c, training.model_config(c, tok)), workers=0))
  out = {}
  for dtype in ("float32", "bfloat16"):
    c.model.dtype = dtype
    cfg = training.model_config(c, tok)
    assert cfg.text.dtype == cfg.vision.dtype == dtype and cfg.text.param_dtype == cfg.vision.param_dtype == "float32"
    model = VLM(cfg)
    params = training.init_params(model, cfg, 0)
    batch = training.step_inputs(rows, tok, cfg, 0.0)
    grad_fn = jax.jit(jax.value_and_grad(lambda p: training.loss_and_metrics({"model": p}, model, batch, None)[0]))
    out[dtype] = grad_fn(params)
  (loss32, _), (loss16, grads16) = out["float32"], out["bfloat16"]
  assert {g.dtype for g in jax.tree_util.tree_leaves(grads16)} == {np.dtype("float32")}
  assert float(loss16) != float(loss32)
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=2e-2)


@pytest.mark.slow
def test_bf16_training_with_remat_runs(tmp_path):
  c = _config(steps=2, eval_every=0, log_every=1, checkpoint_every=100)
  c.model.dtype = "bfloat16"
  c.model.text.remat = "full"
  training.train(c, str(tmp_path), progress=False)
  assert all(np.isfinite(r["loss"]) for r in training.read_metrics(str(tmp_path)))
  assert {x.dtype for x in jax.tree_util.tree_leaves(_params(str(tmp_path)))} == {np.dtype("float32")}
