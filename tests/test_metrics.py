"""vtr_jax.metrics: the official rules, and equality with lmms-eval's own functions on tricky answers.

The comparisons import lmms-eval's task modules (`make test-lmms` installs it); without it they skip and
only the checks against the metrics' definitions run.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import math
import sys
import types

import numpy as np
import pytest

from vtr_jax import metrics
from vtr_jax.metrics import choice, vqa, yesno

# Answers that exercise numbers, articles, punctuation, contractions, case and option letters in prose.
TRICKY = [
    "Two", "2", "two.", "2.", "two ", "the dog", "a dog", "Dog!", "dogs", "dog", "yes.", "Yes", "YES", "yes", "no.",
    "No", "it's red", "its red", "isnt", "isn't", "1,000", "1000", "3.5", "3.5.", "hello, world", "hello world",
    "don't", "dont", "The answer is: two", " 10 ", "ten", "none", "0", "oclock", "e-mail", "email", "A/B", "a b",
    "left-hand side", "$5", "50%", "well...", "a.m.", "#1", "", '"quoted"', "(yes)", "Yes, it is.", "a an the",
    "a.b.c." * 12, "Mr. Smith's dog", "new york city", "New York City.", "x-ray", "tv", "T.V.", "\tdog\n",
    "A", "B", "B.", "b", "(C)", "C)", "D: dog", "The answer is B.", "I think it is A because the dog is A big one",
    "answer: C", "Option (D) is right", "B. a cat", "A. dog\nB. cat", "ABC", "A cat is on the mat.", "banana",
    "The correct option is (A), not B.", "y", "n", "N", "Not sure", "nope", "No, there is no dog.", "yes, there is",
]


def test_soft_accuracy_is_the_leave_one_out_definition():
  rng = np.random.default_rng(0)
  pool = ["two", "2", "the dog", "dog", "red", "yes", "no"]
  for _ in range(50):
    answers = list(rng.choice(pool, size=10))
    for pred in pool:
      norm = [vqa.normalize_answer(a) for a in answers]
      p = vqa.normalize_answer(pred)
      subsets = [[norm[j] for j in range(10) if j != i] for i in range(10)]
      expected = float(np.mean([min(1.0, sum(a == p for a in s) / 3) for s in subsets]))
      assert math.isclose(vqa.soft_accuracy(pred, answers), expected)
  assert vqa.soft_accuracy("Two", ["2"] * 10) == 1.0
  assert vqa.soft_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # 3 subsets see 2 matches of 3
  assert vqa.soft_accuracy("dog", []) == 0.0
  with pytest.raises(ValueError, match="unknown answer style 'gqa'"):
    vqa.soft_accuracy("dog", ["dog"], style="gqa")


def test_normalisation_rules():
  assert vqa.normalize_answer("The Two dogs!") == "2 dogs"
  assert vqa.normalize_answer("dont") == "don't"
  assert vqa.normalize_answer("3.5") == "3.5" and vqa.normalize_answer("end.") == "end"
  assert vqa.normalize_answer("1,000") == "1000"  # a digit comma makes every punctuation mark vanish
  assert vqa.normalize_answer("left-hand") == "left hand"


def test_pope_scores_are_the_confusion_counts():
  preds = ["yes", "Yes", "no", "yes.", "no", "No"]
  labels = ["yes", "no", "yes", "yes", "no", "no"]
  s = yesno.pope_scores(preds, labels)
  tp, fp, fn = 1 + 0, 1, 1  # "yes." is neither yes nor no
  assert s["precision"] == tp / (tp + fp) and s["recall"] == tp / (tp + fn)
  assert s["accuracy"] == 3 / 6 and s["yes_ratio"] == 3 / 6 and s["pred_yes_ratio"] == 2 / 6
  with pytest.raises(ValueError, match=r"yes/no, got \['maybe'\]"):
    yesno.pope_scores(["yes"], ["maybe"])


def test_mme_requires_question_pairs():
  records = [{"image": "a.png", "category": "count", "correct": 1.0}]
  with pytest.raises(ValueError, match=r"'count'.*'a.png': 1"):
    yesno.mme_scores(records)
  records.append({"image": "a.png", "category": "count", "correct": 0.0})
  s = yesno.mme_scores(records)
  assert s["count/acc"] == 50.0 and s["count/acc_plus"] == 0.0 and s["perception"] == 50.0 and s["cognition"] == 0.0


# ---- equality with lmms-eval ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def lmms():
  pytest.importorskip("lmms_eval")
  return lambda name: importlib.import_module(f"lmms_eval.tasks.{name}")


def _answer_sets(n=12, seed=0):
  rng = np.random.default_rng(seed)
  pool = TRICKY[:40]
  return [list(rng.choice(pool, size=10)) for _ in range(n)] + [["2"] * 3 + ["two"] * 2 + ["Two."] * 5]


def test_textvqa_and_vizwiz_accuracy_equal_lmms_eval(lmms):
  textvqa, vizwiz = lmms("textvqa.utils"), lmms("vizwiz_vqa.utils")
  for answers in _answer_sets():
    for pred in TRICKY + answers[:3]:
      pred = pred.strip()  # lmms-eval strips answers before scoring
      doc = {"answers": answers, "question_id": 0}
      ours = vqa.soft_accuracy(pred, answers, "evalai")
      assert ours == textvqa.textvqa_process_results(copy.deepcopy(doc), [pred])["exact_match"], (pred, answers)
      assert ours == vizwiz.vizwiz_vqa_process_results(copy.deepcopy(doc), [pred])["exact_match"], (pred, answers)


def test_normalisation_equals_lmms_eval(lmms):
  processor = importlib.import_module("lmms_eval.tasks._task_utils.vqa_eval_metric").EvalAIAnswerProcessor()
  for text in TRICKY + [t.upper() for t in TRICKY]:
    assert vqa.normalize_answer(text) == processor(text), text
    vqav2_style = processor.process_digit_article(processor.process_punctuation(text.replace("\n", " ").strip()))
    assert vqa.normalize_vqav2(text) == vqav2_style, text


def test_vqav2_accuracy_equals_lmms_eval(lmms):
  vqav2 = lmms("vqav2.utils")
  for answers in _answer_sets(seed=1):
    dicts = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]
    for pred in TRICKY:
      pred = pred.strip()
      expected = vqav2.vqav2_process_results({"answers": copy.deepcopy(dicts), "question_id": 0}, [pred])
      assert vqa.soft_accuracy(pred, dicts, "vqav2") == expected["exact_match"], (pred, answers)


def test_gqa_exact_match_equals_lmms_eval(lmms):
  hf_exact_match = importlib.import_module("lmms_eval.api.metrics").exact_match_hf_evaluate
  for pred, target in itertools.product([p.strip() for p in TRICKY], ["yes", "Two", "the dog", "New York City", "2"]):
    expected = hf_exact_match(predictions=[pred], references=[target], ignore_case=True, ignore_punctuation=True)
    assert vqa.exact_match(pred, target) == expected["exact_match"], (pred, target)


def test_pope_equals_lmms_eval(lmms):
  pope = lmms("pope.utils")
  rng = np.random.default_rng(2)
  preds = [p.strip() for p in TRICKY]
  labels = list(rng.choice(["yes", "no", "Yes"], size=len(preds)))
  rows = [{"question_id": i, "answer": a, "category": "adversarial"} for i, a in enumerate(labels)]
  results = [pope.pope_process_results(row, [p]) for row, p in zip(rows, preds)]
  metric = metrics.pope()
  ours = metric.aggregate([metric.score(p, row) for row, p in zip(rows, preds)])
  for key, fn in (("accuracy", pope.pope_aggregate_accuracy), ("precision", pope.pope_aggregate_precision),
                  ("recall", pope.pope_aggregate_recall), ("f1", pope.pope_aggregate_f1_score),
                  ("yes_ratio", pope.pope_aggregate_yes_ratio)):
    assert ours[key] == pytest.approx(fn([r[f"pope_{key}" if key != "f1" else "pope_f1_score"] for r in results]))
  assert [metric.score(p, r)["score"] for r, p in zip(rows, preds)] == [x["pope_accuracy"]["score"] for x in results]


def test_mme_equals_lmms_eval(lmms):
  mme = lmms("mme.utils")
  rng = np.random.default_rng(3)
  yesno_preds = [p.strip() for p in TRICKY]
  assert [yesno.mme_answer(p) for p in yesno_preds] == [mme.parse_pred_ans(p) for p in yesno_preds]
  rows = []
  for c, category in enumerate(yesno.MME_PERCEPTION + yesno.MME_COGNITION):
    for image in range(3):
      for answer in ("Yes", "No"):
        rows.append({"question_id": f"{category}/{image}.png", "category": category, "answer": answer})
  preds = list(rng.choice(yesno_preds, size=len(rows)))
  metric = metrics.mme()
  ours = metric.aggregate([metric.score(p, r) for r, p in zip(rows, preds)])
  results = [mme.mme_process_results(r, [p]) for r, p in zip(rows, preds)]
  for key in ("perception", "cognition"):
    expected = mme.mme_aggregate_results([v for r in results for k, v in r.items() if k == f"mme_{key}_score"])
    assert ours[key] == pytest.approx(expected)


def test_scienceqa_equals_lmms_eval(lmms):
  sqa = lmms("scienceqa.utils")
  for pred, answer in itertools.product([p.strip() for p in TRICKY], range(4)):
    doc = {"choices": ["dog", "cat", "bird", "fish"], "answer": answer}
    assert metrics.scienceqa().score(pred, doc)["score"] == sqa.sqa_process_results(doc, [pred])["exact_match"]


def test_extract_choice_equals_lmms_eval(lmms):
  extract = importlib.import_module("lmms_eval.tasks._task_utils.mcq_extract").extract_mcq_answer
  for pred in TRICKY:
    for choices in (None, ["A", "B", "C", "D"], ["A", "B"]):
      assert choice.extract_choice(pred, choices) == extract(pred, choices=choices), (pred, choices)


def test_videomme_equals_lmms_eval(lmms, monkeypatch):
  monkeypatch.setitem(sys.modules, "cv2", types.ModuleType("cv2"))  # imported by the module, unused by scoring
  videomme = lmms("videomme.utils")
  for pred, answer in itertools.product(TRICKY, "ABCD"):
    doc = {"answer": answer, "domain": "Knowledge", "sub_category": "x", "task_type": "y", "duration": "short",
           "question_id": "1", "videoID": "v"}
    expected = videomme.videomme_process_results(doc, [pred.strip()])["videomme_perception_score"]["score"]
    assert metrics.videomme().score(pred.strip(), doc)["score"] == expected, (pred, answer)


def test_mmbench_static_circular_equals_lmms_eval(lmms):
  en = lmms("mmbench.en_utils")
  extract = importlib.import_module("lmms_eval.tasks._task_utils.mcq_extract").extract_mcq_answer
  evaluator = en.mmbench_evaluator
  options = {"A": "dog", "B": "cat", "C": "a banana", "D": None}
  for pred in TRICKY:  # the letter each answer reads as
    lmms_choices = {k: v for k, v in options.items() if v is not None}
    expected = evaluator.can_infer(pred.strip(), dict(lmms_choices)) or extract(pred.strip(), sorted(lmms_choices))
    assert choice.mmbench_choice(pred.strip(), choice.mmbench_options(options)) == expected, pred
  rows = []
  for q, pred in enumerate(TRICKY):
    for k in range(3 if q % 2 else 1):  # circular copies of the odd questions
      row = {"index": q + k * 1_000_000, "question": "q", "hint": None, "source": "s", "split": "dev",
             "category": f"cat{q % 3}", "L2-category": f"l2{q % 2}", "answer": "ABC"[(q + k) % 3], **options}
      if q == 5:
        del row["D"]  # an absent option column reads as the text "nan" in lmms-eval
      rows.append((row, pred.strip() if k == 0 else "ABC"[(q + k + q // 4) % 3]))
  results = [en.mmbench_process_results(r, [p])["gpt_eval_score"] for r, p in rows]
  overall, category, l2 = evaluator.eval_result(results, eval_method="static")
  metric = metrics.mmbench()
  ours = metric.aggregate([metric.score(p, r) for r, p in rows])
  assert 0 < overall < 1
  assert ours["accuracy"] == pytest.approx(overall)
  assert {k: v for k, v in ours.items() if k.startswith("category/")} == pytest.approx(
      {f"category/{k}": v for k, v in category.items()})
  assert {k: v for k, v in ours.items() if k.startswith("l2_category/")} == pytest.approx(
      {f"l2_category/{k}": v for k, v in l2.items()})


def test_seedbench_equals_lmms_eval(lmms):
  seed = lmms("seedbench.utils")
  rng = np.random.default_rng(5)
  rows = [{"answer": str(a), "data_type": str(t), "question_id": i}
          for i, (a, t) in enumerate(zip(rng.choice(list("ABCD"), 60), rng.choice(["image", "video"], 60)))]
  preds = [str(p).strip() for p in rng.choice(TRICKY, size=len(rows))]
  results = [seed.seed_process_result(r, [p]) for r, p in zip(rows, preds)]
  metric = metrics.seedbench()
  ours = metric.aggregate([metric.score(p, r) for r, p in zip(rows, preds)])
  assert ours["accuracy"] == pytest.approx(seed.seed_aggregation_result([r["seed_all"] for r in results]))
  for t in ("image", "video"):
    expected = seed.seed_aggregation_result([r[f"seed_{t}"] for r in results if f"seed_{t}" in r])
    assert ours[f"data_type/{t}"] == pytest.approx(expected)


def test_mvbench_equals_lmms_eval(lmms):
  mvbench = lmms("mvbench.utils")
  rng = np.random.default_rng(6)
  candidates = ["a dog", "the cat", "two birds", "fish"]
  rows = [{"candidates": candidates, "answer": str(a)} for a in rng.choice(candidates, 80)]
  preds = [str(p).strip() for p in rng.choice(TRICKY, size=len(rows))]
  results = [mvbench.mvbench_process_results(r, [p])["mvbench_accuracy"] for r, p in zip(rows, preds)]
  metric = metrics.mvbench()
  records = [metric.score(p, r) for r, p in zip(rows, preds)]
  assert [r["score"] for r in records] == [r["score"] for r in results]
  assert 100 * metric.aggregate(records)["accuracy"] == pytest.approx(mvbench.mvbench_aggregate_results(results))
  for pred, target in itertools.product(TRICKY, "ABCDE"):
    assert float(choice.mvbench_choice(pred) == choice.mvbench_choice(target)) == mvbench.mcq_acc(target, pred)

