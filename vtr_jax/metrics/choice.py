"""Multiple choice: reading the chosen option out of a generated answer, per benchmark, as lmms-eval does.

- `extract_choice`: lmms-eval's robust extractor (VideoMME; MMBench's static evaluation): candidate
  letters in formats ranked start > end > "answer is X" > (X) > X. > X: > X) > "X " > anywhere;
  the best format wins, then the last position.
- `scienceqa_correct`: LLaVA's rule: the answer equals the letter, or starts with "X.".
- `mmbench_choice`: MMBench's own matcher (a lone letter, or a letter with punctuation, or the one
  option text contained in the answer), else `extract_choice` over the options; `mmbench_scores`
  is its circular evaluation (a question counts only if every rotated copy of it, index + k * 1e6,
  is answered right).
- `seed_choice`: SEED-Bench's rule: the first character of a longer answer.
- `mvbench_choice`: MVBench's: "X. text" gives X, else after VQA-style punctuation processing the
  first stand-alone letter A-E (case-insensitive: the article "a" reads as A), else the text.
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Mapping, Sequence

from vtr_jax.metrics.vqa import process_punctuation

LETTERS = tuple(string.ascii_uppercase)
DEFAULT_CHOICES = LETTERS[:8]
ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}


def extract_choice(response: str, choices: Sequence[str] | None = None) -> str:
  """The option letter a free-form answer chooses, or "" (lmms-eval's `extract_mcq_answer`)."""
  if not response or not response.strip():
    return ""
  choices = list(choices or DEFAULT_CHOICES)
  text = response.strip()
  for char in ",.!?;:'\"":
    text = text.strip(char)
  text = f" {text} "
  found = []  # (letter, position, format)
  for fmt, (pre, post) in (("parentheses", ("(", ")")), ("period", ("", ".")), ("colon", ("", ":")),
                           ("right_paren", ("", ")")), ("space", ("", " "))):
    found += [(c, text.rfind(pre + c + post), fmt) for c in choices if pre + c + post in text]
  lower = text.lower()
  for phrase in ANSWER_PHRASES:
    at = lower.find(phrase)
    if at != -1:
      found += [(c, text.find(c, at + len(phrase)), "phrase") for c in choices if text.find(c, at + len(phrase)) != -1]
  bare = text.strip()
  found += [(c, 0, "start") for c in choices if bare.startswith(c) and (len(bare) == 1 or not bare[1].isalpha())]
  found += [(c, len(text) - 1, "end") for c in choices
            if bare.endswith(c) and (len(bare) == 1 or not bare[-2].isalpha())]
  if not found:
    found = [(c, text.rfind(c), "fallback") for c in choices if c in text]
  if not found:
    return ""
  return max(found, key=lambda f: (_PRIORITY[f[2]], f[1]))[0]


def scienceqa_correct(prediction: str, target: str) -> float:
  """1.0 when the answer is the target letter (any case) or starts with "<target>."."""
  pred, target = prediction.strip(), target.strip().lower()
  if pred.lower() == target:
    return 1.0
  if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
    return float(pred[0].lower() == target)
  return 0.0


# ---- MMBench ----------------------------------------------------------------------------------
def _missing(value) -> bool:
  return value is None or (isinstance(value, float) and math.isnan(value))


def mmbench_options(row: Mapping) -> dict[str, str]:
  """The options A-D of an MMBench row (a column that is absent reads as the text "nan", as in lmms-eval)."""
  return {c: row.get(c, "nan") for c in "ABCD" if not _missing(row.get(c, "nan"))}


def _infer_letter(answer: str, num_choice: int = 5) -> str | None:
  choices = LETTERS[:num_choice]
  if "Failed to obtain answer via API" in answer:
    return None
  words = [w.strip() for w in answer.split()]
  count = lambda pre="", post="": sum(pre + c + post in words for c in choices)  # noqa: E731
  if count() == 1 and not ("A" in words and len(words) > 3):  # a lone "A" in a sentence may be the article
    return next(c for c in choices if c in words)
  for pre, post in (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                    (":", ","), (":", "."), (":", ")"), (":", ").")):
    if count(pre, post) == 1:
      return next(c for c in choices if pre + c + post in words)
  return None


def _infer_text(answer: str, options: Mapping[str, str]) -> str | None:
  answer = answer.lower()
  hits = [k for k, v in options.items() if str(v).lower() in answer]
  return hits[0] if len(hits) == 1 else None


def mmbench_choice(prediction: str, options: Mapping[str, str]) -> str:
  """The letter MMBench's static evaluation reads from an answer ("" when none)."""
  return (_infer_letter(prediction) or _infer_text(prediction, options)
          or extract_choice(prediction, sorted(options)))


def mmbench_scores(records: Sequence[Mapping]) -> dict[str, float]:
  """Circular accuracy from records {`index`, `choice`, `answer`, `category`, `l2_category`}.

  A question (index < 1e6) is right when every record with index % 1e6 equal to it chose its own
  answer. Returns `accuracy` and `category/<name>`, `l2_category/<name>` over the questions.
  """
  circular = int(1e6)
  groups: dict[int, list[Mapping]] = collections.defaultdict(list)
  for r in records:
    groups[int(r["index"]) % circular].append(r)
  main = [r for r in records if int(r["index"]) < circular]
  hit = {int(r["index"]): all(g["choice"] == g["answer"] for g in groups[int(r["index"])]) for r in main}
  out = {"accuracy": sum(hit.values()) / len(hit) if hit else 0.0}
  for key in ("category", "l2_category"):
    by: dict[str, list[bool]] = collections.defaultdict(list)
    for r in main:
      by[r[key]].append(hit[int(r["index"])])
    out.update({f"{key}/{k}": sum(v) / len(v) for k, v in sorted(by.items())})
  return out


# ---- SEED-Bench, MVBench ------------------------------------------------------------------------
def seed_choice(prediction: str) -> str:
  """The first character of a stripped answer longer than one character."""
  pred = prediction.strip()
  return pred[0] if len(pred) > 1 else pred


_OPTION = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_MVBENCH_DIGIT_COMMA = re.compile(r"(\d)(\,)(\d)")
_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def mvbench_choice(answer: str) -> str:
  """MVBench's reading of an answer (or of the target letter): an upper-case letter, or the processed text."""
  match = _OPTION.match(answer.strip())
  if match:
    return match.group(1).upper()
  text = process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip(), _MVBENCH_DIGIT_COMMA)
  text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
  letter = _LETTER.search(text)
  return letter.group(1).upper() if letter else text
