"""vtr_jax as an lmms-eval model (needs lmms-eval: `make test-lmms`): found through lmms-eval's entry points,
and its answers on a local task equal vtr_jax's own task path on the same data and plan."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

from test_tasks import write_pope  # noqa: E402
from vtr_jax import chat, tasks  # noqa: E402
from vtr_jax.models.vlm import VLM  # noqa: E402

TASK = "vtr_local_pope"


def _task_dir(tmp_path, data_dir: str, max_new_tokens: int) -> str:
  """A task YAML over the local POPE-layout data, scored with lmms-eval's own POPE functions."""
  include = tmp_path / "lmms_tasks"
  include.mkdir()
  (include / "utils.py").write_text("from lmms_eval.tasks.pope.utils import *  # noqa: F401,F403\n")
  (include / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
      task: {TASK}
      dataset_path: {data_dir}
      test_split: test
      output_type: generate_until
      doc_to_visual: !function utils.pope_doc_to_visual
      doc_to_text: !function utils.pope_doc_to_text
      doc_to_target: "answer"
      generation_kwargs:
        max_new_tokens: {max_new_tokens}
        temperature: 0
        do_sample: false
      process_results: !function utils.pope_process_results
      metric_list:
        - metric: pope_accuracy
          aggregation: !function utils.pope_aggregate_accuracy
          higher_is_better: true
      lmms_eval_specific_kwargs:
        default:
          pre_prompt: ""
          post_prompt: "\\nAnswer the question using a single word or phrase."
      """))
  return str(include)


def test_registered_through_entry_points():
  from lmms_eval import models

  from vtr_jax.lmms import VtrJax
  assert models.get_model("vtr_jax") is VtrJax
  assert "vtr_jax" in models.list_available_models()


@pytest.mark.parametrize("reduction", ["none", "fastv:layer=1,keep=6"])
def test_lmms_eval_answers_equal_the_task_path(tiny_clip, tmp_path, reduction):
  from lmms_eval.evaluator import simple_evaluate
  from lmms_eval.tasks import TaskManager
  data_dir = str(tmp_path / "pope")
  write_pope(data_dir, 5, long=30)
  include = _task_dir(tmp_path, data_dir, max_new_tokens=6)
  results = simple_evaluate(model="vtr_jax", model_args=f'pretrained={tiny_clip.directory},reduction="{reduction}"',
                            tasks=[TASK], batch_size=3, task_manager=TaskManager(include_path=include),
                            log_samples=True, verbosity="WARNING")
  samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
  theirs = [s["filtered_resps"][0] for s in samples]
  ours, scores = tasks.run_task(VLM(tiny_clip.config), tiny_clip.params, tiny_clip.tokenizer, "pope", data_dir,
                                reduction=reduction, batch_size=3, template=chat.load(tiny_clip.directory),
                                max_new_tokens=6)
  assert [p["prediction"] for p in ours] == [t.strip() for t in theirs]
  assert results["results"][TASK]["pope_accuracy,none"] == pytest.approx(scores["accuracy"])


def test_bad_requests_are_refused(tiny_clip):
  from vtr_jax.lmms import VtrJax
  with pytest.raises(Exception, match="unknown"):
    VtrJax(pretrained=tiny_clip.directory, reduction="nosuchmethod:keep=3")
  model = VtrJax(pretrained=tiny_clip.directory)
  with pytest.raises(ValueError, match="greedily"):
    model._settings({"do_sample": True, "temperature": 0.7})
  with pytest.raises(NotImplementedError):
    model.loglikelihood([])


@pytest.mark.slow
def test_command_line(tiny_clip, tmp_path):
  """`python -m lmms_eval --model vtr_jax --model_args pretrained=DIR,reduction=...` from a shell."""
  data_dir = str(tmp_path / "pope")
  write_pope(data_dir, 3)
  include = _task_dir(tmp_path, data_dir, max_new_tokens=4)
  cmd = [sys.executable, "-m", "lmms_eval", "--model", "vtr_jax", "--model_args",
         f'pretrained={tiny_clip.directory},reduction="uniform:keep=4"', "--tasks", TASK, "--include_path", include,
         "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"]
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
  run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "pope_accuracy" in run.stdout + run.stderr
