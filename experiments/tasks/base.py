"""What an evaluation sample is, and how a task makes them.

A `Sample` is split the way the evaluation protocol needs it (docs/EVALUATION.md):
`context` is prefilled and compressed before anything else is seen;
`question` is fed afterwards, at positions continuing from the uncompressed context
length (query-agnostic mode), or appended to the context before compression
(question-aware mode). `answers` are the reference strings and `metric` names the scoring
function (`experiments.tasks.metrics.METRICS`) that compares a generation with them.

Lengths are context lengths in tokens of the byte tokenizer (`models.tokenizer.ByteTokenizer`,
one token a UTF-8 byte): a generator asked for `length` returns samples whose BOS + context
is exactly `length` tokens -- the part that is compressed; the question (tens of tokens)
comes on top. With another tokenizer lengths are approximate.

A `Task` makes samples deterministically from (length, n, seed), so every technique in a
comparison sees the same inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Sample:
  """One evaluation item.

  Attributes:
    task: the task's name (a results row's `task`).
    context: text prefilled (and compressed) before the question.
    question: text fed after compression; the model's continuation is the prediction.
    answers: reference strings (any/all of them count, per `metric`).
    metric: a key of `experiments.tasks.metrics.METRICS`.
    max_new_tokens: tokens to generate for the prediction.
    meta: anything else (depth, length, source line, ...), JSON-serialisable.
  """

  task: str
  context: str
  question: str
  answers: tuple
  metric: str = "prefix_match"
  max_new_tokens: int = 8
  meta: dict = dataclasses.field(default_factory=dict)

  def prompt_tokens(self, tokenizer, chat: bool = False) -> tuple[list[int], list[int]]:
    """(context ids, question ids).

    Plain form: BOS + context, then the question as text to continue. Chat form (for
    instruction-tuned models, `chat=True`): the tokenizer's chat template frames the
    context as the user's message; the question's ask (up to its last "Answer:" or "?")
    closes that message, and its cue ("The pass key is ") opens the assistant's turn, so
    the answer is still read from the first generated tokens. The context part never
    contains the question, as the query-agnostic protocol needs.

    `meta["chat_form"]` overrides the split for benchmarks that frame chat prompts their
    own way: "user" puts the whole question in the user's message (the assistant's turn
    starts empty), "none" keeps the plain form even when `chat=True`.
    """
    form = self.meta.get("chat_form", "split")
    if form not in CHAT_FORMS:
      raise ValueError(f"meta['chat_form']={form!r}; allowed: {CHAT_FORMS}")
    if not chat or form == "none":
      return tokenizer.encode(self.context, add_bos=True), tokenizer.encode(self.question)
    head, tail = chat_frame(tokenizer)
    ask, cue = split_question(self.question) if form == "split" else (self.question, "")
    ctx = tokenizer.encode(head + self.context, add_bos=False)
    return ctx, tokenizer.encode(ask + tail + cue, add_bos=False)


CHAT_FORMS = ("split", "user", "none")
_SLOT = "\x00kvjax-context\x00"


def chat_frame(tokenizer) -> tuple[str, str]:
  """(text before, text after) the user's message in `tokenizer`'s chat template.

  The "after" part includes the assistant's generation prompt. ValueError when the
  tokenizer has no chat template.
  """
  render = getattr(tokenizer, "apply_chat_template", None)
  if render is None or not getattr(tokenizer, "chat_template", None):
    raise ValueError(f"{type(tokenizer).__name__} has no chat template; use the plain "
                     "prompt form (chat=False)")
  text = render([{"role": "user", "content": _SLOT}], add_generation_prompt=True)
  if text.count(_SLOT) != 1:
    raise ValueError("the chat template does not place the user message once")
  head, tail = text.split(_SLOT)
  return head, tail


def split_question(question: str) -> tuple[str, str]:
  """(ask, cue): the question up to its last "Answer:" (else its last "?"), and the rest.

  "What is the pass key? The pass key is " -> ("What is the pass key?", "The pass key is ")
  A question with neither marker is all cue (the assistant's turn continues it).
  """
  cut = question.rfind("Answer:")
  if cut >= 0:
    return question[:cut].rstrip(), question[cut + len("Answer:"):].lstrip()
  cut = question.rfind("?")
  if cut >= 0:
    return question[:cut + 1].rstrip(), question[cut + 1:].lstrip()
  return "", question.lstrip()


def byte_len(text: str) -> int:
  return len(text.encode("utf-8"))


def check_length(name: str, length: int, minimum: int):
  if not isinstance(length, int) or isinstance(length, bool) or length < minimum:
    raise ValueError(f"{name}: length={length!r}; must be an int >= {minimum} (tokens)")


def check_n(name: str, n: int):
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ValueError(f"{name}: n={n!r}; must be an int >= 1")


def fit_bytes(text: str, n: int) -> str:
  """`text` (non-ASCII characters dropped) repeated or cut to exactly n bytes."""
  if n <= 0:
    return ""
  raw = text.encode("ascii", errors="ignore")
  if not raw:
    raise ValueError("cannot fill with empty text")
  raw = raw * (n // len(raw) + 1)
  return raw[:n].decode("ascii")


class Task:
  """Base class: a named generator of samples at a given length."""

  name: str = ""
  metric: str = "prefix_match"
  min_length: int = 64

  def samples(self, length: int, n: int, seed: int = 0) -> list[Sample]:
    raise NotImplementedError

  def describe(self) -> str:
    return (self.__doc__ or self.name).strip().splitlines()[0]


def lengths_of(samples: Sequence[Sample], tokenizer) -> list[int]:
  return [sum(map(len, s.prompt_tokens(tokenizer))) for s in samples]


def first_or(x: Sequence, default: Optional[object] = None):
  return x[0] if x else default
