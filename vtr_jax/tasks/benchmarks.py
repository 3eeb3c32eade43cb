"""The benchmarks, each as lmms-eval defines it (prompt, generation length, stop strings, split, metric).

Prompts are lmms-eval's `doc_to_text` with its default model settings; the chat template around
them is the checkpoint's. Where lmms-eval leaves the generation length to the model (TextVQA,
VizWiz, SEED-Bench: its LLaVA models default to 1024 new tokens), 16 are generated: these
tasks want a word or a letter.
"""

from __future__ import annotations

import math
from typing import Mapping

from vtr_jax import metrics
from vtr_jax.tasks.base import Task, register

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def _mme_prompt(row: Mapping) -> str:
  return row["question"].strip().replace(" Please answer yes or no.", "") + SHORT


def _scienceqa_prompt(row: Mapping) -> str:
  options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(row["choices"]))
  context = f"Context: {row['hint']}\n" if row["hint"] else ""
  return f"{context}{row['question']}\n{options}{LETTER}"


def _present(value) -> bool:
  return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != "nan"


def _mmbench_prompt(row: Mapping) -> str:
  options = "There are several options:\n" + "".join(
      f"{c}. {row[c]}\n" for c in "ABCDE" if c in row and row[c] and _present(row[c]))
  options = options.rstrip("\n")
  hint = row["hint"]
  query = f"{hint} {row['question']} {options}" if _present(hint) else f"{row['question']} {options}"
  return f"{query}\n{LETTER}"


def _seed_prompt(row: Mapping) -> str:
  return (f"{row['question']}\nA. {row['choice_a']}\nB. {row['choice_b']}\nC. {row['choice_c']}\n"
          f"D. {row['choice_d']}{LETTER}")


def _videomme_prompt(row: Mapping) -> str:
  return ("Select the best answer to the following multiple-choice question based on the video and the subtitles. "
          "Respond with only the letter (A, B, C, or D) of the correct option.\n"
          f"{row['question']}\n" + "\n".join(row["options"]) + "\n" + LETTER)


def _mvbench_prompt(row: Mapping) -> str:
  options = "".join(f"({chr(ord('A') + i)}) {c}\n" for i, c in enumerate(row["candidates"]))
  return f"Question:{row['question']}\nOption:\n{options}Only give the best option.\n"


POPE = register(Task(
    "pope", ("question", "answer", "question_id"), lambda r: r["question"].strip() + SHORT, metrics.pope(),
    split="test", max_new_tokens=128, source="lmms-lab/POPE; lmms-eval pope"))
GQA = register(Task(
    "gqa", ("question", "answer", "imageId"), "{question}" + SHORT, metrics.exact_match("answer"),
    split="testdev", max_new_tokens=16, config="testdev_balanced_instructions",
    images=("testdev_balanced_images", "imageId", "id"), source="lmms-lab/GQA; lmms-eval gqa"))
TEXTVQA = register(Task(
    "textvqa", ("question", "answers"), lambda r: r["question"].capitalize() + SHORT,
    metrics.vqa_accuracy("evalai"), split="validation", max_new_tokens=16, stop=("ASSISTANT:",),
    target="answers", source="lmms-lab/textvqa; lmms-eval textvqa_val"))
VQAV2 = register(Task(
    "vqav2", ("question", "answers"), "{question}" + SHORT, metrics.vqa_accuracy("vqav2"), split="validation",
    max_new_tokens=16, target="multiple_choice_answer", source="lmms-lab/VQAv2; lmms-eval vqav2_val"))
VIZWIZ = register(Task(
    "vizwiz_vqa", ("question", "answers"),
    lambda r: r["question"].capitalize() + "\nWhen the provided information is insufficient, respond with "
    "'Unanswerable'." + SHORT, metrics.vqa_accuracy("evalai"), split="val", max_new_tokens=16,
    stop=("ASSISTANT:",), target="answers", source="lmms-lab/VizWiz-VQA; lmms-eval vizwiz_vqa_val"))
MME = register(Task(
    "mme", ("question", "answer", "question_id", "category"), _mme_prompt, metrics.mme(), split="test",
    max_new_tokens=16, source="lmms-lab/MME; lmms-eval mme"))
SCIENCEQA_IMG = register(Task(
    "scienceqa_img", ("question", "choices", "answer", "hint"), _scienceqa_prompt, metrics.scienceqa(),
    split="test", max_new_tokens=16, config="ScienceQA-IMG", source="lmms-lab/ScienceQA; lmms-eval scienceqa_img"))
MMBENCH = register(Task(
    "mmbench", ("index", "question", "hint", "answer", "A", "B", "category", "L2-category"), _mmbench_prompt,
    metrics.mmbench(), split="dev", max_new_tokens=1024, stop=("ASSISTANT:",), config="en",
    source="lmms-lab/MMBench (en); lmms-eval mmbench_en_dev_static"))
SEEDBENCH = register(Task(
    "seedbench", ("question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type"), _seed_prompt,
    metrics.seedbench(), split="test", max_new_tokens=16, stop=("ASSISTANT:",),
    source="lmms-lab/SEED-Bench; lmms-eval seedbench"))
VIDEOMME = register(Task(
    "videomme", ("question", "options", "answer", "duration", "videoID"), _videomme_prompt, metrics.videomme(),
    split="test", max_new_tokens=16, visual="video", visual_column="videoID",
    source="lmms-lab/Video-MME; lmms-eval videomme"))
MVBENCH = register(Task(
    "mvbench", ("question", "candidates", "answer", "video"), _mvbench_prompt, metrics.mvbench(),
    split="action_count", max_new_tokens=16, visual="video", visual_column="video", data_files="json/*.json",
    source="OpenGVLab/MVBench (split = the subtask, json/<subtask>.json); lmms-eval mvbench_<subtask>"))
