"""Kernel ops (kernels/): the jnp references and the Pallas kernels against float64 NumPy loops.

`TestMaxSimilarity` / `TestAttentionMass` call the public ops with `impl=None`:
the reference on CPU, the compiled kernel on TPU, its GPU form on GPU. Their
`...Interpret` subclasses rerun every assertion on the Mosaic TPU kernel in
interpret mode on CPU, the `...GpuInterpret` ones on the GPU form (Pallas'
Triton lowering, one program per block looping inside). Small blocks (8 x 128
on TPU, 16 x 64 on GPU) and ragged shapes put several blocks, with a partial
last one, on every axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from vtr_jax.kernels import attention_mass_gpu, ops, similarity, similarity_gpu
from vtr_jax.kernels.attention_mass import BlockSizes as MassBlockSizes
from vtr_jax.kernels.attention_mass import attention_mass as attention_mass_kernel
from vtr_jax.kernels.attention_mass import attention_mass_reference

F32_MIN = float(np.finfo(np.float32).min)
F32_MAX = float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------- NumPy renderings


def np_scores(x, y, metric):
  """float64[B, N, M] from the definitions (-|x - y|^2 written out, not expanded)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if metric == "cosine":
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-300)
    y = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-300)
  if metric == "neg_sq_euclidean":
    return -np.sum((x[:, :, None, :] - y[:, None, :, :]) ** 2, axis=-1)
  return np.einsum("bnd,bmd->bnm", x, y)


def np_max_similarity(x, y, metric, mode, x_valid=None, y_valid=None):
  """(values, index, scores): per row the first best valid column, loops over rows."""
  s = np_scores(x, y, metric)
  b, n, m = s.shape
  x_valid = np.ones((b, n), bool) if x_valid is None else np.asarray(x_valid)
  y_valid = np.ones((b, m), bool) if y_valid is None else np.asarray(y_valid)
  values = np.full((b, n), F32_MIN if mode == "max" else F32_MAX)
  index = np.zeros((b, n), np.int64)
  for bi in range(b):
    for ni in range(n):
      cols = np.flatnonzero(y_valid[bi])
      if not x_valid[bi, ni] or cols.size == 0:
        continue
      row = s[bi, ni, cols]
      best = row.max() if mode == "max" else row.min()
      index[bi, ni] = cols[np.flatnonzero(row == best)[0]]
      values[bi, ni] = best
  return values, index, s


def np_attention_mass(q, k, key_valid=None, row_valid=None, q_slots=None, scale=None):
  """float64[B, S]: per row and head a softmax over the visible keys, then the mean."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  b, n, r, h = q.shape
  kh, s = k.shape[1], k.shape[2]
  scale = h ** -0.5 if scale is None else scale
  out = np.zeros((b, s))
  for bi in range(b):
    rows = 0
    for ri in range(r):
      keys = [si for si in range(s) if (key_valid is None or key_valid[bi, si])
              and (q_slots is None or si <= q_slots[bi, ri])]
      if (row_valid is not None and not row_valid[bi, ri]) or not keys:
        continue
      rows += 1
      for ni in range(n):
        logits = k[bi, ni // (n // kh)][keys] @ q[bi, ni, ri] * scale
        p = np.exp(logits - logits.max())
        out[bi, keys] += p / p.sum()
    out[bi] /= max(rows * n, 1)
  return out


def assert_indices(index, expected, scores, tol):
  """Indices equal, except where the two candidates' scores tie within tol (MaxText-style)."""
  index = np.asarray(index)
  differ = np.argwhere(index != expected)
  for bi, ni in differ:
    gap = abs(scores[bi, ni, index[bi, ni]] - scores[bi, ni, expected[bi, ni]])
    assert gap <= tol, f"row {(bi, ni)}: index {index[bi, ni]} vs {expected[bi, ni]}, score gap {gap}"


def directional_fd(f, args, direction, eps=1e-5):
  """Central difference of the float64 function f along `direction` (a tuple like args)."""
  plus = [np.asarray(a, np.float64) + eps * d for a, d in zip(args, direction)]
  minus = [np.asarray(a, np.float64) - eps * d for a, d in zip(args, direction)]
  return (f(*plus) - f(*minus)) / (2 * eps)


def random_masks(rng, b, n, p_false):
  return rng.random((b, n)) >= p_false


# ----------------------------------------------------------------------------- max_similarity


class TestMaxSimilarity:
  """ops.max_similarity against np_max_similarity; the reference on CPU, the kernel on TPU."""
  IMPL = None
  INTERPRET = False
  BLOCKS = {"pallas": similarity.BlockSizes(block_n=8, block_m=128),
            "pallas_gpu": similarity_gpu.BlockSizes(block_n=16, block_m=64)}

  def call(self, x, y, **kw):
    blocks = self.BLOCKS.get(ops.choose(self.IMPL, has_kernel=True, interpret=self.INTERPRET))
    return ops.max_similarity(x, y, impl=self.IMPL, interpret=self.INTERPRET, block_sizes=blocks, **kw)

  def inputs(self, seed, b=2, n=37, m=300, d=16, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, n, d)) + 0.3
    y = rng.normal(size=(b, m, d)) + 0.3
    return rng, jnp.asarray(x, dtype), jnp.asarray(y, dtype)

  @pytest.mark.parametrize("metric,mode", [("cosine", "max"), ("cosine", "min"), ("dot", "min"),
                                           ("neg_sq_euclidean", "max")])
  def test_matches_numpy_rule(self, metric, mode):
    rng, x, y = self.inputs(0)
    x_valid = random_masks(rng, 2, 37, 0.2)
    y_valid = random_masks(rng, 2, 300, 0.4)
    y_valid[1] = False  # the second sample has no valid column at all
    val, idx = self.call(x, y, metric=metric, mode=mode, x_valid=jnp.asarray(x_valid), y_valid=jnp.asarray(y_valid))
    want_val, want_idx, scores = np_max_similarity(x, y, metric, mode, x_valid, y_valid)
    assert val.dtype == jnp.float32 and idx.dtype == jnp.int32 and val.shape == idx.shape == (2, 37)
    np.testing.assert_allclose(val, want_val, rtol=1e-5, atol=1e-5)
    assert_indices(idx, want_idx, scores, tol=1e-5)
    assert np.all(np.asarray(val)[1] == (F32_MIN if mode == "max" else F32_MAX)) and np.all(np.asarray(idx)[1] == 0)
    assert np.all(np.asarray(idx)[~x_valid] == 0)

  def test_no_nan_from_masked_rows(self):
    rng, x, y = self.inputs(1)
    x_valid = random_masks(rng, 2, 37, 0.3)
    y_valid = random_masks(rng, 2, 300, 0.3)
    x_nan = jnp.where(jnp.asarray(x_valid)[..., None], x, jnp.nan)
    y_nan = jnp.where(jnp.asarray(y_valid)[..., None], y, jnp.nan)
    val, idx = self.call(x_nan, y_nan, x_valid=jnp.asarray(x_valid), y_valid=jnp.asarray(y_valid))
    want_val, want_idx, scores = np_max_similarity(x, y, "cosine", "max", x_valid, y_valid)
    assert np.all(np.isfinite(val))
    np.testing.assert_allclose(val, want_val, rtol=1e-5, atol=1e-5)
    assert_indices(idx, want_idx, scores, tol=1e-5)

  def test_zero_rows_give_zero_cosine(self):
    _, x, y = self.inputs(2, n=9, m=130)
    x = x.at[:, 3].set(0.0)
    y = y.at[:, 5].set(0.0)
    val, _ = self.call(x, y, mode="min")
    assert np.all(np.isfinite(val)) and np.all(np.asarray(val)[:, 3] == 0.0)

  def test_bf16_inputs_accumulate_in_f32(self):
    _, x, y = self.inputs(3, d=256, dtype=jnp.bfloat16)
    val, idx = self.call(x, y, metric="dot")
    want_val, want_idx, scores = np_max_similarity(np.asarray(x, np.float32), np.asarray(y, np.float32), "dot", "max")
    # bf16 products are exact; a bf16 accumulator would be off by ~1e-1 here
    np.testing.assert_allclose(val, want_val, rtol=2e-6, atol=2e-5)
    assert_indices(idx, want_idx, scores, tol=1e-4)

  @pytest.mark.parametrize("metric,mode", [("cosine", "max"), ("dot", "min"), ("neg_sq_euclidean", "min")])
  def test_ties_resolve_to_lowest_index(self, metric, mode):
    rng = np.random.default_rng(4)
    # +-1 entries: norms are 4, so normalised rows, every score and every tie are exact in float32
    x = rng.choice([-1.0, 1.0], size=(1, 20, 16)).astype(np.float32)
    y = rng.choice([-1.0, 1.0], size=(1, 260, 16)).astype(np.float32)
    y[0, [3, 140, 259]] = y[0, 150]  # duplicates across blocks of 128 and inside the last one
    y[0, [7, 9]] = y[0, 8]
    y_valid = np.ones((1, 260), bool)
    y_valid[0, 3] = False  # an invalid duplicate never wins, whatever its index
    val, idx = self.call(jnp.asarray(x), jnp.asarray(y), metric=metric, mode=mode, y_valid=jnp.asarray(y_valid))
    want_val, want_idx, _ = np_max_similarity(x, y, metric, mode, None, y_valid)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(val, want_val, rtol=1e-6)

  @pytest.mark.parametrize("metric", ["cosine", "neg_sq_euclidean"])
  def test_gradient_matches_finite_differences(self, metric):
    rng, x, y = self.inputs(5, n=19, m=150, d=8)
    y_valid = random_masks(rng, 2, 150, 0.3)
    x_valid = random_masks(rng, 2, 19, 0.2)
    w = rng.normal(size=(2, 19))
    masks = dict(x_valid=jnp.asarray(x_valid), y_valid=jnp.asarray(y_valid))

    def loss(x, y):
      return jnp.sum(jnp.asarray(w, jnp.float32) * self.call(x, y, metric=metric, **masks)[0])

    gx, gy = jax.jit(jax.grad(loss, (0, 1)))(x, y)
    dx, dy = rng.normal(size=x.shape), rng.normal(size=y.shape)
    scored = x_valid & y_valid.any(-1, keepdims=True)  # the other rows hold the constant fill value

    def np_loss(x, y):
      return np.sum(np.where(scored, w * np_max_similarity(x, y, metric, "max", x_valid, y_valid)[0], 0.0))

    fd = directional_fd(np_loss, (x, y), (dx, dy))
    analytic = np.sum(np.asarray(gx) * dx) + np.sum(np.asarray(gy) * dy)
    np.testing.assert_allclose(analytic, fd, rtol=1e-4)

  def test_deterministic(self):
    rng, x, y = self.inputs(6)
    y_valid = jnp.asarray(random_masks(rng, 2, 300, 0.3))
    first = self.call(x, y, metric="neg_sq_euclidean", y_valid=y_valid)
    second = self.call(x, y, metric="neg_sq_euclidean", y_valid=y_valid)
    for a, b in zip(first, second):
      np.testing.assert_array_equal(a, b)

  def test_errors_name_the_values(self):
    _, x, y = self.inputs(7, n=5, m=6)
    with pytest.raises(ValueError, match=r"\(2, 5, 16\).*\(2, 6, 8\)"):
      self.call(x, y[..., :8])
    with pytest.raises(ValueError, match=r"y_valid must have shape \(2, 6\), got \(2, 5\)"):
      self.call(x, y, y_valid=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="'manhattan'"):
      self.call(x, y, metric="manhattan")
    with pytest.raises(ValueError, match="'median'"):
      self.call(x, y, mode="median")


class TestMaxSimilarityInterpret(TestMaxSimilarity):
  IMPL, INTERPRET = "pallas", True


class TestMaxSimilarityGpuInterpret(TestMaxSimilarity):
  IMPL, INTERPRET = "pallas_gpu", True


class TestMaxSimilarityKernelGradient:
  """The kernel's custom_vjp equals the reference's gradient."""

  def test_gradient_equals_reference(self):
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(2, 21, 16)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(2, 140, 16)), jnp.float32)
    y_valid = jnp.asarray(random_masks(rng, 2, 140, 0.3)).at[1].set(False)
    w = jnp.asarray(rng.normal(size=(2, 21)), jnp.float32)
    kernel = functools.partial(similarity.max_similarity, metric="cosine", mode="min", y_valid=y_valid,
                               block_sizes=similarity.BlockSizes(block_n=8, block_m=128), interpret=True)
    reference = functools.partial(similarity.max_similarity_reference, metric="cosine", mode="min", y_valid=y_valid)
    got = jax.jit(jax.grad(lambda x, y: jnp.sum(w * kernel(x, y)[0]), (0, 1)))(x, y)
    want = jax.jit(jax.grad(lambda x, y: jnp.sum(w * reference(x, y)[0]), (0, 1)))(x, y)
    for g, r in zip(got, want):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- attention_mass


class TestAttentionMass:
  """ops.attention_mass against np_attention_mass; the reference on CPU, the kernel on TPU."""
  IMPL = None
  INTERPRET = False
  BLOCKS = {"pallas": MassBlockSizes(block_rows=8, block_keys=128),
            "pallas_gpu": attention_mass_gpu.BlockSizes(block_rows=16, block_keys=64)}

  def call(self, q, k, **kw):
    blocks = self.BLOCKS.get(ops.choose(self.IMPL, has_kernel=True, interpret=self.INTERPRET))
    return ops.attention_mass(q, k, impl=self.IMPL, interpret=self.INTERPRET, block_sizes=blocks, **kw)

  def inputs(self, seed, b=2, n=4, kh=2, r=5, s=300, h=16, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, n, r, h)) * 1.5
    k = rng.normal(size=(b, kh, s, h)) * 1.5
    return rng, jnp.asarray(q, dtype), jnp.asarray(k, dtype)

  def masks(self, rng, b, r, s):
    key_valid = random_masks(rng, b, s, 0.3)
    key_valid[0, :136] = False  # sample 0's first key block (128) is fully masked
    row_valid = random_masks(rng, b, r, 0.2)
    row_valid[1] = False  # the second sample has no contributing row: all zeros
    q_slots = rng.integers(s // 2, s + 8, size=(b, r)).astype(np.int32)
    q_slots[0, 0] = 20  # only masked keys before it: this row contributes nothing
    return key_valid, row_valid, q_slots

  @pytest.mark.parametrize("case", ["plain", "key_mask", "causal_masked", "mha_causal"])
  def test_matches_numpy_rule(self, case):
    rng, q, k = self.inputs(10, kh=4 if case == "mha_causal" else 2)
    key_valid, row_valid, q_slots = self.masks(rng, 2, 5, 300)
    kw = {"plain": {}, "key_mask": dict(key_valid=key_valid),
          "causal_masked": dict(key_valid=key_valid, row_valid=row_valid, q_slots=q_slots),
          "mha_causal": dict(q_slots=q_slots)}[case]
    got = self.call(q, k, **{name: jnp.asarray(v) for name, v in kw.items()})
    want = np_attention_mass(q, k, **kw)
    assert got.dtype == jnp.float32 and got.shape == (2, 300)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    if case == "causal_masked":
      assert np.all(np.asarray(got)[1] == 0.0)
    else:
      np.testing.assert_allclose(np.sum(got, axis=-1), 1.0, rtol=1e-5)  # a distribution per sample

  def test_custom_scale(self):
    rng, q, k = self.inputs(11, r=3, s=200)
    got = self.call(q, k, scale=0.05)
    np.testing.assert_allclose(got, np_attention_mass(q, k, scale=0.05), rtol=1e-5, atol=1e-8)

  def test_no_nan_from_masked_rows_and_keys(self):
    rng, q, k = self.inputs(12)
    key_valid, row_valid, q_slots = self.masks(rng, 2, 5, 300)
    q_nan = jnp.where(jnp.asarray(row_valid)[:, None, :, None], q, jnp.nan)
    k_nan = jnp.where(jnp.asarray(key_valid)[:, None, :, None], k, jnp.nan)
    got = self.call(q_nan, k_nan, key_valid=jnp.asarray(key_valid), row_valid=jnp.asarray(row_valid),
                    q_slots=jnp.asarray(q_slots))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np_attention_mass(q, k, key_valid, row_valid, q_slots), rtol=1e-5, atol=1e-8)

  def test_bf16_inputs_accumulate_in_f32(self):
    rng, q, k = self.inputs(13, h=128, dtype=jnp.bfloat16)
    got = self.call(q, k)
    want = np_attention_mass(np.asarray(q, np.float32), np.asarray(k, np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)

  def test_gradient_matches_finite_differences(self):
    rng, q, k = self.inputs(14, r=3, s=140, h=8)
    key_valid, row_valid, q_slots = self.masks(rng, 2, 3, 140)
    masks = dict(key_valid=key_valid, row_valid=row_valid, q_slots=q_slots)
    w = rng.normal(size=(2, 140))

    def loss(q, k):
      mass = self.call(q, k, **{name: jnp.asarray(v) for name, v in masks.items()})
      return jnp.sum(jnp.asarray(w, jnp.float32) * mass)

    gq, gk = jax.jit(jax.grad(loss, (0, 1)))(q, k)
    dq, dk = rng.normal(size=q.shape), rng.normal(size=k.shape)
    fd = directional_fd(lambda q, k: np.sum(w * np_attention_mass(q, k, **masks)), (q, k), (dq, dk))
    analytic = np.sum(np.asarray(gq) * dq) + np.sum(np.asarray(gk) * dk)
    np.testing.assert_allclose(analytic, fd, rtol=1e-4)

  def test_deterministic(self):
    rng, q, k = self.inputs(15)
    key_valid, row_valid, q_slots = (jnp.asarray(m) for m in self.masks(rng, 2, 5, 300))
    first = self.call(q, k, key_valid=key_valid, row_valid=row_valid, q_slots=q_slots)
    second = self.call(q, k, key_valid=key_valid, row_valid=row_valid, q_slots=q_slots)
    np.testing.assert_array_equal(first, second)

  def test_errors_name_the_values(self):
    _, q, k = self.inputs(16, n=6, kh=4, s=20)
    with pytest.raises(ValueError, match="query heads 6 must be a multiple of kv heads 4"):
      self.call(q, k)
    _, q, k = self.inputs(16, s=20)
    with pytest.raises(ValueError, match=r"\(2, 4, 5, 16\).*\(2, 2, 20, 8\)"):
      self.call(q, k[..., :8])
    with pytest.raises(ValueError, match=r"q_slots must have shape \(2, 5\), got \(2, 4\)"):
      self.call(q, k, q_slots=jnp.zeros((2, 4), jnp.int32))


class TestAttentionMassInterpret(TestAttentionMass):
  IMPL, INTERPRET = "pallas", True


class TestAttentionMassGpuInterpret(TestAttentionMass):
  IMPL, INTERPRET = "pallas_gpu", True


class TestAttentionMassKernelGradient:
  """The kernel's custom_vjp equals the reference's gradient, bfloat16 inputs included."""

  def test_gradient_equals_reference(self):
    dtype = jnp.bfloat16
    rng = np.random.default_rng(17)
    q = jnp.asarray(rng.normal(size=(2, 4, 3, 16)), dtype)
    k = jnp.asarray(rng.normal(size=(2, 2, 150, 16)), dtype)
    key_valid = jnp.asarray(random_masks(rng, 2, 150, 0.3))
    q_slots = jnp.asarray(rng.integers(0, 150, size=(2, 3)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(2, 150)), jnp.float32)
    kw = dict(key_valid=key_valid, q_slots=q_slots)
    kernel = functools.partial(attention_mass_kernel, block_sizes=MassBlockSizes(8, 128), interpret=True, **kw)
    got = jax.jit(jax.grad(lambda q, k: jnp.sum(w * kernel(q, k)), (0, 1)))(q, k)
    want = jax.jit(jax.grad(lambda q, k: jnp.sum(w * attention_mass_reference(q, k, **kw)), (0, 1)))(q, k)
    for g, r in zip(got, want):
      assert g.dtype == dtype
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- topk_similarity (reference only)


def test_topk_similarity_matches_numpy_rule():
  rng = np.random.default_rng(20)
  x = rng.integers(-2, 3, size=(2, 6, 4)).astype(np.float32)
  y = rng.integers(-2, 3, size=(2, 30, 4)).astype(np.float32)
  y_valid = random_masks(rng, 2, 30, 0.3)
  val, idx = ops.topk_similarity(jnp.asarray(x), jnp.asarray(y), 5, metric="dot", y_valid=jnp.asarray(y_valid))
  s = np.where(y_valid[:, None, :], np_scores(x, y, "dot"), F32_MIN)
  want = np.argsort(-s, axis=-1, kind="stable")[..., :5]  # descending, ties by lowest index
  np.testing.assert_array_equal(idx, want)
  np.testing.assert_allclose(val, np.take_along_axis(s, want, -1))
  with pytest.raises(ValueError, match="k=31 must be in 1..30"):
    ops.topk_similarity(jnp.asarray(x), jnp.asarray(y), 31)


# ----------------------------------------------------------------------------- blocks, dispatch, TPU interpret, memory


def test_block_sizes_are_validated_and_clamped():
  with pytest.raises(ValueError, match="block_n=12 must be a positive multiple of 8"):
    similarity.BlockSizes(block_n=12)
  with pytest.raises(ValueError, match="block_keys=100 must be a positive multiple of 128"):
    MassBlockSizes(block_keys=100)
  with pytest.raises(ValueError, match="block_rows=0"):
    MassBlockSizes(block_rows=0)
  assert similarity.BlockSizes(block_n=256, block_m=512).clamp(37, 4096) == (37, 512)
  assert MassBlockSizes(block_rows=128, block_keys=512).clamp(4, 300) == (4, 300)
  with pytest.raises(ValueError, match="block_n=24 must be a power of two >= 16"):
    similarity_gpu.BlockSizes(block_n=24)
  with pytest.raises(ValueError, match="block_keys=8 must be a power of two >= 16"):
    attention_mass_gpu.BlockSizes(block_keys=8)
  with pytest.raises(ValueError, match=r"impl='pallas_gpu' takes .*similarity_gpu.BlockSizes, got BlockSizes"):
    ops.max_similarity(jnp.ones((1, 4, 8)), jnp.ones((1, 4, 8)), impl="pallas_gpu", interpret=True,
                       block_sizes=similarity.BlockSizes())


def _has_pallas_call(fn, *args):
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_dispatch_reference_on_cpu_and_kernel_on_request(monkeypatch):
  x = jnp.ones((1, 4, 8))
  q, k = jnp.ones((1, 2, 3, 8)), jnp.ones((1, 1, 9, 8))
  assert jax.default_backend() == "cpu"
  assert not _has_pallas_call(ops.max_similarity, x, x)
  assert not _has_pallas_call(ops.attention_mass, q, k)
  assert _has_pallas_call(functools.partial(ops.max_similarity, impl="pallas", interpret=True), x, x)
  assert _has_pallas_call(functools.partial(ops.attention_mass, impl="pallas", interpret=True), q, k)
  assert _has_pallas_call(functools.partial(ops.max_similarity, impl="pallas_gpu", interpret=True), x, x)
  assert _has_pallas_call(functools.partial(ops.attention_mass, impl="pallas_gpu", interpret=True), q, k)
  with pytest.raises(ValueError, match="backend is 'cpu'"):
    ops.max_similarity(x, x, impl="pallas")
  with pytest.raises(ValueError, match="compiles for GPU only, this backend is 'cpu'"):
    ops.attention_mass(q, k, impl="pallas_gpu")
  with pytest.raises(ValueError, match="unknown kernel impl 'triton'"):
    ops.attention_mass(q, k, impl="triton")
  with pytest.raises(ValueError, match="no Pallas kernel exists"):
    ops.topk_similarity(x, x, 2, impl="pallas", interpret=True)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert ops.choose(None, has_kernel=True, interpret=False) == "pallas_gpu"
  assert ops.choose(None, has_kernel=False, interpret=False) == "reference"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert ops.choose(None, has_kernel=True, interpret=False) == "pallas"


def test_tpu_interpret_mode():
  """TPU interpret mode on both kernels: simulated VMEM, block padding filled with NaN (int32 max for
  integers, which the generic interpreter does not do), "parallel" grid axes visited in random order."""
  rng = np.random.default_rng(30)
  interpret = pltpu.InterpretParams(random_seed=7)
  x = jnp.asarray(rng.normal(size=(2, 11, 8)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(2, 140, 8)), jnp.float32)
  y_valid = jnp.asarray(random_masks(rng, 2, 140, 0.3))
  val, idx = similarity.max_similarity(x, y, y_valid=y_valid, block_sizes=similarity.BlockSizes(8, 128),
                                       interpret=interpret)
  want_val, want_idx, scores = np_max_similarity(x, y, "cosine", "max", None, np.asarray(y_valid))
  np.testing.assert_allclose(val, want_val, rtol=1e-5, atol=1e-5)
  assert_indices(idx, want_idx, scores, tol=1e-5)
  q = jnp.asarray(rng.normal(size=(2, 4, 5, 8)), jnp.float32)  # G * R = 10 stacked rows: a ragged row block
  k = jnp.asarray(rng.normal(size=(2, 2, 140, 8)), jnp.float32)
  q_slots = rng.integers(0, 140, size=(2, 5)).astype(np.int32)
  got = attention_mass_kernel(q, k, q_slots=jnp.asarray(q_slots), block_sizes=MassBlockSizes(8, 128),
                              interpret=interpret)
  np.testing.assert_allclose(got, np_attention_mass(q, k, q_slots=q_slots), rtol=1e-5, atol=1e-8)


def _temp_bytes(fn, *shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_kernel_memory_grows_linearly_reference_quadratically():
  """Compiled temporaries at N and 4N: <= ~4x for the kernels, ~16x for the references."""
  for kernel, reference, shapes in [
      (functools.partial(similarity.max_similarity, interpret=True), similarity.max_similarity_reference,
       lambda n: [(1, n, 64), (1, n, 64)]),
      (functools.partial(attention_mass_kernel, interpret=True), attention_mass_reference,
       lambda n: [(1, 4, n, 32), (1, 2, n, 32)]),  # every token a query row: [N, R, S] is quadratic
  ]:
    kernel_ratio = _temp_bytes(kernel, *shapes(2048)) / _temp_bytes(kernel, *shapes(512))
    reference_ratio = _temp_bytes(reference, *shapes(2048)) / _temp_bytes(reference, *shapes(512))
    assert kernel_ratio <= 4.5, kernel_ratio
    assert reference_ratio >= 12, reference_ratio


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_mosaic_tpu(dtype):
  """Pallas -> Mosaic TPU lowering (jax.export for platform "tpu", no TPU needed) accepts both kernels'
  block shapes and operations, with default and clamped (ragged, odd-width) blocks. Mosaic's own
  compilation of the lowered module still needs a TPU."""
  sd = jax.ShapeDtypeStruct
  for n, m, d in [(576, 576, 1024), (37, 300, 65)]:
    f = jax.jit(lambda x, y, v: similarity.max_similarity(x, y, mode="min", y_valid=v))
    module = export.export(f, platforms=["tpu"])(sd((2, n, d), dtype), sd((2, m, d), dtype), sd((2, m), bool))
    assert module.mlir_module().count("tpu_custom_call") == 1
  for r, s, h in [(64, 576, 128), (1, 300, 65)]:
    g = jax.jit(lambda q, k, v, slots: attention_mass_kernel(q, k, key_valid=v, q_slots=slots))
    module = export.export(g, platforms=["tpu"])(sd((2, 32, r, h), dtype), sd((2, 8, s, h), dtype), sd((2, s), bool),
                                                 sd((2, r), jnp.int32))
    assert module.mlir_module().count("tpu_custom_call") == 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_forms_lower_to_triton(dtype):
  """Pallas -> Triton lowering (jax.export for platform "cuda", no GPU needed) accepts both GPU forms with
  default blocks on LLaVA-scale and ragged, odd-width shapes. Triton's own compilation to PTX needs a GPU
  (benchmarks/device_check.py runs it)."""
  sd = jax.ShapeDtypeStruct
  unchecked = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for n, m, d in [(576, 576, 1024), (37, 300, 65)]:
    f = jax.jit(lambda x, y, v: similarity_gpu.max_similarity(x, y, mode="min", y_valid=v))
    module = export.export(f, platforms=["cuda"], disabled_checks=unchecked)(
        sd((2, n, d), dtype), sd((2, m, d), dtype), sd((2, m), bool))
    assert module.mlir_module().count("xla.gpu.triton") == 1
  for r, s, h in [(64, 576, 128), (1, 300, 65)]:
    g = jax.jit(lambda q, k, v, slots: attention_mass_gpu.attention_mass(q, k, key_valid=v, q_slots=slots))
    module = export.export(g, platforms=["cuda"], disabled_checks=unchecked)(
        sd((2, 32, r, h), dtype), sd((2, 8, s, h), dtype), sd((2, s), bool), sd((2, r), jnp.int32))
    assert module.mlir_module().count("xla.gpu.triton") == 2
