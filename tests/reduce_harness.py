"""Shared checks for reduction methods: batch == single, one trace, degenerate inputs.

Each method's test module adds its own loop-based NumPy rendering of the
published rule and calls these generic checks with its config strings.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vtr_jax.models.decoder import DecoderConfig
from vtr_jax.models.vit import VisionConfig
from vtr_jax.models.vlm import VLM, VLMConfig, generate, pad_prompts
from vtr_jax.reduce import Context, parse
from vtr_jax.seams import Tokens

IMAGE = 60
GRID = 4  # 32 px images, 8 px patches: 16 patches


@functools.lru_cache(maxsize=None)
def tiny_model(kind: str = "clip", text_layers: int = 4, keep_cls: bool = False):
  """(model, params) of a small random VLM: 16 patches, 4 vision blocks, `text_layers` decoder layers
  (`keep_cls`: the CLIP tower also hands its class token to the LLM, as the shipped model's does)."""
  vision = VisionConfig(kind=kind, image_size=8 * GRID, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_layers=4, num_heads=4, feature_layers=(-2,) if kind == "clip" else (-1,),
                        use_head=kind == "siglip", keep_cls=keep_cls)
  text = DecoderConfig(kind="llama" if kind == "clip" else "qwen2", vocab_size=64, hidden_size=32,
                       intermediate_size=64, num_layers=text_layers, num_heads=4, num_kv_heads=2)
  cfg = VLMConfig(vision=vision, text=text, image_token_id=IMAGE, pad_token_id=0, eos_token_ids=())
  model = VLM(cfg)
  toks, valid = pad_prompts([[1, IMAGE, 5]], 0)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8 * GRID, 8 * GRID, 3)), toks, valid)
  params = jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim >= 2 else x, nn.unbox(variables))  # sharper attention
  return model, params


def batch_inputs(seed: int = 0, lengths=(5, 9, 3, 12)):
  """Four different images and four prompts of different lengths (placeholder at varied offsets)."""
  rng = np.random.default_rng(seed)
  prompts = []
  for n in lengths:
    p = [1] + [int(x) for x in rng.integers(2, IMAGE, size=n - 1)]
    p.insert(1 + int(rng.integers(0, n)), IMAGE)
    prompts.append(p)
  pixels = rng.standard_normal((len(lengths), 8 * GRID, 8 * GRID, 3)).astype(np.float32)
  return prompts, pixels


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _prefill(model, params, pixels, tokens, valid, spec):
  return model.apply(params, pixels, tokens, valid, reduction=spec, method=VLM.prefill)


def check_batch_equals_single(spec: str, kind: str = "clip", *, decode_steps: int = 4, atol: float = 2e-5):
  """Batch of 4 (different images, prompt lengths) == 4 single runs: logits, kept positions, tokens.

  Single runs are padded to a different length than the batch (padding must
  not matter) and share one shape, so generation compiles twice in all.
  """
  model, params = tiny_model(kind)
  prompts, pixels = batch_inputs()
  toks, valid = pad_prompts(prompts, 0)
  single_len = toks.shape[1] + 3

  def prefill(x, t, v):
    return _prefill(model, params, x, t, v, spec)

  logits, _, aux = prefill(pixels, toks, valid)
  gen = generate(model, params, pixels, toks, valid, max_new_tokens=decode_steps, reduction=spec,
                 return_logits=True)
  for i, p in enumerate(prompts):
    t1, v1 = pad_prompts([p], 0, length=single_len)
    l1, _, a1 = prefill(pixels[i:i + 1], t1, v1)
    key = "llm/valid" if "llm/valid" in aux else "prompt/valid"
    rows, rows1 = np.asarray(aux[key][i]), np.asarray(a1[key][0])
    np.testing.assert_allclose(np.asarray(logits[i])[rows], np.asarray(l1[0])[rows1], atol=atol,
                               err_msg=f"{spec}: sample {i} logits")
    np.testing.assert_array_equal(np.asarray(aux["reduce/positions"][i]), np.asarray(a1["reduce/positions"][0]),
                                  err_msg=f"{spec}: sample {i} kept positions")
    g1 = generate(model, params, pixels[i:i + 1], t1, v1, max_new_tokens=decode_steps, reduction=spec,
                  return_logits=True)
    np.testing.assert_array_equal(np.asarray(gen.tokens[i]), np.asarray(g1.tokens[0]),
                                  err_msg=f"{spec}: sample {i} generated tokens")
    np.testing.assert_allclose(np.asarray(gen.logits[i]), np.asarray(g1.logits[0]), atol=atol,
                               err_msg=f"{spec}: sample {i} decode logits")


def check_traces_once(spec: str, kind: str = "clip"):
  """Under jit, one trace serves different inputs of the same shapes."""
  model, params = tiny_model(kind)
  traces = []

  @jax.jit
  def run(p, x, t, v):
    traces.append(1)
    return model.apply(p, x, t, v, reduction=spec, method=VLM.prefill)[0]

  for seed in (1, 2, 3):
    prompts, pixels = batch_inputs(seed, lengths=(6, 6, 6, 6))
    toks, valid = pad_prompts(prompts, 0)
    jax.block_until_ready(run(params, pixels, toks, valid))
  assert len(traces) == 1, f"{spec}: traced {len(traces)} times for three inputs of the same shapes"


def check_no_nan_on_degenerate(spec: str, kind: str = "clip"):
  """All-equal patches (a constant image) and an all-zero image give finite outputs."""
  model, params = tiny_model(kind)
  prompts, _ = batch_inputs(4, lengths=(5, 7))
  toks, valid = pad_prompts(prompts, 0)
  for pixels in (np.full((2, 8 * GRID, 8 * GRID, 3), 0.3, np.float32), np.zeros((2, 8 * GRID, 8 * GRID, 3),
                                                                                np.float32)):
    logits, _, aux = _prefill(model, params, pixels, toks, valid, spec)
    assert np.all(np.isfinite(np.asarray(logits))), f"{spec}: non-finite logits on a degenerate image"
    pos = np.asarray(aux["reduce/positions"])
    kept = np.asarray(aux["reduce/valid"])
    for row, ok in zip(pos, kept):  # no patch kept twice
      real = row[ok & (row >= 0)]
      assert len(set(real.tolist())) == len(real), f"{spec}: a patch was kept twice: {row}"


def method_context(vision: VisionConfig, aux: dict, text=None) -> Context:
  """A Context around hand-made extras, for unit tests of a method's reduce()."""
  text = text or (None, None, None)
  return Context(vision, aux, *text)


def random_tokens(rng: np.random.Generator, b: int, n: int, d: int) -> Tokens:
  return Tokens.full(jnp.asarray(rng.standard_normal((b, n, d)), jnp.float32))


def softmax_rows(rng: np.random.Generator, shape, temperature: float = 1.0) -> np.ndarray:
  """Random attention rows (softmax over the last axis), float32."""
  logits = rng.standard_normal(shape) / temperature
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def tie_aware_equal(chosen, expected, scores, k: int) -> None:
  """Two selections of k items agree up to ties at the boundary score.

  Every item in one but not the other must score exactly the k-th best score.
  """
  chosen, expected = set(np.asarray(chosen).tolist()), set(np.asarray(expected).tolist())
  if chosen == expected:
    return
  kth = np.sort(np.asarray(scores))[::-1][k - 1]
  for i in chosen ^ expected:
    assert scores[i] == kth, f"selections differ at {i} (score {scores[i]}, k-th score {kth})"


def plan_budget_errors(spec_too_big: str, n: int):
  """parse() accepts the string; kept(n) raises with the budget and n in the message."""
  plan = parse(spec_too_big)
  m = plan.methods[0]
  try:
    m.kept(n)
  except ValueError as e:
    return str(e)
  raise AssertionError(f"{spec_too_big}: no error for a budget above {n} tokens")
