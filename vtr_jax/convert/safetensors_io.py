"""Reading and writing safetensors files with NumPy (bfloat16 included).

The format is an 8-byte little-endian header length, a JSON header mapping
names to {dtype, shape, data_offsets}, then the raw bytes. Reading is a
memory map with every offset checked, so a truncated or corrupt file raises
a `CheckpointError` naming the file and tensor instead of returning garbage.
No pickle is ever involved.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from vtr_jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str) -> tuple[dict, int]:
  """Returns (tensor entries, byte offset where data starts)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", raw)
    if n > min(_MAX_HEADER, size - 8):
      raise CheckpointError(f"{path}: header length {n} does not fit the file size {size} "
                            "(corrupt or not a safetensors file)")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: header is not a JSON object")
  header.pop("__metadata__", None)
  data_len = size - 8 - n
  for name, entry in header.items():
    try:
      dtype = DTYPES[entry["dtype"]]
      shape = tuple(int(d) for d in entry["shape"])
      start, end = (int(o) for o in entry["data_offsets"])
    except KeyError as e:
      raise CheckpointError(f"{path}: tensor {name!r} has a bad entry {entry!r} (missing or unknown {e})") from None
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not 0 <= start <= end <= data_len or end - start != want:
      raise CheckpointError(f"{path}: tensor {name!r} (dtype {entry['dtype']}, shape {list(shape)}) has data "
                            f"offsets [{start}, {end}) but needs {want} bytes inside {data_len} data bytes "
                            "(truncated or corrupt file)")
  return header, 8 + n


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) for every tensor, memory-mapped and read-only."""
  header, base = read_header(path)
  mm = np.memmap(path, dtype=np.uint8, mode="r")
  for name, entry in header.items():
    start, end = entry["data_offsets"]
    dtype = DTYPES[entry["dtype"]]
    yield name, mm[base + start: base + end].view(dtype).reshape(entry["shape"])


def load_file(path: str) -> dict[str, np.ndarray]:
  return dict(iter_tensors(path))


def save_file(tensors: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors (C-contiguous copies) in name order."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  arrays = []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(np.asarray(tensors[name]))
    if arr.dtype not in _NAMES:
      raise CheckpointError(f"cannot store tensor {name!r} of dtype {arr.dtype} in safetensors")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays.append(arr)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
      f.write(arr.tobytes())
  os.replace(tmp, path)


def checkpoint_files(directory: str) -> list[str]:
  """The safetensors files of a checkpoint directory (single or sharded)."""
  index = os.path.join(directory, "model.safetensors.index.json")
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
    if missing:
      raise CheckpointError(f"{index} lists shards that are not in {directory}: {missing}")
    return [os.path.join(directory, f) for f in files]
  if os.path.exists(single):
    return [single]
  found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")) if os.path.isdir(directory) else []
  if found:
    return [os.path.join(directory, f) for f in found]
  pickles = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth"))] if os.path.isdir(directory) else []
  hint = (f"; found {pickles}: pickle checkpoints are not loaded, convert them to safetensors first"
          if pickles else "")
  raise CheckpointError(f"no safetensors checkpoint in {directory!r}{hint}")


def load_directory(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory; a name in two shards is an error."""
  out: dict[str, np.ndarray] = {}
  for path in checkpoint_files(directory):
    for name, arr in iter_tensors(path):
      if name in out:
        raise CheckpointError(f"tensor {name!r} appears in more than one shard of {directory}")
      out[name] = arr
  return out


def check_finite(tensors: Mapping[str, np.ndarray], source: str) -> None:
  """Raises CheckpointError naming the floating tensors that hold NaN or Inf."""
  bad = []
  for name, arr in tensors.items():
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
      count = int(np.size(arr) - np.count_nonzero(np.isfinite(np.asarray(arr, np.float32))))
      if count:
        bad.append(f"{name} ({count} of {arr.size})")
  if bad:
    raise CheckpointError(f"{source}: {len(bad)} tensor(s) hold NaN/Inf values: {', '.join(bad[:6])}"
                          + (" ..." if len(bad) > 6 else "") + "; the checkpoint is corrupt or was saved diverged")
