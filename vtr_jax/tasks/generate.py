"""Answering a task: batched generation with the checkpoint's chat template, stop strings, and scoring.

`answer` is the one generation path (`run_task` and the lmms-eval model both use it): prompts
rendered by the chat template are tokenized (the tokenizer's own special tokens added unless the
text already starts with the BOS token, as transformers' processors do), left-padded to a power of
two, batched with the last row repeated to a fixed batch size (one compiled program per prompt
length bucket), decoded greedily with the KV cache (`vtr_jax.models.vlm.generate`) under the
reduction plan, cut at the first end-of-sequence token, decoded, cut at the first stop string and
stripped.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image

from vtr_jax.chat import ChatTemplate
from vtr_jax.data import vqa
from vtr_jax.data.tokenizer import Tokenizer
from vtr_jax.models.vlm import VLM, generate, pad_prompts
from vtr_jax.tasks import loading
from vtr_jax.tasks.base import Task, get


def truncate(text: str, stop: Sequence[str]) -> str:
  """`text` up to the first occurrence of any stop string (lmms-eval's `until`)."""
  for s in stop:
    if s:
      text = text.split(s)[0]
  return text


def _bucket(n: int) -> int:
  """Prompt length a batch is padded to: the next power of two (>= 8)."""
  return max(8, 1 << (n - 1).bit_length())


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str]) -> list[list[int]]:
  """Token ids of rendered prompts; special tokens added unless the text starts with the BOS token."""
  bos = tokenizer.bos_token
  return [tokenizer.encode(p, add_special_tokens=not (bos and p.startswith(bos))) for p in prompts]


def render(template: ChatTemplate, tokenizer: Tokenizer, text: str) -> str:
  """The prompt for a question: the template's user turn with the image first, or, when the text already holds
  the image placeholder (LLaVA-style data), with the placeholder where the text puts it."""
  return template.prompt(text, images=0 if tokenizer.image_token in text else 1)


def _decode(tokenizer: Tokenizer, ids: np.ndarray, eos: Sequence[int]) -> str:
  ids = list(ids)
  cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
  return tokenizer.decode(ids[:cut], skip_special_tokens=True)


def answer(model: VLM, params, tokenizer: Tokenizer, prompts: Sequence[str], images: Sequence[Image.Image], *,
           max_new_tokens: int, stop: Sequence[str] = (), reduction: str | None = None, batch_size: int = 8,
           progress: Callable[[int], Any] | None = None) -> list[str]:
  """Greedy answers to rendered prompts, one image each.

  Args:
    model, params: the VLM and its parameters.
    tokenizer: the checkpoint's tokenizer (its image token is the placeholder).
    prompts: chat-template-rendered texts, each with one image placeholder.
    images: one PIL image per prompt (resized and normalised for the tower).
    max_new_tokens: generation length; stop: strings that end an answer.
    reduction: a reduction plan string ("visionzip:keep=64", "none" or None: the full model).
    batch_size: prompts per compiled call (the last batch repeats its final prompt).
    progress: called with the number of prompts done after each batch.
  Returns the answers, stripped. Raises ValueError for a prompt without exactly one image
  placeholder or longer than the model's context.
  """
  if len(prompts) != len(images):
    raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
  cfg = model.config
  for i, p in enumerate(prompts):
    if p.count(tokenizer.image_token) != 1:
      raise ValueError(f"prompt {i} holds the image placeholder {tokenizer.image_token!r} "
                       f"{p.count(tokenizer.image_token)} times (needs exactly once); its start: {p[:200]!r}")
  ids = encode_prompts(tokenizer, prompts)
  pad = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.pad_token_id) if i is not None)
  out = []
  for start in range(0, len(ids), batch_size):
    index = [min(start + j, len(ids) - 1) for j in range(batch_size)]
    batch = [ids[i] for i in index]
    longest = max(len(p) for p in batch)
    context = longest - 1 + cfg.image_positions + max_new_tokens
    if context > cfg.text.max_positions:
      worst = index[int(np.argmax([len(p) for p in batch]))]
      raise ValueError(f"prompt {worst} has {longest} tokens: with {cfg.image_positions} image positions and "
                       f"{max_new_tokens} new tokens it needs {context} positions, more than the model's "
                       f"{cfg.text.max_positions}")
    tokens, valid = pad_prompts(batch, pad, min(_bucket(longest), cfg.text.max_positions))
    pixels = vqa.pixels([{"image": images[i]} for i in index], cfg.vision)
    result = generate(model, params, pixels, tokens, valid, max_new_tokens=max_new_tokens, reduction=reduction)
    generated = np.asarray(jax.device_get(result.tokens))
    done = min(batch_size, len(ids) - start)
    out += [truncate(_decode(tokenizer, g, cfg.eos_token_ids), stop).strip() for g in generated[:done]]
    if progress is not None:
      progress(done)
  return out


def _reference(task: Task, row) -> Any:
  value = row.get(task.target)
  return [a["answer"] if isinstance(a, dict) else a for a in value] if isinstance(value, list) else value


def run_task(model: VLM, params, tokenizer: Tokenizer, task_name: str | Task, data_dir: str,
             reduction: str | None = None, num_examples: int = 0, batch_size: int = 8, *, template: ChatTemplate,
             max_new_tokens: int | None = None, split: str | None = None, cache_dir: str | None = None,
             progress: bool = False) -> tuple[list[dict], dict[str, float]]:
  """Evaluates one model on one task under one reduction plan.

  Args:
    model, params, tokenizer: a loaded checkpoint (`vtr_jax.load`).
    task_name: a registered task (`vtr_jax.tasks.known()`) or a `Task`.
    data_dir: the task's dataset, a local copy in its Hub layout (`vtr_jax.tasks.load`).
    reduction: a reduction plan string; None or "none" runs the full model.
    num_examples: the first n rows only (0: all).
    batch_size: prompts per compiled generation call.
    template: the checkpoint's chat template (`vtr_jax.chat.load(checkpoint_dir)`).
    max_new_tokens: overrides the task's generation length.
    split: overrides the task's split; cache_dir: `datasets`' cache.
    progress: show a progress bar.
  Returns:
    (per-example records [{`id`, `prompt`, `prompt_tokens`, `prediction`, `reference`, `score`}], the task's metric
    values, its headline value also under `score` and the example count under `examples`).
  Raises UnknownTaskError, FileNotFoundError / ColumnError for the data, UnsupportedInputError for
  video or multi-image tasks.
  """
  task = get(task_name) if isinstance(task_name, str) else task_name
  task.check_supported()
  data = loading.load(task, data_dir, split=split, num_examples=num_examples, cache_dir=cache_dir)
  rows = list(data)
  texts = [task.text(row) for row in rows]
  prompts = [render(template, tokenizer, t) for t in texts]
  images = [loading.image_of(task, row) for row in rows]
  params = jax.device_put(params)
  from tqdm import tqdm
  with tqdm(total=len(rows), desc=f"{task.name} [{reduction or 'none'}]", disable=not progress) as bar:
    answers = answer(model, params, tokenizer, prompts, images, max_new_tokens=max_new_tokens or task.max_new_tokens,
                     stop=task.stop, reduction=reduction, batch_size=batch_size, progress=bar.update)
  records = [task.metric.score(a, row) for a, row in zip(answers, rows)]
  lengths = [len(ids) for ids in encode_prompts(tokenizer, prompts)]
  predictions = [{"id": row.get("question_id", row.get("index", i)), "prompt": p, "prompt_tokens": n,
                  "prediction": a, "reference": _reference(task, row), "score": r["score"]}
                 for i, (row, p, n, a, r) in enumerate(zip(rows, prompts, lengths, answers, records))]
  values = task.metric.aggregate(records)
  return predictions, {**values, "score": values[task.metric.primary], "examples": float(len(rows))}
