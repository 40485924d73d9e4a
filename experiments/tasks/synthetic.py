"""Pass-key, key-value retrieval and needle-in-a-haystack samples from `train/tasks.py`.

The generators are the ones the default model was trained with (`train.tasks.Passkey`,
`train.tasks.KVRetrieval`), with seeds disjoint from training (`EVAL_SEED`); each training
sequence is cut where its question starts:

  passkey       context = BOS + filler with "The pass key is 12345. ..." at a random depth;
                question = "What is the pass key? The pass key is "; answer = the digits.
  kv_retrieval  context = BOS + a JSON object of random hex keys/values (+ space padding);
                question = '\\nKey: "<key>"\\nValue: "'; answer = the value.
  needle        pass key at a fixed relative depth: one cell of the depth x length grid
                (Kamradt's needle-in-a-haystack layout with the pass-key needle).
"""

from __future__ import annotations

from typing import Optional, Sequence

from experiments.tasks import base
from train import tasks as train_tasks

EVAL_SEED = 7_777_777   # example seeds for evaluation; training used config.seed (0)
PASSKEY_QUESTION = "What is the pass key? The pass key is "
KV_QUESTION = '\nKey: "'


def _split(tokens, answer_len: int, marker: str):
  """(context, question, answer) strings of a train.tasks example (BOS dropped)."""
  text = bytes(int(t) for t in tokens[1:]).decode("ascii")
  body, answer = text[:-answer_len], text[-answer_len:]
  cut = body.rfind(marker)
  if cut < 0:
    raise AssertionError(f"marker {marker!r} not in the generated example")
  return body[:cut], body[cut:], answer


class Passkey(base.Task):
  """Pass-key retrieval (Mohtashami & Jaggi, 2023): five digits hidden in filler text."""

  name = "passkey"
  metric = "prefix_match"
  min_length = 128

  def __init__(self, digits: int = 5, depth: Optional[float] = None, name: str = ""):
    self.digits, self.depth = digits, depth
    if name:
      self.name = name

  def samples(self, length, n, seed=0):
    base.check_length(self.name, length, self.min_length)
    base.check_n(self.name, n)
    # train.tasks.Passkey's length counts question and answer; ours is BOS + context.
    gen = train_tasks.Passkey(length=length + len(PASSKEY_QUESTION) + self.digits,
                              digits=self.digits, depth=self.depth)
    out = []
    for i in range(n):
      ex = gen.example(EVAL_SEED + seed, i)
      ctx, q, ans = _split(ex.tokens, self.digits, PASSKEY_QUESTION)
      depth = ctx.find("The pass key is") / max(len(ctx), 1)
      out.append(base.Sample(self.name, ctx, q, (ans,), self.metric, self.digits,
                             {"length": length, "depth": round(depth, 3), "index": i}))
    return out


class KVRetrieval(base.Task):
  """Key-value retrieval over a JSON object of hex strings (Liu et al., 2023)."""

  name = "kv_retrieval"
  metric = "prefix_match"
  min_length = 64

  def __init__(self, key_chars: int = 6, value_chars: int = 6, num_pairs: Optional[int] = None):
    self.key_chars, self.value_chars, self.num_pairs = key_chars, value_chars, num_pairs

  def samples(self, length, n, seed=0):
    base.check_length(self.name, length, self.min_length)
    base.check_n(self.name, n)
    # train's length counts question, answer and closing quote; ours is BOS + context.
    q_len = len(KV_QUESTION) + self.key_chars + len('"\nValue: "')
    gen = train_tasks.KVRetrieval(length=length + q_len + self.value_chars + 1,
                                  key_chars=self.key_chars, value_chars=self.value_chars,
                                  num_pairs=self.num_pairs)
    out = []
    for i in range(n):
      ex = gen.example(EVAL_SEED + seed, i)
      ctx, q, ans = _split(ex.tokens[:-1], self.value_chars, KV_QUESTION)
      key = q[len(KV_QUESTION):len(KV_QUESTION) + self.key_chars]
      depth = ctx.find(f'"{key}"') / max(len(ctx), 1)
      out.append(base.Sample(self.name, ctx, q, (ans,), self.metric, self.value_chars,
                             {"length": length, "depth": round(depth, 3), "pairs": gen.pairs,
                              "index": i}))
    return out


def needle_grid(lengths: Sequence[int], depths: Sequence[float], n: int,
                seed: int = 0) -> list[base.Sample]:
  """Needle-in-a-haystack: `n` pass-key samples per (depth, length) cell, task "needle"."""
  out = []
  for length in lengths:
    for d in depths:
      if not 0.0 <= d <= 1.0:
        raise ValueError(f"needle depth={d}; must be in [0, 1]")
      for s in Passkey(depth=float(d), name="needle").samples(int(length), n, seed):
        out.append(base.Sample(s.task, s.context, s.question, s.answers, s.metric,
                               s.max_new_tokens, dict(s.meta, depth=float(d))))
  return out
