"""Held-out perplexity under a compressed cache.

Each sample is a window of the held-out split of the Python standard-library stream
(`train.data.stdlib_corpus("validation")`, files the default model never trained on):
`context` = the first `length` tokens (BOS + text) and `continuation` = the next
`continuation` tokens. The runner prefills and compresses the context, then scores the
continuation teacher-forced through the compressed cache (positions continue from the
original length), so the number is the perplexity of what comes *after* compression:
`exp(mean NLL per continuation token)`, over the continuation's tokens after the first (the
first is predicted by the prefill's last logits, before any compression). Non-ASCII bytes
are replaced by "?" so that text length equals token count.
"""

from __future__ import annotations

from experiments.tasks import base
from train import tasks as train_tasks

EVAL_SEED = 31_337


class HeldOutPerplexity(base.Task):
  """Perplexity of held-out stdlib text continued through the compressed cache."""

  name = "perplexity"
  metric = "nll"
  min_length = 16

  def __init__(self, continuation: int = 128):
    if continuation < 1:
      raise ValueError(f"continuation={continuation}; must be >= 1")
    self.continuation = continuation
    self._stream = None

  def stream(self):
    if self._stream is None:
      from train import data as data_lib  # pylint: disable=import-outside-toplevel
      self._stream = data_lib.stdlib_corpus("validation")
    return self._stream

  def samples(self, length, n, seed=0):
    base.check_length(self.name, length, self.min_length)
    base.check_n(self.name, n)
    from train import data as data_lib  # pylint: disable=import-outside-toplevel
    total = length - 1 + self.continuation        # BOS is added by the tokenizer
    ts = data_lib.TextStream(self.stream(), total, shuffle=True)
    out = []
    for i in range(n):
      c = ts._chunk_id(EVAL_SEED + seed, i)  # pylint: disable=protected-access
      raw = ts.read(c * total, total)
      raw[raw >= 256] = ord("\n")            # document separators (EOS) as newlines
      raw[(raw >= 128) & (raw < 256)] = ord("?")  # keep one token per byte (ASCII)
      text = bytes(int(t) for t in raw).decode("ascii")
      out.append(base.Sample(self.name, text[:length - 1], text[length - 1:], (), self.metric,
                             0, {"length": length, "index": i, "chunk": int(c)}))
    return out


def english_text() -> str:
  """Held-out English prose: the Python Language Reference's topic pages that every CPython
  ships (`pydoc_data.topics`), in key order, separated by blank lines."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  return "\n\n".join(topics.topics[k].strip() for k in sorted(topics.topics))


class EnglishPerplexity(HeldOutPerplexity):
  """Perplexity of held-out English prose (the Python Language Reference) continued through
  the compressed cache.

  For subword models: the text is real English documentation, not code, and contexts are
  cut at the target length in the model's own tokens (`experiments.tasks.fit`), so the
  continuation is scored inside the model's context window, never past it. Each sample is
  a window starting at a random offset; `continuation` is about that many tokens
  (~4 characters each) of the text that follows.
  """

  name = "perplexity_en"

  def samples(self, length, n, seed=0):
    import numpy as np  # pylint: disable=import-outside-toplevel
    base.check_length(self.name, length, self.min_length)
    base.check_n(self.name, n)
    text = english_text()
    cont = 4 * self.continuation
    if length + cont >= len(text):
      raise ValueError(f"{self.name}: length={length} characters exceeds the "
                       f"{len(text)}-character text")
    rng = np.random.default_rng(EVAL_SEED + seed)
    out = []
    for i in range(n):
      start = int(rng.integers(0, len(text) - length - cont))
      # start at a word boundary so the first token is an ordinary word
      start = text.find(" ", start) + 1
      ctx = text[start:start + length - 1]
      out.append(base.Sample(self.name, ctx, text[start + length - 1:start + length - 1 + cont],
                             (), self.metric, 0, {"length": length, "index": i,
                                                  "offset": start}))
    return out
