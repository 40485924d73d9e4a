"""Contexts of a target length in the model's own tokens.

Generators size their contexts in characters (one character = one token of the byte
tokenizer). With a subword tokenizer a character count is only a guess of the token count
(digits, hex and filler text tokenize very differently), so `samples_in_tokens` rescales
the character length by the measured characters-per-token and regenerates, until the
longest context of the batch is within `tolerance` below the target: all samples of a
(task, length) cell then share one batch shape, and a "4K" row means about 4,096 tokens of
context (prompt framing included), not 4,096 characters.
"""

from __future__ import annotations

from experiments.tasks import base


def _is_bytes(tokenizer) -> bool:
  return type(tokenizer).__name__ == "ByteTokenizer"


def context_tokens(sample: base.Sample, tokenizer, chat: bool = False) -> int:
  return len(sample.prompt_tokens(tokenizer, chat=chat)[0])


def samples_in_tokens(task: base.Task, length: int, n: int, seed: int, tokenizer, *,
                      chat: bool = False, tolerance: float = 0.03, tries: int = 6) -> list:
  """`task.samples` whose longest context is in [(1 - tolerance) * length, length] tokens.

  Every sample's `meta["length"]` is `length` (the cell it belongs to). The byte tokenizer
  without chat framing gets the generator's own exact lengths.
  """
  if _is_bytes(tokenizer) and not chat:
    return task.samples(length, n, seed)
  chars = max(length, task.min_length)
  best = None
  for _ in range(tries):
    out = task.samples(chars, n, seed)
    longest = max(context_tokens(s, tokenizer, chat) for s in out)
    if longest <= length:
      best = out
      if longest >= (1 - tolerance) * length:
        break
    # characters per token of this task's text, from the longest sample
    new = int(chars * (length / max(longest, 1)) * (0.995 if longest > length else 1.0))
    new = max(new, task.min_length)
    if new == chars:
      new = chars - 1 if longest > length else chars + 1
    chars = new
  if best is None:
    raise ValueError(f"{task.name}: could not fit a context into {length} tokens "
                     f"(its shortest form is longer); use a larger length")
  return [base.Sample(s.task, s.context, s.question, s.answers, s.metric, s.max_new_tokens,
                      dict(s.meta, length=length, chars=len(s.context)))
          for s in best]
