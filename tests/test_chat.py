"""vtr_jax.chat renders prompts exactly as transformers' apply_chat_template, from the files transformers reads."""

from __future__ import annotations

import json
import os

import pytest

from vtr_jax import chat
from vtr_jax.data import vqa

# Template strings as the checkpoints ship them (the text of their chat_template files).
TEMPLATES = {
    # llava-hf/llava-1.5-7b-hf, chat_template.json
    "llava-1.5": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
        "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
        "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
    # llava-hf/llava-v1.6-mistral-7b-hf, chat_template.json
    "llava-v1.6-mistral": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\\n' + "
        "message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
        "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | "
        "selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif "
        "message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\\\\s> '}}{% else %}"
        "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"),
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf, chat_template.json
    "llava-onevision-qwen2": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
        "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
        "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
        "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # Qwen/Qwen2.5-VL-7B-Instruct, chat_template.json (the same text as Qwen2-VL's)
    "qwen2.5-vl": (
        "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
        "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
        "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
        "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] "
        "== 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value "
        "+ 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|>"
        "<|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
        "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|>"
        "<|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}

LONG = " ".join(f"word{i}," for i in range(300)) + " what is shown? <b>&amp;</b> ünïcode"
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}],
    "long prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": LONG}]}],
    "multi turn": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a cat?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour  is it?\n"}]},
    ],
    "system": [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "Count them."}, {"type": "image"}]},
    ],
}


def _tokenizer(**kwargs):
  import tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER", "ASSISTANT"])}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", extra_special_tokens={"image_token": "<image>"}, **kwargs)


def _save_tokenizer(directory, template=None, *, jinja_file=True):
  tok = _tokenizer(chat_template=template)
  tok.save_pretrained(str(directory), save_jinja_files=jinja_file)
  return tok


@pytest.mark.parametrize("jinja_file", [True, False], ids=["chat_template.jinja", "tokenizer_config.json"])
@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_tokenizer_templates_render_as_transformers(tmp_path, family, jinja_file):
  from transformers import AutoTokenizer
  _save_tokenizer(tmp_path, TEMPLATES[family], jinja_file=jinja_file)
  assert os.path.exists(tmp_path / "chat_template.jinja") == jinja_file
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  ours = chat.load(str(tmp_path), fallback=None)
  assert ours.source == TEMPLATES[family]
  for name, messages in CONVERSATIONS.items():
    if family == "llava-v1.6-mistral" and name == "system":
      continue  # its template reads the system text from content[0], which is not text in this conversation
    for gen in (True, False):
      expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      assert ours.render(messages, add_generation_prompt=gen) == expected, (family, name, gen)
  if family == "qwen2.5-vl":  # template options reach the template as in transformers
    expected = hf.apply_chat_template(CONVERSATIONS["one turn"], tokenize=False, add_generation_prompt=True,
                                      add_vision_id=True)
    assert ours.render(CONVERSATIONS["one turn"], add_vision_id=True) == expected
    assert "Picture 1: " in expected


def test_prompt_is_one_user_turn_with_the_image_first(tmp_path):
  from transformers import AutoTokenizer
  _save_tokenizer(tmp_path, TEMPLATES["llava-1.5"])
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  question = "How many dogs?\nAnswer the question using a single word or phrase."
  expected = hf.apply_chat_template(
      [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], tokenize=False,
      add_generation_prompt=True)
  assert chat.load(str(tmp_path)).prompt(question) == expected == f"USER: <image>\n{question} ASSISTANT:"


def _processor(tmp_path, template):
  from transformers import CLIPImageProcessor, LlavaProcessor
  proc = LlavaProcessor(CLIPImageProcessor(), _tokenizer(), chat_template=template, patch_size=14,
                        vision_feature_select_strategy="default")
  proc.save_pretrained(str(tmp_path))
  return proc


def test_processor_files_take_precedence_like_transformers(tmp_path):
  from transformers import AutoProcessor
  _processor(tmp_path, TEMPLATES["llava-1.5"])
  assert (tmp_path / "chat_template.jinja").exists()
  with open(tmp_path / "tokenizer_config.json") as f:  # a different tokenizer-level template: the processor's wins
    cfg = json.load(f)
  cfg["chat_template"] = TEMPLATES["qwen2.5-vl"]
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump(cfg, f)
  messages = CONVERSATIONS["multi turn"]
  hf = AutoProcessor.from_pretrained(str(tmp_path)).apply_chat_template(messages, add_generation_prompt=True)
  ours = chat.load(str(tmp_path))
  assert ours.origin.endswith("chat_template.jinja")
  assert ours.render(messages) == hf

  # the legacy chat_template.json beats chat_template.jinja
  with open(tmp_path / "chat_template.json", "w") as f:
    json.dump({"chat_template": TEMPLATES["llava-onevision-qwen2"]}, f)
  hf = AutoProcessor.from_pretrained(str(tmp_path)).apply_chat_template(messages, add_generation_prompt=True)
  ours = chat.load(str(tmp_path))
  assert ours.origin.endswith("chat_template.json") and ours.source == TEMPLATES["llava-onevision-qwen2"]
  assert ours.render(messages) == hf


def test_named_templates(tmp_path):
  from transformers import AutoTokenizer
  _save_tokenizer(tmp_path, {"default": TEMPLATES["llava-1.5"], "mistral": TEMPLATES["llava-v1.6-mistral"]})
  assert (tmp_path / "additional_chat_templates" / "mistral.jinja").exists()
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  messages = CONVERSATIONS["one turn"]
  for name in ("default", "mistral"):
    expected = hf.apply_chat_template(messages, chat_template=name, tokenize=False, add_generation_prompt=True)
    assert chat.load(str(tmp_path), name=name).render(messages) == expected
  with pytest.raises(chat.ChatTemplateError, match=r"no chat template named 'chatml'.*'default', 'mistral'"):
    chat.load(str(tmp_path), name="chatml")


def test_fallback_and_no_template(tmp_path):
  from transformers import AutoTokenizer
  _save_tokenizer(tmp_path, None)
  ours = chat.load(str(tmp_path))
  assert ours.origin == "fallback:llava-1.5" and ours.source == TEMPLATES["llava-1.5"] == chat.LLAVA_1_5
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  for messages in CONVERSATIONS.values():
    assert ours.render(messages) == hf.apply_chat_template(messages, chat_template=chat.LLAVA_1_5, tokenize=False,
                                                           add_generation_prompt=True)
  with pytest.raises(chat.ChatTemplateError, match="no chat template .* no fallback was given"):
    chat.load(str(tmp_path), fallback=None)
  with pytest.raises(chat.ChatTemplateError, match="unknown fallback 'vicuna'"):
    chat.load(str(tmp_path), fallback="vicuna")
  with pytest.raises(chat.ChatTemplateError, match="does not exist"):
    chat.load(str(tmp_path / "missing"))


ENVIRONMENT_TEMPLATE = (
    "{% set ns = namespace(n=0) %}{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{{ m['role'] }}={{ m | tojson }}\n"
    "{% if ns.n == 2 %}{% break %}{% endif %}{% endfor %}"
    "{{ dict(a=1, b=eos_token) | tojson(indent=1) }}{{ image_token }}"
    "  {% if add_generation_prompt %}\n  >>{% endif %}")


def test_environment_matches_transformers(tmp_path):
  """Loop controls, namespace, tojson (no HTML escaping), dict, special tokens, trim/lstrip blocks."""
  from transformers import AutoTokenizer
  _save_tokenizer(tmp_path, ENVIRONMENT_TEMPLATE)
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  messages = [{"role": "user", "content": "<b>ü & \"q\"</b>"}, {"role": "skip", "content": "x"},
              {"role": "assistant", "content": "a", "name": None}, {"role": "user", "content": "never"}]
  expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert chat.load(str(tmp_path)).render(messages) == expected
  assert "never" not in expected and '"name"' not in expected and "<b>ü" in expected


def test_raise_exception_and_sandbox(tmp_path):
  from transformers import AutoTokenizer
  _save_tokenizer(tmp_path, TEMPLATES["llava-v1.6-mistral"])
  messages = [{"role": "tool", "content": [{"type": "text", "text": "x"}]}]
  with pytest.raises(Exception, match="Only user and assistant roles are supported!"):
    AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(messages, tokenize=False)
  with pytest.raises(chat.ChatTemplateError, match="Only user and assistant roles are supported!"):
    chat.load(str(tmp_path)).render(messages)
  with pytest.raises(chat.ChatTemplateError, match="underscore"):
    chat.render("{% set ns = namespace(_x=1) %}", [])
  with pytest.raises(chat.ChatTemplateError):  # the sandbox refuses mutating a list
    chat.render("{{ messages.append(1) }}", [])


def test_string_content_templates_get_the_image_token_before_the_text(tmp_path):
  from transformers import AutoTokenizer
  vicuna = ("{% for m in messages %}{{ m['role'].upper() }}: {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
  _save_tokenizer(tmp_path, vicuna)
  ours = chat.load(str(tmp_path))
  assert not ours.reads_content_types
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  expected = hf.apply_chat_template([{"role": "user", "content": "<image>\nWhat is it?"}], tokenize=False,
                                    add_generation_prompt=True)
  assert ours.prompt("What is it?") == expected == "USER: <image>\nWhat is it? ASSISTANT:"


def test_special_tokens_read_like_transformers(tmp_path):
  from transformers import AutoTokenizer
  _save_tokenizer(tmp_path, TEMPLATES["llava-1.5"])
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  assert chat.special_tokens(str(tmp_path)) == hf.special_tokens_map


def test_shipped_model_template_is_its_training_prompt():
  from transformers import AutoTokenizer

  from vtr_jax.evaluation import SHIPPED
  template = chat.load(SHIPPED, fallback=None)
  assert template.origin.endswith("tokenizer_config.json") and template.source == chat.SHAPES_TEMPLATE
  hf = AutoTokenizer.from_pretrained(SHIPPED)
  questions = ["what colour is the star ?", "how many  circles are there ?", "<image>\nwhat is left of the square ?",
               "is there a red <image> triangle ?"]
  for q in questions:
    assert template.prompt(q) == vqa.format_prompt(q)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == vqa.format_prompt(q)
