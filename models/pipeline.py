r"""Text in, answers out: compress a context once, then answer questions from the cache.

    from models import pipeline, presets
    from kvjax import presses
    model, tok = presets.load_model_and_tokenizer("smollm2-135m")
    answers = pipeline.pipeline(model, tok, context, ["What is kvjax?", "Who wrote it?"],
                                press=presses.SnapKVPress(compression_ratio=0.5))

The ergonomics follow kvpress's `pipeline(context, question(s), press)`, and so does the
evaluation protocol (docs/EVALUATION.md): the context is prefilled and compressed *before*
any question is seen (query-agnostic), once; the compressed cache is forked per question
(`kvjax.fork`) and each question is fed at the positions that continue the original,
uncompressed context, then answered greedily (or sampled) until EOS or `max_new_tokens`,
whose defaults come from the model's generation_config.json (`sampling_defaults`).

Chat models: where the tokenizer has a chat template (`chat=None` picks it up), the context
is the user message and each question continues that message, so the rendered prompt is
`<template prefix> context question <end of user turn, assistant opening> answer_prefix`,
split (as kvpress does) at the end of the context: the prefix and context are prefilled and
compressed, the rest is fed per question. Without a template the question is appended to
the context text as is.

Questions are batched (left-padded, padding never enters the cache) `batch_size` at a time,
all at once by default; each question only sees the context and itself.

Memory: the weights, plus the compressed context cache (`PipelineResult.cache_nbytes`,
exact bytes, one copy) forked `batch_size` times with room for the longest question and
`max_new_tokens`. An uncompressed cache holds 2 * num_layers * num_kv_heads * head_dim *
itemsize bytes per token (K and V; `kv_bytes_per_token`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import checks
from models import api

CHAT_MODES = (None, True, False)
_MARK = "\u2063kvjax-context-end\u2063"   # splits a rendered chat prompt after the context


@dataclasses.dataclass
class PipelineResult:
  """What `run` returns.

  Attributes:
    answers: one decoded answer per question (EOS and what follows removed).
    tokens: per question, the generated ids (EOS excluded).
    context_tokens: prompt tokens prefilled before the questions (chat prefix included).
    question_tokens: per question, the ids fed after the compressed context.
    cache_nbytes: exact bytes (`nbytes`) of the context's cache after the press, one row,
      with its room for the longest question + max_new_tokens.
    full_cache_nbytes: exact bytes of the same cache without a press (same room).
    prefill_seconds / answer_seconds: wall time of prefill + compression / of answering.
  """

  answers: list
  tokens: list
  context_tokens: int
  question_tokens: list
  cache_nbytes: int
  full_cache_nbytes: int
  prefill_seconds: float
  answer_seconds: float


def kv_bytes_per_token(config, dtype=None) -> int:
  """K and V bytes per cached token over all layers (uncompressed, dense layers).

  2 (K and V) * num_layers * num_kv_heads * head_dim * itemsize(dtype); dtype defaults to
  the model's parameter dtype (the cache dtype prefill builds).
  """
  dt = checks.float_dtype("dtype", config.dtype if dtype is None else dtype)
  return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dt.itemsize


def _check_text(context, questions):
  if not isinstance(context, str):
    raise TypeError(f"context must be a str; got {type(context).__name__}")
  if not context.strip():
    raise ValueError("context is empty (or only whitespace); pass the text to compress")
  single = isinstance(questions, str)
  qs = [questions] if single else questions
  if isinstance(qs, (bytes, dict)) or not isinstance(qs, Sequence):
    raise TypeError(f"questions must be a str or a list of str; got {type(questions).__name__}")
  if not qs:
    raise ValueError("questions is empty; pass a str or a non-empty list of str")
  for i, q in enumerate(qs):
    if not isinstance(q, str):
      raise TypeError(f"questions[{i}] must be a str; got {type(q).__name__} ({q!r:.60})")
  return list(qs), single


def _check_tokenizer(tokenizer):
  for attr in ("encode", "decode"):
    if not callable(getattr(tokenizer, attr, None)):
      raise TypeError(f"tokenizer must have encode(text) and decode(ids) (models.tokenizer); "
                      f"got {type(tokenizer).__name__} without {attr}()")


SAMPLING_FALLBACK = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "top_k": 0}


def sampling_defaults(tokenizer) -> dict:
  """{"max_new_tokens", "temperature", "top_p", "top_k"}: the tokenizer's defaults from the
  model's generation_config.json (`tokenizer.generation`) where it gives them, else
  SAMPLING_FALLBACK (64 tokens, greedy)."""
  gen = getattr(tokenizer, "generation", None) or {}
  return {k: gen.get(k, v) for k, v in SAMPLING_FALLBACK.items()}


def _eos_ids(tokenizer, eos_id) -> tuple:
  if eos_id is not None:
    ids = [eos_id] if isinstance(eos_id, (int, np.integer)) else list(eos_id)
    return tuple(checks.require_int("eos_id", i, 0) for i in ids)
  ids = list(getattr(tokenizer, "eos_ids", None) or ())
  single = getattr(tokenizer, "eos_id", None)
  if single is not None and single not in ids:
    ids.insert(0, single)
  return tuple(int(i) for i in ids)


def prompt_parts(tokenizer, context: str, questions: Sequence[str], *, chat=None,
                 answer_prefix: str = "", system_prompt: Optional[str] = None):
  """(context ids, [question ids]) as the pipeline feeds them.

  Args:
    tokenizer: a models.tokenizer tokenizer.
    context: the text to compress.
    questions: the questions (str each).
    chat: None = use the tokenizer's chat template if it has one; True = require it;
      False = plain text (the question appended to the context).
    answer_prefix: text that opens every answer (after the assistant turn's opening).
    system_prompt: a system message (chat mode only).
  """
  if chat not in CHAT_MODES:
    raise ValueError(f"chat={chat!r}; allowed: None (auto), True, False")
  template = getattr(tokenizer, "chat_template", None)
  if chat and not template:
    raise ValueError(f"chat=True but the tokenizer ({type(tokenizer).__name__}) has no chat "
                     "template; pass chat=False or None")
  use_chat = bool(template) if chat is None else chat
  if system_prompt is not None and not use_chat:
    raise ValueError("system_prompt applies only with a chat template (chat=None/True)")
  if use_chat:
    msgs = [{"role": "user", "content": context + _MARK}]
    if system_prompt is not None:
      msgs.insert(0, {"role": "system", "content": system_prompt})
    rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    if rendered.count(_MARK) != 1:
      raise ValueError("the chat template does not render the user message verbatim; pass "
                       "chat=False")
    ctx_text, suffix = rendered.split(_MARK)
  else:
    ctx_text, suffix = context, ""
  ctx = list(tokenizer.encode(ctx_text, add_bos=False))
  bos = getattr(tokenizer, "bos_id", None)
  if getattr(tokenizer, "add_bos", False) and bos is not None and (not ctx or ctx[0] != bos):
    ctx.insert(0, bos)
  qs = [list(tokenizer.encode(q + suffix + answer_prefix, add_bos=False)) for q in questions]
  for i, q in enumerate(qs):
    if not q:
      raise ValueError(f"questions[{i}]={questions[i]!r} encodes to no tokens")
  if not ctx:
    raise ValueError("context encodes to no tokens")
  return ctx, qs


def run(model, tokenizer, context: str, questions, press=None, *,
        max_new_tokens: Optional[int] = None, chat=None, answer_prefix: str = "",
        system_prompt: Optional[str] = None, temperature: Optional[float] = None,
        top_p: Optional[float] = None, top_k: Optional[int] = None, seed: int = 0,
        eos_id=None, batch_size: Optional[int] = None, cache_dtype=None,
        chunk_size: Optional[int] = None, backend: str = "auto") -> PipelineResult:
  """Compresses `context` once and answers every question from the compressed cache.

  Args:
    model: a models.Transformer (or a name / path that models.presets loads, with
      tokenizer=None).
    tokenizer: its tokenizer (models.tokenizer); None when `model` is a name.
    context: the text to compress (a non-empty str).
    questions: a str or a list of str.
    press: a press (kvjax.presses; e.g. `kvjax.presses.registry.make("snapkv", 0.5)`) run
      once on the context before any question is seen; None keeps the full cache.
    max_new_tokens: answer length limit (int >= 1); None = the tokenizer's
      generation_config.json default, else 64.
    chat: see `prompt_parts`.
    answer_prefix / system_prompt: see `prompt_parts`.
    temperature, top_p, top_k, seed: sampling (temperature 0 = greedy), as kvjax.generate;
      None = the tokenizer's generation_config.json default (`sampling_defaults`), else
      greedy (0.0, 1.0, 0).
    eos_id: an id or ids that end an answer; default the tokenizer's EOS (and the
      generation_config.json EOS ids of an HF directory).
    batch_size: questions answered together (int >= 1); default all of them.
    cache_dtype: cache dtype ("bfloat16", np.float32, jnp.bfloat16, ...); default the
      parameter dtype.
    chunk_size: prefill the context in chunks of this many tokens (compressing after
      each chunk when a press is given; see models.prefill).
    backend: attention backend ("auto" | "xla" | "pallas").

  Returns:
    A PipelineResult.
  """
  import time  # pylint: disable=import-outside-toplevel
  if isinstance(model, str):
    if tokenizer is not None:
      raise ValueError("pass tokenizer=None when model is a name (it is loaded with it)")
    from models import presets  # pylint: disable=import-outside-toplevel
    model, tokenizer = presets.load_model_and_tokenizer(model)
  config = getattr(model, "config", None)
  if config is None or not callable(getattr(model, "prefill", None)):
    raise TypeError(f"model must be a models.Transformer (or a model name); got "
                    f"{type(model).__name__}")
  _check_tokenizer(tokenizer)
  qs, _ = _check_text(context, questions)
  given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
               top_k=top_k)
  d = sampling_defaults(tokenizer)
  max_new_tokens, temperature, top_p, top_k = (d[k] if v is None else v
                                               for k, v in given.items())
  checks.require_int("max_new_tokens", max_new_tokens)
  checks.sampling(temperature, top_p, top_k)
  if batch_size is not None:
    checks.require_int("batch_size", batch_size)
  if cache_dtype is not None:
    cache_dtype = checks.float_dtype("cache_dtype", cache_dtype)
  if press is not None and not callable(getattr(press, "compress_model", None)):
    raise TypeError(f"press must be a kvjax press (with compress_model); got "
                    f"{type(press).__name__}; build one by name with "
                    "kvjax.presses.registry.make(name, ratio)")
  eos = _eos_ids(tokenizer, eos_id)
  ctx, q_ids = prompt_parts(tokenizer, context, qs, chat=chat, answer_prefix=answer_prefix,
                            system_prompt=system_prompt)
  longest_q = max(len(q) for q in q_ids)
  limit = config.max_position_embeddings
  need = len(ctx) + longest_q + max_new_tokens
  if need > limit:
    raise ValueError(f"context ({len(ctx)} tokens) + longest question ({longest_q}) + "
                     f"max_new_tokens ({max_new_tokens}) = {need} positions; the model "
                     f"allows {limit} (max_position_embeddings). Shorten the context.")
  room = longest_q + max_new_tokens
  kw = dict(logits="last", backend=backend, cache_dtype=cache_dtype, chunk_size=chunk_size)
  t0 = time.perf_counter()
  tokens = jnp.asarray([ctx], jnp.int32)
  if press is None:
    _, base = api.prefill(model, tokens, capacity=len(ctx) + room, **kw)
  else:
    _, base = api.prefill(model, tokens, press=press, decode_room=room, **kw)
  jax.block_until_ready(base)
  t1 = time.perf_counter()
  n = len(qs) if batch_size is None else int(batch_size)
  key = jax.random.key(seed)
  out_tokens = []
  for start in range(0, len(qs), n):
    group = q_ids[start:start + n]
    key, sub = jax.random.split(key)
    out_tokens += _answer_group(model, base, group, max_new_tokens, eos, sub,
                                dict(temperature=temperature, top_p=top_p, top_k=top_k),
                                backend)
  t2 = time.perf_counter()
  answers = [tokenizer.decode(t) for t in out_tokens]
  return PipelineResult(
      answers=answers, tokens=out_tokens, context_tokens=len(ctx),
      question_tokens=[len(q) for q in q_ids], cache_nbytes=base.nbytes,
      full_cache_nbytes=kvjax.cache.tree_nbytes(jax.eval_shape(
          lambda: api.init_cache(config, 1, len(ctx) + room, dtype=cache_dtype))),
      prefill_seconds=t1 - t0, answer_seconds=t2 - t1)


def _answer_group(model, base, group, max_new_tokens, eos, key, sampling, backend):
  """Answers len(group) questions from forks of `base`: [ids (EOS excluded)] per question."""
  b = len(group)
  longest = max(len(q) for q in group)
  ids = np.zeros((b, longest), np.int32)
  mask = np.zeros((b, longest), np.int32)
  for i, q in enumerate(group):   # left-padded: every row's last column is a real token
    ids[i, longest - len(q):] = q
    mask[i, longest - len(q):] = 1
  cache = kvjax.fork(base, b)
  if b == 1:   # repeat by 1 may alias `base`, which decode would donate
    cache = jax.tree.map(jnp.copy, cache)
  logits, cache = api.decode(model, jnp.asarray(ids), cache, attention_mask=jnp.asarray(mask),
                             logits="last", backend=backend)
  out = np.zeros((b, max_new_tokens), np.int32)
  lengths = np.zeros((b,), np.int32)
  done = np.zeros((b,), bool)
  eos_arr = np.asarray(eos, np.int64)
  for step in range(max_new_tokens):
    key, sub = jax.random.split(key)
    nxt = np.asarray(kvjax.sample(logits[:, -1], sub, **sampling))
    hit = np.isin(nxt, eos_arr) & ~done
    out[:, step] = nxt
    lengths += ~(done | hit)
    done |= hit
    if done.all() or step == max_new_tokens - 1:
      break
    logits, cache = api.decode(model, jnp.asarray(nxt)[:, None], cache, logits="last",
                               check_capacity=False, backend=backend)
  return [out[i, :lengths[i]].tolist() for i in range(b)]


def pipeline(model, tokenizer, context: str, questions, press=None, *,
             max_new_tokens: Optional[int] = None, chat=None, **kwargs):
  """Answers `questions` about `context` from a cache compressed once by `press`.

  kvpress-style entry point: `run` with the answers only. `questions` may be one str
  (returns a str) or a list of str (returns a list). Keyword arguments are `run`'s.
  """
  answers = run(model, tokenizer, context, questions, press, max_new_tokens=max_new_tokens,
                chat=chat, **kwargs).answers
  return answers[0] if isinstance(questions, str) else answers
