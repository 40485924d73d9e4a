"""Synthetic long-context tasks, byte-level, generated on the fly without downloads.

Every task is a frozen dataclass; `task.example(seed, index)` is a pure function of
(seed, index): the same pair always gives the same example, on any host, in any order, so
a data iterator only needs to remember an index to resume exactly.

An `Example` holds `length` tokens. Training reads it shifted by one (inputs =
tokens[:-1], targets = tokens[1:]); `loss_mask[t] = 1` marks token t as a target that
counts (only answer tokens, for retrieval tasks). `answer` is `tokens[answer_positions]`,
kept separately so evaluation never has to parse the prompt.

Tasks:
  * `MQAR`: multi-query associative recall (Arora et al., 2023, "Zoology").
  * `Passkey`: a pass key hidden in filler text (Mohtashami & Jaggi, 2023), the
    needle-in-a-haystack probe with a controllable depth.
  * `KVRetrieval`: a JSON object of random hex keys/values, then one key is asked for
    (Liu et al., 2023, "Lost in the Middle", synthetic key-value retrieval).
  * `Copy`: a random token string, a separator, then the same string again
    (Jelassi et al., 2024, "Repeat After Me").
  * `Repeats`: random text in which random spans reappear at random distances; only an
    induction head (Olsson et al., 2022) predicts the second occurrences.

Token ids follow `models.tokenizer.ByteTokenizer`: bytes 0..255, BOS 256, EOS 257, PAD
258, SEP 259.

Shapes: L example length (tokens), A answer tokens.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import numpy as np

from models.tokenizer import ByteTokenizer

BOS, EOS, PAD, SEP = ByteTokenizer.BOS, ByteTokenizer.EOS, ByteTokenizer.PAD, ByteTokenizer.SEP
VOCAB_SIZE = ByteTokenizer.vocab_size


class Example(NamedTuple):
  """One sequence: tokens [L] int32, loss_mask [L] float32, answer [A], answer_positions [A]."""
  tokens: np.ndarray
  loss_mask: np.ndarray
  answer: np.ndarray
  answer_positions: np.ndarray


def example_rng(seed: int, index: int, salt: int = 0) -> np.random.Generator:
  """A generator that depends only on (seed, index, salt) (numpy SeedSequence hashing)."""
  if index < 0:
    raise ValueError(f"index={index}; must be >= 0")
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index), salt])


def _finish(tokens, answer_positions) -> Example:
  tokens = np.asarray(tokens, np.int32)
  pos = np.asarray(answer_positions, np.int32)
  mask = np.zeros(tokens.shape, np.float32)
  mask[pos] = 1.0
  return Example(tokens, mask, tokens[pos].copy(), pos)


def _bytes(text: str) -> list[int]:
  return list(text.encode("utf-8"))


def _check_length(name, length, need):
  if not isinstance(length, (int, np.integer)) or length < need:
    raise ValueError(f"{name}: length={length!r} is too short; this setting needs at least "
                     f"{need} tokens")


@dataclasses.dataclass(frozen=True)
class MQAR:
  """Multi-query associative recall (Arora et al., 2023).

  Layout: BOS, then `num_pairs` key-value pairs `k v`, then a query region of length
  `length - 1 - 2 * num_pairs` filled with `filler`, into which `num_queries` of the keys
  (distinct, random order) are written at random non-overlapping slots, each followed by its
  value. Only those values count in the loss. Keys come from bytes [0, 128) and values from
  [128, 256), so a key never looks like a value.

  Differences from Zoology: query slots are uniform instead of power-law placed, and the
  filler is one fixed token (Zoology uses 0) that the model sees like any other token.
  With `query_replacement=True` queries are drawn with replacement (num_queries may exceed
  num_pairs): the answer can then no longer be guessed as "a value not yet asked for",
  so only key-value association lowers the loss (a denser training signal; evaluate on
  the standard form).
  """
  length: int = 256
  num_pairs: int = 16
  num_queries: Optional[int] = None        # default: every key is queried once
  key_vocab: int = 128
  value_vocab: int = 128
  filler: int = SEP
  query_replacement: bool = False

  def __post_init__(self):
    q = self.queries
    if not 1 <= self.num_pairs <= self.key_vocab:
      raise ValueError(f"MQAR: num_pairs={self.num_pairs}; must be in "
                       f"[1, key_vocab={self.key_vocab}] (distinct keys)")
    if not 1 <= q <= (10 ** 9 if self.query_replacement else self.num_pairs):
      raise ValueError(f"MQAR: num_queries={q}; must be in [1, num_pairs={self.num_pairs}] "
                       "(or set query_replacement=True)")
    if self.key_vocab + self.value_vocab > 256:
      raise ValueError(f"MQAR: key_vocab + value_vocab = {self.key_vocab + self.value_vocab}; "
                       "must be <= 256 (byte ids)")
    _check_length("MQAR", self.length, 1 + 2 * self.num_pairs + 2 * q)

  @property
  def queries(self) -> int:
    return self.num_pairs if self.num_queries is None else self.num_queries

  def example(self, seed: int, index: int) -> Example:
    rng = example_rng(seed, index, 1)
    n, q = self.num_pairs, self.queries
    keys = rng.choice(self.key_vocab, n, replace=False)
    values = self.key_vocab + rng.integers(0, self.value_vocab, n)
    toks = np.full(self.length, self.filler, np.int32)
    toks[0] = BOS
    toks[1:1 + 2 * n:2] = keys
    toks[2:2 + 2 * n:2] = values
    region = self.length - 1 - 2 * n
    slots = np.sort(rng.choice(region // 2, q, replace=False))
    which = rng.choice(n, q, replace=self.query_replacement)
    starts = 1 + 2 * n + 2 * slots
    toks[starts] = keys[which]
    toks[starts + 1] = values[which]
    return _finish(toks, starts + 1)


_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclasses.dataclass(frozen=True)
class Passkey:
  """Pass-key retrieval (Mohtashami & Jaggi, 2023) / needle in a haystack.

  BOS, filler text, the needle "The pass key is 12345. Remember it. 12345 is the pass
  key. " inserted at relative `depth` of the filler (None: uniform per example), more filler,
  then "What is the pass key? The pass key is " and the digits (the answer).
  """
  length: int = 512
  digits: int = 5
  depth: Optional[float] = None

  def __post_init__(self):
    if not 1 <= self.digits <= 20:
      raise ValueError(f"Passkey: digits={self.digits}; must be in [1, 20]")
    if self.depth is not None and not 0.0 <= self.depth <= 1.0:
      raise ValueError(f"Passkey: depth={self.depth}; must be in [0, 1] or None")
    _check_length("Passkey", self.length, 1 + len(self._needle("0" * self.digits))
                  + len(self._question()) + self.digits)

  @staticmethod
  def _needle(key):
    return _bytes(f"The pass key is {key}. Remember it. {key} is the pass key. ")

  @staticmethod
  def _question():
    return _bytes("What is the pass key? The pass key is ")

  def example(self, seed: int, index: int) -> Example:
    rng = example_rng(seed, index, 2)
    key = "".join(str(d) for d in rng.integers(0, 10, self.digits))
    needle, question = self._needle(key), self._question()
    n_fill = self.length - 1 - len(needle) - len(question) - self.digits
    depth = rng.random() if self.depth is None else self.depth
    cut = int(round(depth * n_fill))
    fill = _bytes(_FILLER * (n_fill // len(_FILLER) + 1))[:n_fill]
    toks = [BOS] + fill[:cut] + needle + fill[cut:] + question + _bytes(key)
    return _finish(toks, np.arange(self.length - self.digits, self.length))


@dataclasses.dataclass(frozen=True)
class KVRetrieval:
  """Key-value retrieval over a JSON object (Liu et al., 2023).

  BOS `{"3fa9c1": "b07d2e", ...}` with as many pairs as fit (or `num_pairs`), spaces to
  pad, then `\\nKey: "<k>"\\nValue: "<v>"`; the value's characters are the answer.
  """
  length: int = 512
  key_chars: int = 6
  value_chars: int = 6
  num_pairs: Optional[int] = None

  def _pair_len(self):
    return len(f'"{"0" * self.key_chars}": "{"0" * self.value_chars}", ')

  def _fixed_len(self):
    # BOS + "{" + "}" + question + closing quote
    return 1 + 2 + len(f'\nKey: "{"0" * self.key_chars}"\nValue: "') + self.value_chars + 1

  def __post_init__(self):
    for name in ("key_chars", "value_chars"):
      if not 1 <= getattr(self, name) <= 32:
        raise ValueError(f"KVRetrieval: {name}={getattr(self, name)}; must be in [1, 32]")
    n = self.pairs
    if n < 1:
      raise ValueError(f"KVRetrieval: num_pairs={n}; must be >= 1")
    _check_length("KVRetrieval", self.length, self._fixed_len() + n * self._pair_len() - 2)

  @property
  def pairs(self) -> int:
    if self.num_pairs is not None:
      return self.num_pairs
    return max(1, (self.length - self._fixed_len() + 2) // self._pair_len())

  def example(self, seed: int, index: int) -> Example:
    rng = example_rng(seed, index, 3)
    n = self.pairs
    hexd = np.array(list("0123456789abcdef"))
    keys = set()
    while len(keys) < n:  # distinct keys
      keys.add("".join(rng.choice(hexd, self.key_chars)))
    keys = sorted(keys)
    keys = [keys[i] for i in rng.permutation(n)]
    vals = ["".join(rng.choice(hexd, self.value_chars)) for _ in range(n)]
    body = "{" + ", ".join(f'"{k}": "{v}"' for k, v in zip(keys, vals)) + "}"
    q = int(rng.integers(n))
    tail = f'\nKey: "{keys[q]}"\nValue: "{vals[q]}"'
    pad = self.length - 1 - len(body) - len(tail)
    toks = [BOS] + _bytes(body + " " * pad + tail)
    end = self.length - 1  # closing quote
    return _finish(toks, np.arange(end - self.value_chars, end))


@dataclasses.dataclass(frozen=True)
class Copy:
  """Copying: BOS, n random tokens, SEP, the same n tokens (the answer), PAD to length."""
  length: int = 256
  num_tokens: Optional[int] = None     # default: as many as fit, (length - 2) // 2
  vocab: int = 256

  def __post_init__(self):
    if not 1 <= self.vocab <= 256:
      raise ValueError(f"Copy: vocab={self.vocab}; must be in [1, 256]")
    if self.n < 1:
      raise ValueError(f"Copy: num_tokens={self.n}; must be >= 1")
    _check_length("Copy", self.length, 2 + 2 * self.n)

  @property
  def n(self) -> int:
    return (self.length - 2) // 2 if self.num_tokens is None else self.num_tokens

  def example(self, seed: int, index: int) -> Example:
    rng = example_rng(seed, index, 4)
    s = rng.integers(0, self.vocab, self.n)
    toks = np.full(self.length, PAD, np.int32)
    toks[0] = BOS
    toks[1:1 + self.n] = s
    toks[1 + self.n] = SEP
    toks[2 + self.n:2 + 2 * self.n] = s
    return _finish(toks, np.arange(2 + self.n, 2 + 2 * self.n))


@dataclasses.dataclass(frozen=True)
class Repeats:
  """Random text whose spans reappear at random distances (dense induction targets).

  BOS, then characters drawn uniformly from `alphabet`; `spans_per_100` times per 100
  tokens a span of `min_span..max_span` characters is copied to a point up to `max_gap`
  tokens after its end. Only the copied characters after the first of each copy count in
  the loss: they are predictable only by finding the earlier occurrence by content (a
  small alphabet makes one character ambiguous, so the match must use several) and
  copying what followed it -- an induction head (Olsson et al., 2022), the circuit that
  pass-key and key-value retrieval need. No fixed offset predicts them.
  """
  length: int = 256
  alphabet: str = "abcdefghijklmnopqrstuvwxyz0123456789"
  min_span: int = 4
  max_span: int = 24
  max_gap: int = 200
  spans_per_100: float = 2.5

  def __post_init__(self):
    if not 2 <= len(self.alphabet) <= 255 or len(set(self.alphabet)) != len(self.alphabet):
      raise ValueError(f"Repeats: alphabet={self.alphabet!r}; must be 2..255 distinct chars")
    if not 2 <= self.min_span <= self.max_span:
      raise ValueError(f"Repeats: min_span={self.min_span}, max_span={self.max_span}; need "
                       "2 <= min_span <= max_span")
    if self.max_gap < 0 or self.spans_per_100 <= 0:
      raise ValueError(f"Repeats: max_gap={self.max_gap}, spans_per_100="
                       f"{self.spans_per_100}; need max_gap >= 0 and spans_per_100 > 0")
    _check_length("Repeats", self.length, 2 + 2 * self.max_span)

  def example(self, seed: int, index: int) -> Example:
    rng = example_rng(seed, index, 5)
    alpha = np.frombuffer(self.alphabet.encode("latin-1"), np.uint8).astype(np.int32)
    toks = alpha[rng.integers(0, len(alpha), self.length)]
    toks[0] = BOS
    mask = np.zeros(self.length, bool)
    used = np.zeros(self.length, bool)    # sources and targets of copies so far
    count = max(1, int(round(self.length * self.spans_per_100 / 100)))
    placed = 0
    for _ in range(4 * count):            # bounded retries; the first try always fits
      if placed == count:
        break
      n = int(rng.integers(self.min_span, self.max_span + 1))
      gap = int(rng.integers(0, min(self.max_gap, self.length - 1 - 2 * n) + 1))
      src = int(rng.integers(1, self.length - 2 * n - gap + 1))
      dst = src + n + gap
      if used[src:src + n].any() or used[dst:dst + n].any():
        continue   # overlaps an earlier copy: try another
      toks[dst:dst + n] = toks[src:src + n]
      used[src:src + n] = used[dst:dst + n] = True
      mask[dst + 1:dst + n] = True
      placed += 1
    return _finish(toks, np.flatnonzero(mask))


TASKS = {"mqar": MQAR, "passkey": Passkey, "kv_retrieval": KVRetrieval, "copy": Copy,
         "repeats": Repeats}


def make_task(name: str, length: int, **kwargs):
  """Builds a task by name; unknown names or settings raise ValueError."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
  cls = TASKS[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {"length"}
  bad = sorted(set(kwargs) - fields)
  if bad:
    raise ValueError(f"task {name!r} has no setting(s) {bad}; settings: {sorted(fields)}")
  return cls(length=length, **kwargs)
