"""Turbo: ToMe's in-block merging ranked by information degree instead of similarity alone.

Information degree of a candidate (A) token = alpha * semantic value - mutual
redundancy (METHODS.md: "semantic value - mutual redundancy"; the paper writes
the merge priority as E = R - alpha * A):

  mutual redundancy R: its best cosine similarity to the B tokens — ToMe's
    bipartite matching score on the head-mean keys (the same step, shared);
  semantic value A: the softmax attention the class token pays it in this
    block, mean over heads, with the block's own logits (log(size) included
    once proportional attention is on).

In each block the r A tokens of lowest information degree (most redundant,
least semantic) merge into their most similar B token exactly as in ToMe
(size-weighted, class token never merged, proportional attention, same order
and positions): see `tome.py`. Turbo's understanding-model plug-in is this
merge; its generation-model variant (merge, then restore) does not apply to a
VLM's vision tower.

Towers without a class token (SigLIP): the semantic value is the attention
each token receives, mean over all query rows and heads, as the later
literature does.

Sources: the Turbo paper (arXiv 2312.07408 / 2407.11717; its abstract is in
shared/reference/papers.txt) and METHODS.md. The authors' code is not in the
reference index, so the placement of alpha and the use of the block's
attention (proportional term included) follow the paper's description.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vtr_jax.kernels import ops
from vtr_jax.reduce.api import register
from vtr_jax.reduce.pre_llm.tome import ToMe


def semantic_value(state: dict, has_cls: bool):
  """float32[B, T]: attention the class token pays each token (or, without one, the attention each
  token receives, mean over query rows), mean over heads, with the block's logits.

  log(size) enters `ops.attention_mass` as one extra channel (query 1, key
  log(size) / scale), so its logits are q.k * scale + log(size) exactly as
  the block's proportional attention computes them (log 1 = 0 before any merge).
  """
  q, k = state["q"], state["k"]  # [B, T, N, H]
  scale = q.shape[-1] ** -0.5
  log_size = jnp.log(state["size"]).astype(jnp.float32)
  rows = q[:, :1] if has_cls else q
  q_ext = jnp.concatenate([rows.astype(jnp.float32), jnp.ones(rows.shape[:3] + (1,), jnp.float32)], axis=-1)
  k_ext = jnp.concatenate([k.astype(jnp.float32),
                           jnp.broadcast_to(log_size[:, :, None, None] / scale, k.shape[:3] + (1,))], axis=-1)
  # [B, R, N, H + 1] -> [B, N, R, H + 1]
  return ops.attention_mass(q_ext.transpose(0, 2, 1, 3), k_ext.transpose(0, 2, 1, 3), scale=scale)


@register
@dataclasses.dataclass(frozen=True)
class Turbo(ToMe):
  """Turbo: ToMe-style merging inside every ViT block, candidates ranked by redundancy minus
  alpha x semantic value (class-token attention; SigLIP: attention received).

  Budget, schedule, order (`method`), positions and sizes: as `tome`.
  alpha: the balance coefficient between semantic value and redundancy.
  """
  name = "turbo"
  summary = "ToMe merging ranked by information degree (redundancy vs [CLS] attention)"
  alpha: float = 1.0

  def penalty(self, state: dict, has_cls: bool):
    return self.alpha * semantic_value(state, has_cls)
