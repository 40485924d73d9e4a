"""models.pipeline: compress a context once, answer questions from forks of the cache.

References are independent of the pipeline's code path: without a press, greedy decoding
by full forwards of the whole sequence (no cache at all); with a press, a batch-of-one
prefill + press + token-by-token decode per question.
"""

import functools

import numpy as np
import pytest
from flax import nnx

import models
from kvjax import presses
from models import pipeline
from models import tokenizer as tok_lib

CFG = models.ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256,
                         bos_token_id=256, eos_token_id=257, pad_token_id=258)
CONTEXT = "The cat sat on the mat. The dog ran to the park and back again."
QUESTIONS = ["Where?", "Who ran to the park?", "Q"]
NEW = 6
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.lru_cache(maxsize=None)
def _model():
  return models.Transformer(CFG, rngs=nnx.Rngs(3))


class ChatBytes(tok_lib.ByteTokenizer):
  """Byte tokenizer with a ChatML chat template (rendered by models.tokenizer.render_chat)."""

  chat_template = CHATML

  def apply_chat_template(self, messages, add_generation_prompt=True):
    return tok_lib.render_chat(self.chat_template, messages, add_generation_prompt)


FULL = 128   # full forwards run on [1, FULL] right-padded rows: one compile, and causal
             # attention makes the logits at a real token independent of what follows it


def _greedy_full_forward(model, prompt, n, eos=()):
  """Greedy tokens by re-running the whole sequence each step (no cache)."""
  seq, out = list(prompt), []
  for _ in range(n):
    row = np.zeros((1, FULL), np.int32)
    row[0, :len(seq)] = seq
    logits = np.asarray(model(row))[0, len(seq) - 1]
    nxt = int(np.argmax(logits))
    if nxt in eos:
      break
    out.append(nxt)
    seq.append(nxt)
  return out


def _greedy_press(model, ctx, q, press, n):
  """Batch-of-one prefill + press, then the question and n greedy tokens one by one."""
  _, cache = models.prefill(model, np.asarray([ctx], np.int32), press=press,
                            decode_room=len(q) + n, logits="last")
  logits, cache = models.decode(model, np.asarray([q], np.int32), cache, logits="last")
  out = []
  for _ in range(n):
    nxt = int(np.argmax(np.asarray(logits)[0, -1]))
    out.append(nxt)
    logits, cache = models.decode(model, np.asarray([[nxt]], np.int32), cache, logits="last")
  return out


def test_no_press_equals_full_forward_greedy():
  m, tok = _model(), tok_lib.ByteTokenizer()
  res = pipeline.run(m, tok, CONTEXT, QUESTIONS, max_new_tokens=NEW, eos_id=[])
  ctx = tok.encode(CONTEXT)
  assert res.context_tokens == len(ctx)
  for q, got in zip(QUESTIONS, res.tokens):
    assert got == _greedy_full_forward(m, ctx + tok.encode(q), NEW)
  assert res.answers == [tok.decode(t) for t in res.tokens]


@pytest.mark.parametrize("press", [presses.KnormPress(compression_ratio=0.5),
                                   presses.SnapKVPress(compression_ratio=0.6, window_size=4),
                                   presses.StreamingLLMPress(compression_ratio=0.5)],
                         ids=["knorm", "snapkv", "streaming"])
def test_press_answers_equal_manual_reference(press):
  m, tok = _model(), tok_lib.ByteTokenizer()
  res = pipeline.run(m, tok, CONTEXT, QUESTIONS, press, max_new_tokens=NEW, eos_id=[])
  ctx = tok.encode(CONTEXT)
  for q, got in zip(QUESTIONS, res.tokens):
    assert got == _greedy_press(m, ctx, tok.encode(q), press, NEW)
  # the press really shrank the cache (same room for question + answer in both)
  assert res.cache_nbytes < res.full_cache_nbytes


def test_questions_do_not_see_each_other():
  m, tok = _model(), tok_lib.ByteTokenizer()
  press = presses.KnormPress(compression_ratio=0.5)
  together = pipeline.run(m, tok, CONTEXT, QUESTIONS, press, max_new_tokens=NEW, eos_id=[])
  one_by_one = pipeline.run(m, tok, CONTEXT, QUESTIONS, press, max_new_tokens=NEW, eos_id=[],
                            batch_size=1)
  for i, q in enumerate(QUESTIONS):
    alone = pipeline.run(m, tok, CONTEXT, [q], press, max_new_tokens=NEW, eos_id=[])
    assert together.tokens[i] == alone.tokens[0] == one_by_one.tokens[i]
  # reversed order gives the same answers, reversed
  rev = pipeline.pipeline(m, tok, CONTEXT, QUESTIONS[::-1], press, max_new_tokens=NEW,
                          eos_id=[])
  assert rev == together.answers[::-1]


def test_stops_at_eos():
  m, tok = _model(), tok_lib.ByteTokenizer()
  ctx, q = tok.encode(CONTEXT), tok.encode(QUESTIONS[1])
  free = _greedy_full_forward(m, ctx + q, 12)
  # an id first produced at step k > 0 (k = 0 if the greedy answer repeats one id)
  k = max((i for i in range(len(free)) if free[i] not in free[:i]), default=0)
  res = pipeline.run(m, tok, CONTEXT, [QUESTIONS[0], QUESTIONS[1]], max_new_tokens=12,
                     eos_id=free[k])
  assert res.tokens[1] == free[:k]
  first = _greedy_full_forward(m, ctx + tok.encode(QUESTIONS[0]), 12, eos=(free[k],))
  assert res.tokens[0] == first   # the other row stops at its own EOS (or the limit)


def test_single_question_returns_str():
  m, tok = _model(), tok_lib.ByteTokenizer()
  a = pipeline.pipeline(m, tok, CONTEXT, "Where?", max_new_tokens=3, eos_id=[])
  b = pipeline.pipeline(m, tok, CONTEXT, ["Where?"], max_new_tokens=3, eos_id=[])
  assert isinstance(a, str) and [a] == b


def test_chat_template_split():
  tok = ChatBytes()
  ctx, qs = pipeline.prompt_parts(tok, "CTX", ["Q1", "Q22"], answer_prefix="A:")
  # written out by hand: ChatML user turn split right after the context
  assert tok.decode(ctx) == "<|im_start|>user\nCTX"
  assert [tok.decode(q) for q in qs] == [
      "Q1<|im_end|>\n<|im_start|>assistant\nA:", "Q22<|im_end|>\n<|im_start|>assistant\nA:"]
  raw_ctx, raw_qs = pipeline.prompt_parts(tok, "CTX", ["Q1"], chat=False)
  assert tok.decode(raw_ctx) == "CTX" and tok.decode(raw_qs[0]) == "Q1"
  # the chat prompt is what the pipeline feeds: equal to a full forward of the whole text
  m = _model()
  res = pipeline.run(m, tok, "CTX", ["Q1"], max_new_tokens=4, eos_id=[])
  assert res.tokens[0] == _greedy_full_forward(m, ctx + qs[0][:-2], 4)  # [:-2]: no "A:"


def test_kv_bytes_per_token():
  # 2 (K, V) * 2 layers * 2 kv heads * 8 dims * 4 bytes
  assert pipeline.kv_bytes_per_token(CFG) == 256
  assert pipeline.kv_bytes_per_token(CFG, "bfloat16") == 128
  res = pipeline.run(_model(), tok_lib.ByteTokenizer(), CONTEXT, ["Q"], max_new_tokens=2,
                     eos_id=[])
  room = 1 + 2
  assert res.full_cache_nbytes == res.cache_nbytes  # no press: the same cache
  # K/V bytes plus int32 lengths/positions bookkeeping
  assert res.full_cache_nbytes >= (res.context_tokens + room) * 256


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(context="   "), ValueError, "context is empty"),
    (dict(context=b"bytes"), TypeError, "context must be a str"),
    (dict(questions=["ok", 3]), TypeError, r"questions\[1\] must be a str"),
    (dict(questions=[]), ValueError, "questions is empty"),
    (dict(questions=None), TypeError, "questions must be a str or a list"),
    (dict(context="x" * 300), ValueError, "max_position_embeddings"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens=0"),
    (dict(press="snapkv"), TypeError, "press must be a kvjax press"),
    (dict(chat=True), ValueError, "no chat template"),
    (dict(chat="yes"), ValueError, "chat='yes'"),
    (dict(batch_size=0), ValueError, "batch_size=0"),
    (dict(cache_dtype="int8"), ValueError, "cache_dtype='int8' is not a floating dtype"),
    (dict(tokenizer=object()), TypeError, "tokenizer must have encode"),
])
def test_bad_inputs(kwargs, err, match):
  args = dict(model=_model(), tokenizer=tok_lib.ByteTokenizer(), context=CONTEXT,
              questions=["Q"])
  args.update(kwargs)
  with pytest.raises(err, match=match):
    pipeline.run(args.pop("model"), args.pop("tokenizer"), args.pop("context"),
                 args.pop("questions"), **args)


class ConfiguredBytes(tok_lib.ByteTokenizer):
  """Byte tokenizer carrying generation_config.json defaults, as HFTokenizer.generation."""

  def __init__(self, generation):
    self.generation = generation


def test_generation_config_defaults_are_honoured():
  m = _model()
  # max_new_tokens from the model's generation_config.json; an explicit value wins
  tok = ConfiguredBytes({"max_new_tokens": 3})
  res = pipeline.run(m, tok, CONTEXT, QUESTIONS[:1], eos_id=[])
  ctx = tok.encode(CONTEXT)
  assert res.tokens[0] == _greedy_full_forward(m, ctx + tok.encode(QUESTIONS[0]), 3)
  assert len(pipeline.run(m, tok, CONTEXT, QUESTIONS[:1], eos_id=[],
                          max_new_tokens=5).tokens[0]) == 5
  # sampling settings: the defaults act exactly as the same values passed by hand
  tok = ConfiguredBytes({"temperature": 1.5, "top_p": 0.95, "max_new_tokens": NEW})
  by_default = pipeline.run(m, tok, CONTEXT, QUESTIONS, eos_id=[], seed=1)
  by_hand = pipeline.run(m, tok_lib.ByteTokenizer(), CONTEXT, QUESTIONS, eos_id=[], seed=1,
                         temperature=1.5, top_p=0.95, max_new_tokens=NEW)
  greedy = pipeline.run(m, tok_lib.ByteTokenizer(), CONTEXT, QUESTIONS, eos_id=[],
                        max_new_tokens=NEW)
  assert by_default.tokens == by_hand.tokens != greedy.tokens
  assert pipeline.sampling_defaults(tok_lib.ByteTokenizer()) == pipeline.SAMPLING_FALLBACK
  assert pipeline.sampling_defaults(tok) == {"max_new_tokens": NEW, "temperature": 1.5,
                                             "top_p": 0.95, "top_k": 0}
