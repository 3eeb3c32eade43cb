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
