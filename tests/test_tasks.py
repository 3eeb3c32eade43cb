"""vtr_jax.tasks: definitions, local Hub-layout loaders, and the generation path against transformers."""

from __future__ import annotations

import importlib
import json
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import hf_tiny
import vtr_jax
from vtr_jax import chat, metrics, tasks
from vtr_jax.data import vqa
from vtr_jax.data.vqa import ColumnError
from vtr_jax.models.vlm import VLM, generate, pad_prompts

IMAGE = datasets.Image()
STR = datasets.Value("string")


def _image(seed: int, size=(37, 29)) -> Image.Image:
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _words(rng, n: int) -> str:
  return " ".join(f"w{int(i)}" for i in rng.integers(5, 89, n))


def _parquet(path: str, rows: list[dict], features: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  datasets.Dataset.from_list(rows, features=datasets.Features(features)).to_parquet(path)


def pope_rows(n: int, seed: int = 0, long: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{"id": str(i), "question_id": str(i), "question": f" {_words(rng, 4 + long * (i % 2))} ? ",
           "answer": "yes" if i % 2 else "no", "image_source": f"img{i}", "image": _image(seed * 100 + i),
           "category": "adversarial"} for i in range(n)]


POPE_FEATURES = {"id": STR, "question_id": STR, "question": STR, "answer": STR, "image_source": STR, "image": IMAGE,
                 "category": STR}


def write_pope(root: str, n: int = 5, **kw) -> list[dict]:
  rows = pope_rows(n, **kw)
  _parquet(os.path.join(root, "data", "test-00000-of-00001.parquet"), rows, POPE_FEATURES)
  return rows


def write_textvqa(root: str, n: int = 4, seed: int = 1) -> list[dict]:
  rng = np.random.default_rng(seed)
  rows = [{"question_id": i, "question": _words(rng, 6), "image": _image(seed * 100 + i),
           "answers": [_words(rng, 1 + j % 3) for j in range(10)], "ocr_tokens": ["w5"]} for i in range(n)]
  _parquet(os.path.join(root, "data", "validation-00000-of-00001.parquet"), rows,
           {"question_id": datasets.Value("int64"), "question": STR, "image": IMAGE,
            "answers": datasets.Sequence(STR), "ocr_tokens": datasets.Sequence(STR)})
  return rows


def write_mme(root: str, images: int = 2, seed: int = 2) -> list[dict]:
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(images):
    for answer in ("Yes", "No"):
      rows.append({"question_id": f"count/{i:04d}.png", "image": _image(seed * 100 + i), "category": "count",
                   "question": f"{_words(rng, 40)} ? Please answer yes or no.", "answer": answer})
  _parquet(os.path.join(root, "data", "test-00000-of-00001.parquet"), rows,
           {"question_id": STR, "image": IMAGE, "question": STR, "answer": STR, "category": STR})
  return rows


def _same_image(a: Image.Image, b: Image.Image) -> bool:
  return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


# ---- definitions and errors -----------------------------------------------------------------------
def test_registry_and_unknown_task():
  assert set(tasks.known()) >= {"pope", "gqa", "textvqa", "vqav2", "mme", "scienceqa_img", "mmbench", "seedbench",
                                "videomme", "mvbench"}
  with pytest.raises(tasks.UnknownTaskError, match="unknown task 'popee'; known tasks: gqa, mmbench, mme"):
    tasks.get("popee")
  with pytest.raises(ValueError):  # UnknownTaskError is a ValueError too
    tasks.load("popee", ".")


def test_missing_directory_and_column(tmp_path):
  with pytest.raises(FileNotFoundError, match="data directory .*missing.* for task 'pope' does not exist"):
    tasks.load("pope", str(tmp_path / "missing"))
  rows = [{k: v for k, v in r.items() if k != "question"} for r in pope_rows(2)]
  _parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"), rows,
           {k: v for k, v in POPE_FEATURES.items() if k != "question"})
  with pytest.raises(ColumnError, match=r"task 'pope' needs column\(s\) \['question'\].*available columns: \["):
    tasks.load("pope", str(tmp_path))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no data files"):
    tasks.load("pope", str(tmp_path / "empty"))


def test_video_and_multi_image_inputs_raise(tmp_path):
  for name in ("videomme", "mvbench"):
    with pytest.raises(tasks.UnsupportedInputError, match="video input .* multi-image / video inputs are not"):
      tasks.run_task(None, None, None, name, str(tmp_path), template=None)
  seed = tasks.get("seedbench")
  with pytest.raises(tasks.UnsupportedInputError, match="a row has 2 images"):
    tasks.image_of(seed, {"image": [_image(0), _image(1)]})
  assert _same_image(tasks.image_of(seed, {"image": [_image(3)]}), _image(3))


# ---- loaders --------------------------------------------------------------------------------------
def test_parquet_layout(tmp_path):
  rows = write_pope(str(tmp_path), 3)
  data = tasks.load("pope", str(tmp_path))
  assert len(data) == 3 and data.split == "test"
  for got, want in zip(data, rows):
    assert got["question"] == want["question"] and _same_image(got["image"], want["image"])
  assert len(tasks.load("pope", str(tmp_path), num_examples=2)) == 2


def test_config_folder_layout(tmp_path):
  rng = np.random.default_rng(0)
  rows = [{"image": _image(i), "question": _words(rng, 5), "choices": ["w5", "w6 w7", "w8"], "answer": i % 3,
           "hint": "" if i else _words(rng, 3), "task": "closed choice"} for i in range(3)]
  _parquet(str(tmp_path / "ScienceQA-IMG" / "test-00000-of-00001.parquet"), rows,
           {"image": IMAGE, "question": STR, "choices": datasets.Sequence(STR), "answer": datasets.Value("int64"),
            "hint": STR, "task": STR})
  _parquet(str(tmp_path / "ScienceQA-FULL" / "test-00000-of-00001.parquet"), rows[:1],
           {"image": IMAGE, "question": STR, "choices": datasets.Sequence(STR), "answer": datasets.Value("int64"),
            "hint": STR, "task": STR})
  data = tasks.load("scienceqa_img", str(tmp_path))
  assert len(data) == 3 and [r["answer"] for r in data] == [0, 1, 2]
  text = tasks.get("scienceqa_img").text(data[0])
  assert text.startswith("Context: ") and "\nA. w5\nB. w6 w7\nC. w8\nAnswer with the option's letter" in text


def test_json_and_image_folder_layout(tmp_path):
  import json
  rows = pope_rows(3)
  os.makedirs(tmp_path / "images")
  with open(tmp_path / "llava_pope_test.jsonl", "w") as f:
    for r in rows:
      r["image"].save(tmp_path / "images" / f"{r['id']}.png")
      f.write(json.dumps({**{k: v for k, v in r.items() if k != "image"}, "image": f"{r['id']}.png"}) + "\n")
  data = tasks.load("pope", str(tmp_path))  # one split (named after the file): used whatever its name
  assert [d["question"] for d in data] == [r["question"] for r in rows]
  assert all(_same_image(d["image"], r["image"]) for d, r in zip(data, rows))
  with open(tmp_path / "llava_pope_test.jsonl", "a") as f:
    f.write(json.dumps({**{k: v for k, v in rows[0].items() if k != "image"}, "image": "gone.png"}) + "\n")
  with pytest.raises(FileNotFoundError, match="image 'gone.png' not found"):
    tasks.load("pope", str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_save_to_disk_layout(tmp_path):
  rows = write_textvqa(str(tmp_path / "parquet"), 3)
  datasets.DatasetDict({"validation": datasets.Dataset.from_list(
      [{**r, "image": r["image"]} for r in rows])}).save_to_disk(str(tmp_path / "arrow"))
  a, b = tasks.load("textvqa", str(tmp_path / "arrow")), tasks.load("textvqa", str(tmp_path / "parquet"))
  assert [r["answers"] for r in a] == [r["answers"] for r in b] == [r["answers"] for r in rows]


def test_gqa_joins_its_image_table(tmp_path):
  rng = np.random.default_rng(0)
  questions = [{"id": str(i), "imageId": f"n{i % 2}", "question": _words(rng, 5), "answer": "w7",
                "fullAnswer": "The w7."} for i in range(4)]
  images = [{"id": f"n{i}", "image": _image(50 + i)} for i in range(2)]
  _parquet(str(tmp_path / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet"), questions,
           {"id": STR, "imageId": STR, "question": STR, "answer": STR, "fullAnswer": STR})
  data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="image table .*testdev_balanced_images.* does not exist"):
    tasks.load("gqa", data_dir)
  _parquet(str(tmp_path / "testdev_balanced_images" / "testdev-00000-of-00001.parquet"), images,
           {"id": STR, "image": IMAGE})
  data = tasks.load("gqa", data_dir)
  assert [_same_image(r["image"], _image(50 + i % 2)) for i, r in enumerate(data)] == [True] * 4


# ---- prompts and generation settings equal lmms-eval's ------------------------------------------------
LMMS_TASKS = {  # our task: (lmms-eval module, its YAML files (the last one wins), doc_to_text)
    "pope": ("pope.utils", ["pope/pope.yaml"], "pope_doc_to_text"),
    "gqa": ("gqa.utils", ["gqa/gqa.yaml"], "gqa_doc_to_text"),
    "textvqa": ("textvqa.utils", ["textvqa/_default_template_textvqa_yaml"], "textvqa_doc_to_text"),
    "vqav2": ("vqav2.utils", ["vqav2/_default_template_vqav2_yaml", "vqav2/vqav2_val.yaml"], "vqav2_doc_to_text"),
    "vizwiz_vqa": ("vizwiz_vqa.utils", ["vizwiz_vqa/_default_template_vqa_yaml"], "vizwiz_vqa_doc_to_text"),
    "mme": ("mme.utils", ["mme/mme.yaml"], "mme_doc_to_text"),
    "scienceqa_img": ("scienceqa.utils", ["scienceqa/scienceqa_img.yaml"], "sqa_doc_to_text"),
    "mmbench": ("mmbench.en_utils", ["mmbench/_default_template_mmbench_en_yaml"], "mmbench_doc_to_text"),
    "seedbench": ("seedbench.utils", ["seedbench/seedbench.yaml"], None),
    "videomme": ("videomme.utils", ["videomme/videomme.yaml"], "videomme_doc_to_text"),
    "mvbench": ("mvbench.utils", ["mvbench/_default_template_yaml", "mvbench/mvbench_action_count.yaml"],
                "mvbench_doc_to_text"),
}


def _yaml(path: str) -> dict:
  import yaml
  with open(path) as f:
    return yaml.safe_load("".join(line for line in f if "!function" not in line)) or {}


def _docs(rng) -> list[dict]:
  docs = []
  for i in range(4):
    docs.append({
        "question": f"  what is {_words(rng, 3)}? Please answer yes or no." if i % 2 else f"is it {_words(rng, 2)}",
        "hint": [None, "", "nan", "a hint"][i], "choices": ["w5", "w6", "w7 w8"][: 2 + i % 2],
        "A": "w5", "B": "w6", "C": [None, float("nan"), "w9", "nan"][i], "D": None, "E": None,
        "index": i, "answer": "A", "category": "c", "L2-category": "l", "source": "s", "split": "dev",
        "choice_a": "w5", "choice_b": "w6", "choice_c": "w7", "choice_d": "w8",
        "options": ["A. w5", "B. w6", "C. w7", "D. w8"], "candidates": ["w5", "w6 w7", "w8"]})
  return docs


def test_prompts_and_generation_settings_equal_lmms_eval(monkeypatch):
  import sys
  import types
  pytest.importorskip("lmms_eval")
  monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))  # videomme's module imports it for video IO
  root = os.path.dirname(importlib.import_module("lmms_eval.tasks").__file__)
  rng = np.random.default_rng(0)
  for name, (module, yamls, fn) in LMMS_TASKS.items():
    task = tasks.get(name)
    config: dict = {}
    for y in yamls:
      config.update(_yaml(os.path.join(root, y)))
    utils = importlib.import_module(f"lmms_eval.tasks.{module}")
    kwargs = config.get("lmms_eval_specific_kwargs", {}).get("default")
    for doc in _docs(rng):
      if name == "scienceqa_img" and doc["hint"] is None:
        continue  # lmms-eval would print "None"; ScienceQA's hints are strings ("" when there is none)
      expected = utils.seed_doc_to_text(doc) if fn is None else getattr(utils, fn)(doc, kwargs)
      assert task.text(doc) == expected, name
    gen = config.get("generation_kwargs", {})
    assert task.split == config.get("test_split", task.split) or name == "mvbench", name
    assert tuple(gen.get("until", ["\n\n"])) == task.stop, name
    if "max_new_tokens" in gen:
      assert task.max_new_tokens == gen["max_new_tokens"], name


# ---- generation -----------------------------------------------------------------------------------
def test_truncate_at_the_first_stop_string():
  assert tasks.truncate("w5 w6\n\nw7 ASSISTANT: x", ("\n\n", "ASSISTANT:")) == "w5 w6"
  assert tasks.truncate("w5 ASSISTANT: w6\n\nw7", ("\n\n", "ASSISTANT:")) == "w5 "
  assert tasks.truncate("w5", ()) == "w5"


def _hf_answer(tiny, tok, prompt: str, image, n: int, stop) -> str:
  ids = tasks.generate.encode_prompts(tok, [prompt])[0]
  input_ids = torch.tensor([hf_tiny.hf_input_ids(ids, tiny.config.num_image_tokens)])
  px = torch.from_numpy(np.array(vqa.pixels([{"image": image}], tiny.config.vision))).permute(0, 3, 1, 2)
  with torch.no_grad():
    out = tiny.torch_model.generate(input_ids=input_ids, pixel_values=px, max_new_tokens=n, do_sample=False,
                                    pad_token_id=hf_tiny.PAD, eos_token_id=hf_tiny.EOS)
  new = out[0, input_ids.shape[1]:].tolist()
  new = new[:new.index(hf_tiny.EOS)] if hf_tiny.EOS in new else new
  return tasks.truncate(tok.decode(new), stop).strip()


@pytest.mark.parametrize("name,writer", [("pope", write_pope), ("textvqa", write_textvqa), ("mme", write_mme)])
def test_run_task_answers_equal_transformers(tiny_clip, tmp_path, name, writer):
  """Long prompts, batches padded with repeated rows, EOS and stop strings: answers equal HF's greedy ones."""
  kwargs = {"long": 60} if name == "pope" else {}
  writer(str(tmp_path), **kwargs)
  template = chat.load(tiny_clip.directory)  # the tiny checkpoint has none: LLaVA-1.5's format
  model = VLM(tiny_clip.config)
  preds, scores = tasks.run_task(model, tiny_clip.params, tiny_clip.tokenizer, name, str(tmp_path), batch_size=3,
                                 template=template, max_new_tokens=6)
  task = tasks.get(name)
  data = tasks.load(name, str(tmp_path))
  assert len(preds) == len(data)
  for p, row in zip(preds, data):
    assert p["prompt"] == f"USER: <image>\n{task.text(row)} ASSISTANT:"
    assert p["prediction"] == _hf_answer(tiny_clip, tiny_clip.tokenizer, p["prompt"], row["image"], 6, task.stop)
  records = [task.metric.score(p["prediction"], row) for p, row in zip(preds, data)]
  assert scores == {**task.metric.aggregate(records), "score": task.metric.aggregate(records)[task.metric.primary],
                    "examples": float(len(data))}
  if name == "pope":
    assert max(len(p["prompt"].split()) for p in preds) > 60
    assert scores["accuracy"] == metrics.yesno.pope_scores([p["prediction"] for p in preds],
                                                           [r["answer"] for r in data])["accuracy"]


@pytest.mark.parametrize("reduction", ["uniform:keep=4", "fastv:layer=1,keep=6"])
def test_run_task_under_reductions_equals_one_by_one(tiny_clip, tmp_path, reduction):
  write_pope(str(tmp_path), 4)
  template = chat.load(tiny_clip.directory)
  model = VLM(tiny_clip.config)
  preds, _ = tasks.run_task(model, tiny_clip.params, tiny_clip.tokenizer, "pope", str(tmp_path),
                            reduction=reduction, batch_size=4, template=template, max_new_tokens=5)
  tok = tiny_clip.tokenizer
  for p, row in zip(preds, tasks.load("pope", str(tmp_path))):
    ids = tasks.generate.encode_prompts(tok, [p["prompt"]])
    toks, valid = pad_prompts(ids, hf_tiny.PAD, 48)  # alone, with other left padding than in the batch
    gen = generate(model, tiny_clip.params, vqa.pixels([row], tiny_clip.config.vision), toks, valid,
                   max_new_tokens=5, reduction=reduction)
    new = np.asarray(gen.tokens[0]).tolist()
    new = new[:new.index(hf_tiny.EOS)] if hf_tiny.EOS in new else new
    assert p["prediction"] == tasks.truncate(tok.decode(new), ("\n\n",)).strip()


def test_stop_strings_cut_generated_answers(tiny_clip, tmp_path):
  write_pope(str(tmp_path), 2)
  template = chat.load(tiny_clip.directory)
  model = VLM(tiny_clip.config)
  free, _ = tasks.run_task(model, tiny_clip.params, tiny_clip.tokenizer, "pope", str(tmp_path), batch_size=2,
                           template=template, max_new_tokens=6)
  words = free[0]["prediction"].split()
  assert len(words) >= 3
  import dataclasses
  stopped = dataclasses.replace(tasks.get("pope"), stop=(words[2],))
  cut, _ = tasks.run_task(model, tiny_clip.params, tiny_clip.tokenizer, stopped, str(tmp_path), batch_size=2,
                          template=template, max_new_tokens=6)
  assert cut[0]["prediction"] == free[0]["prediction"].split(words[2])[0].strip()


def test_prompt_longer_than_the_context_is_refused(tiny_clip):
  template = chat.load(tiny_clip.directory)
  prompt = template.prompt(" ".join(["w5"] * 300))
  with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens: .* more than the model's 256"):
    tasks.answer(VLM(tiny_clip.config), tiny_clip.params, tiny_clip.tokenizer, [prompt], [_image(0)],
                 max_new_tokens=4)


def test_image_placeholder_in_the_text_or_missing(tiny_clip):
  from test_chat import TEMPLATES
  template, tok = chat.load(tiny_clip.directory), tiny_clip.tokenizer
  assert tasks.render(template, tok, "w5 w6") == "USER: <image>\nw5 w6 ASSISTANT:"
  assert tasks.render(template, tok, "w5 <image> w6") == "USER: w5 <image> w6 ASSISTANT:"  # where the data put it
  qwen = chat.ChatTemplate(TEMPLATES["qwen2.5-vl"], "test")  # writes <|image_pad|>, not this tokenizer's <image>
  with pytest.raises(ValueError, match="prompt 0 holds the image placeholder '<image>' 0 times"):
    tasks.answer(VLM(tiny_clip.config), tiny_clip.params, tok, [tasks.render(qwen, tok, "w5")], [_image(0)],
                 max_new_tokens=2)


def test_shipped_model_answers_through_its_template_as_the_bundled_evaluation(tmp_path):
  """The shipped model's chat template is its training prompt: the task path answers the bundled questions with
  the token the bundled evaluation predicts (prefill argmax at the prompt's last position)."""
  import vtr_jax
  from vtr_jax import evaluation
  from vtr_jax.data import scenes
  cfg, params, tok = vtr_jax.load(evaluation.SHIPPED)
  rows = vqa.build_split("test", 14, scenes.SceneConfig(image_size=cfg.vision.image_size))
  os.makedirs(tmp_path / "data")
  rows.to_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"))
  task = tasks.Task("bundled", ("question", "answer"), "{question}", metrics.exact_match(), split="test",
                    max_new_tokens=2)
  preds, scores = tasks.run_task(VLM(cfg), params, tok, task, str(tmp_path), batch_size=14,
                                 template=chat.load(evaluation.SHIPPED, fallback=None))
  batch = vqa.prompt_batch(list(rows), tok, cfg.vision, length=vqa.PROMPT_LENGTH)
  logits, _, _ = VLM(cfg).apply(params, batch.pixels, batch.tokens, batch.valid, last_only=True, method=VLM.prefill)
  expected = [tok.decode([int(i)]) for i in np.argmax(np.asarray(logits), axis=-1)]
  assert [p["prediction"] for p in preds] == expected
  assert [p["prompt"] for p in preds] == [vqa.format_prompt(r["question"]) for r in rows]
  assert scores["accuracy"] == np.mean([e == r["answer"] for e, r in zip(expected, rows)])


# ---- eval.py --task --------------------------------------------------------------------------
@pytest.mark.parametrize("name, writer", [("pope", write_pope), ("textvqa", write_textvqa), ("mme", write_mme)])
def test_eval_task_sweep_end_to_end(tiny_clip, tmp_path, capsys, name, writer):
  """A tiny HF checkpoint on locally written POPE / TextVQA / MME layouts (multi-token answers, long prompts):
  the full model and a method at two budgets, the table, JSON/CSV/plot and the per-example predictions; the full
  row's answers are `run_task`'s."""
  from vtr_jax import chat, evaluation
  data = str(tmp_path / name)
  writer(data)
  out = str(tmp_path / "out")
  results = evaluation.main(checkpoint=tiny_clip.directory, task=name, data=data, methods=["fastervlm"],
                            budgets=[0.5, 0.25], batch_size=4, num_examples=0, outdir=out, progress=False)
  printed = capsys.readouterr().out
  assert [r.method for r in results] == ["full", "fastervlm", "fastervlm"] and "fastervlm" in printed
  assert results[0].accuracy == results[0].accuracy and results[1].flops_ratio < 1  # a number, and cheaper
  with open(os.path.join(out, "predictions.json")) as f:
    predictions = json.load(f)
  preds, _ = tasks.run_task(vtr_jax.VLM(tiny_clip.config), tiny_clip.params, tiny_clip.tokenizer, name, data,
                            batch_size=4, template=chat.load(tiny_clip.directory))
  assert [p["prediction"] for p in predictions["none"]] == [p["prediction"] for p in preds]
  for f in ("results.json", "results.csv", "accuracy_vs_flops.png"):
    assert os.path.exists(os.path.join(out, f))


def test_eval_task_errors(tiny_clip, tmp_path):
  from vtr_jax import evaluation
  with pytest.raises(evaluation.EvalError, match=r"unknown task 'popee'; known tasks: .*pope"):
    evaluation.main(checkpoint=tiny_clip.directory, task="popee", data=str(tmp_path), outdir=str(tmp_path))
  with pytest.raises(evaluation.EvalError, match="--task=pope needs --data=DIR"):
    evaluation.main(checkpoint=tiny_clip.directory, task="pope", outdir=str(tmp_path))
  write_pope(str(tmp_path / "pope"))
  with pytest.raises(chat.ChatTemplateError, match="has no chat template .* and no fallback was given"):
    evaluation.main(checkpoint=tiny_clip.directory, task="pope", data=str(tmp_path / "pope"), chat_template="none",
                    outdir=str(tmp_path / "o"), methods=[], progress=False)
  with pytest.raises(evaluation.EvalError, match="--import 'no_such_module' could not be imported"):
    evaluation.main(imports=["no_such_module"], outdir=str(tmp_path))
