"""One attention entry point, selected by implementation name (MaxText's `attention_op`).

    out = attention.attend(q, k, v, Mask.causal_prefill(valid), implementation="auto")

Letters as in `vtr_jax.models.common`: B batch, T queries, S keys, N query heads,
K kv heads (N % K == 0, G = N // K), H head dim.

Implementations (`IMPLEMENTATIONS`):
  reference  the einsum over materialised float32 logits [B, N, T, S] and a
             dense bool[B, T, S] mask (`Mask.dense`); kept as the ground truth
             for tests and as the CPU default for short sequences.
  xla        `jax.nn.dot_product_attention(implementation="xla")`: XLA fuses it,
             the logits are still [B, N, T, S] inside; the mask goes in as
             broadcastable pieces ([B, 1, 1, S] key validity, `is_causal`).
  cudnn      the same call with `implementation="cudnn"` (GPU, bfloat16/float16,
             head dim a multiple of 8 up to 128): flash attention in cuDNN. cuDNN
             takes a mask only as a bias of full length, so key validity and the
             per-key bias are broadcast to [B, 1, T, S] there (the one path
             besides `reference` that builds a T x S mask), and with one it
             needs even lengths (its training kernels do); `auto` checks.
  pallas     JAX's own Pallas TPU splash attention (`jax.experimental.pallas.ops.
             tpu.splash_attention`, not rewritten here): causal or full masks
             computed per block, key validity as segment ids, grouped heads
             natively. No per-key bias and no traced causal offset (decoding);
             `auto` takes `xla` for those. Runs on CPU with `interpret=True`.
  chunked    an online softmax over key blocks (`lax.scan`) inside a loop over
             query blocks, with a flash-style `custom_vjp` backward: nothing of
             size [T, S] is stored, forward or backward. The CPU default for long
             sequences, and the fallback on GPU when cuDNN cannot run.
  auto       picks per backend and size (`choose`).

The mask (`Mask`) is compact: key validity bool[B, S], an optional causal
offset (query t sits at key slot offset + t), and a per-key additive bias
float[B, S] (ToMe's log-size). Under a causal mask every query also sees its
own slot, so padding rows never have an empty softmax and stay finite; their
outputs are unused, and implementations may differ on them (the outputs of
rows with a valid query agree to float rounding).
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp

from vtr_jax.models import common as c

Array = jax.Array

IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn", "pallas", "chunked")

# `auto` on CPU: the reference below this many query x key pairs per sample, `chunked` from it on.
CHUNKED_FROM = 2048 * 2048
BLOCK_Q = 512  # `chunked` query block
BLOCK_KV = 512  # `chunked` key block
SPLASH_BLOCKS = (512, 256, 128)  # `pallas` (splash) blocks: the one that pads T and S least, larger on ties


class AttentionError(ValueError):
  """An implementation that cannot run this attention (names the implementation and the reason)."""


@flax.struct.dataclass
class Mask:
  """Which keys each query may attend, without a [B, T, S] array.

  Key s is visible to query t when `key_valid[b, s]` and, if `causal`,
  s <= offset + t; under `causal` the query's own slot (offset + t) is always
  visible. `key_bias[b, s]` is added to every query's logit for key s. With
  `segment_ids` (T == S) a query sees only the keys of its own segment
  (block-diagonal attention: the Qwen2.5-VL tower's windows and frames); a
  negative id is padding, seen by no query.

  Attributes:
    key_valid: bool[B, S] or None (every key valid).
    key_bias: float[B, S] or None.
    segment_ids: int32[B, S] or None.
    offset: int32[] or int32[B], the key slot of query 0 under `causal`;
      None means 0 (prefill, T == S), an array a decode step (`cache.end`).
    causal: static.
  """
  key_valid: Array | None = None
  key_bias: Array | None = None
  offset: Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  segment_ids: Array | None = None

  @classmethod
  def causal_prefill(cls, valid: Array) -> "Mask":
    """A left-padded prefill: query t at key slot t, valid (bool[B, T]) keys only."""
    return cls(key_valid=valid, causal=True)

  @classmethod
  def decode(cls, key_valid: Array, offset: Array) -> "Mask":
    """Queries written at cache slots offset.. (int32[] or int32[B]) over the cache's valid slots."""
    return cls(key_valid=key_valid, offset=offset, causal=True)

  def query_slots(self, t: int) -> Array:
    """int32[B or 1, T]: the key slot of each query (causal masks)."""
    offset = jnp.zeros((1,), jnp.int32) if self.offset is None else jnp.asarray(self.offset, jnp.int32)
    return offset.reshape(-1, 1) + jnp.arange(t, dtype=jnp.int32)[None]

  def dense(self, t: int, s: int) -> Array | None:
    """bool[B or 1, T, S] (the `reference` path only), None when every key is visible."""
    if self.key_valid is None and not self.causal and self.segment_ids is None:
      return None
    allowed = jnp.ones((1, t, s), bool) if self.key_valid is None else jnp.broadcast_to(
        self.key_valid[:, None, :], (self.key_valid.shape[0], t, s))
    if self.segment_ids is not None:
      seg = self.segment_ids
      allowed = allowed & (seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, None, :]
    if self.causal:
      slot_q = self.query_slots(t)[:, :, None]  # [B|1, T, 1]
      slot_k = jnp.arange(s)[None, None, :]
      allowed = (allowed & (slot_k <= slot_q)) | (slot_k == slot_q)
    return allowed


def attend(q: Array, k: Array, v: Array, mask: Mask | None = None, *, implementation: str = "auto",
           interpret: bool = False) -> Array:
  """Softmax attention with grouped-query heads.

  Args:
    q: float[B, T, N, H]. k, v: float[B, S, K, H], N % K == 0.
    mask: which keys each query sees (None: all).
    implementation: a name in IMPLEMENTATIONS.
    interpret: run `pallas` in Pallas interpret mode (CPU tests).
  Returns:
    float[B, T, N, H] in q's dtype.
  """
  mask = Mask() if mask is None else mask
  check_shapes(q, k, v, mask)
  name = choose(implementation, q, k, mask, interpret=interpret)
  if name == "reference":
    return reference(q, k, v, mask)
  if name in ("xla", "cudnn"):
    return _jax_nn(q, k, v, mask, name)
  if name == "pallas":
    return _splash(q, k, v, mask, interpret)
  return chunked(q, k, v, mask)


def check_shapes(q: Array, k: Array, v: Array, mask: Mask) -> None:
  """Raises AttentionError naming the shapes when q, k, v and the mask do not fit."""
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise AttentionError(f"q must be float[B, T, N, H] and k, v float[B, S, K, H]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
  b, _, n, h = q.shape
  if k.shape[0] != b or k.shape[3] != h or n % k.shape[2]:
    raise AttentionError(f"q {q.shape} and k {k.shape} must share B and H, with query heads a multiple of kv heads")
  if mask.segment_ids is not None and q.shape[1] != k.shape[1]:
    raise AttentionError(f"segment ids are for self-attention (T == S); got T={q.shape[1]}, S={k.shape[1]}")
  for name, a in (("key_valid", mask.key_valid), ("key_bias", mask.key_bias), ("segment_ids", mask.segment_ids)):
    if a is not None and a.shape != (b, k.shape[1]):
      raise AttentionError(f"mask.{name} must have shape {(b, k.shape[1])}, got {a.shape}")
  if mask.causal and mask.offset is None and q.shape[1] != k.shape[1]:
    raise AttentionError(f"a causal mask without offset is a prefill (T == S); got T={q.shape[1]}, S={k.shape[1]}")


def choose(implementation: str, q: Array, k: Array, mask: Mask, *, interpret: bool = False) -> str:
  """The implementation `attend` runs: `implementation` itself, or `auto`'s pick.

  auto: TPU -> `pallas` where splash fits (else `xla`); GPU -> `cudnn` where
  cuDNN fits, else `xla` below CHUNKED_FROM query x key pairs and `chunked`
  from there; CPU -> `reference` below CHUNKED_FROM, `chunked` from there.
  """
  if implementation not in IMPLEMENTATIONS:
    raise AttentionError(f"unknown attention implementation {implementation!r}; known: {', '.join(IMPLEMENTATIONS)}")
  backend = jax.default_backend()
  long = q.shape[1] * k.shape[1] >= CHUNKED_FROM
  if mask.segment_ids is not None:  # block-diagonal masks: the dense paths (a varlen kernel is still to come)
    if implementation in ("chunked", "pallas", "cudnn"):
      raise AttentionError(f"attention implementation {implementation!r} cannot run: segment masks run on "
                           "'reference' or 'xla'")
    return "reference" if implementation == "auto" and backend == "cpu" else (
        "xla" if implementation == "auto" else implementation)
  if implementation == "auto":
    if backend == "tpu":
      return "pallas" if _splash_unsupported(mask) is None else "xla"
    if backend == "gpu":
      if _cudnn_unsupported(q, k, mask) is None:
        return "cudnn"
      return "chunked" if long else "xla"
    return "chunked" if long else "reference"
  if implementation == "pallas":
    why = _splash_unsupported(mask) or (None if backend == "tpu" or interpret else
                                        f"it compiles for TPU only (backend {backend!r}; interpret=True runs it)")
    if why:
      raise AttentionError(f"attention implementation 'pallas' cannot run: {why}")
  if implementation == "cudnn":
    why = _cudnn_unsupported(q, k, mask) or (None if backend == "gpu" else f"it needs a GPU (backend {backend!r})")
    if why:
      raise AttentionError(f"attention implementation 'cudnn' cannot run: {why}")
  return implementation


# ---- reference ----------------------------------------------------------------------------------
def reference(q: Array, k: Array, v: Array, mask: Mask) -> Array:
  """The einsum over materialised logits (see `attend`), computed in float32."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  logits = c.attention_logits(q, k)  # [B, N, T, S]
  if mask.key_bias is not None:
    logits = logits + mask.key_bias[:, None, None, :].astype(jnp.float32)
  dense = mask.dense(t, k.shape[1])
  probs = c.masked_softmax(logits, None if dense is None else dense[:, None])
  probs = probs.reshape(b, kh, n // kh, t, -1)  # [B, N, T, S] -> [B, K, G, T, S]
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)  # [B, T, K, G, H] -> [B, T, N, H]


# ---- jax.nn.dot_product_attention (XLA, cuDNN) ---------------------------------------------------
def _cudnn_unsupported(q: Array, k: Array, mask: Mask) -> str | None:
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN flash attention takes bfloat16/float16, got {q.dtype}"
  if q.shape[-1] % 8 or q.shape[-1] > 128:
    return f"cuDNN needs a head dim that is a multiple of 8 up to 128, got {q.shape[-1]}"
  if (mask.key_valid is not None or mask.key_bias is not None or mask.offset is not None) and (
      q.shape[1] % 2 or k.shape[1] % 2):
    return (f"cuDNN takes a mask or bias (a bias to it) only for even lengths when training; got T={q.shape[1]}, "
            f"S={k.shape[1]}")
  return None


def _jax_nn(q: Array, k: Array, v: Array, mask: Mask, implementation: str) -> Array:
  b, t, _, _ = q.shape
  s = k.shape[1]
  is_causal = mask.causal and mask.offset is None  # prefill: the lower triangle, cuDNN skips the rest
  allowed = None if mask.key_valid is None else mask.key_valid[:, None, None, :]  # [B, 1, 1, S]
  if mask.segment_ids is not None:
    seg = mask.segment_ids
    same = ((seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, None, :])[:, None]  # [B, 1, T, S]
    allowed = same if allowed is None else allowed & same
  if mask.causal and not is_causal:  # decode: slots up to each query's own
    later = jnp.arange(s)[None, None, None, :] <= mask.query_slots(t)[:, None, :, None]  # [B|1, 1, T, S]
    allowed = later if allowed is None else allowed & later
  bias = None if mask.key_bias is None else mask.key_bias[:, None, None, :].astype(jnp.float32)
  if implementation == "cudnn":  # cuDNN reads masks as a bias of full length
    full = (b, 1, t, s)
    allowed = None if allowed is None else jnp.broadcast_to(allowed, full)
    bias = None if bias is None else jnp.broadcast_to(bias.astype(q.dtype), full)
  return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), bias=bias, mask=allowed,
                                      is_causal=is_causal, implementation=implementation)


# ---- Pallas TPU splash attention ------------------------------------------------------------------
def _splash_unsupported(mask: Mask) -> str | None:
  if mask.key_bias is not None:
    return "splash attention takes no per-key bias"
  if mask.causal and mask.offset is not None:
    return "splash attention needs a static causal offset (a prefill), not a decode step's"
  return None


def _splash(q: Array, k: Array, v: Array, mask: Mask, interpret: bool) -> Array:
  """Splash attention per sample; T and S padded to its block, key validity as segment ids.

  Segments: 1 valid slots, 0 invalid ones (a query at an invalid slot of a
  self-attention sees the invalid keys, itself included), 2 the block padding
  of both axes (padded queries see padded keys: no empty softmax anywhere).
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, t, n, h = q.shape
  s = k.shape[1]
  padded = lambda blk: -(-t // blk) * blk + -(-s // blk) * blk  # noqa: E731
  block = min(SPLASH_BLOCKS, key=padded)  # min keeps the first (largest) of equals
  tp, sp = -(-t // block) * block, -(-s // block) * block
  key_seg = jnp.ones((b, s), jnp.int32) if mask.key_valid is None else mask.key_valid.astype(jnp.int32)
  query_seg = key_seg if t == s else jnp.ones((b, t), jnp.int32)
  key_seg = jnp.pad(key_seg, ((0, 0), (0, sp - s)), constant_values=2)
  query_seg = jnp.pad(query_seg, ((0, 0), (0, tp - t)), constant_values=2)
  pad = lambda x, to: jnp.pad(x, ((0, 0), (0, to - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
  qp = pad(q * jnp.asarray(h ** -0.5, q.dtype), tp)  # [B, T, N, H] -> [B, N, T', H]
  kp, vp = pad(k.astype(q.dtype), sp), pad(v.astype(q.dtype), sp)  # [B, S, K, H] -> [B, K, S', H]
  head = splash.CausalMask((tp, sp)) if mask.causal else splash.FullMask((tp, sp))
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([head] * n), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)
  out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks)))(
      qp, kp, vp, query_seg, key_seg)  # [B, N, T', H]
  return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)  # [B, N, T', H] -> [B, T, N, H]


# ---- chunked online softmax -----------------------------------------------------------------------
def chunked(q: Array, k: Array, v: Array, mask: Mask, *, block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV) -> Array:
  """Online-softmax attention over key blocks inside a loop over query blocks (see `attend`).

  Memory beyond inputs and output: one [B, N, block_q, block_kv] score tile
  and per-row statistics; the backward pass (`custom_vjp`) recomputes the
  tiles from the output and the row logsumexp, as flash attention does.
  """
  b, t, n, h = q.shape
  s = k.shape[1]
  bq, bk = min(block_q, t), min(block_kv, s)
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  key_valid = jnp.ones((b, s), bool) if mask.key_valid is None else mask.key_valid
  bias = jnp.zeros((b, s), jnp.float32) if mask.key_bias is None else mask.key_bias.astype(jnp.float32)
  slots = jnp.broadcast_to(mask.query_slots(t), (b, t))  # [B, T] (used under `causal`)
  qp = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  kp, vp = (jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, 0))) for x in (k, v))
  key_valid = jnp.pad(key_valid, ((0, 0), (0, sp - s)))
  bias = jnp.pad(bias, ((0, 0), (0, sp - s)))
  slots = jnp.pad(slots, ((0, 0), (0, tp - t)), constant_values=-1)  # padded queries: their own slot -1 only
  out = _flash(qp, kp, vp, key_valid, bias, slots, mask.causal, bq, bk)
  return out[:, :t]


def _blocks(x: Array, size: int) -> Array:
  """[B, L, ...] -> [L / size, B, size, ...] (the loop axis first)."""
  return x.reshape(x.shape[0], x.shape[1] // size, size, *x.shape[2:]).swapaxes(0, 1)


def _unblocks(x: Array) -> Array:
  """[L / size, B, size, ...] -> [B, L, ...]."""
  x = x.swapaxes(0, 1)
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _tile_logits(qb: Array, kb: Array, valid_b: Array, bias_b: Array, slots_b: Array, k_start, causal: bool):
  """Scaled, biased, masked logits of one tile and its visibility.

  qb float[B, bq, K, G, H], kb float[B, bk, K, H], valid_b bool[B, bk],
  bias_b float32[B, bk], slots_b int32[B, bq] -> (float32[B, K, G, bq, bk], bool[B, 1, 1, bq, bk]).
  """
  h = qb.shape[-1]
  logits = jnp.einsum("btkgh,bskh->bkgts", qb, kb, preferred_element_type=jnp.float32) * (h ** -0.5)
  logits = logits + bias_b[:, None, None, None, :]
  visible = jnp.broadcast_to(valid_b[:, None, :], slots_b.shape + valid_b.shape[-1:])  # [B, bq, bk]
  if causal:
    slot_k = k_start + jnp.arange(kb.shape[1], dtype=jnp.int32)[None, None, :]
    slot_q = slots_b[:, :, None]
    visible = (visible & (slot_k <= slot_q)) | (slot_k == slot_q)
  visible = visible[:, None, None]
  return jnp.where(visible, logits, -jnp.inf), visible


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, key_valid, bias, slots, causal, bq, bk):
  return _flash_fwd(q, k, v, key_valid, bias, slots, causal, bq, bk)[0]


def _flash_fwd(q, k, v, key_valid, bias, slots, causal, bq, bk):
  """q float[B, T', N, H] (T' % bq == 0), k, v float[B, S', K, H] (S' % bk == 0), key_valid bool[B, S'],
  bias float32[B, S'], slots int32[B, T'] -> (out float[B, T', N, H], residuals with lse float32[B, K, G, T'])."""
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  kv_blocks = (_blocks(k, bk), _blocks(v, bk), _blocks(key_valid, bk), _blocks(bias, bk),
               jnp.arange(k.shape[1] // bk, dtype=jnp.int32) * bk)

  def one_query_block(args):
    qb, slots_b = args  # [B, bq, K, G, H], [B, bq]

    def step(carry, kv):
      peak, total, acc = carry
      kb, vb, valid_b, bias_b, start = kv
      logits, visible = _tile_logits(qb, kb, valid_b, bias_b, slots_b, start, causal)
      new_peak = jnp.maximum(peak, jnp.max(logits, axis=-1))
      shift = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)  # no visible key yet: never inf - inf
      p = jnp.where(visible, jnp.exp(logits - shift[..., None]), 0.0)
      rescale = jnp.exp(peak - shift)
      pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
      return (new_peak, total * rescale + jnp.sum(p, axis=-1), acc * rescale[..., None] + pv), None

    init = (jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, h), jnp.float32))
    (peak, total, acc), _ = jax.lax.scan(step, init, kv_blocks)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]  # a row with no visible key: 0
    lse = jnp.where(total > 0, peak + jnp.log(jnp.where(total > 0, total, 1.0)), 0.0)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, bq, n, h)  # [B, K, G, bq, H] -> [B, bq, N, H]
    return out.astype(q.dtype), lse

  q_blocks = _blocks(q.reshape(b, t, kh, g, h), bq)  # [B, T', N, H] -> [T'/bq, B, bq, K, G, H]
  out, lse = jax.lax.map(one_query_block, (q_blocks, _blocks(slots, bq)))
  out = _unblocks(out)  # [B, T', N, H]
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, t)  # [T'/bq, B, K, G, bq] -> [B, K, G, T']
  return out, (q, k, v, key_valid, bias, slots, out, lse)


def _flash_bwd(causal, bq, bk, res, d_out):
  """Flash attention's backward: per (query block, key block) tile, p from the saved logsumexp."""
  q, k, v, key_valid, bias, slots, out, lse = res
  b, t, n, h = q.shape
  kh = k.shape[2]
  g = n // kh
  scale = h ** -0.5
  grouped = lambda x: x.reshape(b, t, kh, g, h)  # noqa: E731  [B, T', N, H] -> [B, T', K, G, H]
  # delta_t = sum_h dO * O per row: the softmax Jacobian's correction term
  delta = jnp.einsum("btkgh,btkgh->bkgt", grouped(d_out).astype(jnp.float32), grouped(out).astype(jnp.float32))
  kv_blocks = (_blocks(k, bk), _blocks(v, bk), _blocks(key_valid, bk), _blocks(bias, bk),
               jnp.arange(k.shape[1] // bk, dtype=jnp.int32) * bk)
  row_stats = lambda x: jnp.moveaxis(x.reshape(b, kh, g, t // bq, bq), 3, 0)  # noqa: E731  [T'/bq, B, K, G, bq]
  q_side = (_blocks(grouped(q), bq), _blocks(grouped(d_out), bq), _blocks(slots, bq), row_stats(lse),
            row_stats(delta))

  def one_query_block(grads, qs):
    qb, dob, slots_b, lse_b, delta_b = qs

    def step(dq, kv):
      kb, vb, valid_b, bias_b, start = kv
      logits, visible = _tile_logits(qb, kb, valid_b, bias_b, slots_b, start, causal)
      p = jnp.where(visible, jnp.exp(logits - lse_b[..., None]), 0.0)  # [B, K, G, bq, bk]
      dv = jnp.einsum("bkgts,btkgh->bskh", p, dob.astype(jnp.float32))
      dp = jnp.einsum("btkgh,bskh->bkgts", dob.astype(jnp.float32), vb.astype(jnp.float32))
      ds = p * (dp - delta_b[..., None])  # d logits (before the scale)
      dq = dq + jnp.einsum("bkgts,bskh->btkgh", ds, kb.astype(jnp.float32)) * scale
      dk = jnp.einsum("bkgts,btkgh->bskh", ds, qb.astype(jnp.float32)) * scale
      return dq, (dk, dv, jnp.sum(ds, axis=(1, 2, 3)))

    dq, (dk, dv, dbias) = jax.lax.scan(step, jnp.zeros(qb.shape, jnp.float32), kv_blocks)
    dk_all, dv_all, dbias_all = grads
    return (dk_all + _unblocks(dk), dv_all + _unblocks(dv), dbias_all + _unblocks(dbias)), dq

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32), jnp.zeros(bias.shape, jnp.float32))
  (dk, dv, dbias), dq = jax.lax.scan(one_query_block, zeros, q_side)
  dq = _unblocks(dq).reshape(b, t, n, h)  # [T'/bq, B, bq, K, G, H] -> [B, T', N, H]
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, dbias, None)


_flash.defvjp(_flash_fwd, _flash_bwd)

