"""The bundled benchmark's scenes: shapes on textured backgrounds, a text box, one question each.

Every example is a square RGB image with 1-6 non-overlapping objects (a shape,
a colour and a size each) and one small light box holding a 2-character code
(rendered with DejaVu Sans Bold, which ships with matplotlib), on a
background that is redundant but not empty: a two-colour gradient, a
low-contrast tinted pattern (stripes, checker, rings or blobs) and fine
noise. Its question comes from one of seven families; every answer is one
word:

| family    | example question                                         | answers            |
|-----------|----------------------------------------------------------|--------------------|
| `colour`  | what colour is the star ?                                 | a colour           |
| `shape`   | what shape is the blue object ?                           | a shape            |
| `count`   | how many objects / red objects / circles are there ?      | 0 .. 6             |
| `exists`  | is there a green cross ?                                  | yes / no           |
| `spatial` | is the red circle left of the blue square ?               | yes / no           |
| `larger`  | which is larger , the red circle or the red square ?      | the differing word |
| `reading` | what is written in the box ?                              | the code ("a7")    |

Questions refer only to unique objects (the one star; the one red circle),
and the scene is built from the question so that answers are balanced: the
family of example `i` is `families[i % len(families)]`, and its main answer
cycles with the family's turn `i // len(families)` (the colour, the shape,
the count 0..6, yes / no, the relation, which of the two is larger, the
code), so any run of examples is balanced across families and, within a
family, across answers. Objects are then placed around the answer (a
relation holds, or its opposite does, with bounding boxes apart on that
axis); everything else is random. The code box covers a dozen of the 256 patches of 16 px at the
default size, which is what makes the `reading` family punish careless
pruning.

Determinism: example `i` of a split is generated from
`numpy.random.SeedSequence([SPLIT_SEEDS[split], i])` alone, so any slice can
be produced independently (and in parallel), and the same (split, index)
always gives the same bytes. The test split's seed (3_000) is held out: the
train and val splits never draw from it. Geometry is in units of the image
side (x right, y down, in [0, 1]), so one index gives the same layout at any
`image_size`.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import json
import math
import os
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SPLIT_SEEDS = {"train": 1_000, "val": 2_000, "test": 3_000}

COLOURS = {  # name -> RGB centre; each object jitters it by up to COLOUR_JITTER per channel
    "red": (215, 40, 40),
    "orange": (245, 135, 25),
    "yellow": (240, 215, 35),
    "green": (40, 165, 65),
    "blue": (35, 85, 220),
    "purple": (145, 55, 185),
}
COLOUR_JITTER = 12
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses"}
SIZES = {"small": (0.045, 0.06), "large": (0.09, 0.115)}  # half-extent range, in image sides
RELATIONS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
CODE_ALPHABET = "ACEHK347"  # glyphs that stay distinct at 16 px patches (no 0/O, 1/I, 8/B)
CODE_LENGTH = 2
MAX_OBJECTS = 6
FAMILIES = ("colour", "shape", "count", "exists", "spatial", "larger", "reading")

BOX_HALF = (0.105, 0.07)  # text box half width, half height (54 x 36 px at 256)
FONT_SIZE = 0.11  # of the image side: capitals ~20 px tall at 256
EDGE = 0.02  # free border around the image
GAP = 0.02  # free space between any two items, and the margin of a spatial relation

QUESTION_WORDS = ("what", "colour", "shape", "is", "the", "object", "how", "many", "objects", "are", "there", "a",
                  "left", "right", "of", "above", "below", "which", "larger", ",", "or", "written", "in", "box", "?")
COUNT_WORDS = tuple(str(n) for n in range(MAX_OBJECTS + 1))
CODES = tuple(a + b for a in CODE_ALPHABET.lower() for b in CODE_ALPHABET.lower())


def answer_set(family: str) -> tuple[str, ...]:
  """Every answer a family can give, in vocabulary order."""
  sets = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNT_WORDS, "exists": ("yes", "no"),
          "spatial": ("yes", "no"), "larger": (*COLOURS, *SHAPES), "reading": CODES}
  if family not in sets:
    raise ValueError(f"unknown question family {family!r}; known: {', '.join(FAMILIES)}")
  return sets[family]


def words() -> list[str]:
  """Every word of every question and answer, in a fixed order (token ids depend on it)."""
  out: list[str] = []
  for w in (*QUESTION_WORDS, *COLOURS, *SHAPES, *PLURALS.values(), *COUNT_WORDS, "yes", "no", *CODES):
    if w not in out:
      out.append(w)
  return out


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """What to generate.

  Attributes:
    image_size: side of the square images in pixels.
    families: question families, cycled by example index.
  """
  image_size: int = 256
  families: tuple[str, ...] = FAMILIES

  def __post_init__(self):
    if self.image_size < 64:
      raise ValueError(f"image_size must be >= 64 for readable text, got {self.image_size}")
    unknown = [f for f in self.families if f not in FAMILIES]
    if unknown or not self.families:
      raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {self.families}")


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One shape; `x, y` its centre and `r` its half-extent, in image sides."""
  shape: str
  colour: str
  size: str
  x: float
  y: float
  r: float
  rgb: tuple[int, int, int]

  @property
  def rect(self) -> tuple[float, float, float, float]:
    return (self.x - self.r, self.y - self.r, self.x + self.r, self.y + self.r)


@dataclasses.dataclass(frozen=True)
class Background:
  """A gradient from `start` to `end` along `angle`, a tinted pattern, and fine noise."""
  start: tuple[int, int, int]
  end: tuple[int, int, int]
  angle: float
  pattern: str  # stripes | checker | rings | blobs
  period: float  # in image sides
  pattern_angle: float
  amplitude: float  # in 0..255 units
  tint: tuple[float, float, float]
  noise: float  # std of the per-pixel noise, 0..255 units
  seed: int  # seeds the blobs and the per-pixel noise


@dataclasses.dataclass(frozen=True)
class Scene:
  """Everything `render` needs; `box` is the text box (x0, y0, x1, y1) in image sides."""
  objects: tuple[SceneObject, ...]
  code: str
  box: tuple[float, float, float, float]
  box_rgb: tuple[int, int, int]
  ink_rgb: tuple[int, int, int]
  background: Background

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

  @classmethod
  def from_json(cls, text: str) -> "Scene":
    d = json.loads(text)
    tup = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    objects = tuple(SceneObject(**{k: tup(v) for k, v in o.items()}) for o in d.pop("objects"))
    background = Background(**{k: tup(v) for k, v in d.pop("background").items()})
    return cls(objects=objects, background=background, **{k: tup(v) for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class Example:
  """One question about one scene; `image` is uint8[S, S, 3]."""
  split: str
  index: int
  family: str
  question: str
  answer: str
  scene: Scene
  image: np.ndarray

  def row(self) -> dict:
    """The dataset row: image uint8[S, S, 3], question, answer, family, scene (JSON), index."""
    return {"image": self.image, "question": self.question, "answer": self.answer, "family": self.family,
            "scene": self.scene.to_json(), "index": self.index}


def generate_example(split: str, index: int, config: SceneConfig = SceneConfig()) -> Example:
  """Example `index` of `split`: the same bytes for the same arguments, independent of other indices."""
  if split not in SPLIT_SEEDS:
    raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLIT_SEEDS)}")
  if index < 0:
    raise ValueError(f"example index must be >= 0, got {index}")
  rng = np.random.default_rng(np.random.SeedSequence([SPLIT_SEEDS[split], index]))
  family = config.families[index % len(config.families)]
  turn = index // len(config.families)  # this family's turn: cycles the main answer choices
  if family == "reading":
    code = CODES[turn % len(CODES)].upper()
    plan = _plan_reading(rng, code)
  else:
    code = "".join(_pick(rng, CODE_ALPHABET) for _ in range(CODE_LENGTH))
    plan = _PLANNERS[family](rng, turn)
  scene = _scene(rng, plan, code, family)
  return Example(split, index, family, plan.question, plan.answer, scene, render(scene, config.image_size))


# -- questions ---------------------------------------------------------------------------------

Spec = tuple[str, str, str]  # shape, colour, size
Rect = tuple[float, float, float, float]


class _Plan(NamedTuple):
  question: str
  answer: str
  targets: list[Spec]  # objects the question needs
  relation: Callable[[Rect, Rect], bool] | None  # must hold between targets[0] and targets[1]
  distractor_ok: Callable[[str, str], bool]  # (shape, colour) allowed for the other objects
  num_distractors: int


def _pick(rng, options):
  return options[int(rng.integers(len(options)))]


def _other(rng, options, excluded):
  return _pick(rng, [o for o in options if o != excluded])


def _spec(rng, shape=None, colour=None, size=None) -> Spec:
  return (shape or _pick(rng, SHAPES), colour or _pick(rng, tuple(COLOURS)), size or _pick(rng, tuple(SIZES)))


def _distractors(rng, targets: int) -> int:
  """How many other objects, keeping the total in 1..MAX_OBJECTS."""
  return int(rng.integers(max(0, 1 - targets), MAX_OBJECTS - targets + 1))


def _plan_colour(rng, turn: int) -> _Plan:
  target = _spec(rng, colour=tuple(COLOURS)[turn % len(COLOURS)])
  return _Plan(f"what colour is the {target[0]} ?", target[1], [target], None,
               lambda s, c: s != target[0], _distractors(rng, 1))


def _plan_shape(rng, turn: int) -> _Plan:
  target = _spec(rng, shape=SHAPES[turn % len(SHAPES)])
  return _Plan(f"what shape is the {target[1]} object ?", target[0], [target], None,
               lambda s, c: c != target[1], _distractors(rng, 1))


def _plan_count(rng, turn: int) -> _Plan:
  n = turn % (MAX_OBJECTS + 1)
  kind = _pick(rng, ("colour", "shape") if n == 0 else ("all", "colour", "shape"))
  if kind == "all":
    return _Plan("how many objects are there ?", str(n), [_spec(rng) for _ in range(n)], None,
                 lambda s, c: False, 0)
  if kind == "colour":
    colour = _pick(rng, tuple(COLOURS))
    return _Plan(f"how many {colour} objects are there ?", str(n), [_spec(rng, colour=colour) for _ in range(n)],
                 None, lambda s, c: c != colour, _distractors(rng, n))
  shape = _pick(rng, SHAPES)
  return _Plan(f"how many {PLURALS[shape]} are there ?", str(n), [_spec(rng, shape=shape) for _ in range(n)],
               None, lambda s, c: s != shape, _distractors(rng, n))


def _plan_exists(rng, turn: int) -> _Plan:
  shape, colour, size = _spec(rng)
  yes = turn % 2 == 0
  targets = [(shape, colour, size)] if yes else []
  # Near misses in both cases, so that seeing the colour or the shape alone never answers.
  if rng.random() < 0.5:
    targets.append(_spec(rng, shape=_other(rng, SHAPES, shape), colour=colour))
  if rng.random() < 0.5:
    targets.append(_spec(rng, shape=shape, colour=_other(rng, tuple(COLOURS), colour)))
  return _Plan(f"is there a {colour} {shape} ?", "yes" if yes else "no", targets, None,
               lambda s, c: (s, c) != (shape, colour), _distractors(rng, len(targets)))


def _holds(relation: str, a: Rect, b: Rect) -> bool:
  """`a` is `relation` `b` with their bounding boxes apart by GAP on that axis."""
  if relation == "left":
    return a[2] + GAP <= b[0]
  if relation == "right":
    return b[2] + GAP <= a[0]
  if relation == "above":
    return a[3] + GAP <= b[1]
  return b[3] + GAP <= a[1]


def _two_descriptions(rng) -> tuple[Spec, Spec]:
  a = _spec(rng)
  while True:
    b = _spec(rng)
    if b[:2] != a[:2]:
      return a, b


def _plan_spatial(rng, turn: int) -> _Plan:
  yes = turn % 2 == 0
  relation = tuple(RELATIONS)[turn // 2 % len(RELATIONS)]
  a, b = _two_descriptions(rng)
  truth = relation if yes else OPPOSITE[relation]
  return _Plan(f"is the {a[1]} {a[0]} {RELATIONS[relation]} the {b[1]} {b[0]} ?", "yes" if yes else "no", [a, b],
               functools.partial(_holds, truth), lambda s, c: (s, c) not in (a[:2], b[:2]), _distractors(rng, 2))


def _plan_larger(rng, turn: int) -> _Plan:
  first_larger = turn % 2 == 0
  differ = ("colour", "shape")[turn // 2 % 2]
  sizes = ("large", "small") if first_larger else ("small", "large")
  shape, colour, _ = _spec(rng)
  if differ == "colour":
    a = (shape, colour, sizes[0])
    b = (shape, _other(rng, tuple(COLOURS), colour), sizes[1])
  else:
    a = (shape, colour, sizes[0])
    b = (_other(rng, SHAPES, shape), colour, sizes[1])
  larger = a if first_larger else b
  answer = larger[1] if differ == "colour" else larger[0]
  return _Plan(f"which is larger , the {a[1]} {a[0]} or the {b[1]} {b[0]} ?", answer, [a, b], None,
               lambda s, c: (s, c) not in (a[:2], b[:2]), _distractors(rng, 2))


def _plan_reading(rng, code: str) -> _Plan:
  return _Plan("what is written in the box ?", code.lower(), [], None, lambda s, c: True, _distractors(rng, 0))


_PLANNERS = {"colour": _plan_colour, "shape": _plan_shape, "count": _plan_count, "exists": _plan_exists,
             "spatial": _plan_spatial, "larger": _plan_larger}


# -- layout ------------------------------------------------------------------------------------

def _apart(a: Rect, b: Rect) -> bool:
  return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _place(rng, half_w: float, half_h: float, placed: list[Rect], extra=lambda rect: True) -> Rect | None:
  for _ in range(100):
    x = rng.uniform(EDGE + half_w, 1 - EDGE - half_w)
    y = rng.uniform(EDGE + half_h, 1 - EDGE - half_h)
    rect = (x - half_w, y - half_h, x + half_w, y + half_h)
    if all(_apart(rect, p) for p in placed) and extra(rect):
      return rect
  return None


def _jitter(rng, rgb) -> tuple[int, int, int]:
  return tuple(min(255, max(0, v + int(d))) for v, d in zip(rgb, rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)))


def _layout(rng, specs: list[Spec], relation) -> tuple[Rect, list[Rect]] | None:
  """Text box and one rect per spec, all apart; None when this draw did not fit."""
  box = _place(rng, *BOX_HALF, [])
  placed = [box]
  rects = []
  for i, (_, _, size) in enumerate(specs):
    r = rng.uniform(*SIZES[size])
    extra = (lambda rect: relation(rects[0], rect)) if (i == 1 and relation) else (lambda rect: True)
    rect = _place(rng, r, r, placed, extra)
    if rect is None:
      return None
    placed.append(rect)
    rects.append(rect)
  return box, rects


def _scene(rng, plan: _Plan, code: str, family: str) -> Scene:
  specs = list(plan.targets)
  while len(specs) < len(plan.targets) + plan.num_distractors:
    spec = _spec(rng)
    if plan.distractor_ok(spec[0], spec[1]):
      specs.append(spec)
  for _ in range(100):
    layout = _layout(rng, specs, plan.relation)
    if layout is not None:
      break
  else:
    raise RuntimeError(f"could not place {len(specs)} objects for a {family!r} question after 100 layouts")
  box, rects = layout
  objects = tuple(SceneObject(s, c, size, (r[0] + r[2]) / 2, (r[1] + r[3]) / 2, (r[2] - r[0]) / 2,
                              _jitter(rng, COLOURS[c])) for (s, c, size), r in zip(specs, rects))
  grey = lambda lo, hi: tuple(int(v) for v in rng.integers(lo, hi, 3))  # noqa: E731
  return Scene(objects, code, box, grey(225, 251), grey(10, 60), _background(rng))


def _hsv(rng, saturation, value) -> tuple[int, int, int]:
  """A random hue with saturation and value drawn from the given ranges, as 0..255 RGB."""
  rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
  return tuple(int(round(255 * c)) for c in rgb)


def _background(rng) -> Background:
  tint = np.asarray(_hsv(rng, (0.0, 0.6), (1.0, 1.0)), np.float64) / 255
  return Background(
      start=_hsv(rng, (0.0, 0.25), (0.3, 0.75)), end=_hsv(rng, (0.0, 0.25), (0.3, 0.75)),
      angle=float(rng.uniform(0, 2 * math.pi)), pattern=_pick(rng, ("stripes", "checker", "rings", "blobs")),
      period=float(rng.uniform(0.03, 0.15)), pattern_angle=float(rng.uniform(0, math.pi)),
      amplitude=float(rng.uniform(6, 18)), tint=tuple(float(t) for t in tint / np.linalg.norm(tint) * math.sqrt(3)),
      noise=float(rng.uniform(1.5, 4.5)), seed=int(rng.integers(2**31)))


# -- rendering ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _font(size_px: int) -> ImageFont.FreeTypeFont:
  import matplotlib
  return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans-Bold.ttf"), size_px)


def _background_pixels(bg: Background, size: int) -> np.ndarray:
  """uint8[S, S, 3]: one matmul mixes the per-pixel fields [1, gradient, pattern, noise] into RGB."""
  rng = np.random.default_rng(bg.seed)
  u = (np.arange(size, dtype=np.float32) + 0.5) / size
  x, y = u[None, :], u[:, None]  # [1, S], [S, 1]
  fields = np.empty((size, size, 4), np.float32)
  fields[..., 0] = 1
  t = math.cos(bg.angle) * x + math.sin(bg.angle) * y  # [S, S]
  fields[..., 1] = (t - t.min()) / (t.max() - t.min())
  phase = 2 * math.pi / bg.period
  if bg.pattern == "stripes":
    fields[..., 2] = np.sin(phase * (math.cos(bg.pattern_angle) * x + math.sin(bg.pattern_angle) * y))
  elif bg.pattern == "checker":
    fields[..., 2] = np.sign(np.sin(phase * x)) * np.sign(np.sin(phase * y))
  elif bg.pattern == "rings":
    fields[..., 2] = np.sin(phase * np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2))
  else:  # blobs: a coarse random grid, smoothly upsampled
    cells = max(2, round(0.5 / bg.period))
    grid = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    fields[..., 2] = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC))
  fields[..., 3] = rng.standard_normal((size, size), dtype=np.float32)
  start, end = np.asarray(bg.start, np.float32), np.asarray(bg.end, np.float32)
  mix = np.stack([start + 0.5, end - start, bg.amplitude * np.asarray(bg.tint, np.float32),
                  np.full(3, bg.noise, np.float32)])  # [4, 3]; the 0.5 rounds in the cast below
  rgb = fields @ mix  # [S, S, 4] @ [4, 3] -> [S, S, 3]
  np.clip(rgb, 0, 255, out=rgb)
  return rgb.astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  if shape == "square":
    h = 0.85 * r
    return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
  if shape == "triangle":  # upright, circumradius 1.15 r, bounding box centred on (cx, cy)
    R = 1.15 * r
    angles = (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
    return [(cx + R * math.cos(a), cy + R * 0.25 + R * math.sin(a)) for a in angles]
  if shape == "star":
    return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
             cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
  if shape == "cross":
    w = 0.34 * r
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
            (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
  raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, image_size: int = 256) -> np.ndarray:
  """The scene as uint8[S, S, 3] (S = image_size)."""
  image = Image.fromarray(_background_pixels(scene.background, image_size))
  draw = ImageDraw.Draw(image)
  s = image_size
  for o in scene.objects:
    cx, cy, r = o.x * s, o.y * s, o.r * s
    if o.shape == "circle":
      draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=o.rgb)
    else:
      draw.polygon(_polygon(o.shape, cx, cy, r), fill=o.rgb)
  x0, y0, x1, y1 = (v * s for v in scene.box)
  draw.rectangle((x0, y0, x1, y1), fill=scene.box_rgb)
  draw.text(((x0 + x1) / 2, (y0 + y1) / 2), scene.code, fill=scene.ink_rgb, font=_font(round(FONT_SIZE * s)),
            anchor="mm")
  return np.asarray(image)


def render_preview(path: str, n: int = 8, split: str = "val", config: SceneConfig = SceneConfig(),
                   columns: int = 4) -> None:
  """Writes a PNG grid of the first `n` examples of `split`, each titled with its question and answer."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = -(-n // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i < n:
      ex = generate_example(split, i, config)
      ax.imshow(ex.image)
      ax.set_title(f"[{ex.family}] {ex.question}\n→ {ex.answer}", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
