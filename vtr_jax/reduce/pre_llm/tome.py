"""Token merging inside the ViT blocks: ToMe's bipartite soft matching, and the ToMe method.

The merge runs in every block the tower runs, between attention and MLP (a
`BlockHook`). One step on T tokens, r of them merged away:

  1. metric = the block's head-mean keys, L2-normalised;
  2. A = tokens 0, 2, 4, ... and B = tokens 1, 3, 5, ... (current order);
     each A token finds its most similar B token (cosine; ties -> lowest index);
  3. the r A tokens ranked highest (ToMe: by that similarity; Turbo subtracts
     a semantic term, see `turbo.py`) are merged into their B token by a
     size-weighted average; sizes add up (every patch starts at size 1);
  4. the class token (index 0, an A token) is never matched nor merged;
  5. new order: the unmerged A tokens in ascending order (class token first),
     then every B token;
  6. from then on the tower adds log(size) of each key to the attention logits
     (proportional attention), as the reference's `prop_attn=True` does.

Reference: facebookresearch/ToMe `tome/merge.py` (bipartite_soft_matching,
merge_wavg) and `tome/patch/timm.py` (ToMeBlock / ToMeAttention) — read here
through a verbatim copy in ModelTC/llmc `token_reduction/tome.py`, whose own
CLIP patch is the quirk METHODS.md names: it calls merge_wavg without sizes
and drops proportional attention. Here sizes are tracked and proportional
attention is on, as in the original.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vtr_jax.kernels import ops
from vtr_jax.reduce import primitives as P
from vtr_jax.reduce.api import Method, ReductionError, register, resolve_budget
from vtr_jax.seams import BlockHook

Array = jax.Array


def merge_schedule(method: str, patches: int, keep: int, blocks: int) -> tuple[int, ...]:
  """Patches to merge away in each of `blocks` blocks so that `keep` of `patches` remain.

  An even spread: block i merges ceil(left / blocks left), so the remainder
  falls on the first blocks; raised where needed so that the later blocks,
  merging at most half each, still reach `keep`; never more than half of the
  patches entering a block (ToMe's bound r <= (T - class token) // 2).

  Raises:
    ReductionError when `keep` is out of reach (more than half per block needed).
  """
  schedule, n = [], patches
  for i in range(blocks):
    left = blocks - i
    even = -(-(n - keep) // left)
    forced = n - keep * 2 ** (left - 1)  # after this block, halving each later block must reach keep
    r = min(max(even, forced), n // 2)
    schedule.append(r)
    n -= r
  if n != keep:
    fewest = -(-patches // 2 ** blocks)
    raise ReductionError(f"{method}: keep={keep} cannot be reached from {patches} patches in the {blocks} blocks "
                         f"the tower runs: a block merges at most half of its patches (r <= 50%), so at least "
                         f"{fewest} remain")
  return tuple(schedule)


def bipartite_merge(state: dict, r: int, has_cls: bool, penalty: Array | None = None) -> dict:
  """One merging step on a block-hook state (see the module docstring).

  Args:
    state: the tower's hook state: `x` float[B, T, D], `metric` float[B, T, H]
      (head-mean keys), `size` float[B, T]; `positions` int32[B, T] (tower
      index of the token each slot stands for) is created on the first call.
    r: static count of A tokens to merge away, 0 <= r <= (T - has_cls) // 2.
    has_cls: token 0 is a class token (never merged).
    penalty: float32[B, T] subtracted from each A token's best similarity when
      ranking the candidates (Turbo's semantic value); None for ToMe.
  Returns:
    the state with `x`, `size`, `positions` of T - r tokens and
    `proportional=True`. A merged token keeps the position of its B
    (destination) token: the tokens that survive are B tokens or unmerged A
    tokens, each at its own original position, so positions stay distinct.
  """
  x, size = state["x"], state["size"]
  b, t = x.shape[:2]
  positions = state.get("positions")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  out = {**state, "positions": positions, "proportional": True}
  if r == 0:
    return out
  if not 0 < r <= (t - int(has_cls)) // 2:
    raise ReductionError(f"a merge step may remove at most half of the {t - int(has_cls)} patch tokens "
                         f"({(t - int(has_cls)) // 2}), got r={r}")
  n_a = (t + 1) // 2
  n_b = t // 2
  a_valid = jnp.broadcast_to(jnp.arange(n_a) >= int(has_cls), (b, n_a))  # the class token finds no partner
  similarity, dst_of_a = ops.max_similarity(state["metric"][:, ::2], state["metric"][:, 1::2], metric="cosine",
                                            mode="max", x_valid=a_valid)  # [B, nA] each, over B tokens
  score = similarity if penalty is None else similarity - penalty[:, ::2]
  score = jnp.where(a_valid, score, -jnp.inf)
  src = P.topk_indices(score, r, sort=False)  # [B, r] A indices merged away
  unmerged = P.complement(src, n_a)  # [B, nA - r] ascending: class token first
  dst = P.take(dst_of_a, src)  # [B, r] B index each one joins

  x_a, x_b = x[:, ::2], x[:, 1::2]
  size_a, size_b = size[:, ::2], size[:, 1::2]
  src_size = P.take(size_a, src)
  x_b = P.scatter_merge(x_b, size_b, P.take(x_a, src), src_size, dst)
  rows = jnp.arange(b)[:, None]
  size_b = size_b + jnp.zeros((b, n_b), size.dtype).at[rows, dst].add(src_size)
  join = lambda a, bb: jnp.concatenate([P.take(a, unmerged), bb], axis=1)
  out.update(x=join(x_a, x_b), size=join(size_a, size_b), positions=join(positions[:, ::2], positions[:, 1::2]))
  return out


@register
@dataclasses.dataclass(frozen=True)
class ToMe(Method):
  """ToMe (Token Merging): bipartite soft matching inside every ViT block the tower runs.

  Budget: `keep` (or `ratio` of the patches) = patch tokens leaving the
  tower; `merge_schedule` spreads the P - keep merges over the blocks run
  (even, remainder first, <= 50 % per block). The tower's features hold
  `keep` patch tokens (+ the class token where the tower keeps one).

  Order (`method`): ToMe's own — per block, unmerged A tokens ascending, then
  B tokens; the class token stays first. The reference sorts the unmerged A
  tokens only when there is a class token (to bring it first) and leaves them
  in descending-similarity order otherwise; here they are sorted for every
  tower, so SigLIP's next split still alternates spatially (deviation).
  Positions: each token reports the patch index of the token it survived as
  (its B destination for merged groups); the decoder re-numbers
  contiguously. `Tokens.size` carries the patch counts; aux (from the VLM):
  `vision/hook/positions` int32[B, K(+1)], `vision/size` float32[B, K(+1)].
  """
  name = "tome"
  stages = ("vision",)
  order = "method"
  summary = "token merging inside the ViT blocks (bipartite matching, size-weighted)"
  keep: int | None = None
  ratio: float | None = None

  def kept(self, n: int) -> int:
    return resolve_budget(self.name, self.keep, self.ratio, n)

  def schedule(self, vision) -> tuple[int, ...]:
    """Patches merged away in each block the tower runs."""
    return merge_schedule(self.name, vision.num_patches, self.kept(vision.num_patches), vision.layers_run)

  def vision_counts(self, vision) -> list[int]:
    """Tokens entering each block run (class token included)."""
    counts, n = [], vision.num_tokens
    for r in self.schedule(vision):
      counts.append(n)
      n -= r
    return counts

  def penalty(self, state: dict, has_cls: bool) -> Array | None:
    """Per-token term subtracted from the matching score before ranking (None for ToMe)."""
    return None

  def block_hook(self, vision) -> BlockHook:
    schedule = self.schedule(vision)
    has_cls = vision.has_cls

    def fn(layer: int, state: dict) -> dict:
      r = schedule[layer] if layer < len(schedule) else 0  # blocks past the features run only at init
      penalty = self.penalty(state, has_cls) if r else None
      return bipartite_merge(state, r, has_cls, penalty)

    return BlockHook(fn)
