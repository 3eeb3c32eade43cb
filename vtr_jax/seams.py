"""The seam types where models and reduction methods meet, and the two sequence edits they share.

`vtr_jax.models` (towers, decoders) and `vtr_jax.reduce` (methods) never import each
other; both import this module, which imports nothing of the project but the
axis names. What crosses a seam:

  Tokens        visual tokens between the tower and the LLM (vision / embed stages)
  BlockHook     a function the tower calls inside every block (ToMe-style merging)
  LLMState      the sequence at a decoder layer boundary (llm stage), typed
  LayerAccess   what a boundary hook may use of the decoder (q/k of a layer, the final norm)
  BoundaryHook  the function the decoder calls at the boundaries a plan acts at

`take` gathers per-token arrays and `splice` inserts a block of tokens at each
sample's own offset; every placement of tokens into a sequence (the VLM's image
placeholder, LLaVolta's pooled grid, SparseVLM's recycled tokens) goes through
`splice`. Arrays are batch-leading with the token axis at 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp

Array = jax.Array

# `LLMState.tokens["patch"]` values that are not a patch index.
CLASS_TOKEN = -1
TEXT = -2
MERGED = -3


# ---- sequence edits ---------------------------------------------------------------------------
def take(x: Array, idx: Array) -> Array:
  """x[b, idx[b, j], ...]: [B, N, ...] gathered by int[B, k] -> [B, k, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def splice(base: Array, offset: Array, remove: int, insert: Array) -> Array:
  """Replaces `remove` slots of each sample at its own `offset` with the K slots of `insert`.

  out[b, j] = base[b, j]                      for j < offset[b]
            = insert[b, j - offset[b]]        for offset[b] <= j < offset[b] + K
            = base[b, j - K + remove]         after that

  Args:
    base: [B, T, ...]; offset: int32[B] (0 <= offset <= T - remove); remove:
      static slots removed (0 inserts); insert: [B, K, ...] (K static, may be 0).
  Returns:
    [B, T - remove + K, ...] in base's dtype.
  """
  b, t = base.shape[:2]
  k = insert.shape[1]
  if not 0 <= remove <= t:
    raise ValueError(f"splice: remove={remove} must be in 0..{t} (the sequence length)")
  j = jnp.arange(t - remove + k)[None, :]  # [1, T']
  p = offset.astype(jnp.int32)[:, None]  # [B, 1]
  src = jnp.clip(jnp.where(j < p, j, j - k + remove), 0, max(t - 1, 0))
  out = take(base, jnp.broadcast_to(src, (b, src.shape[1])))
  if k == 0:
    return out
  is_new = (j >= p) & (j < p + k)
  new = take(insert.astype(base.dtype), jnp.broadcast_to(jnp.clip(j - p, 0, k - 1), (b, src.shape[1])))
  return jnp.where(is_new.reshape(is_new.shape + (1,) * (base.ndim - 2)), new, out)


# ---- vision / embed stages --------------------------------------------------------------------
@flax.struct.dataclass
class Tokens:
  """Visual tokens on their way to the language model.

  Attributes:
    x: float[B, N, D] features.
    positions: int32[B, N] index of the (first) original patch a token stands
      for, in raster order of the tower's grid (0..P-1; the class token, when
      kept, is -1 and goes first). The decoder's RoPE ids derive from these
      under the `keep` position policy.
    valid: bool[B, N] False for slots a data-dependent rule left empty
      (attention ignores them).
    size: float32[B, N] how many original patches a token stands for.
    input: int32[B, N] or None: which visual input of the prompt (its image /
      video placeholder, 0-based) the token belongs to; None for one image.
    frame: int32[B, N] or None: the frame (video) or tile (anyres image) of
      its input the token comes from; None when every input has one.
    row, col: int32[B, N] or None: the token's (row, col) in its frame's or
      tile's patch grid (the grid before any reduction).
    Structure fields are gathered with the rest; methods that need them read
    them (`tokens.frame`) and fail with a clear error when they are None.
  """
  x: Array
  positions: Array
  valid: Array
  size: Array
  input: Array | None = None
  frame: Array | None = None
  row: Array | None = None
  col: Array | None = None

  @property
  def count(self) -> int:
    return self.x.shape[1]

  @classmethod
  def full(cls, x: Array, first_position: int = 0) -> "Tokens":
    """All N tokens valid, positions first_position..first_position+N-1, size 1."""
    b, n = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) + first_position, (b, n))
    return cls(x, positions, jnp.ones((b, n), bool), jnp.ones((b, n), jnp.float32))

  def gather(self, idx: Array) -> "Tokens":
    """The tokens at idx (int32[B, k]), every field gathered."""
    return jax.tree_util.tree_map(lambda a: take(a, idx), self)


def unit_structure(unit_input: Array, unit_frame: Array, unit_valid: Array, grid: tuple[int, int]) -> dict:
  """The `Tokens` structure fields of M units (images, frames or tiles) of rows x cols tokens each.

  Args:
    unit_input, unit_frame: int32[B, M] each unit's visual input and frame / tile index.
    unit_valid: bool[B, M] False for padding units.
    grid: (rows, cols) of one unit's patch grid (P = rows * cols tokens, raster order).
  Returns:
    dict input/frame/row/col int32[B, M * P] and valid bool[B, M * P], unit-major.
  """
  rows, cols = grid
  p = rows * cols
  b, m = unit_input.shape
  cell = jnp.arange(m * p, dtype=jnp.int32) % p
  rep = lambda a: jnp.repeat(a, p, axis=1)  # noqa: E731
  return dict(input=rep(unit_input), frame=rep(unit_frame), row=jnp.broadcast_to(cell // cols, (b, m * p)),
              col=jnp.broadcast_to(cell % cols, (b, m * p)), valid=rep(unit_valid))


@dataclasses.dataclass(frozen=True)
class BlockHook:
  """A function called inside every tower block, between attention and MLP.

  `fn(layer, state) -> state` where state is a dict with at least
  `x` float[B, T, D] (hidden states after attention), `q`, `k`
  float[B, T, N, H] (the block's projections), `metric` float[B, T, H] (its
  head-mean keys) and `size` float[B, T] (patches per token); it may change T
  and carry its own entries (they come back in the aux dict under
  `vision/hook/<name>`; `positions` int32[B, T], the tower index of the token
  each one stands for, class token at 0, becomes the tokens' positions). When
  it sets `proportional=True`, later blocks add log(size) to every attention
  logit (ToMe's proportional attention).
  """
  fn: Callable[[int, dict], dict]


# ---- llm stage --------------------------------------------------------------------------------
@flax.struct.dataclass
class LLMState:
  """The sequence at a decoder layer boundary, as in-LLM methods read and change it.

  Three kinds of entries, so that no method edits another's by hand:
    per token  `x`, `positions`, `valid`, `visual` and the `tokens` mapping:
               every gather or splice moves them together (`gather`, `splice`).
    scratch    a method's own values that are not per token (`note` / `noted`):
               never gathered; the framework removes them after the method's
               last boundary, with the method's per-token values (`keep_mine`).
    reports    what a method wants back in the aux dict (`report`): kept to the
               end, returned as `llm/<owner>/<name>`.
  Methods run under an `owner` namespace (their name, or `name.i` when a plan
  holds the same method twice) that the framework sets, so two instances of a
  method never share an entry.

  Attributes:
    x: float[B, T, D] hidden states entering decoder layer `layer`.
    positions: int32[B, T] RoPE position ids.
    valid: bool[B, T] real tokens (attention and the caches ignore the rest).
    visual: bool[B, T] the slot holds a visual token.
    tokens: per-token entries [B, T, ...]: `patch` int32 (the original patch a
      visual token stands for; CLASS_TOKEN, TEXT or MERGED otherwise), the
      caller's entries (`prompt` bool: False on tokens appended after the
      prompt; `query` bool: PyramidDrop's training rows; `target`, `loss` for
      training) and methods' own per-token values (`<owner>/<name>`).
    scratch: `<owner>/<name>` -> a method's values that are not per token
      (arrays [B, ...], or Python numbers fixed at trace time).
    reports: `<owner>/<name>` -> arrays returned in the aux dict.
    n_visual: static number of visual slots (the same for every sample).
    n_cls: static 1 when the visual block starts with the tower's class token
      (selection never drops it and budgets do not count it), else 0.
    layer: static index of the decoder layer about to run.
    owner: static namespace of the method running now ("" outside methods).
  """
  x: Array
  positions: Array
  valid: Array
  visual: Array
  tokens: Mapping[str, Array] = flax.struct.field(default_factory=dict)
  scratch: Mapping[str, Any] = flax.struct.field(default_factory=dict)
  reports: Mapping[str, Array] = flax.struct.field(default_factory=dict)
  n_visual: int = flax.struct.field(pytree_node=False, default=0)
  n_cls: int = flax.struct.field(pytree_node=False, default=0)
  layer: int = flax.struct.field(pytree_node=False, default=0)
  owner: str = flax.struct.field(pytree_node=False, default="")

  @property
  def length(self) -> int:
    return self.x.shape[1]

  @property
  def n_patches(self) -> int:
    """Visual slots a selection may drop: every visual slot but a leading class token."""
    return self.n_visual - self.n_cls

  @property
  def droppable(self) -> Array:
    """bool[B, T]: visual slots other than the class token."""
    if not self.n_cls:
      return self.visual
    return self.visual & (self.tokens["patch"] != CLASS_TOKEN)

  # -- per-token entries, moved together --------------------------------------------------------
  def per_token(self) -> dict[str, Array]:
    """Every per-token array by name (`tokens` entries prefixed `tokens/`)."""
    out = {"x": self.x, "positions": self.positions, "valid": self.valid, "visual": self.visual}
    out.update({f"tokens/{k}": v for k, v in self.tokens.items()})
    return out

  def _with_per_token(self, arrays: Mapping[str, Array], n_visual: int) -> "LLMState":
    tokens = {k[len("tokens/"):]: v for k, v in arrays.items() if k.startswith("tokens/")}
    return self.replace(x=arrays["x"], positions=arrays["positions"], valid=arrays["valid"],
                        visual=arrays["visual"], tokens=tokens, n_visual=n_visual)

  def slots(self, idx: Array) -> dict[str, Array]:
    """Every per-token entry at the slots idx (int32[B, K]): the starting point of inserted tokens."""
    return {k: take(v, idx) for k, v in self.per_token().items()}

  def gather(self, idx: Array, n_visual: int) -> "LLMState":
    """The sequence reduced to the slots idx (int32[B, T'], ascending), which hold n_visual visual tokens."""
    return self._with_per_token(self.slots(idx), n_visual)

  def splice(self, offset: Array, remove: int, insert: Mapping[str, Array], n_visual: int) -> "LLMState":
    """`splice` applied to every per-token entry: `remove` slots at each sample's offset become the
    K slots of `insert` (a mapping with every key of `per_token()`, e.g. from `slots`)."""
    base = self.per_token()
    missing = sorted(set(base) - set(insert))
    if missing:
      raise ValueError(f"LLMState.splice: the inserted tokens lack the entries {missing}")
    return self._with_per_token({k: splice(v, offset, remove, insert[k]) for k, v in base.items()}, n_visual)

  # -- a method's own entries -------------------------------------------------------------------
  def _key(self, name: str) -> str:
    if not self.owner:
      raise ValueError(f"{name!r}: a method's own entries need the owner the framework sets (LLMState.owner)")
    return f"{self.owner}/{name}"

  def keep_mine(self, **values: Array) -> "LLMState":
    """Stores per-token values [B, T, ...] of the running method (gathered with the sequence)."""
    return self.replace(tokens={**self.tokens, **{self._key(k): v for k, v in values.items()}})

  def mine(self, name: str) -> Array:
    """A per-token value the running method stored at an earlier boundary."""
    return self.tokens[self._key(name)]

  def note(self, **values: Any) -> "LLMState":
    """Stores values of the running method that are not per token (never gathered)."""
    return self.replace(scratch={**self.scratch, **{self._key(k): v for k, v in values.items()}})

  def noted(self, name: str, default: Any = None) -> Any:
    return self.scratch.get(self._key(name), default)

  def report(self, **values: Array) -> "LLMState":
    """Values returned in the aux dict as `llm/<owner>/<name>`."""
    return self.replace(reports={**self.reports, **{self._key(k): v for k, v in values.items()}})

  def release(self, owner: str) -> "LLMState":
    """Drops `owner`'s per-token values and scratch (the framework calls it after its last boundary)."""
    prefix = f"{owner}/"
    return self.replace(tokens={k: v for k, v in self.tokens.items() if not k.startswith(prefix)},
                        scratch={k: v for k, v in self.scratch.items() if not k.startswith(prefix)})


@dataclasses.dataclass(frozen=True)
class LayerAccess:
  """What a boundary hook may use of the decoder besides the state.

  Attributes:
    qk: `qk(layer, x, positions) -> (q float[B, T, N, H], k float[B, T, K, H])`,
      the roped projections of layer `layer` for hidden states entering it.
    final_norm: the decoder's last RMSNorm.
    caches: the layer caches built so far (layers before this boundary).
    num_layers: decoder layers.
  """
  qk: Callable[[int, Array, Array], tuple[Array, Array]]
  final_norm: Callable[[Array], Array]
  caches: tuple
  num_layers: int


@dataclasses.dataclass(frozen=True)
class BoundaryHook:
  """`fn(layer, state, access) -> state`, called before each decoder layer in `layers`.

  `layers` is static (the boundaries a plan's methods act at), so the decoder
  knows where the sequence may change and runs the layers between as it likes.
  """
  layers: frozenset
  fn: Callable[[int, LLMState, LayerAccess], LLMState]
