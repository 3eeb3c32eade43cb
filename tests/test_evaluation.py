"""eval.py's library: every method gets a valid config at every budget; outputs are well formed."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

import vtr_jax
from configs import shapes_tiny
from vtr_jax import evaluation, placement, sharding, training
from vtr_jax.data import scenes, vqa
from vtr_jax.models.vlm import VLM


def _shipped_geometry():
  return training.model_config(shapes_tiny.get_config(), vqa.tokenizer())


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  c = shapes_tiny.get_config("test")
  tok = vqa.tokenizer()
  cfg = training.model_config(c, tok)
  params = training.init_params(VLM(cfg), cfg, 0)
  path = str(tmp_path_factory.mktemp("ckpt"))
  vtr_jax.save(path, cfg, params, tok)
  return path


def test_eval_writes_table_json_csv_and_plot(tiny_checkpoint, tmp_path, capsys):
  methods = ["random", "fastervlm", "fastv", "pdrop"]
  results = evaluation.main(checkpoint=tiny_checkpoint, num_examples=14, methods=methods, budgets=[0.5, 0.25],
                            batch_size=7, outdir=str(tmp_path), progress=False)
  out = capsys.readouterr().out
  assert "method" in out and "fastervlm" in out and "wrote" in out
  assert results[0].method == "full" and results[0].agreement == 1.0 and results[0].relative == pytest.approx(100)
  assert {r.method for r in results} == {"full", *methods}
  with open(tmp_path / "results.json") as f:
    data = json.load(f)
  assert data["meta"]["examples"] == 14 and len(data["results"]) == len(results)
  for r in data["results"]:
    assert 0 <= r["accuracy"] <= 1 and r["prefill_gflops"] > 0 and r["latency_ms"] > 0 and r["peak_memory_mb"] > 0
    assert set(r["per_family"]) == set(vqa.scenes.FAMILIES)
  reduced = [r for r in data["results"] if r["method"] != "full"]
  assert all(r["flops_ratio"] < 1 for r in reduced)
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(results) and "reading" in rows[0]
  with open(tmp_path / "accuracy_vs_flops.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_checkpoint_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    evaluation.main(checkpoint=str(tmp_path / "nope"), num_examples=7, outdir=str(tmp_path), progress=False)


def test_unknown_method_is_named(tiny_checkpoint, tmp_path):
  with pytest.raises(ValueError, match=r"unknown methods \['fastvv'\]"):
    evaluation.main(checkpoint=tiny_checkpoint, num_examples=7, methods=["fastvv"], outdir=str(tmp_path),
                    progress=False)


def test_shipped_model_is_the_config_it_claims():
  """The weights inside the package load strictly, match configs/shapes_tiny.py, and answer finitely."""
  assert os.path.isdir(evaluation.SHIPPED), f"the shipped model is missing: {evaluation.SHIPPED}"
  cfg, params, tok = vtr_jax.load(evaluation.SHIPPED)
  want = _shipped_geometry()  # the HF layout keeps no run name and writes head_dim out
  assert cfg.vision == want.vision and cfg.projector == want.projector
  assert cfg.text == dataclasses.replace(want.text, head_dim=want.text.hidden_size // want.text.num_heads)
  with open(os.path.join(evaluation.SHIPPED, "training.json")) as f:
    info = json.load(f)
  assert info["config"] == "shapes-tiny" and 0 < info["step"] <= info["steps"]
  rows = vqa.build_split("test", 7, scenes.SceneConfig(image_size=cfg.vision.image_size))
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  acc = training.answer_accuracy(VLM(cfg), params, rows, tok, mesh=mesh, rules=sharding.DEFAULT_RULES)
  assert 0.0 <= acc["overall"] <= 1.0 and set(acc) >= {"colour", "reading"}
  _, pixels, tokens, valid = placement.init_inputs(cfg)
  logits, _, _ = VLM(cfg).apply(params, pixels, tokens, valid, reduction="fastv:layer=1,keep=8", method=VLM.prefill)
  assert np.isfinite(np.asarray(logits)).all()
