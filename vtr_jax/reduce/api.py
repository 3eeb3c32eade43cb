"""The token-reduction API: methods, stages, budgets, the registry and config strings.

A method is a frozen dataclass registered under a name. Its fields are the
keys a user types (`fastv:layer=2,keep=64`); its class attributes declare
where it acts and what it promises:

  stages     the stages it supports, the first being its default:
             `vision` (ViT hidden states and extras, before the projector),
             `embed` (projected visual tokens, with the prompt's embeddings),
             `llm` (hidden states at a decoder layer boundary), `kv` (cache).
  positions  `renumber` (contiguous RoPE ids after reduction) or `keep`
             (original ids with gaps).
  order      `original` (kept tokens in patch order) or `method` (the
             published rule's own order, documented by the method).

Budgets are static: an int `keep`, or a `ratio` of the tokens the method
receives, resolved to an int at trace time. Methods whose published rule
yields a data-dependent count use a fixed maximum plus `Tokens.valid`.

A method owns its budget mapping: `Method.for_budget(fraction, model)` is the
setting that gives the LLM about `fraction` of the visual tokens it receives
without reduction (`model.reducible_tokens`), so evaluation, benchmarks and
tests ask the method instead of knowing it.

Registration checks that every stage a method declares has its hook:
`reduce` (or `block_hook`, inside the tower) for `vision`, `reduce` for
`embed`, `boundaries` + `at_boundary` for `llm`, `compress_cache` for `kv`.
In-LLM methods run through `llm_boundary_hook`, which gives each one its own
namespace in the typed `LLMState` and clears its scratch after its last
boundary.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Mapping

import flax
import jax

from vtr_jax import sharding
from vtr_jax.seams import BoundaryHook, LayerAccess, LLMState, Tokens

STAGES = ("vision", "embed", "llm", "kv")
POSITION_POLICIES = ("renumber", "keep")
ORDERS = ("original", "method")

_REGISTRY: dict[str, type["Method"]] = {}


class ReductionError(ValueError):
  """A reduction plan that cannot run (bad config string, budget, stage)."""


@flax.struct.dataclass
class Context:
  """What a vision- or embed-stage method may read besides its tokens.

  A pytree (its arrays are leaves, `vision` is static), so the VLM can hand
  it to a method through `jax.shard_map` (`vtr_jax.sharding.per_sample`).

  Attributes:
    vision: the tower's `VisionConfig` (grid size, layers run).
    aux: the tower's aux dict (the extras methods asked for:
      `vision/<name>/<layer>`), plus `vision/cls_feature` float[B, Dv] for
      towers with a class token.
    text_x: float[B, T, D] the prompt's embeddings (embed stage only).
    text_valid: bool[B, T]. image_slot: int32[B] the placeholder index.
    fingerprint: uint32[B] exact hash of each input image (seeds per-sample
      randomness independently of batch position).
  """
  vision: Any = flax.struct.field(pytree_node=False)
  aux: Mapping[str, Any]
  text_x: jax.Array | None = None
  text_valid: jax.Array | None = None
  image_slot: jax.Array | None = None
  fingerprint: jax.Array | None = None

  def extra(self, name: str, layer: int = -1):
    """An extra of block `layer` (negative: relative to the blocks run)."""
    absolute = layer if layer >= 0 else self.vision.layers_run + layer
    key = f"vision/{name}/{absolute}"
    if key not in self.aux:
      raise ReductionError(f"{key} was not computed: the method must list ({name!r}, {layer}) in vision_extras")
    return self.aux[key]

  @property
  def cls_feature(self):
    return self.aux.get("vision/cls_feature")


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class of every reduction method (see module docstring).

  Attributes:
    stage: where this instance acts (default: the first of `stages`); typed
      in a config string as `name@stage`.
  """
  name: ClassVar[str] = ""
  stages: ClassVar[tuple[str, ...]] = ()
  positions: ClassVar[str] = "renumber"
  order: ClassVar[str] = "original"
  summary: ClassVar[str] = ""

  stage: str = ""

  def __post_init__(self):
    if not self.stage:
      object.__setattr__(self, "stage", self.stages[0])
    if self.stage not in self.stages:
      raise ReductionError(f"method {self.name!r} cannot act at stage {self.stage!r}; "
                           f"it supports: {', '.join(self.stages)}")

  # -- budgets (static) ----------------------------------------------------------------------
  def kept(self, n: int) -> int:
    """Visual tokens this method hands on when it receives n (raises if impossible).

    In-LLM methods: n counts the tokens a selection may drop (a kept class
    token is not counted, see `LLMState.n_cls`).
    """
    return n

  @classmethod
  def for_budget(cls, fraction: float, model) -> "Method | None":
    """This method's setting for about `fraction` of the visual tokens the LLM receives (None: no
    setting expresses it).

    `model` is the `VLMConfig` (read: `reducible_tokens`, `text.num_layers`,
    `vision`). The default sets `keep` to that share of `model.reducible_tokens`;
    methods with other knobs override it.
    """
    k = target_tokens(cls.name, fraction, model)
    if "keep" not in {f.name for f in dataclasses.fields(cls)}:
      return None
    return cls(keep=k)

  @classmethod
  def unbudgeted(cls, model) -> "Method | None":
    """The setting to evaluate once when the method has no budget knob (adaptive methods), else None."""
    return None

  # -- vision / embed stages ------------------------------------------------------------------
  def vision_extras(self, vision) -> frozenset:
    """(name, layer) pairs of tower extras this method reads (see `VisionTower`)."""
    return frozenset()

  def block_hook(self, vision):
    """A `BlockHook` for methods that act inside the ViT blocks (ToMe), else None."""
    return None

  def vision_counts(self, vision) -> list[int] | None:
    """Tokens entering each tower block, for methods that act inside blocks."""
    return None

  def reduce(self, tokens: Tokens, ctx: Context) -> tuple[Tokens, dict[str, Any]]:
    """Vision/embed stage: tokens -> (fewer or merged tokens, aux)."""
    raise NotImplementedError

  # -- llm stage ------------------------------------------------------------------------------
  def boundaries(self, num_layers: int) -> tuple[int, ...]:
    """The decoder layer boundaries this method acts at (before those layers), validated."""
    raise NotImplementedError

  def at_boundary(self, layer: int, state: LLMState, access: LayerAccess) -> LLMState:
    """Llm stage: the state entering decoder layer `layer` -> the state that layer runs on."""
    raise NotImplementedError

  def layer_counts(self, n: int, num_layers: int, n_cls: int = 0) -> list[int]:
    """Visual tokens entering each decoder layer (class token included) given n droppable visual
    tokens and n_cls class tokens at the LLM input."""
    return [n + n_cls] * num_layers

  # -- kv stage -------------------------------------------------------------------------------
  def compress_cache(self, cache, view):
    """Kv stage: a layer's cache -> the cache of the plan's static capacity."""
    raise NotImplementedError

  # -- text -----------------------------------------------------------------------------------
  def spec(self) -> str:
    """The config string that recreates this instance."""
    parts = []
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name == "stage" or value == f.default:
        continue
      parts.append(f"{f.name}={_format(value)}")
    at = f"@{self.stage}" if self.stage != self.stages[0] else ""
    return f"{self.name}{at}" + (":" + ",".join(parts) if parts else "")


def register(cls: type[Method]) -> type[Method]:
  """Class decorator adding a method to the registry."""
  if not cls.name or not cls.stages or not cls.summary:
    raise TypeError(f"{cls.__name__} must set name, stages and summary")
  if any(s not in STAGES for s in cls.stages):
    raise TypeError(f"{cls.__name__}.stages {cls.stages} must be among {STAGES}")
  if cls.positions not in POSITION_POLICIES or cls.order not in ORDERS:
    raise TypeError(f"{cls.__name__}: positions in {POSITION_POLICIES}, order in {ORDERS}")
  missing = [f"{stage}: {' or '.join(hooks)}" for stage, hooks in _missing_hooks(cls)]
  if missing:
    raise TypeError(f"{cls.__name__} declares stages {cls.stages} but implements no hook for "
                    f"{'; '.join(missing)}")
  if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
    raise TypeError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
  _REGISTRY[cls.name] = cls
  return cls


# The hooks a stage needs: any one of each group must be overridden.
STAGE_HOOKS = {"vision": (("reduce", "block_hook"),), "embed": (("reduce",),),
               "llm": (("boundaries",), ("at_boundary",)), "kv": (("compress_cache",),)}


def implements(method: "Method | type[Method]", hook: str) -> bool:
  """Whether the method's class overrides the base's `hook` (e.g. `reduce`, `block_hook`)."""
  cls = method if isinstance(method, type) else type(method)
  return getattr(cls, hook) is not getattr(Method, hook)


def _missing_hooks(cls) -> list[tuple[str, tuple[str, ...]]]:
  out = []
  for stage in cls.stages:
    for group in STAGE_HOOKS[stage]:
      if not any(implements(cls, hook) for hook in group):
        out.append((stage, group))
  return out


def registry() -> dict[str, type[Method]]:
  """Registered methods by name (sorted)."""
  return dict(sorted(_REGISTRY.items()))


# ---- budgets ----------------------------------------------------------------------------------
def resolve_budget(method: str, keep: int | None, ratio: float | None, n: int, default: int | None = None) -> int:
  """The static number of tokens to keep out of n.

  Exactly one of keep / ratio may be given (ratio = fraction kept, rounded,
  at least 1); `default` applies when neither is.
  """
  if keep is not None and ratio is not None:
    raise ReductionError(f"{method}: give keep= or ratio=, not both (keep={keep}, ratio={ratio})")
  if keep is None and ratio is None:
    if default is None:
      raise ReductionError(f"{method}: needs a budget, keep=<tokens> or ratio=<fraction kept>")
    keep = min(default, n)
  if ratio is not None:
    if not 0 < ratio <= 1:
      raise ReductionError(f"{method}: ratio={ratio} must be in (0, 1] (the fraction of tokens kept)")
    keep = max(1, int(round(ratio * n)))
  if not isinstance(keep, int) or keep < 1:
    raise ReductionError(f"{method}: keep={keep!r} must be a positive integer")
  if keep > n:
    raise ReductionError(f"{method}: budget keep={keep} is larger than the {n} tokens it receives")
  return keep


def check_fraction(method: str, fraction: float) -> float:
  """A budget fraction of the visual tokens, 0 < fraction <= 1 (raises naming the value)."""
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
    raise ReductionError(f"{method}: a budget is a fraction of the visual tokens in (0, 1], got {fraction!r}")
  return float(fraction)


def target_tokens(method: str, fraction: float, model) -> int:
  """round(fraction x the visual tokens the LLM receives), at least 1."""
  return max(1, int(round(check_fraction(method, fraction) * model.reducible_tokens)))


def setting_for(name: str, fraction: float, model) -> str | None:
  """The config string of registered method `name` at `fraction` of the visual tokens (its
  `for_budget`), else its `unbudgeted` setting, else None."""
  if name not in _REGISTRY:
    raise ReductionError(f"unknown reduction method {name!r}; known: {', '.join(registry())}")
  cls = _REGISTRY[name]
  m = cls.for_budget(fraction, model) or cls.unbudgeted(model)
  return None if m is None else m.spec()


def scaled_layer(published: int, of: int, num_layers: int, *, lo: int, hi: int) -> int:
  """A published layer index of an `of`-layer decoder moved to the same depth of `num_layers` layers."""
  return int(min(hi, max(lo, round(published * num_layers / of))))


# ---- config strings ---------------------------------------------------------------------------
def _format(value) -> str:
  if isinstance(value, tuple):
    return "/".join(_format(v) for v in value)
  if isinstance(value, bool):
    return "true" if value else "false"
  return str(value)


def _convert(method: str, key: str, text: str, hint) -> Any:
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  if origin in (typing.Union, types.UnionType):
    inner = [a for a in args if a is not type(None)]
    if text.lower() == "none":
      return None
    return _convert(method, key, text, inner[0])
  if origin is tuple:
    item = args[0] if args else str
    return tuple(_convert(method, key, part, item) for part in text.split("/") if part)
  try:
    if hint is bool:
      if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
      return text.lower() in ("true", "1", "yes")
    if hint is int:
      return int(text)
    if hint is float:
      return float(text)
    return str(text)
  except ValueError:
    raise ReductionError(f"{method}: {key}={text!r} is not a valid {getattr(hint, '__name__', hint)}") from None


def parse_method(item: str) -> Method:
  """One `name[@stage][:key=value,...]` item -> a Method instance."""
  item = item.strip()
  if not item:
    raise ReductionError("empty method in the reduction string (check for a stray '+')")
  head, _, body = item.partition(":")
  name, _, stage = head.strip().partition("@")
  name = name.strip().lower()
  if name not in _REGISTRY:
    raise ReductionError(f"unknown reduction method {name!r}; known: {', '.join(registry())}")
  cls = _REGISTRY[name]
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls) if f.name != "stage"}
  kwargs: dict[str, Any] = {}
  if stage.strip():
    kwargs["stage"] = stage.strip()
  for pair in filter(None, (p.strip() for p in body.split(","))) if body.strip() else []:
    key, eq, value = pair.partition("=")
    key = key.strip()
    if not eq or not key or not value.strip():
      raise ReductionError(f"{name}: malformed setting {pair!r}; write key=value (e.g. {name}:keep=64)")
    if key not in fields:
      known = ", ".join(sorted(fields)) or "none"
      raise ReductionError(f"{name}: unknown setting {key!r}; known settings: {known}")
    if key in kwargs:
      raise ReductionError(f"{name}: setting {key!r} given twice")
    kwargs[key] = _convert(name, key, value.strip(), hints[key])
  if body.strip() == "" and ":" in item:
    raise ReductionError(f"{name}: nothing after ':' in {item!r}")
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ReductionError(f"{name}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Plan:
  """An ordered, validated sequence of methods (static; hashable for jit)."""
  methods: tuple[Method, ...] = ()

  def __post_init__(self):
    ordered = tuple(sorted(self.methods, key=lambda m: STAGES.index(m.stage)))
    object.__setattr__(self, "methods", ordered)
    inside = [m.name for m in self.methods if m.stage == "vision" and implements(m, "block_hook")]
    if len(inside) > 1:
      raise ReductionError(f"at most one method may act inside the ViT blocks, got {inside}")

  def at(self, stage: str) -> tuple[Method, ...]:
    return tuple(m for m in self.methods if m.stage == stage)

  @property
  def keep_positions(self) -> bool:
    """Whether pre-LLM methods keep original position ids (gaps) in the prompt."""
    return any(m.positions == "keep" for m in self.methods if m.stage in ("vision", "embed"))

  @property
  def spec(self) -> str:
    return "+".join(m.spec() for m in self.methods) or "none"

  def __bool__(self) -> bool:
    return bool(self.methods)


def parse(spec: str | Plan | Method | None) -> Plan:
  """`"visionzip:keep=128+fastv:layer=2,keep=64"` -> Plan. None / "" / "none" -> empty plan."""
  if spec is None:
    return Plan()
  if isinstance(spec, Plan):
    return spec
  if isinstance(spec, Method):
    return Plan((spec,))
  if not isinstance(spec, str):
    raise ReductionError(f"a reduction is a string like 'fastv:layer=2,keep=64', got {type(spec).__name__}")
  if spec.strip().lower() in ("", "none", "full"):
    return Plan()
  return Plan(tuple(parse_method(item) for item in spec.split("+")))


# ---- the llm stage ----------------------------------------------------------------------------
def owners(methods) -> tuple[str, ...]:
  """Each method's namespace in the `LLMState`: its name, or `name.i` when the plan holds it twice."""
  names = [m.name for m in methods]
  seen: dict[str, int] = {}
  out = []
  for name in names:
    if names.count(name) == 1:
      out.append(name)
    else:
      out.append(f"{name}.{seen.get(name, 0)}")
      seen[name] = seen.get(name, 0) + 1
  return tuple(out)


def llm_boundary_hook(plan: Plan, num_layers: int) -> BoundaryHook | None:
  """The plan's llm-stage methods as one `BoundaryHook` (None when there are none).

  At each boundary the methods acting there run in plan order, each under
  its own namespace (`owners`); after a method's last boundary its scratch
  and per-token values are released. The hook runs per device on its own
  samples (`sharding.per_sample`).
  """
  methods = plan.at("llm")
  if not methods:
    return None
  keys = owners(methods)
  acts = []
  for m, key in zip(methods, keys):
    layers = tuple(sorted(set(m.boundaries(num_layers))))
    if not layers or not all(0 <= layer < num_layers for layer in layers):
      raise ReductionError(f"{m.name}: boundaries {layers} must lie in 0..{num_layers - 1}")
    acts.append((m, key, frozenset(layers), layers[-1]))

  def run(layer: int, state: LLMState, access: LayerAccess) -> LLMState:
    for m, key, layers, last in acts:
      if layer in layers:
        state = m.at_boundary(layer, state.replace(owner=key), access)
        if layer == last:
          state = state.release(key)
    return state.replace(owner="")

  return BoundaryHook(frozenset().union(*(a[2] for a in acts)), sharding.per_sample(run))
