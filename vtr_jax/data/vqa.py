"""VQA datasets: the bundled benchmark stored with `datasets`, Hub-style local data, and model batches.

Rows everywhere have the columns `image` (a PIL image, or uint8[h, w, 3] for
examples generated on the fly), `question`, `answer` and `family`; the
bundled benchmark adds `scene` (the scene as JSON, see `scenes.Scene`) and
`index`.

Prompt template (`PROMPT`), five tokens around the question:

    <image> question: what colour is the star ? answer:

The answer follows as the next token(s). With the benchmark's word-level
tokenizer (`tokenizer()`, built on `vocabulary()`) every answer is one
token, prompts are at most `PROMPT_LENGTH` tokens and a training sequence
(prompt, answer, end of sequence) at most `TRAIN_LENGTH`.

Two ways to get the bundled benchmark:
- stored: `build(directory, sizes)` writes a `DatasetDict` with
  `save_to_disk`; `load(directory, split)` reads it back (PNG images, exact).
- on the fly, for training on many examples without storing them:
  `stream(split, batch_size, ...)` yields lists of rows per step, made here
  or ahead in worker processes; step `s` always holds the same examples, so
  a resumed run sees the same data.

`prompt_batch` and `train_batch` turn rows into numpy model inputs (left
padding, one image placeholder per prompt, pixels normalised by
`vit.preprocess`).
"""

from __future__ import annotations

import collections
import functools
import io
import multiprocessing
import os
import tempfile
from typing import Iterator, Mapping, NamedTuple, Sequence

import datasets
import numpy as np
from PIL import Image

from vtr_jax.data import scenes
from vtr_jax.data.tokenizer import Tokenizer
from vtr_jax.models import vit
from vtr_jax.models.vlm import check_prompts, pad_prompts

PROMPT = "{image} question: {question} answer:"
PROMPT_WORDS = ("question", ":", "answer")
PROMPT_LENGTH = 17  # the longest benchmark prompt, a `larger` question, in tokens
TRAIN_LENGTH = PROMPT_LENGTH + 2  # + answer + end of sequence

COLUMNS = ("image", "question", "answer", "family")  # what `load` returns, at least
FEATURES = datasets.Features({
    "image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"),
    "family": datasets.Value("string"), "scene": datasets.Value("string"), "index": datasets.Value("int64"),
})
DEFAULT_SIZES = {"train": 14_000, "val": 700, "test": 1_400}  # multiples of 7: every family equally often


class ColumnError(ValueError):
  """A dataset lacks a column that was asked for."""


def vocabulary() -> list[str]:
  """Every word of the benchmark's prompts and answers, in a fixed order (ids depend on it)."""
  return [*PROMPT_WORDS, *(w for w in scenes.words() if w not in PROMPT_WORDS)]


def tokenizer() -> Tokenizer:
  """The benchmark's word-level tokenizer: `Tokenizer.word_level(vocabulary())`, carrying the chat template that
  renders `PROMPT` (`vtr_jax.chat.SHAPES_TEMPLATE`), so trained exports evaluate on real tasks as they train."""
  from vtr_jax.chat import SHAPES_TEMPLATE
  return Tokenizer.word_level(vocabulary(), chat_template=SHAPES_TEMPLATE)


def format_prompt(question: str, image_token: str = "<image>") -> str:
  """The prompt for a question; image placeholders already in the question (LLaVA-style data) are removed."""
  question = " ".join(question.replace(image_token, " ").split())
  return PROMPT.format(image=image_token, question=question)


# -- the bundled benchmark on disk ---------------------------------------------------------------

def _png(image: np.ndarray) -> dict:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return {"bytes": buf.getvalue(), "path": None}


def _rows(split: str, indices: Sequence[int], config: scenes.SceneConfig) -> list[dict]:
  return [scenes.generate_example(split, i, config).row() for i in indices]


def _stored_rows(split: str, indices: Sequence[int], config: scenes.SceneConfig) -> list[dict]:
  return [{**row, "image": _png(row["image"])} for row in _rows(split, indices, config)]


def _pool(workers: int):
  """Spawned, not forked (the parent may hold JAX's threads): the caller's `__main__` must be importable."""
  return multiprocessing.get_context("spawn").Pool(workers)


def _generate_stored(split: str, start: int, stop: int, config: scenes.SceneConfig, workers: int,
                     chunk: int = 64) -> Iterator[dict]:
  chunks = [range(a, min(a + chunk, stop)) for a in range(start, stop, chunk)]
  make = functools.partial(_stored_rows, split, config=config)
  if not workers:
    for c in chunks:
      yield from make(c)
    return
  with _pool(workers) as pool:
    for rows in pool.imap(make, chunks):
      yield from rows


def _from_generator(split: str, num_examples: int, config: scenes.SceneConfig, workers: int, start: int,
                    cache_dir: str, keep_in_memory: bool) -> datasets.Dataset:
  return datasets.Dataset.from_generator(
      _generate_stored, features=FEATURES, cache_dir=cache_dir, keep_in_memory=keep_in_memory,
      gen_kwargs={"split": split, "start": start, "stop": start + num_examples, "config": config,
                  "workers": workers},
      split=datasets.NamedSplit(split))


def build_split(split: str, num_examples: int, config: scenes.SceneConfig = scenes.SceneConfig(), *, start: int = 0,
                workers: int = 0) -> datasets.Dataset:
  """Examples `start .. start + num_examples - 1` of `split` as an in-memory `datasets.Dataset`.

  `workers` processes make the images (0: this process).
  """
  with tempfile.TemporaryDirectory() as tmp:  # a fresh cache: never a stale one from older code
    return _from_generator(split, num_examples, config, workers, start, tmp, keep_in_memory=True)


def build(directory: str, sizes: Mapping[str, int] = DEFAULT_SIZES, config: scenes.SceneConfig = scenes.SceneConfig(),
          *, workers: int = 0) -> datasets.DatasetDict:
  """Writes the first `sizes[split]` examples of each split with `save_to_disk`; returns the saved copy.

  `workers` processes make the images (0: this process).
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    splits = datasets.DatasetDict({
        split: _from_generator(split, n, config, workers, 0, tmp, keep_in_memory=False) for split, n in sizes.items()})
    splits.save_to_disk(directory)
  return datasets.load_from_disk(directory)


# -- any VQA dataset from a local directory --------------------------------------------------------

_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def _read(source: str, cache_dir: str | None):
  if os.path.isdir(source) and any(os.path.exists(os.path.join(source, f))
                                   for f in ("dataset_dict.json", "state.json")):
    return datasets.load_from_disk(source)
  if os.path.isdir(source):  # Hub layout: data files named by split, or an image folder with metadata
    return datasets.load_dataset(source, cache_dir=cache_dir)
  ext = os.path.splitext(source)[1]
  if not os.path.exists(source) or ext not in _FILE_BUILDERS:
    raise FileNotFoundError(f"{source} is neither a dataset directory nor a data file "
                            f"({', '.join(_FILE_BUILDERS)})")
  return datasets.load_dataset(_FILE_BUILDERS[ext], data_files=source, cache_dir=cache_dir)


def _pick_split(data, split: str | None, source: str) -> datasets.Dataset:
  if isinstance(data, datasets.Dataset):
    return data
  names = list(data)
  if split is None:
    if len(names) != 1:
      raise ValueError(f"{source} has splits {names}; pass split=")
    split = names[0]
  if split not in data:
    raise ValueError(f"split {split!r} is not in {source}; available splits: {names}")
  return data[split]


def load(source: str, split: str | None = None, *, columns: Mapping[str, str] | None = None,
         cache_dir: str | None = None) -> datasets.Dataset:
  """A VQA split from a local directory or file, with the standard columns.

  Args:
    source: a `save_to_disk` directory (such as `build`'s), a directory in
      Hub layout (parquet / json / csv files named by split, or an image
      folder with metadata), or a single data file.
    split: which split; may be left out when there is only one.
    columns: standard name -> the dataset's column, for names that differ:
      POPE `{"family": "category"}`, GQA `{"answer": "fullAnswer"}`. A
      dataset column that has a standard name but is not the one mapped to it
      is dropped. Without `family` (mapped or present) every row gets "all".
    cache_dir: where `datasets` may cache converted files (its default
      otherwise).

  Returns a `datasets.Dataset` whose `image` column decodes to PIL images
  (paths in a string column are read relative to `source`'s directory), with
  `question`, `answer`, `family` and the dataset's other columns.

  Raises ColumnError naming the missing column and the available ones.
  """
  unknown = sorted(set(columns or {}) - set(COLUMNS))
  if unknown:
    raise ColumnError(f"columns= maps {unknown}, which are not standard columns; standard: {list(COLUMNS)}")
  ds = _pick_split(_read(source, cache_dir), split, source)
  mapping = {c: c for c in COLUMNS if c != "family" or "family" in ds.column_names} | dict(columns or {})
  for name, column in mapping.items():
    if column not in ds.column_names:
      raise ColumnError(f"column {column!r} (for {name!r}) is not in {source}; available columns: {ds.column_names}")
  renames = {column: name for name, column in mapping.items() if column != name}
  replaced = [c for c in ds.column_names if c in mapping and c not in renames and mapping[c] != c]
  ds = ds.remove_columns(replaced).rename_columns(renames)
  if "family" not in ds.column_names:
    ds = ds.add_column("family", ["all"] * len(ds))
  if not isinstance(ds.features["image"], datasets.Image):
    if ds.features["image"] == datasets.Value("string"):
      base = source if os.path.isdir(source) else os.path.dirname(source)
      ds = ds.map(lambda path: {"image": os.path.join(base, path)}, input_columns="image")
    ds = ds.cast_column("image", datasets.Image())
  return ds


# -- generation on the fly, for training ----------------------------------------------------------

def _batch_indices(step: int, batch_size: int, num_examples: int | None, rows: range) -> list[int]:
  first = step * batch_size
  indices = range(first + rows.start, first + rows.stop)
  return [i % num_examples for i in indices] if num_examples else list(indices)


def stream(split: str, batch_size: int, *, first_step: int = 0, num_examples: int | None = None,
           config: scenes.SceneConfig = scenes.SceneConfig(), workers: int = 0,
           prefetch: int = 2, rows: range | None = None) -> Iterator[list[dict]]:
  """Rows of step `first_step`, `first_step + 1`, ... generated on the fly (without end).

  Step `s` holds examples `s * batch_size ... (s + 1) * batch_size - 1` of
  `split`, taken modulo `num_examples` when it is given (a finite split seen
  for several epochs) and never repeated otherwise. `rows` (a range within
  0..batch_size) makes only those rows of each step's batch: one process's
  share of a global batch (`vtr_jax.sharding.process_rows`). With `workers`
  0 each batch is made in this process when asked for; with `workers` >= 1
  that many spawned processes keep `prefetch` batches each made ahead (one
  worker already overlaps generation with a train step); the batches are
  the same.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  rows = range(batch_size) if rows is None else rows
  if not 0 <= rows.start < rows.stop <= batch_size or rows.step != 1:
    raise ValueError(f"rows={rows} must be a non-empty range of consecutive rows within 0..{batch_size}")
  step = first_step
  if not workers:
    while True:
      yield _rows(split, _batch_indices(step, batch_size, num_examples, rows), config)
      step += 1
  else:
    with _pool(workers) as pool:
      pending = collections.deque()
      while True:
        while len(pending) < workers * prefetch:
          indices = _batch_indices(step, batch_size, num_examples, rows)
          pending.append(pool.apply_async(_rows, (split, indices, config)))
          step += 1
        yield pending.popleft().get()


# -- batches for the model ----------------------------------------------------------------------

class PromptBatch(NamedTuple):
  """Inputs for answering: the answer is predicted at the last prompt position."""
  pixels: np.ndarray  # float32[B, S, S, 3] normalised for the tower
  tokens: np.ndarray  # int32[B, T] prompts, left-padded
  valid: np.ndarray  # bool[B, T]
  answer_ids: np.ndarray  # int32[B] the one-token answers


class TrainBatch(NamedTuple):
  """Prompt, answer and end of sequence, left-padded; the loss reads `targets` where `loss_mask`."""
  pixels: np.ndarray  # float32[B, S, S, 3]
  tokens: np.ndarray  # int32[B, L]
  valid: np.ndarray  # bool[B, L]
  targets: np.ndarray  # int32[B, L] the next token (tokens shifted left by one)
  loss_mask: np.ndarray  # bool[B, L] positions whose next token is part of the answer or its end


def _rgb(image, size: int) -> np.ndarray:
  """A PIL image or uint8[h, w, 3] -> uint8[size, size, 3]."""
  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.asarray(image, np.uint8))
  image = image.convert("RGB")
  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image)


def pixels(rows: Sequence[Mapping], vision: vit.VisionConfig) -> np.ndarray:
  """The rows' images, resized to the tower's size and normalised: float32[B, S, S, 3]."""
  images = np.stack([_rgb(row["image"], vision.image_size) for row in rows])  # uint8[B, S, S, 3]
  return np.asarray(vit.preprocess(images, vision))


def _pad_id(tok: Tokenizer) -> int:
  """Padding id: the pad token, else end of sequence (LLaMA tokenizers have no pad), else 0."""
  for i in (tok.pad_token_id, tok.eos_token_id):
    if i is not None:
      return i
  return 0


def _encode(rows: Sequence[Mapping], tok: Tokenizer) -> tuple[list[list[int]], list[list[int]]]:
  prompts = tok.encode_batch([format_prompt(row["question"], tok.image_token) for row in rows])
  answers = tok.encode_batch([row["answer"] for row in rows], add_special_tokens=False)
  return prompts, answers


def prompt_batch(rows: Sequence[Mapping], tok: Tokenizer, vision: vit.VisionConfig, *,
                 length: int | None = None) -> PromptBatch:
  """Rows -> model inputs for answering; `length` fixes T (else the longest prompt), e.g. PROMPT_LENGTH."""
  prompts, answers = _encode(rows, tok)
  for row, ids in zip(rows, answers):
    if len(ids) != 1:
      raise ValueError(f"answer {row['answer']!r} is {len(ids)} tokens; answer_ids needs one-token answers")
  tokens, valid = pad_prompts(prompts, _pad_id(tok), length)
  check_prompts(tokens, valid, tok.image_token_id)
  return PromptBatch(pixels(rows, vision), tokens, valid, np.array([a[0] for a in answers], np.int32))


def train_batch(rows: Sequence[Mapping], tok: Tokenizer, vision: vit.VisionConfig, *,
                length: int | None = None) -> TrainBatch:
  """Rows -> teacher-forced sequences; `length` fixes L (else the longest), e.g. TRAIN_LENGTH."""
  prompts, answers = _encode(rows, tok)
  eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
  tokens, valid = pad_prompts([p + a + eos for p, a in zip(prompts, answers)], _pad_id(tok), length)
  check_prompts(tokens, valid, tok.image_token_id)
  targets = np.concatenate([tokens[:, 1:], np.full_like(tokens[:, :1], _pad_id(tok))], axis=1)
  answer_lengths = np.array([len(a) + len(eos) for a in answers])
  position = np.arange(tokens.shape[1])[None, :]  # [1, L]
  last = tokens.shape[1] - 1  # sequences end at the right edge (left padding)
  loss_mask = (position >= last - answer_lengths[:, None]) & (position < last)
  return TrainBatch(pixels(rows, vision), tokens, valid, targets, loss_mask)
