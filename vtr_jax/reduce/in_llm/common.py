"""What every in-LLM method shares: the bases, attention rows from Q/K, visual-token selection.

A method acts at static decoder-layer boundaries (`boundaries`) on the typed
`LLMState` (`vtr_jax.seams`): x, positions, valid, visual, and per-token
entries in `tokens` (`patch`: the original patch of a visual token; the
caller's `prompt`, `query`, `target`, `loss`; methods' own values). The
framework (`reduce.api.llm_boundary_hook`) namespaces each method's entries
and clears them after its last boundary.

Selection (`LLMMethod.drop`) keeps every text token, the class token where the
tower hands one on (budgets never count it, as before the LLM, where methods
never see it), and `keep` other visual tokens per sample (a static count), in
slot order, so visual tokens stay one contiguous block. Positions follow the
class's declared policy: `renumber` makes them contiguous afterwards, `keep`
leaves the original ids (gaps). The `mask` variant keeps the sequence whole
and hides the dropped tokens with `valid` instead (FastV's attention-mask
variant): same results, no speed-up -- the reference the drop variant is
tested against.

Two bases cover the dropping methods: `ScheduledDrop` (stages, each scored at
one boundary and dropping at the same or a later one: PyramidDrop, SparseVLM)
and its one-stage form `SingleDrop` ("score at layer K-1, keep at K": FastV,
DART, visual-token exit).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from vtr_jax.kernels import ops
from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import Method, ReductionError
from vtr_jax.seams import LayerAccess, LLMState

BIG = 3.0e38  # priority of tokens that are always kept


def renumber(valid: jax.Array) -> jax.Array:
  """Contiguous position ids over the valid tokens: int32[B, T]."""
  return jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)


def prompt_mask(state: LLMState) -> jax.Array:
  """bool[B, T]: valid prompt tokens (`tokens["prompt"]` when the caller marks appended answer tokens)."""
  if "prompt" in state.tokens:
    return state.valid & state.tokens["prompt"]
  return state.valid


def last_row(state: LLMState) -> tuple[jax.Array, jax.Array]:
  """(slot index int32[B, 1], valid bool[B, 1]) of the last prompt token.

  With left padding that is slot T-1, unless `tokens["prompt"]` marks tokens
  appended after the prompt (answers during training, generated tokens when
  re-running a prefill): then it is the last slot of the prompt.
  """
  b, t = state.valid.shape
  if "prompt" not in state.tokens:
    return jnp.full((b, 1), t - 1, jnp.int32), jnp.ones((b, 1), bool)
  slots = jnp.arange(t, dtype=jnp.int32)[None]
  last = jnp.max(jnp.where(prompt_mask(state), slots, -1), axis=1, keepdims=True)
  return jnp.maximum(last, 0), last >= 0


def all_rows(state: LLMState) -> jax.Array:
  """int32[B, T]: every slot as a query row (methods that average over a row mask)."""
  return jnp.broadcast_to(jnp.arange(state.length, dtype=jnp.int32), state.valid.shape)


def text_after_image(state: LLMState) -> jax.Array:
  """bool[B, T]: valid prompt text tokens after the last visual slot."""
  slots = jnp.arange(state.length)[None]
  last_vis = jnp.max(jnp.where(state.visual, slots, -1), axis=1, keepdims=True)
  return prompt_mask(state) & ~state.visual & (slots > last_vis)


def attention_mass(access: LayerAccess, layer: int, state: LLMState, rows: jax.Array,
                   row_valid: jax.Array) -> jax.Array:
  """Mean softmax attention that the query rows pay each key at decoder layer `layer`.

  Computes only the rows' q (and all keys) with layer `layer`'s input norm,
  projections and RoPE on the hidden states entering it; the attention
  matrix is never formed (`vtr_jax.kernels.ops.attention_mass`).

  Args:
    access: the decoder's `LayerAccess`.
    rows: int32[B, R] query slots; row_valid: bool[B, R].
  Returns:
    float32[B, T] attention per key, averaged over heads and valid rows,
    causal and padding masks applied.
  """
  q, k = access.qk(layer, state.x, state.positions)  # [B, T, N, H], [B, T, K, H]
  q_rows = P.take(q, rows)  # [B, R, N, H]
  return ops.attention_mass(jnp.swapaxes(q_rows, 1, 2), jnp.swapaxes(k, 1, 2), key_valid=state.valid,
                            row_valid=row_valid, q_slots=rows)


def check_layer(method: str, layer: int, num_layers: int, *, first: int = 0) -> None:
  if not first <= layer < num_layers:
    raise ReductionError(f"{method}: layer={layer} must be in {first}..{num_layers - 1} "
                         f"(the decoder has {num_layers} layers)")


def check_increasing(method: str, layers: tuple[int, ...]) -> None:
  if list(layers) != sorted(set(layers)) or not layers:
    raise ReductionError(f"{method}: layers={layers} must be strictly increasing")


@dataclasses.dataclass(frozen=True)
class LLMMethod(Method):
  """Base (unregistered) of methods acting at decoder-layer boundaries.

  Subclasses implement `boundaries` and `at_boundary`; `drop` is the shared
  selection, following the class's `positions` policy. `removes_class_token`
  marks methods whose rule removes every visual token, the class token too
  (visual-token exit).
  """
  stages: ClassVar[tuple[str, ...]] = ("llm",)
  removes_class_token: ClassVar[bool] = False

  def drop(self, state: LLMState, scores: jax.Array, keep: int, *, mask: bool = False
           ) -> tuple[LLMState, jax.Array]:
    """Keeps text, the class token, and the `keep` best-scoring valid droppable visual tokens.

    Args:
      scores: float[B, T] (only droppable visual slots matter; NaN ranks last); None: all equal.
      keep: static count, 0 <= keep <= droppable visual tokens present.
      mask: hide the dropped tokens (valid=False) instead of removing them.
    Returns:
      (new state, chosen bool[B, T] over the old slots: droppable tokens kept).
    """
    candidates = state.visual if self.removes_class_token else state.droppable
    n_cand = state.n_visual if self.removes_class_token else state.n_patches
    if not 0 <= keep <= n_cand:
      raise ReductionError(f"{self.name}: cannot keep {keep} visual tokens: {n_cand} are left at this layer")
    if scores is None:
      scores = jnp.zeros(state.valid.shape, jnp.float32)
    score = jnp.where(jnp.isnan(scores), -jnp.inf, scores.astype(jnp.float32))
    if keep:
      idx = P.topk_indices(jnp.where(candidates, score, -jnp.inf), keep, candidates & state.valid)
      chosen = P.chosen_mask(idx, state.length) & candidates
    else:
      chosen = jnp.zeros_like(candidates)
    stays = ~candidates | chosen
    if mask:
      new = state.replace(valid=state.valid & stays)
    else:
      idx = P.topk_indices(stays.astype(jnp.float32), state.length - n_cand + keep)  # sorted slots
      new = state.gather(idx, state.n_visual - n_cand + keep)
    if self.positions == "renumber":
      new = new.replace(positions=renumber(new.valid))
    return new, chosen


@dataclasses.dataclass(frozen=True)
class ScheduledDrop(LLMMethod):
  """Base (unregistered) of methods that drop visual tokens in static stages.

  Stage i is scored at boundary `stage_layers[i][0]` (None: no score) and
  drops at boundary `stage_layers[i][1]` (the same or a later one) to
  `stage_keeps(n)[i]` = (kept, merged) droppable tokens, n being the droppable
  tokens present at the method's first boundary. At a boundary a drop runs
  before a score for a later drop. A score computed before its drop boundary
  is a per-token value (it follows other methods' drops in between).

  Subclasses implement `stage_layers`, `stage_keeps`, `score` and, when the
  stage is not a plain top-k drop, `select`.

  Attributes:
    mask: hide dropped tokens instead of removing them (the checking variant).
  """
  mask: bool = False

  def stage_layers(self, num_layers: int) -> tuple[tuple[int | None, int], ...]:
    """((score boundary or None, drop boundary), ...) per stage, validated."""
    raise NotImplementedError

  def stage_keeps(self, n: int) -> tuple[tuple[int, int], ...]:
    """((kept, merged), ...) per stage for n droppable tokens at the method's first boundary."""
    raise NotImplementedError

  def score(self, stage: int, state: LLMState, access: LayerAccess) -> jax.Array | None:
    """float[B, T] of stage `stage` on the state at its score boundary (higher = kept first)."""
    return None

  def select(self, stage: int, keep: int, merged: int, state: LLMState, score: jax.Array | None,
             access: LayerAccess) -> LLMState:
    """The drop of stage `stage` (default: the top `keep` by score)."""
    return self.drop(state, score, keep, mask=self.mask)[0]

  def kept(self, n: int) -> int:
    keep, merged = self.stage_keeps(n)[-1]
    return keep + merged

  def boundaries(self, num_layers: int) -> tuple[int, ...]:
    return tuple(sorted({b for stage in self.stage_layers(num_layers) for b in stage if b is not None}))

  def layer_counts(self, n: int, num_layers: int, n_cls: int = 0) -> list[int]:
    stages = self.stage_layers(num_layers)
    if self.mask:  # the checking variant keeps every slot: no saving
      return [n + n_cls] * num_layers
    cls = 0 if self.removes_class_token else n_cls
    after = {drop: keep + merged + cls for (_, drop), (keep, merged) in zip(stages, self.stage_keeps(n))}
    counts, current = [], n + n_cls
    for i in range(num_layers):
      current = after.get(i, current)
      counts.append(current)
    return counts

  def at_boundary(self, layer: int, state: LLMState, access: LayerAccess) -> LLMState:
    stages = self.stage_layers(access.num_layers)
    if layer == self.boundaries(access.num_layers)[0]:
      state = state.note(n0=state.n_visual if self.removes_class_token else state.n_patches)
    keeps = self.stage_keeps(state.noted("n0"))
    for i, (score_at, drop_at) in enumerate(stages):
      if drop_at == layer:
        if score_at is None:
          score = None
        elif score_at == layer:
          score = self.score(i, state, access)
        else:
          score = state.mine("score")
        state = self.select(i, *keeps[i], state, score, access)
    for i, (score_at, drop_at) in enumerate(stages):
      if score_at == layer and drop_at > layer:
        state = state.keep_mine(score=self.score(i, state, access))
    return state


@dataclasses.dataclass(frozen=True)
class SingleDrop(ScheduledDrop):
  """Base (unregistered): one drop before decoder layer K, scored on the state entering layer K-1
  (`scored=False`: no score, e.g. every visual token leaves).

  Attributes:
    layer: K >= 1.
  """
  layer: int = 2
  scored: ClassVar[bool] = True

  def stage_layers(self, num_layers: int):
    check_layer(self.name, self.layer, num_layers, first=1)
    return ((self.layer - 1 if self.scored else None, self.layer),)

  def stage_keeps(self, n: int):
    return ((self.kept(n), 0),)

  def kept(self, n: int) -> int:
    raise NotImplementedError
