"""LongBench's own prompts, lengths and chat framing (Bai et al., 2023, arXiv 2308.14508)."""

import json

import pytest

from experiments.tasks import base, loaders, longbench, metrics
from models import tokenizer as tok_lib

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# The 21 datasets of LongBench's pred.py, in its order.
DATASETS = ["narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa",
            "2wikimqa", "musique", "dureader", "gov_report", "qmsum", "multi_news", "vcsum",
            "trec", "triviaqa", "samsum", "lsht", "passage_count", "passage_retrieval_en",
            "passage_retrieval_zh", "lcc", "repobench-p"]


class ChatChars:
  """One token per character, with a ChatML template: token counts are character counts."""

  chat_template = TEMPLATE

  def encode(self, text, add_bos=None):
    return ([1] if add_bos else []) + [ord(c) for c in text]

  def apply_chat_template(self, messages, add_generation_prompt=True):
    return tok_lib.render_chat(TEMPLATE, messages, add_generation_prompt)


def _write(tmp_path, name, recs):
  p = tmp_path / f"{name}.jsonl"
  p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
  return str(p)


def test_every_dataset_has_a_prompt_a_length_and_a_metric():
  assert sorted(longbench.PROMPTS) == sorted(DATASETS)
  assert sorted(longbench.MAX_NEW_TOKENS) == sorted(DATASETS)
  assert sorted(longbench.METRICS) == sorted(DATASETS)
  assert set(longbench.METRICS.values()) <= set(metrics.METRICS)
  for name, t in longbench.PROMPTS.items():
    assert t.count("{context}") == 1, name
    # the question never comes before the context (the compressed part)
    assert "{input}" not in t.split("{context}")[0], name
  assert longbench.NO_CHAT >= longbench.FIRST_LINE


def test_hotpotqa_prompt_is_longbench_s_string(tmp_path):
  rec = {"input": "Where is the Blue Museum?", "context": "Passage 1: It is in Oslo.",
         "answers": ["Oslo"], "dataset": "hotpotqa", "all_classes": None, "_id": "x"}
  s = loaders.load_jsonl(_write(tmp_path, "hotpotqa", [rec]), "longbench").samples[0]
  ask = ("Answer the question based on the given passages. Only give me the answer and do "
         "not output any other words.")
  want = (f"{ask}\n\nThe following are given passages.\nPassage 1: It is in Oslo.\n\n{ask}"
          "\n\nQuestion: Where is the Blue Museum?\nAnswer:")
  assert s.context + s.question == want
  assert "Blue Museum" not in s.context and s.context.endswith("It is in Oslo.")
  assert (s.metric, s.max_new_tokens) == ("qa_f1", 32)
  assert s.meta["chat_form"] == "user" and s.meta["template"] == "longbench"


@pytest.mark.parametrize("ds,metric,max_new", [("gov_report", "rouge_l", 512),
                                                ("passage_count", "count", 32),
                                                ("lcc", "code_sim", 64),
                                                ("trec", "classification", 64),
                                                ("narrativeqa", "qa_f1", 128)])
def test_per_dataset_lengths_and_metrics(tmp_path, ds, metric, max_new):
  rec = {"input": "in", "context": "ctx", "answers": ["a"], "dataset": ds}
  s = loaders.load_jsonl(_write(tmp_path, ds, [rec]), "longbench").samples[0]
  assert (s.metric, s.max_new_tokens) == (metric, max_new)


def test_code_completion_prompt_and_no_chat(tmp_path):
  rec = {"input": "x = f(", "context": "def f(a):\n  return a\n", "answers": ["x = f(1)"],
         "dataset": "repobench-p"}
  s = loaders.load_jsonl(_write(tmp_path, "r", [rec]), "longbench").samples[0]
  assert s.context == "Please complete the code given below. \ndef f(a):\n  return a\n"
  assert s.question == "x = f(Next line of code:\n"
  tok = ChatChars()
  # LongBench leaves code and few-shot prompts unframed even for chat models
  assert s.prompt_tokens(tok, chat=True) == s.prompt_tokens(tok, chat=False)


def test_longbench_e_and_unknown_datasets(tmp_path):
  rec = {"input": "Q", "context": "C", "answers": ["a"]}
  e = loaders.load_jsonl(_write(tmp_path, "musique_e", [rec]), "longbench").samples[0]
  assert e.context.endswith("given passages.\nC") and e.max_new_tokens == 32
  u = loaders.load_jsonl(_write(tmp_path, "mine", [rec]), "longbench").samples[0]
  assert (u.context, u.question) == ("C", "\n\nQuestion: Q\nAnswer:")
  assert u.meta["template"] == "generic" and "chat_form" not in u.meta


def test_user_chat_form_puts_the_whole_question_in_the_user_turn():
  tok = ChatChars()
  s = base.Sample("longbench/qmsum", "Transcript:\nhi", "\n\nQuery: why?\nAnswer:", ("b",),
                  "rouge_l", 512, {"chat_form": "user"})
  ctx, q = s.prompt_tokens(tok, chat=True)
  text = "".join(map(chr, ctx + q))
  # as LongBench's build_chat: the whole prompt is the user's message
  assert text == ("<|im_start|>user\nTranscript:\nhi\n\nQuery: why?\nAnswer:<|im_end|>\n"
                  "<|im_start|>assistant\n")
  split = base.Sample("t", "Transcript:\nhi", "\n\nQuery: why?\nAnswer:", ("b",))
  assert "".join(map(chr, sum(split.prompt_tokens(tok, chat=True), []))).endswith(
      "why?<|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(ValueError, match="chat_form"):
    base.Sample("t", "c", "q", ("a",), meta={"chat_form": "both"}).prompt_tokens(tok, True)


def test_first_line_scoring_as_longbench_eval():
  pred = "\n\nOslo\nQuestion: next one? Answer: Rome"
  assert metrics.score("qa_f1", pred, ["Oslo"], first_line=True) == 1.0
  # without it the extra words lower the token F1: 1 of 6 tokens, recall 1 -> 2/7
  assert metrics.score("qa_f1", pred, ["Oslo"]) == pytest.approx(2 / 7)


def test_truncation_keeps_instruction_and_question(tmp_path):
  rec = {"input": "Q?", "context": "A" * 500 + "B" * 500, "answers": ["a"],
         "dataset": "multifieldqa_en"}
  s = loaders.load_jsonl(_write(tmp_path, "m", [rec]), "longbench",
                         max_context_tokens=300).samples[0]
  assert 1 + len(s.context.encode()) + len(s.question.encode()) == 300
  assert s.context.startswith("Read the following text and answer briefly.")
  assert s.context.endswith("B") and s.question.endswith("Question: Q?\nAnswer:")
