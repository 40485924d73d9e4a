"""A RULER-style synthetic suite (Hsieh et al., 2024, "RULER: What's the Real Context Size
of Your Long-Context Language Models?"), generated in-project at any length.

Each task is RULER's category with its question and scoring rule, built from offline
material: the haystack is the pass-key filler ("noise" in RULER) or Python standard-library
source (RULER uses Paul Graham essays), keys are pronounceable made-up words, values
7-digit numbers. Every sample's BOS + context is exactly `length` byte tokens.

  niah_single      one needle "One of the special magic numbers for <key> is: <value>."
  niah_multikey    the same plus `distractors` needles with other keys; one key is asked
  niah_multivalue  `num_values` needles with the same key; all values must be produced
  vt               variable tracking: VAR A = 12345, VAR B = VAR A, ... (`hops` links);
                   every variable that holds the value must be named
  cwe              common-word extraction: a numbered word list where `num_common`
                   words occur `freq_common` times and the rest once; name the common ones
  qa               QA-style retrieval: "The capital of <country> is <city>." among
                   distractor facts of the same form (RULER's QA uses SQuAD / HotpotQA
                   paragraphs; here the facts are invented so no download is needed)

Scoring follows RULER: `string_match_all` (fraction of references found in the
prediction) for niah / vt / cwe, `string_match_part` (any reference found) for qa.
Differences from RULER: byte-level lengths, shorter values (7 digits) and the filler above.
"""

from __future__ import annotations

import zlib
from typing import Optional

import numpy as np

from experiments.tasks import base
from train import tasks as train_tasks

EVAL_SEED = 9_191_919
NOISE = train_tasks._FILLER  # pylint: disable=protected-access

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "gr",
           "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u")


def word(rng: np.random.Generator, syllables: int = 3) -> str:
  """A pronounceable made-up word, e.g. 'gomatu'."""
  return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))


def distinct_words(rng, n: int, syllables: int = 3) -> list[str]:
  out: list[str] = []
  while len(out) < n:
    w = word(rng, syllables)
    if w not in out:
      out.append(w)
  return out


def number(rng: np.random.Generator, digits: int = 7) -> str:
  return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def haystack_text(kind: str, seed: int) -> str:
  """Filler: "noise" (the pass-key sentences) or "code" (held-out stdlib source)."""
  if kind == "noise":
    return NOISE
  if kind == "code":
    from train import data as data_lib  # pylint: disable=import-outside-toplevel
    corpus = data_lib.stdlib_corpus("validation")
    rng = np.random.default_rng(seed)
    docs = [corpus.doc(int(i)).decode("ascii", errors="ignore")
            for i in rng.permutation(len(corpus))[:16]]
    return "\n".join(docs)
  raise ValueError(f"haystack={kind!r}; allowed: 'noise', 'code'")


def insert_needles(filler: str, needles: list[str], depths: list[float], n_bytes: int) -> str:
  """`n_bytes` of text: filler with each needle inserted at its relative depth.

  Needles go in at the nearest sentence or line boundary before their depth, so no word
  is cut; the result is exactly n_bytes long.
  """
  need = sum(len(x) for x in needles)
  if need > n_bytes:
    raise ValueError(f"needles take {need} bytes; the context has room for {n_bytes}")
  hay = base.fit_bytes(filler, n_bytes - need)
  cuts = []
  for d in depths:
    c = int(round(d * len(hay)))
    b = max(hay.rfind(". ", 0, c), hay.rfind("\n", 0, c))
    cuts.append(b + (2 if hay[b:b + 2] == ". " else 1) if b >= 0 else 0)
  order = np.argsort(cuts, kind="stable")
  out, last = [], 0
  for i in order:
    out += [hay[last:cuts[i]], needles[i]]
    last = cuts[i]
  out.append(hay[last:])
  return "".join(out)


class _Ruler(base.Task):
  metric = "string_match_all"

  def __init__(self, haystack: str = "noise", **kw):
    self.haystack = haystack
    for k, v in kw.items():
      if not hasattr(self, k):
        raise ValueError(f"{self.name}: unknown setting {k!r}")
      setattr(self, k, v)

  def _one(self, rng, length) -> base.Sample:
    raise NotImplementedError

  def samples(self, length, n, seed=0):
    base.check_length(self.name, length, self.min_length)
    base.check_n(self.name, n)
    filler = haystack_text(self.haystack, seed)
    out = []
    for i in range(n):
      rng = train_tasks.example_rng(EVAL_SEED + seed, i, zlib.crc32(self.name.encode()) & 0xFFFF)
      s = self._one(rng, length, filler)
      got = 1 + base.byte_len(s.context)
      assert got == length, (self.name, got, length)
      out.append(base.Sample(s.task, s.context, s.question, s.answers, s.metric,
                             s.max_new_tokens, dict(s.meta, length=length, index=i,
                                                    haystack=self.haystack)))
    return out

  def _room(self, length, question):
    del question  # the question comes on top of the context
    return length - 1


def _needle(key, value):
  return f"One of the special magic numbers for {key} is: {value}. "


class NIAHSingle(_Ruler):
  """RULER niah_single: one key, one 7-digit value in a haystack."""
  name = "niah_single"
  min_length = 256

  def _one(self, rng, length, filler):
    key, value = word(rng), number(rng)
    q = (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
         f"The special magic number for {key} mentioned in the provided text is ")
    depth = float(rng.random())
    ctx = insert_needles(filler, [_needle(key, value)], [depth], self._room(length, q))
    return base.Sample(self.name, ctx, q, (value,), self.metric, 8, {"depth": round(depth, 3)})


class NIAHMultiKey(_Ruler):
  """RULER niah_multikey: distractor needles with other keys; one key is asked."""
  name = "niah_multikey"
  min_length = 384
  distractors = 3

  def _one(self, rng, length, filler):
    keys = distinct_words(rng, self.distractors + 1)
    values = [number(rng) for _ in keys]
    q = (f"\nWhat is the special magic number for {keys[0]} mentioned in the provided text? "
         f"The special magic number for {keys[0]} mentioned in the provided text is ")
    depths = [float(d) for d in rng.random(len(keys))]
    ctx = insert_needles(filler, [_needle(k, v) for k, v in zip(keys, values)], depths,
                         self._room(length, q))
    return base.Sample(self.name, ctx, q, (values[0],), self.metric, 8,
                       {"depth": round(depths[0], 3)})


class NIAHMultiValue(_Ruler):
  """RULER niah_multivalue: one key with several values; all must be produced."""
  name = "niah_multivalue"
  min_length = 384
  num_values = 3

  def _one(self, rng, length, filler):
    key = word(rng)
    values = [number(rng) for _ in range(self.num_values)]
    q = (f"\nWhat are all the special magic numbers for {key} mentioned in the provided "
         f"text? The special magic numbers for {key} mentioned in the provided text are ")
    depths = [float(d) for d in rng.random(self.num_values)]
    ctx = insert_needles(filler, [_needle(key, v) for v in values], depths,
                         self._room(length, q))
    return base.Sample(self.name, ctx, q, tuple(values), self.metric, 8 * self.num_values, {})


class VariableTracking(_Ruler):
  """RULER vt: follow a chain of variable assignments; name every variable holding a value."""
  name = "vt"
  min_length = 384
  hops = 4

  def _one(self, rng, length, filler):
    names = [w.upper()[:5] for w in distinct_words(rng, self.hops + 1, 3)]
    value = number(rng, 5)
    lines = [f"VAR {names[0]} = {value}. "] + [
        f"VAR {names[i + 1]} = VAR {names[i]}. " for i in range(self.hops)]
    q = (f"\nQuestion: Find all variables that are assigned the value {value} in the text "
         f"above. Answer: According to the chain(s) of variable assignment in the text above, "
         f"{len(names)} variables are assigned the value {value}, they are: ")
    depths = sorted(float(d) for d in rng.random(len(lines)))
    ctx = insert_needles(filler, lines, depths, self._room(length, q))
    return base.Sample(self.name, ctx, q, tuple(names), self.metric, 6 * len(names), {})


class CommonWords(_Ruler):
  """RULER cwe: a numbered word list; the `num_common` most frequent words are the answer."""
  name = "cwe"
  min_length = 512
  num_common = 5
  freq_common = 6

  def _one(self, rng, length, filler):
    del filler
    q = (f"\nQuestion: What are the {self.num_common} most common words in the above list? "
         f"Answer: The top {self.num_common} words that appear most often in the list are: ")
    room = self._room(length, q)
    common = distinct_words(rng, self.num_common, 2)
    words = [w for w in common for _ in range(self.freq_common)]
    piece = lambda i, w: len(f"{i}. {w} ")  # noqa: E731
    used = sum(piece(i + 1, w) for i, w in enumerate(words))
    if used > room:
      raise ValueError(f"cwe: length={length} is too short for {self.num_common} common "
                       f"words x {self.freq_common}")
    for w in distinct_words(rng, room // 8 + 1, 3):   # rare words, once each, while room
      if w in common or used + piece(len(words) + 1, w) > room:
        continue
      words.append(w)
      used += piece(len(words), w)
    items = [f"{i + 1}. {words[j]} " for i, j in enumerate(rng.permutation(len(words)))]
    ctx = "".join(items).ljust(room)
    return base.Sample(self.name, ctx, q, tuple(common), self.metric, 8 * self.num_common, {})


class QA(_Ruler):
  """QA-style retrieval: "The capital of <country> is <city>." among distractor facts."""
  name = "qa"
  metric = "string_match_part"
  min_length = 384
  facts = 8

  def _one(self, rng, length, filler):
    countries = distinct_words(rng, self.facts, 3)
    cities = [w.capitalize() for w in distinct_words(rng, self.facts, 2)]
    facts = [f"The capital of {c.capitalize()} is {t}. " for c, t in zip(countries, cities)]
    ask = int(rng.integers(self.facts))
    q = f"\nQuestion: What is the capital of {countries[ask].capitalize()}?\nAnswer: "
    depths = [float(d) for d in rng.random(self.facts)]
    ctx = insert_needles(filler, facts, depths, self._room(length, q))
    return base.Sample(self.name, ctx, q, (cities[ask],), self.metric, 8,
                       {"depth": round(depths[ask], 3)})


RULER_TASKS = {c.name: c for c in (NIAHSingle, NIAHMultiKey, NIAHMultiValue, VariableTracking,
                                   CommonWords, QA)}


def make(name: str, haystack: str = "noise", **kw) -> _Ruler:
  if name not in RULER_TASKS:
    raise ValueError(f"unknown RULER task {name!r}; known: {sorted(RULER_TASKS)}")
  return RULER_TASKS[name](haystack=haystack, **kw)


def suite(names: Optional[list] = None, haystack: str = "noise") -> list:
  return [make(n, haystack) for n in (names or RULER_TASKS)]
