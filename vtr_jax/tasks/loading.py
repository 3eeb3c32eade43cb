"""A task's data from a local directory, in the layouts the Hub versions ship (nothing is downloaded).

Layouts read (with `datasets`):
- parquet / arrow files named by split, at the top or under `data/` or the task's config folder
  (`lmms-lab/POPE`'s `data/test-00000-of-00003.parquet`, `lmms-lab/ScienceQA`'s
  `ScienceQA-IMG/test-*.parquet`, `lmms-lab/MMBench`'s `en/dev-*.parquet`);
- JSON / JSON-lines files beside an image folder, the image column holding paths relative to the
  JSON file, the data directory or its `images/` folder (LLaVA-style evaluation files);
- a `save_to_disk` directory;
- GQA's two tables (questions and images in their own config folders), joined on the image id.
A directory with one split serves the task whatever that split is called.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator, Mapping

import datasets
from PIL import Image

from vtr_jax.data.vqa import ColumnError
from vtr_jax.tasks.base import Task, UnsupportedInputError, get

DATA_EXTENSIONS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def _data_files(root: str, pattern: str | None) -> dict[str, list[str]]:
  """{split: files} of the first kind of data file found (parquet, arrow, json, csv)."""
  if pattern is not None:
    files = sorted(glob.glob(os.path.join(root, pattern), recursive=True))
  else:
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*"), recursive=True) if os.path.isfile(f))
  by_builder: dict[str, list[str]] = {}
  for f in files:
    ext = os.path.splitext(f)[1]
    if ext in DATA_EXTENSIONS and os.path.basename(f) not in ("dataset_info.json", "state.json", "dataset_dict.json"):
      by_builder.setdefault(DATA_EXTENSIONS[ext], []).append(f)
  for builder in ("parquet", "arrow", "json", "csv"):
    if builder in by_builder:
      splits: dict[str, list[str]] = {}
      for f in by_builder[builder]:
        splits.setdefault(os.path.basename(f).split("-")[0].split(".")[0], []).append(f)
      return {"builder": builder, **splits}
  raise FileNotFoundError(f"no data files ({', '.join(DATA_EXTENSIONS)}) under {root}"
                          + (f" matching {pattern!r}" if pattern else ""))


def _read(root: str, pattern: str | None, cache_dir: str | None) -> tuple[datasets.DatasetDict, list[str]]:
  """(the splits, the folders holding their data files)."""
  if pattern is None and any(os.path.exists(os.path.join(root, f)) for f in ("dataset_dict.json", "state.json")):
    data = datasets.load_from_disk(root)
    return (data if isinstance(data, datasets.DatasetDict) else datasets.DatasetDict({"data": data})), [root]
  files = _data_files(root, pattern)
  builder = files.pop("builder")
  folders = list(dict.fromkeys(os.path.dirname(f) for fs in files.values() for f in fs))
  return datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir), folders


def _split(data: datasets.DatasetDict, split: str, root: str) -> tuple[datasets.Dataset, str]:
  if split in data:
    return data[split], split
  if len(data) == 1:
    (name, ds), = data.items()
    return ds, name
  raise ValueError(f"split {split!r} is not in {root}; available splits: {sorted(data)}")


def _check_columns(ds: datasets.Dataset, columns, where: str, task: Task) -> None:
  missing = [c for c in columns if c not in ds.column_names]
  if missing:
    raise ColumnError(f"task {task.name!r} needs column(s) {missing}, which {where} lacks; "
                      f"available columns: {ds.column_names}")


def _resolve_paths(ds: datasets.Dataset, column: str, bases: list[str]) -> datasets.Dataset:
  """A column of image paths -> absolute paths (tried against each base) decoded as images."""
  def resolve(path):
    if path is None or os.path.isabs(path):
      return path
    for base in bases:
      if os.path.exists(os.path.join(base, path)):
        return os.path.join(base, path)
    raise FileNotFoundError(f"image {path!r} not found under {bases}")

  ds = ds.map(lambda p: {column: resolve(p)}, input_columns=column)
  return ds.cast_column(column, datasets.Image())


class TaskData:
  """A task's rows (`len`, `data[i]` -> dict with the visual input in `task.visual_column`).

  Attributes:
    task: the task; split: the split read; source: the directory.
    rows: the questions as a `datasets.Dataset`.
  """

  def __init__(self, task: Task, rows: datasets.Dataset, split: str, source: str,
               images: datasets.Dataset | None = None):
    self.task, self.rows, self.split, self.source = task, rows, split, source
    self._images = images
    self._image_row: dict[Any, int] = {}
    if images is not None:
      _, key, id_column = task.images
      self._image_row = {v: i for i, v in enumerate(images[id_column])}
      unknown = sorted(set(rows[key]) - set(self._image_row))
      if unknown:
        raise ValueError(f"task {task.name!r}: {len(unknown)} image ids in column {key!r} are not in the image "
                         f"table (first: {unknown[:3]})")

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> dict:
    row = dict(self.rows[int(i)])
    if self._images is not None:
      row[self.task.visual_column] = self._images[self._image_row[row[self.task.images[1]]]]["image"]
    return row

  def __iter__(self) -> Iterator[dict]:
    return (self[i] for i in range(len(self)))

  def head(self, n: int) -> "TaskData":
    """The first n rows (all when n is 0 or more than there are)."""
    if not n or n >= len(self):
      return self
    return TaskData(self.task, self.rows.select(range(n)), self.split, self.source, self._images)


def image_of(task: Task, row: Mapping) -> Image.Image:
  """The one image of a row; UnsupportedInputError for several (multi-image input is not implemented yet)."""
  task.check_supported()
  value = row[task.visual_column]
  if isinstance(value, (list, tuple)):
    if len(value) != 1:
      raise UnsupportedInputError(
          f"task {task.name!r}: a row has {len(value)} images; vtr_jax's VLM takes one image per prompt "
          "(multi-image inputs are not implemented yet)")
    value = value[0]
  if not isinstance(value, Image.Image):
    raise ValueError(f"task {task.name!r}: column {task.visual_column!r} holds {type(value).__name__}, not an image")
  return value


def load(task: Task | str, data_dir: str, *, split: str | None = None, num_examples: int = 0,
         cache_dir: str | None = None) -> TaskData:
  """A task's rows from `data_dir` (see the module docstring for the layouts).

  Args:
    task: a `Task` or its registered name.
    data_dir: the local copy of the task's dataset.
    split: overrides `task.split`.
    num_examples: the first n rows only (0: all).
    cache_dir: where `datasets` may cache converted files.
  Raises UnknownTaskError (listing the known tasks), FileNotFoundError naming a missing directory
  or data files, ColumnError naming a missing column.
  """
  task = get(task) if isinstance(task, str) else task
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"data directory {data_dir!r} for task {task.name!r} does not exist")
  root = os.path.join(data_dir, task.config) if task.config and os.path.isdir(
      os.path.join(data_dir, task.config)) else data_dir
  data, folders = _read(root, task.data_files, cache_dir)
  rows, split_name = _split(data, split or task.split, root)
  images = None
  if task.images is not None and task.visual_column not in rows.column_names:
    folder, _, id_column = task.images
    images_root = os.path.join(data_dir, folder)
    if not os.path.isdir(images_root):
      raise FileNotFoundError(f"task {task.name!r}: the questions in {root} have no {task.visual_column!r} column "
                              f"and the image table {images_root!r} does not exist")
    images, _ = _split(_read(images_root, None, cache_dir)[0], split or task.split, images_root)
    _check_columns(images, (id_column, "image"), images_root, task)
    _check_columns(rows, task.columns, root, task)
  else:
    _check_columns(rows, (*task.columns, task.visual_column), root, task)
  if task.visual == "image" and rows.features.get(task.visual_column) == datasets.Value("string"):
    bases = [*folders, root, data_dir, os.path.join(data_dir, "images")]
    rows = _resolve_paths(rows, task.visual_column, list(dict.fromkeys(bases)))
  return TaskData(task, rows, split_name, data_dir, images).head(num_examples)
