"""Open-ended answers: VQA soft accuracy with the EvalAI answer normalisation, and exact match.

The normalisation is the VQA challenge's (EvalAI, the official `vqaEval.py`, mmf's
`EvalAIAnswerProcessor`): lower-case, punctuation removed or turned into spaces, number words
to digits, articles dropped, contractions restored. Its quirks are kept, because published numbers
carry them: a period is removed unless a digit follows it (the reference's look-behind is a typo
that makes it a look-ahead), at most 32 periods go (the reference passes `re.UNICODE` as the
count), and punctuation is deleted instead of spaced whenever any "digit,digit" appears.

Accuracy of an answer against the 10 annotators' answers: min(#matches / 3, 1) averaged over the
10 leave-one-out subsets of 9 annotators.
"""

from __future__ import annotations

import re
import statistics
import string
from typing import Mapping, Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the reference's pattern, verbatim
DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")
_MAX_PERIODS = 32  # re.UNICODE, which the reference passes as `count`


def process_punctuation(text: str, digit_comma: re.Pattern = DIGIT_COMMA) -> str:
  """Deletes punctuation next to a space (or everywhere when "digit,digit" occurs), spaces the rest."""
  out = text
  delete_all = digit_comma.search(text) is not None
  for p in PUNCTUATION:
    out = out.replace(p, "" if delete_all or (p + " " in text or " " + p in text) else " ")
  return PERIOD.sub("", out, _MAX_PERIODS)


def process_digit_article(text: str) -> str:
  """Lower-cases, maps number words to digits, drops articles, restores contractions."""
  words = [NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
  """The full EvalAI answer processing (TextVQA, VizWiz): tokenisation, punctuation, digits, articles."""
  text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(text))


def normalize_vqav2(text: str) -> str:
  """The VQAv2 evaluation's processing: whitespace, punctuation, digits and articles (no tokenisation step)."""
  return process_digit_article(process_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


STYLES = {"evalai": normalize_answer, "vqav2": normalize_vqav2}


def soft_accuracy(prediction: str, answers: Sequence[str | Mapping], style: str = "evalai") -> float:
  """VQA accuracy of one prediction in [0, 1].

  Args:
    prediction: the model's answer.
    answers: the annotators' answers (strings, or VQAv2's `{"answer": ...}` dicts).
    style: `evalai` (TextVQA, VizWiz) or `vqav2` (VQAv2's processing).
  Returns the mean over leave-one-out subsets of min(#matches / 3, 1); 0 without answers.
  """
  if style not in STYLES:
    raise ValueError(f"unknown answer style {style!r}; known: {sorted(STYLES)}")
  norm = STYLES[style]
  gts = [norm(a["answer"] if isinstance(a, Mapping) else a) for a in answers]
  if not gts:
    return 0.0
  pred = norm(prediction)
  matches = sum(g == pred for g in gts)
  return statistics.mean(min(1.0, (matches - (g == pred)) / 3) for g in gts)


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, target: str, *, ignore_case: bool = True, ignore_punctuation: bool = True) -> float:
  """1.0 when equal after lower-casing and deleting ASCII punctuation (HF evaluate's exact_match; GQA)."""
  if ignore_case:
    prediction, target = prediction.lower(), target.lower()
  if ignore_punctuation:
    prediction, target = prediction.translate(_NO_PUNCTUATION), target.translate(_NO_PUNCTUATION)
  return float(prediction == target)
