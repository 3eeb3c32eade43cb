"""Training-only dense supervision for the bundled benchmark: scene labels for the vision tower.

A VLM trained from scratch learns visual grounding slowly when its only
signal is one answer token. The benchmark's scenes are fully known, so
training may add cheap auxiliary losses on the tower's output features:

  per patch   colour (none + 6), shape (none + 5) and code character
              (none + 8) of what covers the patch centre;
  class token which colours and shapes occur (multi-label) and how many
              objects there are (0..6).

The heads (`AuxHeads`) live beside the model, not in it: the exported
checkpoint is a plain LLaVA model, and evaluation never sees them.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vtr_jax.data import scenes

COLOURS = tuple(scenes.COLOURS)
SHAPES = scenes.SHAPES
CHARS = tuple(scenes.CODE_ALPHABET.lower())


def _cells(grid: int) -> np.ndarray:
  """Patch centres in image sides: float[P, 2] (x, y), raster order."""
  c = (np.arange(grid) + 0.5) / grid
  return np.stack(np.meshgrid(c, c), -1).reshape(-1, 2)


def scene_targets(scene_json: Sequence[str], grid: int) -> dict[str, np.ndarray]:
  """Labels for a batch of scenes (the rows' `scene` column) on a grid x grid patch layout.

  Returns:
    patch_colour, patch_shape, patch_char: int32[B, P] (0 = nothing there);
    colours, shapes: float32[B, 6], [B, 5] presence; count: int32[B].
  """
  centres = _cells(grid)
  half = 0.5 / grid
  out = {k: [] for k in ("patch_colour", "patch_shape", "patch_char", "colours", "shapes", "count")}
  for text in scene_json:
    scene = scenes.Scene.from_json(text)
    colour = np.zeros(grid * grid, np.int32)
    shape = np.zeros(grid * grid, np.int32)
    char = np.zeros(grid * grid, np.int32)
    for o in scene.objects:
      inside = (np.abs(centres[:, 0] - o.x) <= max(o.r, half)) & (np.abs(centres[:, 1] - o.y) <= max(o.r, half))
      colour[inside] = COLOURS.index(o.colour) + 1
      shape[inside] = SHAPES.index(o.shape) + 1
    x0, y0, x1, y1 = scene.box
    for k, ch in enumerate(scene.code.lower()):
      cx0, cx1 = x0 + k * (x1 - x0) / len(scene.code), x0 + (k + 1) * (x1 - x0) / len(scene.code)
      inside = ((centres[:, 0] >= cx0 - half / 2) & (centres[:, 0] <= cx1 + half / 2)
                & (centres[:, 1] >= y0 - half / 2) & (centres[:, 1] <= y1 + half / 2))
      char[inside] = CHARS.index(ch) + 1
    out["patch_colour"].append(colour)
    out["patch_shape"].append(shape)
    out["patch_char"].append(char)
    out["colours"].append(np.array([any(o.colour == c for o in scene.objects) for c in COLOURS], np.float32))
    out["shapes"].append(np.array([any(o.shape == s for o in scene.objects) for s in SHAPES], np.float32))
    out["count"].append(len(scene.objects))
  return {k: np.asarray(v, np.int32 if k in ("patch_colour", "patch_shape", "patch_char", "count") else np.float32)
          for k, v in out.items()}


class AuxHeads(nn.Module):
  """Linear heads on the tower's features: float[B, T, D] (class token first when present)."""

  @nn.compact
  def __call__(self, patches: jax.Array, cls: jax.Array | None) -> dict[str, jax.Array]:
    out = {
        "patch_colour": nn.Dense(len(COLOURS) + 1, name="patch_colour")(patches),
        "patch_shape": nn.Dense(len(SHAPES) + 1, name="patch_shape")(patches),
        "patch_char": nn.Dense(len(CHARS) + 1, name="patch_char")(patches),
    }
    if cls is not None:
      out["colours"] = nn.Dense(len(COLOURS), name="colours")(cls)
      out["shapes"] = nn.Dense(len(SHAPES), name="shapes")(cls)
      out["count"] = nn.Dense(scenes.MAX_OBJECTS + 1, name="count")(cls)
    return out


def check_supported(vision) -> None:
  """Raises unless the tower hands on per-patch features of one view (what the labels describe)."""
  if vision.num_registers or vision.crops != 1:
    raise ValueError(f"auxiliary scene supervision labels patches of one view, but this tower hands on "
                     f"{vision.num_registers} registers per view over {vision.num_crops} views; "
                     "set train.aux_weight=0 for register (FALCON) models")


def split_features(features: jax.Array, cls_feature: jax.Array | None, vision) -> tuple[jax.Array, jax.Array]:
  """(patch features float[B, P, D], class-token features float[B, D] or None)."""
  check_supported(vision)
  if vision.has_cls and vision.keep_cls:
    return features[:, 1:], features[:, 0]
  return features, cls_feature


def init_heads(vision, seed: int):
  check_supported(vision)
  p = jnp.zeros((1, vision.num_patches, vision.feature_dim))
  cls = jnp.zeros((1, vision.feature_dim)) if vision.has_cls else None
  return AuxHeads().init(jax.random.key(seed + 1), p, cls)


def aux_loss(head_params, patches: jax.Array, cls: jax.Array | None,
             targets: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean of the per-patch cross-entropies and (with a class token) the scene losses."""
  logits = AuxHeads().apply(head_params, patches, cls)
  ce = optax.softmax_cross_entropy_with_integer_labels
  terms = {k: ce(logits[k], targets[k]).mean() for k in ("patch_colour", "patch_shape", "patch_char")}
  if cls is not None:
    terms["colours"] = optax.sigmoid_binary_cross_entropy(logits["colours"], targets["colours"]).mean()
    terms["shapes"] = optax.sigmoid_binary_cross_entropy(logits["shapes"], targets["shapes"]).mean()
    terms["count"] = ce(logits["count"], targets["count"]).mean()
  total = sum(terms.values()) / len(terms)
  return total, {f"aux/{k}": v for k, v in terms.items()}
