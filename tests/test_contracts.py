"""One contract suite for every registered method, driven by the registry.

For each method (present and future): its NumPy rule (`tests/rules/<name>.py`), its budget
mapping (`for_budget`), batch of 4 = 4 single runs (prefill and decode), one trace across
inputs, degenerate inputs without NaN, a keep-all setting equal to the unreduced model where the
method has one, its error cases, the KV-cache shapes `flops.py` predicts, and for in-LLM methods
drop == mask and decode == a prefill re-run on the grown sequence. The contract model is
`reduce_harness.tiny_model` (16 patches, 4 decoder layers).
"""

from __future__ import annotations

import functools
import typing

import jax
import numpy as np
import pytest

import reduce_harness as H
import rules
from configs import shapes_tiny
from vtr_jax import flops, training
from vtr_jax.data import vqa
from vtr_jax.evaluation import DEFAULT_BUDGETS
from vtr_jax.models.vlm import VLM, generate, pad_prompts
from vtr_jax.reduce import ReductionError, parse, registry

METHODS = sorted(registry())
LLM = [n for n in METHODS if registry()[n].stages[0] == "llm"]
RULE_CASES = [pytest.param(name, fn, args, id=f"{name}-{case_id}")
              for name in METHODS if name in rules.available() for case_id, fn, args in rules.cases(name)]


def contract_config():
  return H.tiny_model("clip")[0].config


def examples(name: str) -> list[str]:
  """The method's own setting at 25 % of the contract model's tokens (or its unbudgeted one), then
  the rule module's EXAMPLES."""
  cls = registry()[name]
  own = cls.for_budget(0.25, contract_config()) or cls.unbudgeted(contract_config())
  out = [own.spec()] if own is not None else []
  out += [s for s in getattr(rules.load(name), "EXAMPLES", ()) if s not in out]
  assert out, f"{name}: no example setting (for_budget(0.25) and unbudgeted are None and the rule has no EXAMPLES)"
  return out


def test_the_suite_covers_every_registered_method():
  missing = [n for n in METHODS if n not in rules.available()]
  assert not missing, f"registered methods without tests/rules/<name>.py: {missing}"
  covered = {name for name in METHODS if rules.cases(name)}
  print(f"\ncontract suite: {len(covered)} methods covered, registry holds {len(registry())}")
  assert len(covered) == len(registry())


@pytest.mark.parametrize("name, fn, args", RULE_CASES)
def test_numpy_rule(name, fn, args):
  fn(*args)


# ---- budgets -----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _shipped_geometry():
  return training.model_config(shapes_tiny.get_config(), vqa.tokenizer())


@pytest.mark.parametrize("name", METHODS)
def test_for_budget_gives_a_runnable_setting_near_the_share(name):
  """On the shipped model's geometry (100 patches and a class token), each budget maps to a config string
  that parses back to itself and keeps about that share of the 100 patches (coarse knobs: pooling grids,
  exit layers, data-dependent caps are looser)."""
  cfg = _shipped_geometry()
  cls = registry()[name]
  n = cfg.reducible_tokens
  assert n == 100 and cfg.image_class_tokens == 1
  for budget in DEFAULT_BUDGETS:
    m = cls.for_budget(budget, cfg)
    if m is None:
      assert name in ("pool", "llavolta") and budget > 0.3 or cls.unbudgeted(cfg) is not None, \
          f"{name}: no setting for {budget}"
      continue
    assert parse(m.spec()).methods[0] == m
    if m.stage == "llm":
      counts = m.layer_counts(n, cfg.text.num_layers, cfg.image_class_tokens)
      assert np.mean(counts) < n + 1, f"{m.spec()}: no reduction"
      if name != "exit":  # exit's budget picks its layer; the rest keep about k tokens (+ the class token) at the end
        slack = 0.3 if name == "llavolta" else 0.15  # a pooling grid's counts are coarse, as `pool`'s
        assert abs(counts[-1] - 1 - budget * n) <= max(3, slack * budget * n), f"{m.spec()}: ends with {counts[-1]}"
    elif name not in ("prumerge", "prumerge_plus"):  # these cap a data-dependent count
      assert abs(m.kept(n) - budget * n) <= max(2, 0.3 * budget * n), f"{m.spec()}: keeps {m.kept(n)} of {n}"
  for bad in (0, -0.5, 1.5, float("nan")):
    with pytest.raises(ReductionError, match=f"{name}: a budget is a fraction of the visual tokens in"):
      cls.for_budget(bad, cfg)


# ---- generic checks on the contract model ------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_single(name):
  H.check_batch_equals_single(examples(name)[0])


@pytest.mark.slow  # the rules' further examples; the method's own setting runs by default
@pytest.mark.parametrize("name", [n for n in METHODS if len(examples(n)) > 1])
def test_batch_equals_single_on_further_examples(name):
  for spec in examples(name)[1:]:
    H.check_batch_equals_single(spec)


@pytest.mark.slow  # the SigLIP + Qwen2 twins; the CLIP + LLaMA instances run by default
@pytest.mark.parametrize("name", METHODS)
def test_siglip_batch_equals_single(name):
  H.check_batch_equals_single(examples(name)[0], kind="siglip")


@pytest.mark.parametrize("name", METHODS)
def test_traces_once(name):
  H.check_traces_once(examples(name)[0])


def _runs(spec: str) -> bool:
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs(4, lengths=(5, 7))
  toks, valid = pad_prompts(prompts, 0)
  try:
    jax.eval_shape(lambda: model.apply(params, pixels, toks, valid, reduction=spec, method=VLM.prefill))
    return True
  except ReductionError:
    return False


@pytest.mark.parametrize("name", METHODS)
def test_degenerate_inputs(name):
  """A constant and an all-zero image at the method's smallest and largest budgets that run, and its example."""
  cls, cfg = registry()[name], contract_config()
  budgets = [cls.for_budget(f / 16, cfg) for f in (1, 2, 4)] + [cls.for_budget(1.0, cfg)]
  extreme = [m.spec() for m in budgets if m is not None and _runs(m.spec())]
  specs = list(dict.fromkeys(extreme[:1] + extreme[-1:] + examples(name)[:1]))
  for spec in specs:
    H.check_no_nan_on_degenerate(spec)


@functools.lru_cache(maxsize=None)
def _unreduced(kind="clip"):
  model, params = H.tiny_model(kind)
  prompts, pixels = H.batch_inputs(6)
  toks, valid = pad_prompts(prompts, 0)
  logits = model.apply(params, pixels, toks, valid, method=VLM.prefill)[0]
  gen = generate(model, params, pixels, toks, valid, max_new_tokens=20)
  return np.asarray(logits), np.asarray(gen.tokens)


@pytest.mark.parametrize("name", METHODS)
def test_keep_all_equals_unreduced(name):
  """The method's keep-every-token setting reproduces the unreduced model: logits and 20 greedy tokens."""
  rule = rules.load(name)
  spec = rule.KEEP_ALL
  if spec is None:
    assert len(getattr(rule, "NO_KEEP_ALL", "")) > 10, f"{name}: KEEP_ALL is None; say why in NO_KEEP_ALL"
    pytest.skip(f"{name} has no keep-all setting: {rule.NO_KEEP_ALL}")
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs(6)
  toks, valid = pad_prompts(prompts, 0)
  full_logits, full_tokens = _unreduced()
  logits = model.apply(params, pixels, toks, valid, reduction=spec, method=VLM.prefill)[0]
  np.testing.assert_allclose(np.asarray(logits), full_logits, atol=1e-5, err_msg=spec)
  gen = generate(model, params, pixels, toks, valid, max_new_tokens=20, reduction=spec)
  np.testing.assert_array_equal(np.asarray(gen.tokens), full_tokens, err_msg=spec)


@pytest.mark.parametrize("name", METHODS)
def test_errors_name_the_values(name):
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs()
  toks, valid = pad_prompts(prompts, 0)
  errors = list(getattr(rules.load(name), "ERRORS", ()))
  hints = typing.get_type_hints(registry()[name])
  fields = set(registry()[name].__dataclass_fields__)
  if hints.get("keep") == (int | None):
    errors.append((f"{name}:keep=17", f"{name}: budget keep=17 is larger than the 16 tokens"))
  if "ratio" in fields and name != "pdrop":
    errors.append((f"{name}:ratio=1.5", r"ratio=1.5 must be in \(0, 1\]"))
  assert errors, f"{name}: no error case (add ERRORS to tests/rules/{name}.py)"
  for spec, message in errors:
    with pytest.raises(ReductionError, match=message):
      jax.eval_shape(lambda: model.apply(params, pixels, toks, valid, reduction=spec, method=VLM.prefill))


@pytest.mark.parametrize("name", METHODS)
def test_kv_slots_equal_the_flops_accounting(name):
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs()
  toks, valid = pad_prompts(prompts, 0)
  for spec in examples(name)[:1] + ([rules.load(name).MASKED + ",mask=true"] if hasattr(rules.load(name), "MASKED")
                                    else []):
    _, cache, _ = jax.eval_shape(lambda: model.apply(params, pixels, toks, valid, reduction=spec, cache_extra=0,
                                                     method=VLM.prefill))
    cost = flops.prefill_cost(model.config, spec, text_tokens=toks.shape[1] - 1, batch=len(prompts),
                              bytes_per_element=4)
    assert [lc.k.shape[1] for lc in cache.layers] == list(cost.kv_slots), spec
    assert [2 * int(np.prod(lc.k.shape)) * lc.k.dtype.itemsize for lc in cache.layers] == list(cost.kv_bytes), spec


# ---- in-LLM methods ----------------------------------------------------------------------------
MASKED = [n for n in LLM if hasattr(rules.load(n), "MASKED")]


def test_every_maskable_method_declares_its_pair():
  maskable = [n for n in LLM if "mask" in registry()[n].__dataclass_fields__]
  assert maskable == MASKED, f"in-LLM methods with a mask variant must set MASKED in their rule: {maskable}"


@pytest.mark.parametrize("name", MASKED)
def test_drop_equals_mask_variant(name):
  """Removing tokens == hiding the same tokens with the attention mask from that layer on (prefill and decode)."""
  spec = rules.load(name).MASKED
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs(7)
  toks, valid = pad_prompts(prompts, 0)
  masked = spec + ",mask=true"
  d_logits, _, d_aux = model.apply(params, pixels, toks, valid, reduction=spec, method=VLM.prefill)
  m_logits, _, m_aux = model.apply(params, pixels, toks, valid, reduction=masked, method=VLM.prefill)
  assert d_logits.shape[1] < m_logits.shape[1]
  for i in range(len(prompts)):
    d = np.asarray(d_logits[i])[np.asarray(d_aux["llm/valid"][i])]
    m = np.asarray(m_logits[i])[np.asarray(m_aux["llm/valid"][i])]
    np.testing.assert_allclose(d, m, atol=1e-4)
  d_gen = generate(model, params, pixels, toks, valid, max_new_tokens=5, reduction=spec, return_logits=True)
  m_gen = generate(model, params, pixels, toks, valid, max_new_tokens=5, reduction=masked, return_logits=True)
  np.testing.assert_allclose(np.asarray(d_gen.logits), np.asarray(m_gen.logits), atol=1e-4)


SLOW_DECODE = ("exit", "todre_llm")  # covered by the slow run; their single drop / masking is the simplest
DECODE = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_DECODE else n for n in LLM] + [
    "fastervlm:keep=8+pdrop:layers=1/2,ratio=0.5", "fastv:layer=1,keep=12+fastv:layer=3,keep=6"]


@pytest.mark.parametrize("name", DECODE)
def test_decode_equals_rerun_prefill(name):
  """Each decode step == a prefill of prompt + tokens so far with the same reduction (positions stay right)."""
  spec = examples(name)[0] if name in registry() else name
  model, params = H.tiny_model("clip")
  prompts, pixels = H.batch_inputs(8)
  toks, valid = pad_prompts(prompts, 0)
  steps = 4
  gen = generate(model, params, pixels, toks, valid, max_new_tokens=steps, reduction=spec, return_logits=True)
  length = toks.shape[1] + steps

  @jax.jit
  def rerun(t, v, prompt):
    return model.apply(params, pixels, t, v, reduction=spec, last_only=True, llm_extras={"prompt": prompt},
                       method=VLM.prefill)[0]

  for s in range(steps):
    grown = [p + [int(x) for x in gen.tokens[i, :s]] for i, p in enumerate(prompts)]
    gt, gv = pad_prompts(grown, 0, length=length)
    prompt_mask = np.zeros_like(gv)
    for i, p in enumerate(prompts):
      prompt_mask[i, length - len(grown[i]): length - len(grown[i]) + len(p)] = True
    np.testing.assert_allclose(np.asarray(rerun(gt, gv, prompt_mask)), np.asarray(gen.logits[:, s]), atol=5e-5,
                               err_msg=f"{spec}: step {s}")
