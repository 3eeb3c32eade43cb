"""Prompts as a checkpoint expects them: its own chat template, rendered as transformers renders it.

    template = chat.load("/path/to/llava-1.5-7b-hf")        # or chat.load(dir, fallback=None)
    text = template.prompt("What is in the image?")         # "USER: <image>\\nWhat is in the image? ASSISTANT:"

Where a template comes from (what transformers 5 reads from a local directory):
  1. the processor's: `processor_config.json`'s `chat_template` key, else the legacy
     `chat_template.json` (`{"chat_template": ...}`), else `chat_template.jinja` (plus named
     templates in `additional_chat_templates/*.jinja`);
  2. else the tokenizer's: `chat_template.jinja` (and `additional_chat_templates/`), else
     `tokenizer_config.json`'s `chat_template` (a string, or a list of `{"name", "template"}`).
A checkpoint with several named templates renders the one called `default` unless `name=` picks
another. A checkpoint with none gets the fallback: LLaVA-1.5's conversation format
(`FALLBACKS["llava-1.5"]`, the template llava-hf ships: "USER: <image>\\n{question} ASSISTANT:");
with `fallback=None` it raises `ChatTemplateError`.

Rendering matches `tokenizer.apply_chat_template(..., tokenize=False)` /
`processor.apply_chat_template(...)`: jinja2's `ImmutableSandboxedEnvironment` with
`trim_blocks` and `lstrip_blocks`, the loop controls extension, the `{% generation %}` block
(rendered as its body), `raise_exception`, `strftime_now`, `dict`, a `namespace` that refuses
underscore names, and a `tojson` filter that does not escape HTML; the template sees `messages`,
`add_generation_prompt`, `tools`, `documents` and the tokenizer's named special tokens (`bos_token`,
`eos_token`, ..., and model-specific ones such as `image_token`, read from
`tokenizer_config.json`, with `special_tokens_map.json` for names it lacks).

Messages: a user turn holds `{"type": "image"}` entries then `{"type": "text", "text": ...}`, the
form processors' templates read. A template that never looks at content entries' `type` (a
text-only LLM's template) gets the content as one string instead, the image placeholder
(`image_token`, "<image>" by default) and a newline before the text, as LLaVA's data put it.

The shipped model (`vtr_jax/assets/shapes_tiny`) carries `SHAPES_TEMPLATE` in its
tokenizer_config.json: "<image> question: {question} answer:" -- `vtr_jax.data.vqa.format_prompt`'s
prompt, so training and task evaluation see the same text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils


class ChatTemplateError(ValueError):
  """A checkpoint has no usable chat template, or a template failed to render."""


# The conversation format of LLaVA-1.5 (llava-hf/llava-1.5-*-hf's chat_template.json).
LLAVA_1_5 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
FALLBACKS = {"llava-1.5": LLAVA_1_5}

# The shipped model's prompt (`vtr_jax.data.vqa.PROMPT`): image placeholders inside the question
# are dropped and whitespace collapsed, as `vqa.format_prompt` does.
SHAPES_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ image_token }} {% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "question: {{ ' '.join(content['text'].replace(image_token, ' ').split()) }}{% endfor %}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %} {{ content['text'] }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} answer:{% endif %}")

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# ---- the jinja environment transformers uses ---------------------------------------------------
class _GenerationBlock(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` (assistant-token masks in transformers): renders its body."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateDict:
  """`dict(...)` in templates without exposing the type."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
  """`namespace(...)` that refuses underscore-prefixed attributes."""

  def __init__(*args, **kwargs):  # noqa: N805 (jinja's signature trick: `namespace(self=...)` works)
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes ({name!r})")


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                     dict=_TemplateDict(), namespace=_Namespace)
  return env


_ENV = _environment()


def render(source: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
           **variables) -> str:
  """Renders a template string over `messages` as `apply_chat_template(..., tokenize=False)` does.

  Keys whose value is None are dropped from each message (as transformers does); `variables`
  (special tokens, template options such as `add_vision_id`) are visible to the template.
  Raises ChatTemplateError for a template that fails to compile or calls `raise_exception`.
  """
  try:
    compiled = _ENV.from_string(source)
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return compiled.render(messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                           **variables)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f"chat template failed: {e}") from e


# ---- finding a checkpoint's template -----------------------------------------------------------
def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _json(path: str) -> dict:
  try:
    return json.loads(_read(path))
  except json.JSONDecodeError as e:
    raise ChatTemplateError(f"{path} is not valid JSON: {e}") from None


def _named_files(directory: str) -> dict[str, str]:
  folder = os.path.join(directory, "additional_chat_templates")
  if not os.path.isdir(folder):
    return {}
  names = sorted(f for f in os.listdir(folder) if f.endswith(".jinja"))
  return {f[:-len(".jinja")]: _read(os.path.join(folder, f)) for f in names}


def _jinja_templates(directory: str) -> dict[str, str]:
  """chat_template.jinja as `default`, plus additional_chat_templates/*.jinja by name."""
  templates = _named_files(directory)
  path = os.path.join(directory, "chat_template.jinja")
  if os.path.exists(path):
    templates["default"] = _read(path)
  return templates


def _as_dict(value, origin: str) -> dict[str, str]:
  if isinstance(value, str):
    return {"default": value}
  if isinstance(value, Mapping):
    return dict(value)
  if isinstance(value, list):  # tokenizer_config.json stores several as [{"name", "template"}]
    return {t["name"]: t["template"] for t in value}
  raise ChatTemplateError(f"{origin}: chat_template must be a string, a dict or a list of {{name, template}}, "
                          f"got {type(value).__name__}")


def find_templates(directory: str) -> tuple[dict[str, str], str] | None:
  """({name: template}, the file they came from) as transformers would load them, or None."""
  processor_config = os.path.join(directory, "processor_config.json")
  if os.path.exists(processor_config) and _json(processor_config).get("chat_template") is not None:
    return _as_dict(_json(processor_config)["chat_template"], processor_config), processor_config
  legacy = os.path.join(directory, "chat_template.json")
  if os.path.exists(legacy):
    data = _json(legacy)
    if "chat_template" not in data:
      raise ChatTemplateError(f"{legacy} has no 'chat_template' key (keys: {sorted(data)})")
    return _as_dict(data["chat_template"], legacy), legacy
  jinja_files = _jinja_templates(directory)
  if jinja_files:
    return jinja_files, os.path.join(directory, "chat_template.jinja" if "default" in jinja_files
                                     else "additional_chat_templates")
  tokenizer_config = os.path.join(directory, "tokenizer_config.json")
  if os.path.exists(tokenizer_config) and _json(tokenizer_config).get("chat_template") is not None:
    return _as_dict(_json(tokenizer_config)["chat_template"], tokenizer_config), tokenizer_config
  return None


def _token_text(value) -> str | None:
  if isinstance(value, Mapping):  # an AddedToken serialised as {"content": ..., ...}
    value = value.get("content")
  return value if isinstance(value, str) else None


def special_tokens(directory: str) -> dict[str, str]:
  """The named special tokens a template sees (transformers' `tokenizer.special_tokens_map`).

  From tokenizer_config.json: the standard names, every other `*_token` string entry (model-specific
  tokens such as `image_token`) and an `extra_special_tokens` dict; special_tokens_map.json fills
  names the config lacks.
  """
  out: dict[str, str] = {}
  config_path = os.path.join(directory, "tokenizer_config.json")
  config = _json(config_path) if os.path.exists(config_path) else {}
  legacy_path = os.path.join(directory, "special_tokens_map.json")
  legacy = _json(legacy_path) if os.path.exists(legacy_path) and "added_tokens_decoder" not in config else {}
  for source in (legacy, config):
    for key, value in source.items():
      if key in SPECIAL_TOKEN_NAMES or (key.endswith("_token") and _token_text(value) is not None):
        if _token_text(value) is not None:
          out[key] = _token_text(value)
    extra = source.get("extra_special_tokens")
    if isinstance(extra, Mapping):
      out.update({k: _token_text(v) for k, v in extra.items() if _token_text(v) is not None})
  return out


# ---- the template of one checkpoint ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """One checkpoint's chat template, ready to render prompts.

  Attributes:
    source: the jinja template text.
    origin: the file it came from, or `fallback:<name>`.
    tokens: named special tokens the template sees (`bos_token`, `image_token`, ...).
    image_token: the placeholder put into string-content prompts (`tokens["image_token"]`, or "<image>").
  """
  source: str
  origin: str
  tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
  image_token: str = "<image>"

  @property
  def reads_content_types(self) -> bool:
    """Whether the template looks at content entries' `type` (else content is passed as one string)."""
    return any(s in self.source for s in ("'type'", '"type"', ".type"))

  def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **variables) -> str:
    """`messages` (content as lists of typed entries) -> the prompt text."""
    if not self.reads_content_types:
      messages = [{**m, "content": self._as_string(m["content"])} for m in messages]
    return render(self.source, messages, add_generation_prompt=add_generation_prompt, **{**self.tokens, **variables})

  def _as_string(self, content) -> str:
    if isinstance(content, str):
      return content
    images = "".join(f"{self.image_token}\n" for c in content if c.get("type") == "image")
    return images + " ".join(c["text"] for c in content if c.get("type") == "text")

  def prompt(self, text: str, *, images: int = 1, system: str | None = None, **variables) -> str:
    """One user turn (`images` image placeholders, then `text`) and the generation prompt."""
    messages = [] if system is None else [{"role": "system", "content": [{"type": "text", "text": system}]}]
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    return self.render(messages + [{"role": "user", "content": content}], add_generation_prompt=True, **variables)


def load(directory: str, *, name: str | None = None, fallback: str | None = "llava-1.5") -> ChatTemplate:
  """The chat template of the checkpoint in `directory` (see the module docstring for the order).

  Args:
    directory: a local checkpoint directory.
    name: which of several named templates (default: `default`).
    fallback: a `FALLBACKS` name used when the checkpoint has no template; None raises instead.
  Raises ChatTemplateError for no template and no fallback, an unknown name or fallback.
  """
  if not os.path.isdir(directory):
    raise ChatTemplateError(f"checkpoint directory {directory!r} does not exist")
  tokens = special_tokens(directory)
  image_token = tokens.get("image_token", "<image>")
  found = find_templates(directory)
  if found is None:
    if fallback is None:
      raise ChatTemplateError(
          f"{directory} has no chat template (looked for processor_config.json / chat_template.json / "
          "chat_template.jinja / tokenizer_config.json 'chat_template') and no fallback was given; "
          f"pass fallback= one of {sorted(FALLBACKS)} or add a chat_template.jinja")
    if fallback not in FALLBACKS:
      raise ChatTemplateError(f"unknown fallback {fallback!r}; known: {sorted(FALLBACKS)}")
    return ChatTemplate(FALLBACKS[fallback], f"fallback:{fallback}", tokens, image_token)
  templates, origin = found
  key = name or "default"
  if key not in templates:
    raise ChatTemplateError(f"{origin} has no chat template named {key!r}; available: {sorted(templates)}")
  return ChatTemplate(templates[key], origin, tokens, image_token)
