"""The model on a device mesh: example inputs, parameter placement, prompt batches, the jitted predictor.

Shared by evaluation (`vtr_jax.evaluation`) and training (`vtr_jax.training`),
neither of which imports the other.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from vtr_jax import axes, sharding
from vtr_jax.data import vqa
from vtr_jax.data.tokenizer import Tokenizer
from vtr_jax.models.vlm import VLM, VLMConfig
from vtr_jax.reduce import parse


def init_inputs(cfg: VLMConfig, seed: int = 0) -> tuple:
  """(key, pixels, tokens, valid): a one-sample example for `VLM.init` (shapes of the parameters only)."""
  s = cfg.vision.image_size
  tokens = jnp.array([[cfg.image_token_id, cfg.pad_token_id]], jnp.int32)
  return jax.random.key(seed), jnp.zeros((1, s, s, 3)), tokens, jnp.ones((1, 2), bool)


def param_shardings(model: VLM, mesh, rules: sharding.Rules):
  """NamedShardings of the model's parameters on `mesh`, from their logical names (nothing allocated)."""
  return sharding.logical_shardings(jax.eval_shape(model.init, *init_inputs(model.config)), mesh, rules)


def placed(model: VLM, params, mesh, rules: sharding.Rules):
  """`params` (host arrays, or arrays on devices) laid out in their shardings on `mesh`."""
  return sharding.put(params, param_shardings(model, mesh, rules))


@functools.lru_cache(maxsize=64)
def predictor(model: VLM, spec: str, mesh, rules: sharding.Rules, batch_size: int):
  """jit(params, pixels, tokens, valid) -> (answer token int32[B], valid visual tokens int32[B]).

  Parameters and inputs are sharded (batch over the batch axes); the two
  small results come back replicated, so every process reads all of them.
  """
  plan = parse(spec)

  def run(params, pixels, tokens, valid):
    with sharding.activate(mesh, rules):
      logits, _, aux = model.apply(params, pixels, tokens, valid, reduction=plan, last_only=True,
                                   method=VLM.prefill)
      return jnp.argmax(logits, axis=-1), jnp.sum(aux["reduce/valid"], axis=1)

  batch = sharding.batch_sharding(mesh, rules, batch_size)
  return jax.jit(run, in_shardings=(param_shardings(model, mesh, rules), batch, batch, batch),
                 out_shardings=sharding.replicated(mesh))


def batch_size_for(requested: int, mesh, rules: sharding.Rules) -> int:
  """`requested` rounded up to a multiple of the devices the batch splits over."""
  n = math.prod(mesh.shape[a] for a in dict(rules).get(axes.ACT_BATCH, ()))
  return -(-requested // n) * n


def prompt_batches(rows, tok: Tokenizer, cfg: VLMConfig, batch_size: int, mesh, rules: sharding.Rules
                   ) -> list[dict[str, jax.Array]]:
  """Global batches of `rows` ({'pixels', 'tokens', 'valid', 'answers'}), the last padded by repeating a row.

  Each process makes the inputs of its own rows of every batch only
  (`sharding.process_rows`).
  """
  split = sharding.batch_sharding(mesh, rules, batch_size)
  mine = sharding.process_rows(split, batch_size)
  out = []
  for i in range(0, len(rows), batch_size):
    index = [min(i + j, len(rows) - 1) for j in mine]  # one shape: one compile
    b = vqa.prompt_batch([rows[j] for j in index], tok, cfg.vision, length=vqa.PROMPT_LENGTH)
    local = {"pixels": b.pixels, "tokens": b.tokens, "valid": b.valid, "answers": b.answer_ids}
    out.append(sharding.global_batch(local, split, batch_size))
  return out


