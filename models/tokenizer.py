"""Tokenizers: a byte-level tokenizer (built-in models) and HF `tokenizer.json` via `tokenizers`.

    tok = models.tokenizer.load(path)   # tokenizer.json or a .gguf -> HF tokenizers;
    ids = tok.encode("text"); text = tok.decode(ids)   # else byte-level
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

import numpy as np


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
  """Wraps a `tokenizers.Tokenizer` (from tokenizer.json or from GGUF metadata).

  Attributes:
    bos_id / eos_id / pad_id: special ids (None when unknown).
    eos_ids: every id that ends generation (generation_config.json may list several).
    generation: default sampling from generation_config.json ({"temperature", "top_p",
      "top_k", "max_new_tokens"} where given; {} otherwise).
    add_bos: whether `encode` prepends BOS by default (GGUF's tokenizer.ggml.add_bos_token,
      or tokenizer_config.json's add_bos_token).
    chat_template: the Jinja chat template, or None.
  """

  def __init__(self, path: Optional[str] = None, *, tokenizer=None, bos_id=None, eos_id=None,
               pad_id=None, add_bos: bool = False, chat_template: Optional[str] = None):
    """Loads `path` (a tokenizer.json beside an HF config.json) or wraps `tokenizer`."""
    if (path is None) == (tokenizer is None):
      raise ValueError("HFTokenizer needs exactly one of path= (tokenizer.json) or tokenizer=")
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.add_bos, self.chat_template = bool(add_bos), chat_template
    self.eos_ids = () if eos_id is None else (int(eos_id),)
    self.generation = {}
    if tokenizer is None:
      from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
      _check_size(path, MAX_TOKENIZER_BYTES)
      try:
        tokenizer = Tokenizer.from_file(path)
      except Exception as e:  # pylint: disable=broad-except  # the Rust error type
        raise ValueError(f"{path}: not a readable tokenizer.json ({str(e)[:200]})") from None
      self._configure(os.path.dirname(path), tokenizer)
    self._tok = tokenizer
    self.vocab_size = self._tok.get_vocab_size()

  def _configure(self, cfg_dir: str, tokenizer) -> None:
    """Special ids, chat template, add_bos and generation defaults from the HF files beside
    tokenizer.json: config.json, tokenizer_config.json, generation_config.json."""
    c = _read_json(os.path.join(cfg_dir, "config.json"))
    tc = _read_json(os.path.join(cfg_dir, "tokenizer_config.json"))
    gen = _read_json(os.path.join(cfg_dir, "generation_config.json"))
    vocab = tokenizer.get_vocab_size()

    def token_id(field, src, where):
      v = src.get(field)
      if isinstance(v, dict):   # tokenizer_config's AddedToken form {"content": ...}
        v = v.get("content")
      if isinstance(v, str):    # tokenizer_config names the token
        v = tokenizer.token_to_id(v)
      if v is None:
        return None
      if isinstance(v, list) and v:
        return [token_id_value(x, field, where, vocab) for x in v]
      return token_id_value(v, field, where, vocab)

    eos = [token_id(k, src, w) for k, src, w in (
        ("eos_token_id", gen, "generation_config.json"), ("eos_token_id", c, "config.json"),
        ("eos_token", tc, "tokenizer_config.json"))]
    ids = []
    for e in eos:
      for i in e if isinstance(e, list) else [e]:
        if i is not None and i not in ids:
          ids.append(i)
    self.eos_ids = tuple(ids)
    self.eos_id = ids[0] if ids else None
    for attr, keys in (("bos_id", (("bos_token_id", c), ("bos_token_id", gen),
                                   ("bos_token", tc))),
                       ("pad_id", (("pad_token_id", c), ("pad_token_id", gen),
                                   ("pad_token", tc)))):
      for k, src in keys:
        v = token_id(k, src, k)
        if isinstance(v, list):
          v = v[0]
        if v is not None:
          setattr(self, attr, v)
          break
    template = tc.get("chat_template")
    if isinstance(template, list):   # [{"name": "default", "template": ...}, ...]
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      template = named.get("default")
    if isinstance(template, str):
      self.chat_template = template
    self.add_bos = bool(tc.get("add_bos_token", False)) and self.bos_id is not None
    self.generation = generation_defaults(gen, os.path.join(cfg_dir,
                                                            "generation_config.json"))

  def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
    """Token ids of `text` (special-token strings in it become their ids).

    Args:
      text: the string.
      add_bos: prepend BOS; None = the tokenizer's own `add_bos` setting.
    """
    ids = self._tok.encode(text, add_special_tokens=False).ids
    add_bos = self.add_bos if add_bos is None else add_bos
    return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                          tokenize: bool = False):
    """Renders a conversation with the model's chat template.

    Uses Jinja (sandboxed, as transformers does) when `jinja2` is installed; otherwise a
    ChatML renderer for ChatML-style templates (<|im_start|>role\ncontent<|im_end|>\n, with
    the template's default system prompt when the conversation has none).

    Args:
      messages: [{"role": ..., "content": ...}, ...].
      add_generation_prompt: end with the assistant turn's opening.
      tokenize: return token ids instead of text.
    """
    text = render_chat(self.chat_template, messages, add_generation_prompt,
                       bos_token=self._token(self.bos_id), eos_token=self._token(self.eos_id))
    return self.encode(text, add_bos=False) if tokenize else text

  def _token(self, i) -> str:
    return "" if i is None else (self._tok.id_to_token(int(i)) or "")

  def save(self, path: str):
    """Writes tokenizer.json, tokenizer_config.json (chat template, add_bos_token, special
    tokens) and generation_config.json (special ids, every EOS id, sampling defaults) into
    the directory `path`, so `load(path)` gives back the same tokenizer."""
    os.makedirs(path, exist_ok=True)
    self._tok.save(os.path.join(path, "tokenizer.json"))
    tc = {"add_bos_token": self.add_bos}
    for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id),
                   ("pad_token", self.pad_id)):
      if i is not None and self._token(i):
        tc[key] = self._token(i)
    if self.chat_template:
      tc["chat_template"] = self.chat_template
    gen = {k: v for k, v in (("bos_token_id", self.bos_id), ("pad_token_id", self.pad_id))
           if v is not None}
    if self.eos_ids:
      gen["eos_token_id"] = list(self.eos_ids)
    gen.update(self.generation)
    if self.generation.get("temperature", 0.0) > 0:
      gen["do_sample"] = True
    for name, d in (("tokenizer_config.json", tc), ("generation_config.json", gen)):
      with open(os.path.join(path, name), "w") as f:
        json.dump(d, f, indent=1, ensure_ascii=False)


MAX_JSON_BYTES = 64 << 20         # config / tokenizer_config / generation_config files
MAX_TOKENIZER_BYTES = 512 << 20   # tokenizer.json (large vocabularies are tens of MiB)


def _check_size(path: str, limit: int) -> int:
  size = os.path.getsize(path)
  if size > limit:
    raise ValueError(f"{path}: {size} bytes, more than the {limit} bytes this file may hold; "
                     "refusing to read it")
  return size


def _read_json(path: str) -> dict:
  """A JSON object from `path` ({} if the file is absent), read only up to MAX_JSON_BYTES."""
  if not os.path.exists(path):
    return {}
  _check_size(path, MAX_JSON_BYTES)
  with open(path, "rb") as f:
    raw = f.read(MAX_JSON_BYTES + 1)
  try:
    d = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
  return d if isinstance(d, dict) else {}


def token_id_value(v, field: str, where: str, vocab: int) -> int:
  """A special token id from a config file: an int in [0, vocab) or a ValueError."""
  if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
    raise ValueError(f"{where}: {field}={v!r}; must be a token id in [0, {vocab})")
  return v


GENERATION_KEYS = {"temperature": (0.0, None), "top_p": (0.0, 1.0), "top_k": (0, None),
                   "max_new_tokens": (1, None), "do_sample": None}


def generation_defaults(gen: dict, where: str = "generation_config.json") -> dict:
  """Default sampling settings from an HF generation_config.json's dict.

  Returns {"temperature", "top_p", "top_k", "max_new_tokens"} for the keys present (values
  validated); `do_sample: false` gives temperature 0 (greedy), as transformers does.
  """
  out = {}
  for key, rng in GENERATION_KEYS.items():
    if key not in gen or gen[key] is None:
      continue
    v = gen[key]
    if rng is None:
      if not isinstance(v, bool):
        raise ValueError(f"{where}: {key}={v!r}; must be true or false")
      continue
    lo, hi = rng
    is_int = isinstance(lo, int) and not isinstance(lo, float)
    ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and
          (isinstance(v, int) or not is_int) and v == v and v >= lo and
          (hi is None or v <= hi) and abs(v) != float("inf"))
    if not ok:
      raise ValueError(f"{where}: {key}={v!r}; must be a {'int' if is_int else 'number'} "
                       f">= {lo}" + (f" and <= {hi}" if hi is not None else ""))
    out[key] = int(v) if is_int else float(v)
  if gen.get("do_sample") is False:
    out["temperature"] = 0.0
  if out.get("top_p") == 0.0:
    raise ValueError(f"{where}: top_p=0; must be in (0, 1]")
  return out


# --- chat templates ----------------------------------------------------------------------
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)(.*?)<\|im_end\|>", re.S)


def render_chat(template: Optional[str], messages: Sequence[dict],
                add_generation_prompt: bool = True, *, bos_token: str = "",
                eos_token: str = "") -> str:
  """Renders `messages` with a chat template (Jinja if available, else ChatML)."""
  if not isinstance(messages, (list, tuple)) or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str)
      and isinstance(m.get("content"), str) for m in messages):
    raise ValueError("messages must be a list of {'role': str, 'content': str} dicts; got "
                     f"{messages!r:.200}")
  if template is None:
    raise ValueError("this tokenizer has no chat template")
  try:
    from jinja2 import sandbox  # pylint: disable=import-outside-toplevel
  except ImportError:
    sandbox = None
  if sandbox is not None:
    def raise_exception(msg):
      raise ValueError(f"chat template: {msg}")
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=bos_token, eos_token=eos_token)
  if "<|im_start|>" not in template or "<|im_end|>" not in template:
    raise ValueError("rendering this chat template needs jinja2 (pip install jinja2); "
                     "without it only ChatML templates (<|im_start|> ... <|im_end|>) render")
  out = []
  m = _CHATML_SYSTEM.search(template)
  if m and messages and messages[0]["role"] != "system":  # the template's default system turn
    out.append(f"<|im_start|>system\n{m.group(1).replace(chr(92) + 'n', chr(10))}<|im_end|>\n")
  for msg in messages:
    out.append(f"<|im_start|>{msg['role']}\n{msg['content']}<|im_end|>\n")
  if add_generation_prompt:
    out.append("<|im_start|>assistant\n")
  return "".join(out)


# --- tokenizers from GGUF metadata -------------------------------------------------------
# llama.cpp's `tokenizer.ggml.pre` names -> the pre-tokenizer HF's tokenizer.json uses for
# that family (regexes from llama.cpp's llama-vocab.cpp / the models' tokenizer.json files).
_GPT2 = "gpt2"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
              r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}"
             r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = {
    "default": _GPT2, "gpt2": _GPT2, "gpt-2": _GPT2,
    "smollm": "digits", "starcoder": "digits", "refact": "digits",
    "llama-bpe": _LLAMA3_RE, "llama3": _LLAMA3_RE, "smaug-bpe": _LLAMA3_RE,
    "qwen2": _QWEN2_RE, "deepseek-r1-qwen": _QWEN2_RE,
}
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4


def from_gguf_metadata(md: dict, source: str = "GGUF metadata") -> HFTokenizer:
  """Builds the tokenizer stored in GGUF metadata (`tokenizer.ggml.*`, gpt2-style BPE).

  Args:
    md: metadata dict (`models.gguf.read_header(path).metadata`).
    source: named in errors (the file's path).

  Returns:
    HFTokenizer with bos/eos/pad ids, add_bos and chat_template from the metadata.
  """
  # pylint: disable=import-outside-toplevel
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
  from tokenizers import models as tok_models
  # pylint: enable=import-outside-toplevel
  kind = md.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"{source}: tokenizer.ggml.model={kind!r} is not supported; allowed: "
                     "'gpt2' (byte-level BPE)")
  pre = md.get("tokenizer.ggml.pre", "default")
  if pre not in GGUF_PRE_TOKENIZERS:
    raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; allowed: "
                     f"{sorted(GGUF_PRE_TOKENIZERS)}")
  tokens = md.get("tokenizer.ggml.tokens")
  merges = md.get("tokenizer.ggml.merges")
  if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
    raise ValueError(f"{source}: tokenizer.ggml.tokens must be a non-empty array of strings")
  if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
    raise ValueError(f"{source}: tokenizer.ggml.merges must be an array of strings")
  vocab = {}
  for i, t in enumerate(tokens):
    if vocab.setdefault(t, i) != i:
      raise ValueError(f"{source}: tokenizer.ggml.tokens[{i}]={t!r} repeats "
                       f"tokenizer.ggml.tokens[{vocab[t]}]")
  pairs = []
  for i, m in enumerate(merges):
    parts = m.split(" ")
    if len(parts) != 2 or parts[0] not in vocab or parts[1] not in vocab:
      raise ValueError(f"{source}: tokenizer.ggml.merges[{i}]={m!r} is not two tokens of the "
                       "vocabulary separated by one space")
    pairs.append((parts[0], parts[1]))
  types = md.get("tokenizer.ggml.token_type")
  if types is None:
    types = np.full(len(tokens), TOKEN_NORMAL, np.int32)
  types = np.asarray(types)
  if types.shape != (len(tokens),) or types.dtype.kind not in "iu":
    raise ValueError(f"{source}: tokenizer.ggml.token_type must be {len(tokens)} integers")
  regex = GGUF_PRE_TOKENIZERS[pre]
  tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                                 ignore_merges=regex is _LLAMA3_RE))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex in (_GPT2,
                                                                                    "digits"))
  if regex == _GPT2:
    tok.pre_tokenizer = byte_level
  elif regex == "digits":
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False), byte_level])
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  specials = [AddedToken(tokens[i], special=True, normalized=False)
              for i in np.nonzero(types == TOKEN_CONTROL)[0]]
  user = [AddedToken(tokens[i], special=False, normalized=False)
          for i in np.nonzero(types == TOKEN_USER_DEFINED)[0]]
  tok.add_special_tokens(specials)
  tok.add_tokens(user)

  def special(key):
    v = md.get(f"tokenizer.ggml.{key}")
    if v is None:
      return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(tokens):
      raise ValueError(f"{source}: tokenizer.ggml.{key}={v!r}; must be a token id in "
                       f"[0, {len(tokens)})")
    return v

  add_bos = md.get("tokenizer.ggml.add_bos_token", False)
  template = md.get("tokenizer.chat_template")
  return HFTokenizer(tokenizer=tok, bos_id=special("bos_token_id"),
                     eos_id=special("eos_token_id"), pad_id=special("padding_token_id"),
                     add_bos=add_bos is True,
                     chat_template=template if isinstance(template, str) else None)


def load(path: str | None):
  """Tokenizer for a model directory, a tokenizer.json file or a GGUF file.

  None, or a directory without tokenizer.json or GGUF file -> ByteTokenizer. A
  tokenizer.json is read with the tokenizer_config.json / generation_config.json /
  config.json beside it (chat template, add_bos, special ids, generation defaults).
  """
  if path and os.path.isfile(path) and os.path.basename(path) == "tokenizer.json":
    return HFTokenizer(path)
  if path and os.path.exists(os.path.join(path, "tokenizer.json")):
    return HFTokenizer(os.path.join(path, "tokenizer.json"))
  from models import gguf  # pylint: disable=import-outside-toplevel
  if path and gguf.is_gguf_path(path):
    return gguf.load_tokenizer(path)
  return ByteTokenizer()
