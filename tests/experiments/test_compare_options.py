"""compare's model-aware press options, token-sized samples and the overall verdict."""

import json

import numpy as np
import pytest

from experiments import compare, results
from experiments import tasks as T
from models import tokenizer as tok_lib

from tests.experiments.test_prompt_fit import WordTokenizer


def test_duo_attention_needs_gates_and_takes_them_from_a_file(tmp_path):
  with pytest.raises(ValueError, match="duo_attention needs learned gates"):
    compare.parse_techniques(["duo_attention"], [0.5])
  gates = np.linspace(0, 1, 6).reshape(3, 2)
  path = tmp_path / "gates.json"
  path.write_text(json.dumps({"gates": gates.tolist()}))
  tok = WordTokenizer()
  opts = compare.press_options("x", tok, chat=True, duo_gates=str(path),
                               kvzip_prompt="Repeat it.")
  ts = compare.parse_techniques(["duo_attention", "kvzip"], [0.5], opts)
  duo, kvzip = (t.build() for t in ts)
  np.testing.assert_array_equal(np.asarray(duo.head_scores), gates)
  assert duo.head_compression_ratio == 0.5
  tail = T.base.chat_frame(tok)[1]
  # the instructions, then the chat turn's close and the assistant's opening before each chunk
  assert kvzip.repeat_ids == tuple(tok.encode("Repeat it."))
  assert kvzip.continue_ids == tuple(tok.encode(compare.KVZIP_CONTINUE))
  assert kvzip.answer_ids == tuple(tok.encode(tail))
  assert kvzip.headwise is False
  # plain prompts: a newline instead of the chat turn
  byte = tok_lib.ByteTokenizer()
  plain = compare.press_options("x", byte, chat=False, duo_gates="")
  assert plain["kvzip"]["repeat_ids"] == tuple(byte.encode(compare.KVZIP_PROMPT, add_bos=False))
  assert plain["kvzip"]["answer_ids"] == tuple(byte.encode("\n", add_bos=False))
  assert "duo_attention" not in plain


def test_build_samples_in_model_tokens_with_chat():
  tok = WordTokenizer()
  samples = compare.build_samples(["passkey", "needle", "perplexity_en"], [500], 2, [400],
                                  [0.0, 1.0], 1, 0, 16, 4096, 0, tokenizer=tok, chat=True)
  by_task = {}
  for s in samples:
    by_task.setdefault(s.task, []).append(s)
  assert len(by_task["passkey"]) == 2 and len(by_task["needle"]) == 2
  for s in by_task["passkey"]:
    assert 0.97 * 500 <= len(s.prompt_tokens(tok, chat=True)[0]) <= 500
  for s in by_task["needle"]:
    assert len(s.prompt_tokens(tok, chat=True)[0]) <= 400 and s.meta["length"] == 400
  for s in by_task["perplexity_en"]:   # perplexity is never chat-framed
    assert len(compare.prompt_tokens(s, tok, chat=True)[0]) <= 500
    assert compare.prompt_tokens(s, tok, chat=True) == s.prompt_tokens(tok, chat=False)


def _row(t, task, score, factor, length=100):
  return dict(technique=t, family="full" if t == "full" else "press", mode="query_agnostic",
              task=task, length=length, score=score, n=4, kv_bytes=1000 / factor,
              kv_factor=factor)


def test_overall_verdict_needs_both_accuracy_and_perplexity():
  rows = [_row("full", "passkey", 1.0, 1.0), _row("full", "perplexity_en", 10.0, 1.0),
          _row("a@0.5", "passkey", 1.0, 2.0), _row("a@0.5", "perplexity_en", 10.05, 2.0),
          _row("a@0.9", "passkey", 1.0, 8.0), _row("a@0.9", "perplexity_en", 10.5, 8.0),
          _row("b@0.9", "passkey", 0.5, 9.0), _row("b@0.9", "perplexity_en", 9.0, 9.0)]
  v = results.overall_verdict(rows)
  assert (v["factor"], v["technique"]) == (2.0, "a@0.5")
  assert v["full_perplexity"] == 10.0 and v["full_accuracy"] == 1.0
  assert results.perplexity_verdict(rows)["a"] == (2.0, "a@0.5")
  table = results.table(rows)
  assert "ppl_en" in table and "10.05" in table
