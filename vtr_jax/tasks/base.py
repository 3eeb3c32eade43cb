"""A benchmark task as a small declarative definition, and the registry of tasks by name."""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from vtr_jax.metrics import Metric


class UnknownTaskError(KeyError, ValueError):
  """A task name that is not registered."""

  def __str__(self):
    return self.args[0]


class UnsupportedInputError(NotImplementedError):
  """A task needs a visual input the model assembly cannot take yet (several images, video)."""


VISUALS = ("image", "video")


@dataclasses.dataclass(frozen=True)
class Task:
  """What a benchmark asks and how it is scored.

  Attributes:
    name: the registry name (`pope`, `gqa`, ...).
    columns: the dataset columns the prompt and the metric read (the loader checks them).
    prompt: row -> the question text of the user turn (the chat template adds the image and the
      roles), or a `str.format` template over the row's columns.
    metric: how answers are scored (`vtr_jax.metrics`).
    split: the split it evaluates (a local directory with a single split uses that one).
    max_new_tokens: generation length.
    stop: generation is cut at the first of these strings (lmms-eval's `until`; its default is
      a blank line).
    visual: `image` (one image per row) or `video`.
    visual_column: the column holding it: an image (decoded by `datasets`, or a path relative to
      the data), a list of images, or for video a file name.
    config: the Hub dataset's config folder (`ScienceQA-IMG`, `en`, ...), used when the data
      directory has it.
    data_files: a glob (relative to the data directory) choosing the data files, where the Hub
      layout holds several configs' files side by side (MVBench's `json/<subtask>.json`).
    images: for datasets that keep images in a table of their own (GQA): (its config folder, the
      question column naming the image, the image table's id column).
    target: the column shown as the reference answer in per-example outputs.
    source: the Hub dataset and the lmms-eval task the definition follows.
  """
  name: str
  columns: tuple[str, ...]
  prompt: Callable[[Mapping], str] | str
  metric: Metric
  split: str
  max_new_tokens: int
  stop: tuple[str, ...] = ("\n\n",)
  visual: str = "image"
  visual_column: str = "image"
  config: str | None = None
  data_files: str | None = None
  images: tuple[str, str, str] | None = None
  target: str = "answer"
  source: str = ""

  def __post_init__(self):
    if self.visual not in VISUALS:
      raise ValueError(f"task {self.name!r}: visual must be one of {VISUALS}, got {self.visual!r}")
    if self.max_new_tokens < 1:
      raise ValueError(f"task {self.name!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

  def text(self, row: Mapping) -> str:
    """The question text of a row."""
    return self.prompt.format(**row) if isinstance(self.prompt, str) else self.prompt(row)

  def check_supported(self) -> None:
    """Raises UnsupportedInputError when the model assembly cannot take this task's visual input."""
    if self.visual == "video":
      raise UnsupportedInputError(
          f"task {self.name!r} needs video input (frames per visual placeholder); vtr_jax's VLM takes one image "
          "per prompt (vtr_jax.models.vlm): multi-image / video inputs are not implemented yet")


_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
  """Adds a task under its name (replacing one of the same name)."""
  _REGISTRY[task.name] = task
  return task


def known() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> Task:
  """The task called `name`; UnknownTaskError lists the known ones."""
  if name not in _REGISTRY:
    raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(known())}")
  return _REGISTRY[name]
