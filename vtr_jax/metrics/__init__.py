"""Official benchmark metrics over generated answers, equal to lmms-eval's on the same predictions.

A `Metric` scores one answer against its dataset row (a record with at least `score`, in [0, 1]
for the per-example table) and aggregates the records into named numbers, one of them the
`primary` one a sweep compares. Accuracies are fractions; MME's scores keep their scale (acc +
acc+ per category, perception out of 2000, cognition out of 800). Answers arrive stripped (as
lmms-eval strips them before scoring).

The rules themselves are plain functions: `vqa` (EvalAI normalisation, soft accuracy, exact
match), `yesno` (POPE, MME), `choice` (option extraction per benchmark).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Callable, Mapping, Sequence

from vtr_jax.metrics import choice, vqa, yesno

Record = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Metric:
  """How a task scores answers.

  Attributes:
    name: e.g. `vqa_accuracy`.
    score: (answer, row) -> record with `score` (float) and what `aggregate` needs.
    aggregate: records -> {name: value}, including `primary`.
    primary: the headline number's key.
  """
  name: str
  score: Callable[[str, Mapping], Record]
  aggregate: Callable[[Sequence[Record]], dict[str, float]]
  primary: str = "accuracy"


def mean_score(records: Sequence[Record], by: str | None = None) -> dict[str, float]:
  """`accuracy` = mean score, and `<by>/<value>` means when records carry a `by` field."""
  out = {"accuracy": sum(r["score"] for r in records) / len(records) if records else 0.0}
  if by is not None:
    groups: dict[str, list[float]] = {}
    for r in records:
      groups.setdefault(str(r[by]), []).append(r["score"])
    out.update({f"{by}/{k}": sum(v) / len(v) for k, v in sorted(groups.items())})
  return out


def vqa_accuracy(style: str, answers: str = "answers") -> Metric:
  """VQA soft accuracy against the row's list of annotator answers (`vqa.soft_accuracy`)."""
  return Metric(f"vqa_accuracy[{style}]", lambda pred, row: {"score": vqa.soft_accuracy(pred, row[answers], style)},
                mean_score)


def exact_match(target: str = "answer") -> Metric:
  """Case- and punctuation-insensitive exact match with one target (GQA)."""
  return Metric("exact_match", lambda pred, row: {"score": vqa.exact_match(pred, str(row[target]))}, mean_score)


def pope(answer: str = "answer", category: str = "category") -> Metric:
  def score(pred, row):
    return {"score": float(yesno.pope_label(pred) == yesno.pope_label(row[answer])), "prediction": pred,
            "label": row[answer], "category": row.get(category, "all")}

  def aggregate(records):
    out = yesno.pope_scores([r["prediction"] for r in records], [r["label"] for r in records])
    for c in sorted({r["category"] for r in records}):
      part = [r for r in records if r["category"] == c]
      out.update({f"{c}/{k}": v for k, v in yesno.pope_scores([r["prediction"] for r in part],
                                                              [r["label"] for r in part]).items()})
    return out

  return Metric("pope", score, aggregate, primary="accuracy")


def mme(answer: str = "answer", image: str = "question_id", category: str = "category") -> Metric:
  def score(pred, row):
    label = row[answer].lower().strip().replace(".", "")
    if label not in ("yes", "no"):
      raise ValueError(f"MME labels must be yes/no, got {row[answer]!r} (question {row[image]!r})")
    correct = float(yesno.mme_answer(pred) == label)
    return {"score": correct, "correct": correct, "image": row[image], "category": row[category]}

  return Metric("mme", score, yesno.mme_scores, primary="total")


def _letter_of(row: Mapping, answer: str) -> str:
  """A row's answer as a letter: an int index into the options, or the letter itself."""
  value = row[answer]
  return string.ascii_uppercase[value] if isinstance(value, int) else str(value)


def scienceqa(answer: str = "answer") -> Metric:
  return Metric("scienceqa", lambda pred, row: {"score": choice.scienceqa_correct(pred, _letter_of(row, answer))},
                mean_score)


def mmbench() -> Metric:
  def score(pred, row):
    picked = choice.mmbench_choice(pred, choice.mmbench_options(row))
    return {"score": float(picked == row["answer"]), "choice": picked, "answer": row["answer"],
            "index": int(row["index"]), "category": row["category"], "l2_category": row["L2-category"]}

  return Metric("mmbench_circular", score, choice.mmbench_scores)


def seedbench(data_type: str = "data_type") -> Metric:
  def score(pred, row):
    return {"score": float(choice.seed_choice(pred).lower().strip() == row["answer"].lower().strip()),
            "data_type": row[data_type]}

  return Metric("seed", score, lambda records: mean_score(records, by="data_type"))


def videomme() -> Metric:
  def score(pred, row):
    picked = choice.extract_choice(pred, ["A", "B", "C", "D"])
    return {"score": float(picked.lower() == row["answer"].lower()), "duration": row["duration"]}

  return Metric("videomme", score, lambda records: mean_score(records, by="duration"))


def mvbench() -> Metric:
  def score(pred, row):
    target = string.ascii_uppercase[list(row["candidates"]).index(row["answer"])]
    return {"score": float(choice.mvbench_choice(pred) == choice.mvbench_choice(target)), "answered": pred != ""}

  def aggregate(records):  # MVBench averages over the non-empty answers
    answered = [r for r in records if r["answered"]]
    return {"accuracy": sum(r["score"] for r in answered) / len(answered) if answered else 0.0}

  return Metric("mvbench", score, aggregate)


__all__ = ["Metric", "choice", "exact_match", "mean_score", "mme", "mmbench", "mvbench", "pope", "scienceqa",
           "seedbench", "videomme", "vqa", "vqa_accuracy", "yesno"]
