"""Chat framing of samples and contexts sized in the model's own tokens."""

import pytest

from experiments import tasks as T
from experiments.tasks import base, fit
from experiments.tasks import perplexity
from models import tokenizer as tok_lib

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class WordTokenizer:
  """One token per whitespace-separated word (and one for BOS): an independent count."""

  chat_template = TEMPLATE

  def encode(self, text, add_bos=None):
    return ([1] if add_bos else []) + [sum(map(ord, w)) % 1000 + 10 for w in text.split()]

  def apply_chat_template(self, messages, add_generation_prompt=True):
    return tok_lib.render_chat(TEMPLATE, messages, add_generation_prompt)


@pytest.mark.parametrize("question,ask,cue", [
    ("What is the pass key? The pass key is ", "What is the pass key?", "The pass key is "),
    ("\nQuestion: What is the capital of X?\nAnswer: ", "\nQuestion: What is the capital of X?",
     ""),
    ('\nKey: "ab12"\nValue: "', "", 'Key: "ab12"\nValue: "'),
    ("\nQuestion: Find all. Answer: they are: ", "\nQuestion: Find all.", "they are: "),
])
def test_split_question(question, ask, cue):
  assert base.split_question(question) == (ask, cue)


def test_chat_prompt_frames_context_and_puts_cue_in_assistant_turn():
  tok = WordTokenizer()
  s = base.Sample("passkey", "alpha beta gamma", "What is it? It is ", ("1",))
  head, tail = base.chat_frame(tok)
  assert head.endswith("<|im_start|>user\n") and tail.startswith("<|im_end|>")
  assert tail.endswith("<|im_start|>assistant\n")
  ctx, q = s.prompt_tokens(tok, chat=True)
  assert ctx == tok.encode(head + "alpha beta gamma")
  assert q == tok.encode("What is it?" + tail + "It is ")
  plain_ctx, plain_q = s.prompt_tokens(tok)
  assert plain_ctx == [1] + tok.encode("alpha beta gamma") and plain_q == tok.encode(s.question)


def test_chat_without_template_is_a_clear_error():
  s = base.Sample("passkey", "a b", "q? a ", ("1",))
  with pytest.raises(ValueError, match="no chat template"):
    s.prompt_tokens(tok_lib.ByteTokenizer(), chat=True)


@pytest.mark.parametrize("name", ["passkey", "niah_multikey", "vt", "kv_retrieval"])
@pytest.mark.parametrize("chat", [False, True])
def test_samples_in_tokens_hit_the_target(name, chat):
  tok = WordTokenizer()
  out = fit.samples_in_tokens(T.make(name), 600, 3, 0, tok, chat=chat)
  counts = [len(s.prompt_tokens(tok, chat=chat)[0]) for s in out]
  assert 0.97 * 600 <= max(counts) <= 600, counts
  assert all(s.meta["length"] == 600 for s in out)


def test_byte_tokenizer_lengths_are_exact():
  tok = tok_lib.ByteTokenizer()
  out = fit.samples_in_tokens(T.make("passkey"), 512, 2, 0, tok)
  assert [len(s.prompt_tokens(tok)[0]) for s in out] == [512, 512]


def test_english_perplexity_windows_continue_the_text():
  text = perplexity.english_text()
  assert len(text) > 100_000 and "statement" in text
  out = T.make("perplexity_en").samples(2000, 3, 0)
  for s in out:
    start = s.meta["offset"]
    assert text[start:start + len(s.context)] == s.context
    assert text[start + len(s.context):].startswith(s.question)
    assert len(s.context) == 1999 and len(s.question) == 4 * 128
