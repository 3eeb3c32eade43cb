"""vtr_jax as an lmms-eval model: `--model vtr_jax --model_args pretrained=DIR,reduction=...`.

Registered through lmms-eval's entry-point group `lmms_eval.models` (pyproject.toml:
`vtr_jax = "vtr_jax.lmms:manifest"`), so an installed vtr_jax is found by lmms-eval with no
plugin variable or fork:

    python -m lmms_eval --model vtr_jax \\
        --model_args 'pretrained=/ckpt/llava-1.5-7b-hf,reduction="fastv:layer=2,keep=64"' \\
        --tasks pope --batch_size 16

Model arguments: `pretrained` (a checkpoint directory `vtr_jax.load` reads), `reduction` (a plan
string, quoted when it holds commas; "none" by default), `max_new_tokens` (when a task's
generation_kwargs give none; 1024 as lmms-eval's LLaVA models), `template` (a named chat template
of the checkpoint), `fallback` (the chat format for checkpoints without a template: "llava-1.5",
or "none" to refuse them), `dtype`. lmms-eval's `--batch_size` sets how many prompts one compiled
call answers; `--device` is ignored (JAX uses its default devices).

Generation is `vtr_jax.tasks.answer`, the path `vtr_jax.tasks.run_task` uses: the checkpoint's
chat template around lmms-eval's `doc_to_text` (the image first), greedy decoding, cut at
the task's `until` strings. Only single-image requests are supported (no video, no several images)
and only greedy decoding; log-likelihood requests are refused.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

from vtr_jax import chat, tasks
from vtr_jax.convert import load
from vtr_jax.models.vlm import VLM
from vtr_jax.reduce import parse

MODEL_ID = "vtr_jax"


def manifest() -> ModelManifest:
  """The entry point lmms-eval loads (group `lmms_eval.models`)."""
  return ModelManifest(model_id=MODEL_ID, simple_class_path="vtr_jax.lmms.VtrJax")


def _unquote(value: str) -> str:
  value = str(value).strip()
  return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'" else value


class VtrJax(lmms):
  """A vtr_jax checkpoint under one reduction plan, answering lmms-eval's `generate_until` requests."""
  is_simple = True

  def __init__(self, pretrained: str, reduction: str = "none", max_new_tokens: int = 1024,
               template: str | None = None, fallback: str = "llava-1.5", dtype: str | None = None,
               batch_size: int | str | None = 8, device: str | None = None, max_batch_size: int | None = None):
    super().__init__()
    del device, max_batch_size  # JAX places the computation; one batch size is used throughout
    import jax
    pretrained = _unquote(pretrained)
    self.reduction = _unquote(reduction)
    parse(self.reduction)  # an unknown method or bad setting fails here, before any data is read
    self.config, params, self.tokenizer = load(pretrained, dtype=dtype)
    self.model = VLM(self.config)
    self.params = jax.device_put(params)
    fallback = None if _unquote(fallback).lower() in ("", "none") else _unquote(fallback)
    self.template = chat.load(pretrained, name=template and _unquote(template), fallback=fallback)
    self.batch_size = 8 if batch_size in (None, "auto") else int(batch_size)
    self.max_new_tokens = int(max_new_tokens)

  def _image(self, request) -> Image.Image:
    context, _, doc_to_visual, doc_id, task, split = request.args
    visuals = doc_to_visual(self.task_dict[task][split][doc_id])
    if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
      kinds = sorted({type(v).__name__ for v in visuals})
      raise tasks.UnsupportedInputError(
          f"{task} document {doc_id} has {len(visuals)} visual inputs ({', '.join(kinds) or 'none'}); the vtr_jax "
          "model answers one image per prompt (video and multi-image inputs are not implemented yet)")
    return visuals[0]

  def _settings(self, gen_kwargs: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
    if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
      raise ValueError(f"the vtr_jax model decodes greedily; got do_sample={gen_kwargs.get('do_sample')}, "
                       f"temperature={gen_kwargs.get('temperature')}")
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    return int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), until

  def generate_until(self, requests) -> list[str]:
    """Answers in request order; requests with the same generation settings are batched together."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
      groups.setdefault(self._settings(r.args[1]), []).append(i)
    out: list[str] = [""] * len(requests)
    for (max_new_tokens, until), index in groups.items():
      prompts = [tasks.render(self.template, self.tokenizer, requests[i].args[0]) for i in index]
      images = [self._image(requests[i]) for i in index]
      answers = tasks.answer(self.model, self.params, self.tokenizer, prompts, images, max_new_tokens=max_new_tokens,
                             stop=until, reduction=self.reduction, batch_size=self.batch_size)
      for i, a in zip(index, answers):
        out[i] = a
    return out

  def loglikelihood(self, requests):
    raise NotImplementedError("the vtr_jax model answers generate_until tasks only (no log-likelihood scoring)")

  def generate_until_multi_round(self, requests):
    raise NotImplementedError("the vtr_jax model answers single-turn generate_until tasks only")


__all__ = ["MODEL_ID", "VtrJax", "manifest"]
