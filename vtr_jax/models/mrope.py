"""M-RoPE position ids of Qwen2-VL / Qwen2.5-VL prompts (transformers 5.24's `get_rope_index`).

Host-side preprocessing on NumPy arrays (runs of data-dependent length are
walked in Python, never inside `jit`); the decoder consumes the result as
int32[B, T, 3] (t, h, w) positions (`vtr_jax.models.decoder.rope`).

Per sample, over the tokens with attention_mask = 1, in runs of equal
`mm_token_type_ids` (0 text, 1 image, 2 video), with `cur` starting at 0:
  text   ids `cur + arange(n)` on all three axes, then `cur += n`;
  vision for the next grid (T, H, W) of its kind (grids are consumed in order
         across the batch), merged sides H' = H / m, W' = W / m:
         t = long(arange(T) * interval) + cur (interval = tokens_per_second *
         second_per_grid_ts for videos, 1 for images), h = arange(H') + cur,
         w = arange(W') + cur, over the (T, H', W') grid in raster order; then
         `cur += max(H', W')` (`text_after_video="hf5"`, transformers 5.x) or
         `cur = max(ids) + 1` (`"max_plus_one"`, transformers 4.x and the
         original Qwen code; the two differ only after a video).
Padding slots get 0 on every axis; `delta = max(ids) + 1 - n_valid`, and the
token decoded after the prompt sits at `n_valid + delta` on all three axes.
"""

from __future__ import annotations

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2
TEXT_AFTER_VIDEO = ("hf5", "max_plus_one")


def token_types(input_ids, image_token_id: int, video_token_id: int) -> np.ndarray:
  """int[B, T] token ids -> int32[B, T] modality ids (0 text, 1 image, 2 video), as the processor's
  `mm_token_type_ids`."""
  ids = np.asarray(input_ids)
  return np.where(ids == image_token_id, IMAGE, np.where(ids == video_token_id, VIDEO, TEXT)).astype(np.int32)


def vision_positions(start: int, grid_thw, spatial_merge_size: int, interval: float) -> np.ndarray:
  """int64[T * H' * W', 3] (t, h, w) ids of one image or video placed at `start`.

  `interval` is multiplied in float32 and truncated, as transformers does
  (`(arange(T) * interval).long()`).
  """
  t, h, w = (int(v) for v in grid_thw)
  h, w = h // spatial_merge_size, w // spatial_merge_size
  t_ids = (np.arange(t, dtype=np.float32) * np.float32(interval)).astype(np.int64) + start
  grid = np.stack(np.meshgrid(t_ids, np.arange(h) + start, np.arange(w) + start, indexing="ij"), axis=-1)
  return grid.reshape(-1, 3)  # [T, H', W', 3] -> [T * H' * W', 3]


def get_rope_index(mm_token_type_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                   second_per_grid_ts=None, *, spatial_merge_size: int = 2, tokens_per_second: float = 2,
                   text_after_video: str = "hf5") -> tuple[np.ndarray, np.ndarray]:
  """3-D position ids of a (left- or right-) padded batch of prompts.

  Args:
    mm_token_type_ids: int[B, T] modality of each token (`token_types`).
    attention_mask: int/bool[B, T] (None: every slot is a token).
    image_grid_thw: int[n_images, 3] patch grids, in prompt order over the batch.
    video_grid_thw: int[n_videos, 3].
    second_per_grid_ts: float[n_videos] seconds per temporal grid step
      (temporal_patch_size / fps); None: 1 for every video.
    spatial_merge_size: the tower's merge size (2).
    tokens_per_second: `vision_config.tokens_per_second` of the checkpoint.
    text_after_video: "hf5" (transformers 5.x) or "max_plus_one" (4.x).
  Returns:
    (positions int32[B, T, 3] (t, h, w), delta int32[B]).
  """
  if text_after_video not in TEXT_AFTER_VIDEO:
    raise ValueError(f"text_after_video must be one of {TEXT_AFTER_VIDEO}, got {text_after_video!r}")
  types = np.asarray(mm_token_type_ids)
  if types.ndim != 2:
    raise ValueError(f"mm_token_type_ids must be [B, T], got shape {types.shape}")
  mask = np.ones(types.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  if mask.shape != types.shape:
    raise ValueError(f"attention_mask shape {mask.shape} differs from mm_token_type_ids shape {types.shape}")
  grids = {IMAGE: iter(np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)),
           VIDEO: iter(np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw))}
  n_videos = 0 if video_grid_thw is None else len(video_grid_thw)
  seconds = iter(np.ones(n_videos, np.float32) if second_per_grid_ts is None
                 else np.asarray(second_per_grid_ts, np.float32).reshape(-1))
  positions = np.zeros(types.shape + (3,), np.int64)
  delta = np.zeros(types.shape[0], np.int64)
  for b in range(types.shape[0]):
    kinds = types[b][mask[b]]
    ids, cur, start = [], 0, 0
    while start < len(kinds):
      end = start + 1
      while end < len(kinds) and kinds[end] == kinds[start]:
        end += 1
      kind, n = int(kinds[start]), end - start
      if kind == TEXT:
        ids.append(np.repeat(np.arange(cur, cur + n)[:, None], 3, axis=1))
        cur += n
      elif kind in (IMAGE, VIDEO):
        name = "image" if kind == IMAGE else "video"
        grid = next(grids[kind], None)
        if grid is None:
          raise ValueError(f"sample {b} has more {name} runs than the {name}_grid_thw rows given")
        want = int(np.prod(grid)) // spatial_merge_size ** 2
        if n != want:
          raise ValueError(f"sample {b}: a run of {n} {name} tokens at token {start} (of the unpadded prompt) "
                           f"does not match its grid_thw {list(map(int, grid))}, which gives {want} tokens")
        if kind == VIDEO:
          second = next(seconds, None)
          if second is None:
            raise ValueError(f"second_per_grid_ts has fewer entries than the {n_videos} videos")
          interval = np.float32(tokens_per_second) * np.float32(second)
        else:
          interval = 1.0
        block = vision_positions(cur, grid, spatial_merge_size, interval)
        ids.append(block)
        if text_after_video == "hf5":
          cur += max(int(grid[1]), int(grid[2])) // spatial_merge_size
        else:
          cur = int(block.max()) + 1
      else:
        raise ValueError(f"sample {b}: unknown mm_token_type_id {kind} (0 text, 1 image, 2 video)")
      start = end
    if ids:
      flat = np.concatenate(ids, axis=0)
      positions[b, mask[b]] = flat
      delta[b] = flat.max() + 1 - len(kinds)
  return positions.astype(np.int32), delta.astype(np.int32)


def next_position(delta, attention_mask) -> np.ndarray:
  """int32[B] position of the first token decoded after the (unpruned) prompt: `n_valid + delta`."""
  return (np.asarray(attention_mask).astype(bool).sum(axis=1) + np.asarray(delta)).astype(np.int32)
