"""Yes/no benchmarks: POPE (accuracy, precision, recall, F1, yes-ratio) and MME (perception, cognition).

POPE, as lmms-eval scores it: the answer is the lower-cased, stripped output, compared with the
label exactly ("Yes" counts as yes, "yes." and "Yes, there is" as neither). Precision and recall
count "yes" as the positive class; lmms-eval's `yes_ratio` is the share of *labels* that are
yes, reported under that name for comparability; `pred_yes_ratio` is the share of answers that
are yes (the POPE paper's yes-ratio, a model's bias towards yes).

MME, as its official script (and lmms-eval) scores it: an answer is yes/no after lower-casing,
deleting periods, and reading "y"/"n" or a yes/no within the first 4 characters; per category,
acc is the question accuracy and acc+ the share of images whose two questions are both right,
both in percent; a category scores acc + acc+ (at most 200); perception sums its 10 categories
(at most 2000), cognition its 4 (at most 800).
"""

from __future__ import annotations

import collections
from typing import Mapping, Sequence

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def pope_label(prediction: str) -> str:
  """The answer POPE compares with its label: lower-cased and stripped."""
  return prediction.lower().strip()


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
  """accuracy, precision, recall, f1, yes_ratio (of labels) and pred_yes_ratio of yes/no answers."""
  if len(predictions) != len(labels):
    raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
  labels = [pope_label(a) for a in labels]
  bad = sorted({a for a in labels if a not in ("yes", "no")})
  if bad:
    raise ValueError(f"POPE labels must be yes/no, got {bad}")
  preds = [pope_label(p) for p in predictions]
  n = len(preds)
  tp = sum(p == "yes" and a == "yes" for p, a in zip(preds, labels))
  fp = sum(p == "yes" and a == "no" for p, a in zip(preds, labels))
  fn = sum(p == "no" and a == "yes" for p, a in zip(preds, labels))  # an answer that is neither is no negative
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  return {
      "accuracy": sum(p == a for p, a in zip(preds, labels)) / n if n else 0.0,
      "precision": precision, "recall": recall,
      "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
      "yes_ratio": labels.count("yes") / n if n else 0.0,
      "pred_yes_ratio": preds.count("yes") / n if n else 0.0,
  }


def mme_answer(prediction: str) -> str:
  """`yes`, `no` or `other` (MME's parser)."""
  text = prediction.lower().strip().replace(".", "")
  if text in ("yes", "no"):
    return text
  if len(text) == 1:
    return {"y": "yes", "n": "no"}.get(text, "other")
  head = text[:4]
  return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(records: Sequence[Mapping]) -> dict[str, float]:
  """MME scores from per-question records {`image`, `category`, `correct`}.

  Returns `perception`, `cognition`, `total` and, per category present, `<category>/acc`,
  `<category>/acc_plus` and `<category>/score`. Raises ValueError for an image without exactly
  two questions, or an unknown category.
  """
  by_category: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in records:
    if r["category"] not in MME_PERCEPTION + MME_COGNITION:
      raise ValueError(f"unknown MME category {r['category']!r}; known: {list(MME_PERCEPTION + MME_COGNITION)}")
    by_category[r["category"]][r["image"]].append(float(r["correct"]))
  out: dict[str, float] = {}
  for category, images in sorted(by_category.items()):
    wrong = {k: len(v) for k, v in images.items() if len(v) != 2}
    if wrong:
      raise ValueError(f"MME scores question pairs: in {category!r} these images do not have 2 questions: {wrong}")
    acc = 100.0 * sum(sum(v) / 2 for v in images.values()) / len(images)
    acc_plus = 100.0 * sum(sum(v) == 2 for v in images.values()) / len(images)
    out.update({f"{category}/acc": acc, f"{category}/acc_plus": acc_plus, f"{category}/score": acc + acc_plus})
  out["perception"] = sum(out.get(f"{c}/score", 0.0) for c in MME_PERCEPTION)
  out["cognition"] = sum(out.get(f"{c}/score", 0.0) for c in MME_COGNITION)
  out["total"] = out["perception"] + out["cognition"]
  return out
