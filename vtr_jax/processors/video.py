"""Video frames: read a file with PyAV, or take an array / iterable of frames, and sample them.

Sampling is transformers' `default_sample_indices_fn` (video_utils.py, 5.24):
- `num_frames=N`: indices `arange(N) * total // N` (uniform, starting at frame 0);
- `fps=f`: N = `max(1, int(total / video_fps * f))`, then the same uniform rule;
- neither: every frame.
Asking for more frames than the video has is an error, as in transformers.

Decoding follows transformers' `read_video_pyav`: frames are decoded in order from the start and the sampled
ones kept as RGB (`to_ndarray(format="rgb24")`). When the container does not record a frame count (WebM
usually does not), the frames are counted by decoding once first.

Attributes:
  VideoInfo: frame count, frame rate and size of a video file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

import numpy as np

from vtr_jax.processors.common import ProcessorError, check_image


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """A video file's first video stream: `total_frames`, `fps` (None when unknown), `height`, `width`."""
  total_frames: int
  fps: float | None
  height: int
  width: int


def sample_indices(total_frames: int, *, num_frames: int | None = None, fps: float | None = None,
                   video_fps: float | None = None) -> np.ndarray:
  """int64[T] frame indices to keep of `total_frames` (transformers' uniform rule; see the module docstring)."""
  if num_frames is not None and fps is not None:
    raise ProcessorError(f"num_frames={num_frames} and fps={fps} are exclusive: pass one")
  if total_frames < 1:
    raise ProcessorError(f"cannot sample frames of a video with {total_frames} frames")
  if fps is not None:
    if not video_fps:
      raise ProcessorError(f"sampling at fps={fps} needs the video's frame rate, got video_fps={video_fps}")
    if fps <= 0:
      raise ProcessorError(f"fps must be > 0, got {fps}")
    num_frames = max(1, int(total_frames / video_fps * fps))
  if num_frames is None:
    return np.arange(total_frames, dtype=np.int64)
  if not 1 <= num_frames <= total_frames:
    raise ProcessorError(f"asked for {num_frames} frames (num_frames={num_frames}, fps={fps}) of a video with "
                         f"{total_frames} frames; ask for 1..{total_frames}")
  return np.arange(num_frames, dtype=np.int64) * total_frames // num_frames


def check_frames(frames: Any, name: str = "video") -> np.ndarray:
  """One video's frames (uint8[T, H, W, 3], or an iterable of uint8[H, W, 3]) -> uint8[T, H, W, 3].

  Raises ProcessorError for no frames, a frame that is not uint8[H, W, 3], or frames of different sizes
  (naming both sizes).
  """
  if isinstance(frames, np.ndarray) and frames.ndim == 4:
    if len(frames) == 0:
      raise ProcessorError(f"{name} has no frames (shape {tuple(frames.shape)})")
    check_image(frames[0], f"{name} frame 0")
    return frames
  if isinstance(frames, np.ndarray):
    raise ProcessorError(f"{name} must be uint8[T, H, W, 3] or a list of uint8[H, W, 3], got shape "
                         f"{tuple(frames.shape)}")
  out = []
  for i, frame in enumerate(frames):
    frame = check_image(frame, f"{name} frame {i}")
    if out and frame.shape != out[0].shape:
      raise ProcessorError(f"{name} frame {i} is {frame.shape[0]}x{frame.shape[1]} but frame 0 is "
                           f"{out[0].shape[0]}x{out[0].shape[1]}: the frames of one video share a size")
    out.append(frame)
  if not out:
    raise ProcessorError(f"{name} has no frames")
  return np.stack(out)


def sample_frames(frames: Any, *, num_frames: int | None = None, fps: float | None = None,
                  video_fps: float | None = None) -> np.ndarray:
  """Samples an array or iterable (a generator too) of frames: uint8[T', H, W, 3] (`sample_indices`).

  An iterable is read whole first: uniform sampling needs the frame count.
  """
  frames = check_frames(frames)
  return frames[sample_indices(len(frames), num_frames=num_frames, fps=fps, video_fps=video_fps)]


def _open(path: str):
  import av
  if not os.path.isfile(path):
    raise ProcessorError(f"video file {path!r} does not exist")
  try:
    container = av.open(path)
  except (av.FFmpegError, UnicodeDecodeError) as e:
    raise ProcessorError(f"cannot read video {path!r}: {e}") from None
  if not container.streams.video:
    container.close()
    raise ProcessorError(f"{path!r} has no video stream")
  return container


def _decoded(container, path: str) -> Iterable:
  import av
  try:
    yield from container.decode(video=0)
  except av.FFmpegError as e:
    raise ProcessorError(f"cannot decode video {path!r}: {e}") from None


def video_info(path: str) -> VideoInfo:
  """The frame count, frame rate and size of `path`'s first video stream (counted by decoding if unrecorded)."""
  with _open(path) as container:
    stream = container.streams.video[0]
    total = stream.frames or sum(1 for _ in _decoded(container, path))
    rate = stream.average_rate
    return VideoInfo(total_frames=int(total), fps=float(rate) if rate else None, height=stream.height,
                     width=stream.width)


def read_video(path: str, *, num_frames: int | None = None, fps: float | None = None) -> np.ndarray:
  """Decodes and samples a video file: uint8[T, H, W, 3] RGB frames (`sample_indices`).

  Raises ProcessorError naming the path for a missing, unreadable or undecodable file, a file without a
  video stream, and a video with zero frames.
  """
  info = video_info(path)
  if info.total_frames == 0:
    raise ProcessorError(f"video {path!r} has no frames")
  indices = sample_indices(info.total_frames, num_frames=num_frames, fps=fps, video_fps=info.fps)
  wanted, kept = set(indices.tolist()), []
  with _open(path) as container:
    for i, frame in enumerate(_decoded(container, path)):
      if i > indices[-1]:
        break
      if i in wanted:
        kept.append(frame.to_ndarray(format="rgb24"))
  if len(kept) != len(indices):
    raise ProcessorError(f"video {path!r} decoded to fewer frames than its {info.total_frames} recorded ones: "
                         f"got {len(kept)} of the {len(indices)} sampled (last index {indices[-1]})")
  return np.stack(kept)
