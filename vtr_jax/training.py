"""The library behind train.py: config -> model, optimizer, jitted train step, checkpointed loop.

    from vtr_jax import training
    from configs import shapes_tiny
    training.train(shapes_tiny.get_config("test"), "/tmp/run")

Training reads the bundled benchmark on the fly (`vtr_jax.data.vqa.stream`):
step s always sees the same examples and the same dropout/init keys derive
from (seed, step), so a run interrupted and resumed from its last
checkpoint continues exactly as an uninterrupted one.

Everything runs on the config's device mesh (`config.mesh`, see
`vtr_jax.sharding`): the state is created in its shardings (derived with
`jax.eval_shape`), the step is jitted with in/out shardings and donates the
old state, each process generates only its rows of every global batch, and
orbax saves and restores the sharded state (onto any mesh shape).

No step waits for the device: the loop reads values back only at log steps
(`train.log_every`) and before a checkpoint is written. Whether any step so
far had a non-finite loss or gradient norm is kept on the device (the first
such step's number), so training still stops at the first bad step and names
it, as big_vision's trainer does, and never checkpoints a state past it.
`config.model.dtype` / `param_dtype` set the compute and parameter dtypes of
the whole model (e.g. bfloat16 compute over float32 master weights: the
optimizer updates float32 parameters, every matmul runs in bfloat16), and
`config.model.text.remat` the decoder layers' rematerialisation policy.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from vtr_jax import placement, sharding, supervision
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
  dtypes = {k: m[k] for k in ("dtype", "param_dtype") if m.get(k)}  # the whole model's, over the parts'
  vision = VisionConfig(**{**m.vision.to_dict(), "feature_layers": tuple(m.vision.feature_layers), **dtypes})
  text = DecoderConfig(**{**m.text.to_dict(), "vocab_size": tok.vocab_size, **dtypes})
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


def init_params(model: VLM, cfg: VLMConfig, seed: int, mesh=None, rules: sharding.Rules = sharding.DEFAULT_RULES):
  """The model's initial parameters (unboxed); on `mesh`, made directly in their shardings."""
  if mesh is None:
    return nn.unbox(jax.jit(model.init)(*placement.init_inputs(cfg, seed)))
  return sharding.init_params(model.init, mesh, rules, *placement.init_inputs(cfg, seed))[0]


def _fresh_state(model: VLM, config: ml_collections.ConfigDict, aux_weight: float, seed: int) -> TrainState:
  """The state before step 0 (under `jax.jit` or `jax.eval_shape`)."""
  params = nn.unbox(model.init(*placement.init_inputs(model.config, seed)))
  heads = supervision.init_heads(model.config.vision, seed) if aux_weight else {}
  tx = optimizer(config, params, heads)
  return TrainState(jnp.asarray(0, jnp.int32), params, heads, tx.init({"model": params, "heads": heads}))


def state_shardings(model: VLM, config: ml_collections.ConfigDict, aux_weight: float, mesh,
                    rules: sharding.Rules) -> tuple[TrainState, TrainState]:
  """(abstract state, its NamedShardings) from `jax.eval_shape`: nothing is allocated.

  Parameters follow their logical names; optimizer moments mirror the
  parameters; the step, the auxiliary heads and scalars are replicated.
  """
  abstract = jax.eval_shape(functools.partial(_fresh_state, model, config, aux_weight, 0))
  params = placement.param_shardings(model, mesh, rules)
  rep = sharding.replicated(mesh)
  heads = jax.tree_util.tree_map(lambda _: rep, abstract.heads)
  opt = sharding.like_params(abstract.opt_state, {"model": abstract.params, "heads": abstract.heads},
                             {"model": params, "heads": heads}, mesh)
  return abstract, TrainState(rep, params, heads, opt)


# ---- the step ---------------------------------------------------------------------------------
def loss_and_metrics(trainable, model: VLM, batch: Mapping[str, Array], reduction, query_rows: bool = False,
                     aux_weight: float = 0.0):
  """Mean cross-entropy over the answer (and end) tokens, plus `aux_weight` x the auxiliary scene
  losses (`vtr_jax.supervision`); accuracy of the first answer token.

  Targets ride through the decoder as per-token entries, so they stay
  aligned with the logits even when an in-LLM method drops tokens.
  """
  params = trainable["model"]
  extras = {"target": batch["targets"], "loss": batch["loss_mask"]}
  if query_rows:  # PyramidDrop's training rule: the rows just before the answer
    first = batch["loss_mask"] & ~jnp.pad(batch["loss_mask"], ((0, 0), (1, 0)))[:, :-1]
    extras["query"] = first
    extras["prompt"] = batch["valid"] & ~batch["loss_mask"] | first
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
                    aux_weight: float = 0.0, *, mesh, rules: sharding.Rules = sharding.DEFAULT_RULES,
                    batch_size: int):
  """jit(state, batch) -> (state, metrics) on `mesh`, the state's buffers donated.

  In and out shardings: the state's (`state_shardings`); the batch (a dict
  of batch-leading arrays of `batch_size` rows) split over the batch axes;
  metrics replicated. The compiled step is cached by (model, optimizer
  settings, plan, mesh, rules, batch size), so several `train` calls in one
  process (tests, sweeps) compile it once.
  """
  return _compiled_step(model, _optim_key(config), parse(reduction), query_rows, float(aux_weight), mesh,
                        sharding.normalize_rules(rules), batch_size)


def _optim_key(config: ml_collections.ConfigDict) -> tuple:
  """The optimizer settings as a hashable key (what `optimizer` reads)."""
  return (tuple(sorted(config.optim.to_dict().items())), config.train.steps, config.train.trainable)


def _config_from_key(key: tuple) -> ml_collections.ConfigDict:
  optim, steps, trainable = key
  return ml_collections.ConfigDict({"optim": dict(optim), "train": {"steps": steps, "trainable": trainable}})


@functools.lru_cache(maxsize=32)
def _compiled_step(model: VLM, optim: tuple, plan, query_rows: bool, aux_weight: float, mesh,
                   rules: sharding.Rules, batch_size: int):
  _, shardings = state_shardings(model, _config_from_key(optim), aux_weight, mesh, rules)

  def step(state, batch):
    with sharding.activate(mesh, rules):
      return train_step(state, batch, model=model, optim=optim, plan=plan, query_rows=query_rows,
                        aux_weight=aux_weight)

  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh, rules, batch_size)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def train_step(state: TrainState, batch, *, model: VLM, optim: tuple, plan, query_rows: bool, aux_weight: float):
  """One optimizer step (traced inside `make_train_step`'s jit)."""
  tx = optimizer(_config_from_key(optim), state.params, state.heads)
  trainable = {"model": state.params, "heads": state.heads}
  grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
  (_, metrics), grads = grad_fn(trainable, model, batch, plan, query_rows, aux_weight)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  new = optax.apply_updates(trainable, updates)
  metrics["grad_norm"] = optax.global_norm(grads)
  return TrainState(state.step + 1, new["model"], new["heads"], opt_state), metrics


@jax.jit
def _note_first_bad(first_bad: Array, loss: Array, grad_norm: Array, step) -> Array:
  """int32[]: the first step whose loss or gradient norm was not finite (0 while none was)."""
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  return jnp.where((first_bad == 0) & ~finite, jnp.asarray(step, jnp.int32), first_bad)


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


def step_inputs(rows, tok: Tokenizer, cfg: VLMConfig, aux_weight: float) -> dict[str, np.ndarray]:
  """Rows -> the train step's batch entries (teacher-forced sequences; scene targets when aux_weight > 0)."""
  batch = as_arrays(vqa.train_batch(rows, tok, cfg.vision, length=vqa.TRAIN_LENGTH))
  if aux_weight:
    targets = supervision.scene_targets([r["scene"] for r in rows], cfg.vision.grid)
    batch.update({f"aux/{k}": v for k, v in targets.items()})
  return batch


# ---- evaluation during training ---------------------------------------------------------------
def answer_accuracy(model: VLM, params, rows, tok: Tokenizer, *, mesh, rules: sharding.Rules,
                    batch_size: int = 64, reduction=None):
  """Accuracy of the argmax answer token per family: {'overall': ..., '<family>': ...}.

  `params` are laid out on `mesh` (as the train state's); each process loads its rows of every batch.
  """
  batch_size = placement.batch_size_for(batch_size, mesh, rules)
  batches = placement.prompt_batches(rows, tok, model.config, batch_size, mesh, rules)
  prefill = placement.predictor(model, parse(reduction).spec, mesh, rules, batch_size)
  outs = sharding.fetch([(prefill(params, b["pixels"], b["tokens"], b["valid"])[0], b["answers"]) for b in batches])
  pred = np.concatenate([p for p, _ in outs])[:len(rows)]
  answers = np.concatenate([a for _, a in outs])[:len(rows)]
  hits: dict[str, list[bool]] = {}
  for i in range(len(rows)):
    hits.setdefault(rows[i]["family"], []).append(bool(pred[i] == answers[i]))
  out = {f: float(np.mean(v)) for f, v in sorted(hits.items())}
  out["overall"] = float(np.mean([h for v in hits.values() for h in v]))
  return out


# ---- the loop ---------------------------------------------------------------------------------
def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=config.train.keep_checkpoints, save_interval_steps=config.train.checkpoint_every))


def _flat(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}.{k}"))
    else:
      out[f"{prefix}.{k}"] = list(v) if isinstance(v, tuple) else v
  return out


# What a resumed run must share with the run that wrote its checkpoints, besides the model: the optimiser and
# the schedule (a changed one would silently continue a different run). Logging, evaluation and checkpoint
# cadence may change freely.
RUN_FIELDS = ("seed", "optim", "train.steps", "train.batch_size", "train.trainable", "train.reduction",
              "train.query_rows", "train.aux_weight")


def config_changes(saved: Mapping[str, Any], config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """(model fields that differ, optimiser / schedule fields that differ) between a saved and a new config."""
  old, new = _flat(saved, "config"), _flat(json.loads(config.to_json_best_effort()), "config")
  def diff(prefixes):
    keys = sorted(k for k in set(old) | set(new) if any(k == f"config.{p}" or k.startswith(f"config.{p}.")
                                                       for p in prefixes))
    return [f"{k[len('config.'):]}: checkpoint {old.get(k)!r}, config {new.get(k)!r}" for k in keys
            if old.get(k) != new.get(k)]
  return diff(("model",)), diff(RUN_FIELDS)


def check_resumable(saved: Mapping[str, Any], config: ml_collections.ConfigDict, where: str, *,
                    allow_changes: bool = False) -> list[str]:
  """Raises TrainingError naming every field that differs from the run in `where`: model fields always (the
  checkpoint cannot fit), optimiser / schedule fields unless `allow_changes` (then they are returned)."""
  model, run = config_changes(saved, config)
  if model:
    raise TrainingError(f"the checkpoints in {os.path.dirname(where)} were written with another model config "
                        f"({'; '.join(model)}); use a new --workdir or the original config")
  if run and not allow_changes:
    raise TrainingError(f"the checkpoints in {os.path.dirname(where)} were written with another optimiser or "
                        f"schedule ({'; '.join(run)}); resuming would continue a different run: use a new --workdir, "
                        "the original config, or --allow_config_change to continue anyway")
  return run


def _restore_error(step: int, directory: str, e: BaseException) -> str:
  """One line for an orbax / TensorStore failure: the step, its directory, the arrays or files named in it."""
  text = str(e)
  arrays = sorted(set(re.findall(r"'path': '([^']+?)/?'", text)) - {f"{directory}/{step}/default"})
  arrays = [a for a in arrays if not a.startswith("/")]
  files = sorted(set(re.findall(r"(/[^\s'\"]+)", text)))
  where = f"array {arrays[0]}" if arrays else f"file {files[0]}" if files else "its files"
  first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
  return f"step {step} ({os.path.join(directory, str(step))}) cannot be read: {where} ({first})"


def restore_or_init(mgr: ocp.CheckpointManager, model: VLM, config: ml_collections.ConfigDict, aux_weight: float,
                    mesh, rules: sharding.Rules, *, fallback: bool = False,
                    log=print) -> TrainState:
  """The latest checkpoint's state, or a fresh one, laid out in its shardings on `mesh`.

  Restoring reads each device's shards straight into the shardings of this
  mesh, whatever mesh the checkpoint was written from. A step that cannot be
  read raises TrainingError naming it and what failed; with `fallback` it is
  deleted and the previous kept step is restored instead.
  """
  abstract, shardings = state_shardings(model, config, aux_weight, mesh, rules)
  steps = sorted(mgr.all_steps(), reverse=True)
  if not steps:
    init = functools.partial(_fresh_state, model, config, aux_weight, config.seed)
    return jax.jit(init, out_shardings=shardings)()
  target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  for i, step in enumerate(steps):
    try:
      return mgr.restore(step, args=ocp.args.StandardRestore(target))
    except json.JSONDecodeError as e:  # a metadata file that is not JSON any more
      problem = _restore_error(step, str(mgr.directory), e)
    except (ValueError, KeyError) as e:  # a structure that does not fit this config
      raise TrainingError(f"checkpoint at step {step} in {mgr.directory} does not fit this config: {e}") from None
    except Exception as e:  # orbax and TensorStore raise plain Exceptions for unreadable data
      problem = _restore_error(step, str(mgr.directory), e)
    rest = steps[i + 1:]
    if not fallback:
      hint = (f"; pass --fallback_checkpoint to resume from step {rest[0]}" if rest else
              "; no earlier checkpoint is kept: delete the step or use a new --workdir")
      raise TrainingError(f"checkpoint {problem}{hint}")
    if not rest:
      raise TrainingError(f"checkpoint {problem}, and no earlier checkpoint is kept: use a new --workdir")
    log(f"warning: checkpoint {problem}; deleting it and resuming from step {rest[0]}")
    mgr.delete(step)
  raise AssertionError("unreachable")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The rows of `workdir/metrics.jsonl` that `train` logs, oldest first ([] before the first)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
          stop_at: int | None = None, progress: bool = True, allow_config_change: bool = False,
          fallback_checkpoint: bool = False) -> dict[str, Any]:
  """Runs (or resumes) training; returns the last logged metrics.

  Writes `workdir/checkpoints/` (orbax), `workdir/metrics.jsonl`,
  `workdir/config.json`, and at the end `workdir/export/` (a checkpoint
  directory `vtr_jax.load` reads, with `training.json`: the step and the
  last validation accuracy). `stop_after` ends the run early after that many
  steps of this invocation (used to test interruption); `stop_at` ends it at
  that global step and exports it -- a snapshot of the same run, since the
  learning-rate schedule stays that of `train.steps` and resuming is exact. With
  several processes (`sharding.initialize_distributed`) every process runs
  this; process 0 writes the logs, the config and the export.
  
  Resuming refuses a config whose model, optimiser or schedule differs from
  the run's (`check_resumable`; `allow_config_change` continues despite the
  latter) and a checkpoint step that cannot be read (`fallback_checkpoint`
  resumes from the previous kept step instead).
  """
  from tqdm import tqdm  # a dependency, imported here to keep `import vtr_jax.training` light

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  tok = vqa.tokenizer()
  cfg = model_config(config, tok)
  model = VLM(cfg)
  lead = jax.process_index() == 0
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path) and os.path.isdir(os.path.join(workdir, "checkpoints")):
    with open(config_path) as f:
      changed = check_resumable(json.load(f), config, config_path, allow_changes=allow_config_change)
    if changed and lead:
      print(f"warning: continuing the run in {workdir} with a changed config: {'; '.join(changed)}")
  if lead:
    with open(config_path, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh, rules = sharding.mesh_from_config(config), sharding.rules_from_config(config)
  aux_weight = float(config.train.get("aux_weight", 0.0))
  mgr = checkpoint_manager(workdir, config)
  state = restore_or_init(mgr, model, config, aux_weight, mesh, rules, fallback=fallback_checkpoint,
                          log=print if lead else (lambda *_: None))
  if lead and progress:
    _, shardings = state_shardings(model, config, aux_weight, mesh, rules)
    print(sharding.replication_report(state.params, shardings.params).summary())
  start = int(jax.device_get(state.step))
  schedule = reduction_schedule(config.train.get("reduction") or None)
  query_rows = config.train.get("query_rows", False)
  batch_size = config.train.batch_size
  step_fns = {spec: make_train_step(model, config, spec or None, query_rows=query_rows, aux_weight=aux_weight,
                                    mesh=mesh, rules=rules, batch_size=batch_size) for _, spec in schedule}
  total = config.train.steps
  end = total if stop_after is None else min(total, start + stop_after)
  if stop_at is not None:
    if not 0 < stop_at <= total:
      raise TrainingError(f"stop_at={stop_at} must be in 1..train.steps={total}")
    end = min(end, stop_at)
  split = sharding.batch_sharding(mesh, rules, batch_size)
  data = vqa.stream("train", batch_size, first_step=start, config=scene_config(config, cfg),
                    workers=config.data.workers, num_examples=config.data.get("train_examples") or None,
                    rows=sharding.process_rows(split, batch_size))
  val_rows = None
  metrics: dict[str, Any] = {}
  log_path = os.path.join(workdir, "metrics.jsonl")
  bar = tqdm(total=total, initial=start, disable=not (progress and lead), desc="train", dynamic_ncols=True)
  first_bad = jax.device_put(jnp.zeros((), jnp.int32), sharding.replicated(mesh))  # 0: every step finite
  t0 = time.perf_counter()
  try:
    for step in range(start, end):
      rows = next(data)  # this process's rows of the step's batch
      batch = sharding.global_batch(step_inputs(rows, tok, cfg, aux_weight), split, batch_size)
      state, step_metrics = step_fns[spec_at(schedule, step)](state, batch)
      done = step + 1
      first_bad = _note_first_bad(first_bad, step_metrics["loss"], step_metrics["grad_norm"], done)
      log = done % config.train.log_every == 0 or done == end
      if log or mgr.should_save(done):  # the only reads from the device
        bad = int(jax.device_get(first_bad))
        if bad:
          raise TrainingError(f"non-finite loss or gradient norm at step {bad}; stopping (found at step {done}; "
                              f"last checkpoint: step {mgr.latest_step()})")
      mgr.save(done, args=ocp.args.StandardSave(state))
      bar.update(1)
      if log:
        host = jax.device_get(step_metrics)
        bar.set_postfix(loss=f"{float(host['loss']):.3f}")
        metrics = {"step": done, "loss": float(host["loss"]), "accuracy": float(host["accuracy"]),
                   "grad_norm": float(host["grad_norm"]), "lr": float(learning_rate(config)(step)),
                   "seconds": round(time.perf_counter() - t0, 2),
                   **{k: float(v) for k, v in host.items() if k.startswith("aux/")}}
        if config.train.eval_every and (done % config.train.eval_every == 0 or done == total):
          if val_rows is None:
            val_rows = vqa.build_split("val", config.data.val_examples, scene_config(config, cfg))
          metrics["val"] = answer_accuracy(model, state.params, val_rows, tok, mesh=mesh, rules=rules)
        if lead:
          with open(log_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
  finally:
    bar.close()
    mgr.wait_until_finished()
    mgr.close()
  if int(jax.device_get(state.step)) >= (total if stop_at is None else stop_at):
    from vtr_jax.convert import save
    state = state.replace(params=sharding.fetch(state.params))  # every process joins the gather; process 0 writes
    if lead:
      save(os.path.join(workdir, "export"), cfg, state.params, tok)
      last_val = next(({"step": r["step"], **r["val"]} for r in reversed(read_metrics(workdir)) if "val" in r), None)
      with open(os.path.join(workdir, "export", "training.json"), "w") as f:
        json.dump({"step": int(state.step), "steps": total, "config": config.get("name"), "last_val": last_val}, f,
                  indent=2)
  return metrics
