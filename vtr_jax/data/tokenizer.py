"""Tokenizers read from disk (`tokenizer.json`), never from the Hub.

`Tokenizer` wraps a `tokenizers.Tokenizer` with the special tokens a VLM
needs (image placeholder, padding, end of sequence). The same class serves a
Hugging Face checkpoint's tokenizer and the bundled benchmark's word-level
vocabulary (`Tokenizer.word_level`).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import tokenizers

from vtr_jax.errors import CheckpointError


def _token_text(value) -> str | None:
  if isinstance(value, dict):
    return value.get("content")
  return value


class Tokenizer:
  """Text <-> ids with named special tokens.

  Attributes:
    backend: the `tokenizers.Tokenizer`.
    image_token, pad_token, eos_token, bos_token: special token strings.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, image_token: str = "<image>",
               pad_token: str | None = None, eos_token: str | None = None, bos_token: str | None = None,
               chat_template: str | None = None):
    self.backend = backend
    self.image_token = image_token
    self.pad_token = pad_token
    self.eos_token = eos_token
    self.bos_token = bos_token
    self.chat_template = chat_template  # tokenizer_config.json's, kept so that a saved checkpoint carries it

  # -- construction ---------------------------------------------------------------------------
  @classmethod
  def from_directory(cls, directory: str, image_token: str = "<image>") -> "Tokenizer":
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
      raise CheckpointError(f"{path} not found: vtr_jax reads fast tokenizers (tokenizer.json) from disk")
    try:
      backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a plain Exception
      raise CheckpointError(f"{path} could not be read as a tokenizer: {e}") from None
    specials = {}
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        cfg = json.load(f)
      specials = {k: _token_text(cfg.get(k)) for k in ("pad_token", "eos_token", "bos_token")}
      if isinstance(cfg.get("chat_template"), str):
        specials["chat_template"] = cfg["chat_template"]
    return cls(backend, image_token=image_token, **specials)

  @classmethod
  def word_level(cls, words: Iterable[str], *, image_token: str = "<image>", pad_token: str = "<pad>",
                 eos_token: str = "<eos>", bos_token: str = "<bos>", unk_token: str = "<unk>",
                 chat_template: str | None = None) -> "Tokenizer":
    """Whitespace/punctuation word vocabulary; ids: specials first, then `words` in order."""
    specials = [pad_token, bos_token, eos_token, unk_token, image_token]
    vocab = {}
    for w in [*specials, *words]:
      vocab.setdefault(w, len(vocab))
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=unk_token))
    backend.normalizer = tokenizers.normalizers.Lowercase()
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in specials])
    return cls(backend, image_token=image_token, pad_token=pad_token, eos_token=eos_token, bos_token=bos_token,
               chat_template=chat_template)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    self.backend.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump({"pad_token": self.pad_token, "eos_token": self.eos_token, "bos_token": self.bos_token,
                 "image_token": self.image_token, "tokenizer_class": "PreTrainedTokenizerFast",
                 **({"chat_template": self.chat_template} if self.chat_template else {})}, f, indent=2)

  # -- use ------------------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def token_id(self, token: str) -> int:
    i = self.backend.token_to_id(token)
    if i is None:
      raise KeyError(f"token {token!r} is not in the vocabulary ({self.vocab_size} entries)")
    return i

  def _maybe_id(self, token: str | None) -> int | None:
    return None if token is None else self.backend.token_to_id(token)

  @property
  def image_token_id(self) -> int:
    return self.token_id(self.image_token)

  @property
  def pad_token_id(self) -> int | None:
    return self._maybe_id(self.pad_token)

  @property
  def eos_token_id(self) -> int | None:
    return self._maybe_id(self.eos_token)

  @property
  def bos_token_id(self) -> int | None:
    return self._maybe_id(self.bos_token)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
