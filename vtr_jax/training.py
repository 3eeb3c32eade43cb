"""The library behind train.py: config -> model, optimizer, jitted train step, checkpointed loop.

    from vtr_jax import training
    from configs import shapes_tiny
    training.train(shapes_tiny.get_config("test"), "/tmp/run")

Training reads the bundled benchmark on the fly (`vtr_jax.data.vqa.stream`):
step s always sees the same examples and the same dropout/init keys derive
from (seed, step), so a run interrupted and resumed from its last
checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from vtr_jax import supervision
from vtr_jax.data import scenes, vqa
from vtr_jax.data.tokenizer import Tokenizer
from vtr_jax.models.decoder import DecoderConfig
from vtr_jax.models.vit import VisionConfig
from vtr_jax.models.vlm import VLM, VLMConfig
from vtr_jax.reduce import parse

Array = jax.Array


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, a checkpoint that does not fit the config)."""


@flax.struct.dataclass
class TrainState:
  """`params` is the model (what gets exported); `heads` the training-only auxiliary heads ({} if none)."""
  step: Array
  params: Any
  heads: Any
  opt_state: Any


# ---- config -> parts ------------------------------------------------------------------------
def model_config(config: ml_collections.ConfigDict, tok: Tokenizer) -> VLMConfig:
  """The VLMConfig a training config describes (vocabulary and special ids from the tokenizer)."""
  m = config.model
  vision = VisionConfig(**{**m.vision.to_dict(), "feature_layers": tuple(m.vision.feature_layers)})
  text = DecoderConfig(**{**m.text.to_dict(), "vocab_size": tok.vocab_size})
  eos = tok.eos_token_id
  return VLMConfig(vision=vision, text=text, projector=m.projector, image_token_id=tok.image_token_id,
                   pad_token_id=tok.pad_token_id or 0, eos_token_ids=() if eos is None else (eos,),
                   name=config.get("name", "vlm"))


def scene_config(config: ml_collections.ConfigDict, cfg: VLMConfig) -> scenes.SceneConfig:
  return scenes.SceneConfig(image_size=cfg.vision.image_size)


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  o, steps = config.optim, config.train.steps
  return optax.warmup_cosine_decay_schedule(0.0, o.lr, min(o.warmup, steps), max(steps, o.warmup + 1),
                                            end_value=o.lr * o.get("final_lr_fraction", 0.05))


def trainable_mask(params, trainable: str):
  """Pytree of bools: which parameters the optimizer updates (`all`, `projector`, or '+'-joined tops)."""
  parts = set(trainable.split("+"))
  if parts == {"all"}:
    return jax.tree_util.tree_map(lambda _: True, params)
  tops = set(params["params"])
  unknown = parts - tops
  if unknown:
    raise ValueError(f"train.trainable names {sorted(unknown)}; the model's parts are {sorted(tops)} (or 'all')")
  return {"params": {k: jax.tree_util.tree_map(lambda _, t=k in parts: t, v) for k, v in params["params"].items()}}


def optimizer(config: ml_collections.ConfigDict, params, heads=None) -> optax.GradientTransformation:
  """AdamW (warmup + cosine, clipped) over {'model': params, 'heads': heads}; frozen parts get zero updates."""
  o = config.optim
  no_decay = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda path, x: x.ndim >= 2 and "embedding" not in jax.tree_util.keystr(path), p)
  inner = optax.chain(optax.clip_by_global_norm(o.clip),
                      optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                                  mask=no_decay))
  mask = {"model": trainable_mask(params, config.train.trainable),
          "heads": jax.tree_util.tree_map(lambda _: True, heads or {})}
  labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", mask)
  return optax.multi_transform({"train": inner, "freeze": optax.set_to_zero()}, labels)


def init_params(model: VLM, cfg: VLMConfig, seed: int):
  s = cfg.vision.image_size
  tokens = jnp.array([[cfg.image_token_id, cfg.pad_token_id]], jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, s, s, 3)), tokens, jnp.ones((1, 2), bool))
  return nn.unbox(variables)


# ---- the step ---------------------------------------------------------------------------------
def loss_and_metrics(trainable, model: VLM, batch: Mapping[str, Array], reduction, query_rows: bool = False,
                     aux_weight: float = 0.0):
  """Mean cross-entropy over the answer (and end) tokens, plus `aux_weight` x the auxiliary scene
  losses (`vtr_jax.supervision`); accuracy of the first answer token.

  Targets ride through the decoder as per-token entries, so they stay
  aligned with the logits even when an in-LLM method drops tokens.
  """
  params = trainable["model"]
  extras = {"tok/target": batch["targets"], "tok/loss": batch["loss_mask"]}
  if query_rows:  # PyramidDrop's training rule: the rows just before the answer
    first = batch["loss_mask"] & ~jnp.pad(batch["loss_mask"], ((0, 0), (1, 0)))[:, :-1]
    extras["tok/query"] = first
    extras["tok/prompt"] = batch["valid"] & ~batch["loss_mask"] | first
  logits, _, aux = model.apply(params, batch["pixels"], batch["tokens"], batch["valid"], reduction=reduction,
                               llm_extras=extras, method=VLM.prefill)
  targets, mask = aux["llm/tok/target"], aux["llm/tok/loss"] & aux["llm/valid"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  count = jnp.maximum(jnp.sum(mask), 1)
  loss = jnp.sum(jnp.where(mask, losses, 0.0)) / count
  first = mask & ~jnp.pad(mask, ((0, 0), (1, 0)))[:, :-1]  # the answer token itself
  correct = jnp.sum(jnp.where(first, jnp.argmax(logits, -1) == targets, False))
  acc = correct / jnp.maximum(jnp.sum(first), 1)
  metrics = {"loss": loss, "accuracy": acc}
  if aux_weight:
    patches, cls = supervision.split_features(aux["vision/features"], aux.get("vision/cls_feature"),
                                              model.config.vision)
    targets = {k[len("aux/"):]: v for k, v in batch.items() if k.startswith("aux/")}
    extra, aux_metrics = supervision.aux_loss(trainable["heads"], patches, cls, targets)
    metrics.update(aux_metrics)
    return loss + aux_weight * extra, metrics
  return loss, metrics


def make_train_step(model: VLM, config: ml_collections.ConfigDict, reduction=None, query_rows: bool = False,
                    aux_weight: float = 0.0):
  """jit(state, batch) -> (state, metrics), the state's buffers donated.

  The compiled step is cached by (model, optimizer settings, plan), so
  several `train` calls in one process (tests, sweeps) compile it once.
  """
  key = _optim_key(config)
  return functools.partial(_train_step, model=model, optim=key, plan=parse(reduction), query_rows=query_rows,
                           aux_weight=aux_weight)


def _optim_key(config: ml_collections.ConfigDict) -> tuple:
  """The optimizer settings as a hashable key (what `optimizer` reads)."""
  return (tuple(sorted(config.optim.to_dict().items())), config.train.steps, config.train.trainable)


def _config_from_key(key: tuple) -> ml_collections.ConfigDict:
  optim, steps, trainable = key
  return ml_collections.ConfigDict({"optim": dict(optim), "train": {"steps": steps, "trainable": trainable}})


@functools.partial(jax.jit, static_argnames=("model", "optim", "plan", "query_rows", "aux_weight"),
                   donate_argnums=(0,))
def _train_step(state: TrainState, batch, *, model: VLM, optim: tuple, plan, query_rows: bool, aux_weight: float):
  tx = optimizer(_config_from_key(optim), state.params, state.heads)
  trainable = {"model": state.params, "heads": state.heads}
  grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
  (_, metrics), grads = grad_fn(trainable, model, batch, plan, query_rows, aux_weight)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  new = optax.apply_updates(trainable, updates)
  metrics["grad_norm"] = optax.global_norm(grads)
  return TrainState(state.step + 1, new["model"], new["heads"], opt_state), metrics


def reduction_schedule(text: str | None) -> list[tuple[int | None, str]]:
  """'until:spec|until:spec|spec' -> [(until_step, spec), ..., (None, spec)].

  A plan per training stage, each used while step < until (LLaVolta's
  relaxing compression: strong pooling first, none at the end). A plain
  reduction string is a one-stage schedule.
  """
  if not text:
    return [(None, "")]
  stages = []
  for part in text.split("|"):
    head, sep, rest = part.partition(":")
    if sep and head.strip().isdigit():
      stages.append((int(head), rest.strip()))
    else:
      stages.append((None, part.strip()))
  if any(until is None for until, _ in stages[:-1]):
    raise ValueError(f"reduction schedule {text!r}: every stage but the last needs 'until_step:'")
  bounds = [u for u, _ in stages[:-1]]
  if bounds != sorted(set(bounds)):
    raise ValueError(f"reduction schedule {text!r}: stage boundaries {bounds} must increase")
  for _, spec in stages:
    parse(spec)  # fail early on a bad string
  return stages


def spec_at(schedule: list[tuple[int | None, str]], step: int) -> str:
  for until, spec in schedule:
    if until is None or step < until:
      return spec
  return schedule[-1][1]


def as_arrays(batch: vqa.TrainBatch) -> dict[str, np.ndarray]:
  return {"pixels": batch.pixels, "tokens": batch.tokens, "valid": batch.valid, "targets": batch.targets,
          "loss_mask": batch.loss_mask}


# ---- evaluation during training ---------------------------------------------------------------
def answer_accuracy(model: VLM, params, rows, tok: Tokenizer, *, batch_size: int = 64, reduction=None):
  """Accuracy of the argmax answer token per family: {'overall': ..., '<family>': ...}."""
  prefill = _answer_fn(model, parse(reduction))
  hits: dict[str, list[bool]] = {}
  for i in range(0, len(rows), batch_size):
    chunk = [rows[j] for j in range(i, min(i + batch_size, len(rows)))]  # a list or a datasets.Dataset
    pad = batch_size - len(chunk)
    b = vqa.prompt_batch(list(chunk) + [chunk[-1]] * pad, tok, model.config.vision, length=vqa.PROMPT_LENGTH)
    pred = np.asarray(prefill(params, b.pixels, b.tokens, b.valid))
    for row, p, a in zip(chunk, pred, b.answer_ids):
      hits.setdefault(row["family"], []).append(bool(p == a))
  out = {f: float(np.mean(v)) for f, v in sorted(hits.items())}
  out["overall"] = float(np.mean([h for v in hits.values() for h in v]))
  return out


@functools.lru_cache(maxsize=32)
def _answer_fn(model: VLM, plan):
  @jax.jit
  def run(params, pixels, tokens, valid):
    logits, _, _ = model.apply(params, pixels, tokens, valid, reduction=plan, last_only=True, method=VLM.prefill)
    return jnp.argmax(logits, axis=-1)
  return run


# ---- the loop ---------------------------------------------------------------------------------
def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=config.train.keep_checkpoints, save_interval_steps=config.train.checkpoint_every))


def check_same_model(saved: Mapping[str, Any], config: ml_collections.ConfigDict, where: str) -> None:
  """Raises TrainingError naming every model field that differs from the run in `where`."""
  def flat(d, prefix="model"):
    out = {}
    for k, v in d.items():
      if isinstance(v, Mapping):
        out.update(flat(v, f"{prefix}.{k}"))
      else:
        out[f"{prefix}.{k}"] = list(v) if isinstance(v, tuple) else v
    return out
  old, new = flat(saved.get("model", {})), flat(json.loads(config.model.to_json_best_effort()))
  diffs = [f"{k}: checkpoint {old.get(k)!r}, config {new.get(k)!r}" for k in sorted(set(old) | set(new))
           if old.get(k) != new.get(k)]
  if diffs:
    raise TrainingError(f"the checkpoints in {os.path.dirname(where)} were written with another model config "
                        f"({'; '.join(diffs)}); use a new --workdir or the original config")


def restore_or_init(mgr: ocp.CheckpointManager, params, heads, tx) -> TrainState:
  """The latest checkpoint's state, or a fresh one around `params` and `heads`."""
  state = TrainState(jnp.asarray(0, jnp.int32), params, heads, tx.init({"model": params, "heads": heads}))
  latest = mgr.latest_step()
  if latest is None:
    return state
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  try:
    return mgr.restore(latest, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError) as e:
    raise TrainingError(f"checkpoint at step {latest} in {mgr.directory} does not fit this config: {e}") from None


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
          progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) training; returns the last logged metrics.

  Writes `workdir/checkpoints/` (orbax), `workdir/metrics.jsonl`,
  `workdir/config.json`, and at the end `workdir/export/` (a checkpoint
  directory `vtr_jax.load` reads). `stop_after` ends the run early after
  that many steps of this invocation (used to test interruption).
  """
  from tqdm import tqdm  # a dependency, imported here to keep `import vtr_jax.training` light

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  tok = vqa.tokenizer()
  cfg = model_config(config, tok)
  model = VLM(cfg)
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path) and os.path.isdir(os.path.join(workdir, "checkpoints")):
    check_same_model(json.load(open(config_path)), config, config_path)
  with open(config_path, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  params = init_params(model, cfg, config.seed)
  aux_weight = float(config.train.get("aux_weight", 0.0))
  heads = supervision.init_heads(cfg.vision, config.seed) if aux_weight else {}
  tx = optimizer(config, params, heads)
  mgr = checkpoint_manager(workdir, config)
  state = restore_or_init(mgr, params, heads, tx)
  start = int(state.step)
  schedule = reduction_schedule(config.train.get("reduction") or None)
  query_rows = config.train.get("query_rows", False)
  step_fns = {spec: make_train_step(model, config, spec or None, query_rows=query_rows, aux_weight=aux_weight)
              for _, spec in schedule}
  total = config.train.steps
  end = total if stop_after is None else min(total, start + stop_after)
  data = vqa.stream("train", config.train.batch_size, first_step=start, config=scene_config(config, cfg),
                    workers=config.data.workers, num_examples=config.data.get("train_examples") or None)
  val_rows = None
  metrics: dict[str, Any] = {}
  log_path = os.path.join(workdir, "metrics.jsonl")
  bar = tqdm(total=total, initial=start, disable=not progress, desc="train", dynamic_ncols=True)
  t0 = time.perf_counter()
  try:
    for step in range(start, end):
      rows = next(data)
      batch = as_arrays(vqa.train_batch(rows, tok, cfg.vision, length=vqa.TRAIN_LENGTH))
      if aux_weight:
        grid = cfg.vision.grid
        batch.update({f"aux/{k}": v for k, v in supervision.scene_targets([r["scene"] for r in rows], grid).items()})
      state, step_metrics = step_fns[spec_at(schedule, step)](state, batch)
      loss = float(step_metrics["loss"])
      if not math.isfinite(loss) or not math.isfinite(float(step_metrics["grad_norm"])):
        raise TrainingError(f"non-finite loss {loss} or gradient norm at step {step + 1}; stopping "
                            f"(last checkpoint: step {mgr.latest_step()})")
      mgr.save(step + 1, args=ocp.args.StandardSave(state))
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.3f}")
      done = step + 1
      if done % config.train.log_every == 0 or done == end:
        metrics = {"step": done, "loss": loss, "accuracy": float(step_metrics["accuracy"]),
                   "grad_norm": float(step_metrics["grad_norm"]), "lr": float(learning_rate(config)(step)),
                   "seconds": round(time.perf_counter() - t0, 2),
                   **{k: float(v) for k, v in step_metrics.items() if k.startswith("aux/")}}
        if config.train.eval_every and (done % config.train.eval_every == 0 or done == total):
          if val_rows is None:
            val_rows = vqa.build_split("val", config.data.val_examples, scene_config(config, cfg))
          metrics["val"] = answer_accuracy(model, state.params, val_rows, tok)
        with open(log_path, "a") as f:
          f.write(json.dumps(metrics) + "\n")
  finally:
    bar.close()
    mgr.wait_until_finished()
    mgr.close()
  if int(state.step) >= total:
    from vtr_jax.convert import save
    save(os.path.join(workdir, "export"), cfg, state.params, tok)
  return metrics
