"""Tokenizers: a byte-level tokenizer (built-in models) and HF `tokenizer.json` via `tokenizers`.

    tok = models.tokenizer.load(path)   # tokenizer.json -> HF tokenizers; else byte-level
    ids = tok.encode("text"); text = tok.decode(ids)
"""

from __future__ import annotations

import json
import os
from typing import Sequence


class ByteTokenizer:
  """UTF-8 bytes 0..255 plus specials: BOS=256, EOS=257, PAD=258, SEP=259."""

  BOS, EOS, PAD, SEP = 256, 257, 258, 259
  vocab_size = 260

  @property
  def bos_id(self):
    return self.BOS

  @property
  def eos_id(self):
    return self.EOS

  @property
  def pad_id(self):
    return self.PAD

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [self.BOS] + ids if add_bos else ids

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def save(self, path: str):
    with open(os.path.join(path, "kvjax_tokenizer.json"), "w") as f:
      json.dump({"type": "byte", "vocab_size": self.vocab_size}, f)


class HFTokenizer:
  """Wraps a `tokenizers.Tokenizer` loaded from tokenizer.json."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    self._tok = Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size()
    cfg_dir = os.path.dirname(path)
    self.bos_id = self.eos_id = self.pad_id = None
    cfg = os.path.join(cfg_dir, "config.json")
    if os.path.exists(cfg):
      with open(cfg) as f:
        c = json.load(f)
      eos = c.get("eos_token_id")
      self.eos_id = eos[0] if isinstance(eos, list) else eos
      self.bos_id = c.get("bos_token_id")
      self.pad_id = c.get("pad_token_id")

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids])


def load(path: str | None):
  """Tokenizer for a model directory (None or no tokenizer file -> byte-level)."""
  if path and os.path.exists(os.path.join(path, "tokenizer.json")):
    return HFTokenizer(os.path.join(path, "tokenizer.json"))
  return ByteTokenizer()
