"""Bad input at every public entry point: one readable error naming the offending values, never a silent answer.

Entry points: `VLM.prefill` / `encode_image` (through `apply`), `generate`, `vtr_jax.load`, eval.py
(`evaluation.main`) and train.py (`training.train`). Inside `jax.jit` only static properties are checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
import reduce_harness as H
import vtr_jax
from configs import shapes_tiny
from vtr_jax import evaluation, training
from vtr_jax.errors import CheckpointError
from vtr_jax.models.inputs import InputError
from vtr_jax.models.vit import VisionConfig
from vtr_jax.models.vlm import VLM, VLMConfig, generate, pad_prompts
from vtr_jax.reduce import ReductionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs()
  toks, valid = pad_prompts(prompts, 0)
  return model, params, np.asarray(pixels), toks, valid


def _prefill(tiny, pixels=None, toks=None, valid=None, reduction=None):
  model, params, px, t, v = tiny
  return model.apply(params, px if pixels is None else pixels, t if toks is None else toks,
                     v if valid is None else valid, reduction=reduction, method=VLM.prefill)


# ---- pixels ----------------------------------------------------------------------------------
def test_unnormalised_pixels_name_their_range(tiny):
  raw = np.random.default_rng(0).integers(0, 256, tiny[2].shape).astype(np.float32)
  with pytest.raises(InputError, match=r"pixels look unnormalised: \|values\| reach 255, .* \[-1\.79, 2\.15\]"):
    _prefill(tiny, pixels=raw)


def test_non_float_pixels_are_refused(tiny):
  with pytest.raises(InputError, match="pixels have dtype uint8; the model takes normalised floats"):
    _prefill(tiny, pixels=np.zeros(tiny[2].shape, np.uint8))
  model, params = tiny[:2]
  with pytest.raises(InputError, match="pixels have dtype int32"):
    model.apply(params, jnp.zeros(tiny[2].shape, jnp.int32), method=VLM.encode_image)


def test_nan_and_inf_pixels_name_the_samples(tiny):
  px = tiny[2].copy()
  px[2, 3, 4, 0] = np.nan
  px[3, 0, 0, 1] = np.inf
  with pytest.raises(InputError, match=r"pixels hold 2 NaN/Inf values \(samples \[2, 3\]\)"):
    _prefill(tiny, pixels=px)
  model, params = tiny[:2]
  with pytest.raises(InputError, match="NaN/Inf"):
    model.apply(params, px, method=VLM.encode_image)


def test_wrong_image_size_is_named(tiny):
  with pytest.raises(InputError, match=r"pixels must be float\[B, 32, 32, 3\] .* got shape \(4, 28, 28, 3\)"):
    _prefill(tiny, pixels=np.zeros((4, 28, 28, 3), np.float32))


def test_checks_are_static_inside_jit(tiny):
  """Under jit only shapes and dtypes are checked: a NaN is not looked for (no host sync), shapes still are."""
  model, params, px, toks, valid = tiny
  fn = jax.jit(lambda p, x: model.apply(p, x, toks, valid, method=VLM.prefill)[0])
  bad = px.copy()
  bad[0, 0, 0, 0] = np.nan
  assert fn(params, bad).shape[0] == 4
  with pytest.raises(InputError, match="dtype uint8"):
    fn(params, np.zeros(px.shape, np.uint8))


# ---- prompts ---------------------------------------------------------------------------------
def test_batch_sizes_must_agree(tiny):
  with pytest.raises(InputError, match="3 images but 4 prompts"):
    _prefill(tiny, pixels=tiny[2][:3])


def test_token_ids_outside_the_vocabulary_are_named(tiny):
  toks = tiny[3].copy()
  toks[1, -2] = 99
  with pytest.raises(InputError, match=rf"token id 99 at sample 1, slot {toks.shape[1] - 2} is outside the "
                                       r"vocabulary \(0\.\.63\)"):
    _prefill(tiny, toks=toks)
  toks[1, -2] = -1
  with pytest.raises(InputError, match="token id -1"):
    _prefill(tiny, toks=toks)


def test_right_padding_and_all_padding_are_refused(tiny):
  toks, valid = pad_prompts([[1, H.IMAGE, 5, 6], [1, H.IMAGE, 7]], 0)
  right_t, right_v = np.roll(toks, -1, axis=1), np.roll(valid, -1, axis=1)  # sample 1: padding at the end
  px = tiny[2][:2]
  with pytest.raises(InputError, match=r"must be left-padded .* sample 1 has padding after a real token at slot 3"):
    _prefill(tiny, pixels=px, toks=right_t, valid=right_v)
  empty = valid.copy()
  empty[1] = False
  with pytest.raises(InputError, match=r"prompts \[1\] are all padding"):
    _prefill(tiny, pixels=px, valid=empty, toks=toks)


def test_empty_batches_are_refused(tiny):
  model, params = tiny[:2]
  with pytest.raises(InputError, match=r"the batch is empty: pixels have shape \(0, \.\.\.\)"):
    _prefill(tiny, pixels=np.zeros((0, 32, 32, 3), np.float32), toks=np.zeros((0, 3), np.int32),
             valid=np.zeros((0, 3), bool))
  with pytest.raises(InputError, match=r"the batch is empty: tokens have shape \(1, 0\)"):
    generate(model, params, tiny[2][:1], np.zeros((1, 0), np.int32), np.zeros((1, 0), bool), max_new_tokens=2)


def test_placeholder_count_is_named(tiny):
  toks, valid = pad_prompts([[1, H.IMAGE, 5, H.IMAGE], [1, 5]], 0)
  with pytest.raises(InputError, match=r"exactly one image placeholder \(id 60\); sample 0 has 2 .*\[0, 1\]"):
    _prefill(tiny, pixels=tiny[2][:2], toks=toks, valid=valid)


# ---- generation ------------------------------------------------------------------------------
def test_generation_settings_are_checked(tiny):
  model, params, px, toks, valid = tiny
  run = lambda **kw: generate(model, params, px, toks, valid, **{"max_new_tokens": 2, **kw})  # noqa: E731
  longest = int(valid.sum(axis=1).max()) - 1 + 16
  with pytest.raises(InputError, match=rf"max_new_tokens=4090 needs positions up to {longest + 4090}, beyond the "
                                       r"decoder's max_positions=4096"):
    run(max_new_tokens=4090)
  with pytest.raises(InputError, match="temperature must be a number >= 0 .* got nan"):
    run(temperature=float("nan"))
  with pytest.raises(InputError, match="temperature must be a number >= 0 .* got -1.0"):
    run(temperature=-1.0)
  with pytest.raises(InputError, match="max_new_tokens must be an integer >= 1, got 0"):
    run(max_new_tokens=0)
  with pytest.raises(InputError, match=r"top_k must be an integer in 0\.\.64"):
    run(top_k=100)
  with pytest.raises(InputError, match="needs an rng key"):
    run(temperature=0.7)


# ---- reduction plans -------------------------------------------------------------------------
def test_a_composition_that_cannot_run_names_the_method(tiny):
  with pytest.raises(ReductionError, match="pool needs the full 4x4 patch grid"):
    _prefill(tiny, reduction="visionzip:keep=8+pool@embed:stride=2")
  with pytest.raises(ReductionError, match="llavolta: pools the full patch grid, but 7 visual tokens"):
    _prefill(tiny, reduction="fastervlm:keep=7+llavolta:layer=1")
  with pytest.raises(ReductionError, match="fastv: budget keep=9 is larger than the 8 tokens it receives"):
    _prefill(tiny, reduction="fastervlm:keep=8+fastv:layer=1,keep=9")


def test_register_towers_refuse_grid_methods_by_name():
  vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_registers=4)
  cfg = VLMConfig(vision=vision, text=H.tiny_model("clip")[0].config.text, image_token_id=H.IMAGE, eos_token_ids=(2,))
  model = VLM(cfg)
  toks, valid = pad_prompts([[1, H.IMAGE, 5]], 0)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), toks, valid)
  with pytest.raises(ReductionError, match="fastervlm, tome read the tower's patch grid .* hands 4 visual registers"):
    model.apply(params, jnp.zeros((1, 32, 32, 3)), toks, valid, reduction="fastervlm:keep=2+tome:keep=2",
                method=VLM.prefill)
  model.apply(params, jnp.zeros((1, 32, 32, 3)), toks, valid, reduction="random@embed:keep=2", method=VLM.prefill)


def test_the_same_in_llm_method_twice_runs_each_under_its_own_name(tiny):
  """Two FastV drops: each keeps its own score (namespaced `fastv.0` / `fastv.1`), the second acts on the first's
  survivors; equal to the masked twins of both."""
  spec = "fastv:layer=1,keep=12+fastv:layer=3,keep=6"
  logits, _, aux = _prefill(tiny, reduction=spec)
  live = np.asarray(aux["llm/visual"]) & np.asarray(aux["llm/valid"])
  assert live.sum(axis=1).tolist() == [6] * 4
  assert not [k for k in aux if "fastv" in k]  # scratch was released after each method's last boundary
  masked, _, maux = _prefill(tiny, reduction="fastv:layer=1,keep=12,mask=true+fastv:layer=3,keep=6,mask=true")
  for i in range(4):
    np.testing.assert_allclose(np.asarray(logits[i])[np.asarray(aux["llm/valid"][i])],
                               np.asarray(masked[i])[np.asarray(maux["llm/valid"][i])], atol=1e-4)


def test_registration_refuses_a_stage_without_its_hook():
  import dataclasses

  from vtr_jax.reduce import Method, register

  @dataclasses.dataclass(frozen=True)
  class Hookless(Method):
    name = "hookless"
    stages = ("vision", "llm")
    summary = "declares stages, implements nothing"
    keep: int = 1

  with pytest.raises(TypeError, match=r"Hookless declares stages \('vision', 'llm'\) but implements no hook for "
                                      r"vision: reduce or block_hook; llm: boundaries; llm: at_boundary"):
    register(Hookless)


# ---- checkpoints -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf"))
  hf_tiny.build("clip_llama", path)
  return path


def _copy(src, dst, edit_config=None):
  shutil.copytree(src, dst)
  if edit_config:
    with open(os.path.join(dst, "config.json")) as f:
      cfg = json.load(f)
    edit_config(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(cfg, f)
    gen = os.path.join(dst, "generation_config.json")
    if os.path.exists(gen):
      os.remove(gen)
  return dst


def test_nan_tensors_are_named(hf_dir, tmp_path):
  from vtr_jax.convert import load_file, save_file
  path = _copy(hf_dir, tmp_path / "nan")
  weights = os.path.join(path, "model.safetensors")
  tensors = load_file(weights)
  name = sorted(k for k in tensors if k.endswith("q_proj.weight"))[0]
  tensors[name] = tensors[name].copy()
  tensors[name][0, :3] = np.nan
  save_file(tensors, weights)
  with pytest.raises(CheckpointError, match=rf"1 tensor\(s\) hold NaN/Inf values: {name} \(3 of"):
    vtr_jax.load(str(path))


def test_a_config_without_an_end_of_sequence_id_is_refused(hf_dir, tmp_path):
  def drop_eos(cfg):
    for d in (cfg, cfg["text_config"]):
      d.pop("eos_token_id", None)
  path = _copy(hf_dir, tmp_path / "noeos", drop_eos)
  with open(os.path.join(path, "tokenizer_config.json")) as f:
    tok = json.load(f)
  tok["eos_token"] = None
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(tok, f)
  with pytest.raises(CheckpointError, match="defines no end-of-sequence id .* generation could never stop early"):
    vtr_jax.load(str(path))


def test_a_null_pad_id_pads_with_the_tokenizers_pad_token(hf_dir, tmp_path):
  def null_pad(cfg):
    for d in (cfg, cfg["text_config"]):
      d["pad_token_id"] = None
  path = _copy(hf_dir, tmp_path / "nullpad", null_pad)
  with open(os.path.join(path, "tokenizer_config.json")) as f:
    tok = json.load(f)
  tok["pad_token"] = "w7"  # a pad token that is not id 0
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(tok, f)
  cfg, _, _ = vtr_jax.load(str(path))
  assert cfg.pad_token_id == 7
  tok["pad_token"] = None  # no pad token either: the end-of-sequence id, as transformers pads
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(tok, f)
  assert vtr_jax.load(str(path))[0].pad_token_id == hf_tiny.EOS


def test_a_missing_directory_is_named(tmp_path):
  with pytest.raises(CheckpointError, match="checkpoint directory .*nowhere' does not exist"):
    vtr_jax.load(str(tmp_path / "nowhere"))


# ---- eval.py ---------------------------------------------------------------------------------
@pytest.mark.parametrize("budgets, message", [([0.0], r"budgets \[0\.0\] must be fractions"),
                                              ([0.5, 1.5], r"budgets \[1\.5\] must be fractions"),
                                              ([-0.25], r"budgets \[-0\.25\]")])
def test_eval_budgets_outside_the_unit_interval(budgets, message, tmp_path):
  with pytest.raises(evaluation.EvalError, match=message):
    evaluation.main(budgets=budgets, outdir=str(tmp_path), progress=False)


def test_eval_outdir_that_cannot_be_written_is_refused_before_the_run(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(evaluation.EvalError, match=r"--outdir '.*file/out' cannot be written"):
    evaluation.main(checkpoint=str(tmp_path / "missing"), outdir=str(blocker / "out"), progress=False)


def _run(script, *args, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


def test_eval_py_exits_non_zero_with_one_line(tmp_path):
  proc = _run("eval.py", "--budgets=0.5,2", f"--outdir={tmp_path}")
  assert proc.returncode == 2
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("eval.py: error: budgets [2.0] must be fractions") and "Traceback" not in proc.stderr


# ---- train.py --------------------------------------------------------------------------------
def _config(**train):
  c = shapes_tiny.get_config("test")
  c.train.update(**{"steps": 4, "checkpoint_every": 2, "eval_every": 0, "log_every": 1, **train})
  return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A workdir with checkpoints at steps 2 and 4 (of 6)."""
  path = str(tmp_path_factory.mktemp("run"))
  training.train(_config(steps=6), path, stop_after=4, progress=False)
  return path


def test_resuming_with_a_changed_optimiser_or_schedule_names_the_field(run_dir, tmp_path):
  work = str(tmp_path / "w")
  shutil.copytree(run_dir, work)
  changed = _config(steps=8)
  changed.optim.lr = changed.optim.lr * 2
  with pytest.raises(training.TrainingError, match=r"another optimiser or schedule \(optim\.lr: checkpoint .*; "
                                                   r"train\.steps: checkpoint 6, config 8\).*--allow_config_change"):
    training.train(changed, work, stop_after=1, progress=False)
  training.train(changed, work, stop_after=1, progress=False, allow_config_change=True)
  assert training.read_metrics(work)[-1]["step"] == 5


def _corrupt_latest(work):
  data = os.path.join(work, "checkpoints", "4", "default", "ocdbt.process_0", "d")
  biggest = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(100)


def test_a_corrupt_step_is_named_and_the_previous_one_restores_when_allowed(run_dir, tmp_path):
  work = str(tmp_path / "w")
  shutil.copytree(run_dir, work)
  _corrupt_latest(work)
  # which array orbax reports first (a parameter or its optimiser moment) depends on its async read order
  unreadable = r"cannot be read: array (opt_state|params)\.[\w.]+ .*--fallback_checkpoint to resume from step 2"
  with pytest.raises(training.TrainingError, match=r"checkpoint step 4 \(.*checkpoints/4\) " + unreadable):
    training.train(_config(steps=6), work, stop_after=1, progress=False)
  training.train(_config(steps=6), work, stop_after=1, progress=False, fallback_checkpoint=True)
  assert training.read_metrics(work)[-1]["step"] == 3  # steps 3.. are redone from step 2


def test_train_py_reports_a_corrupt_step_in_one_line(run_dir, tmp_path):
  work = str(tmp_path / "w")
  shutil.copytree(run_dir, work)
  _corrupt_latest(work)
  proc = _run("train.py", "--config=configs/shapes_tiny.py:test", "--config.train.steps=6",
              "--config.train.checkpoint_every=2", "--config.train.eval_every=0", "--config.train.log_every=1",
              f"--workdir={work}")
  lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("WARNING", "W0", "I0"))]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert lines[-1].startswith("train.py: error: checkpoint step 4") and "Traceback" not in proc.stderr
