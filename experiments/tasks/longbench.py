"""LongBench's own prompts, generation lengths and metrics, per dataset.

LongBench: "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding"
(Bai et al., 2023, arXiv 2308.14508). Its reference runner formats every record with a
per-dataset template (the dataset2prompt table in the config folder of
github.com/THUDM/LongBench, MIT licence), generates at most its dataset2maxlen tokens
greedily, and scores with its evaluation script's dataset2metric. The three tables below are those files, copied verbatim
(typos such as "asconcisely" included), so a score computed here is comparable with the
published ones.

Differences from the reference runner, all forced by the evaluation protocol
(docs/EVALUATION.md), which prefills and compresses the context before the question:

* A template is split at `{context}`: the instruction before it and the context are the
  part that is compressed; the text after it (with `{input}`) is the question. The prompt
  the model reads is the same string.
* Chat framing follows `pred.py`: the whole prompt is the user's message (`build_chat`),
  except for the few-shot and code sets (`NO_CHAT`), which it leaves plain.
* Truncation keeps the head and tail of instruction + context in bytes (`loaders`), where
  the reference cuts the middle of the whole prompt in tokens.
* The Chinese sets are scored with the English metrics (`qa_f1`, `rouge_l`, `retrieval`
  on whitespace tokens); LongBench segments Chinese with jieba first.
"""

from __future__ import annotations

from typing import Optional

_QA_PASSAGES = ("Answer the question based on the given passages. Only give me the answer and "
                "do not output any other words.\n\nThe following are given passages.\n{context}"
                "\n\nAnswer the question based on the given passages. Only give me the answer "
                "and do not output any other words.\n\nQuestion: {input}\nAnswer:")

PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a "
                   "question. Answer the question asconcisely as you can, using a single phrase "
                   "if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, "
                   "answer the question based on the story asconcisely as you can, using a "
                   "single phrase if possible. Do not provide any explanation.\n\nQuestion: "
                   "{input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as "
              "concisely as you can, using a single phrase or sentence if possible. If the "
              "question cannot be answered based on the information in the article, write "
              "\"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", "
              "or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n "
              "Answer the question based on the above article as concisely as you can, using a "
              "single phrase or sentence if possible. If the question cannot be answered based "
              "on the information in the article, write \"unanswerable\". If the question is a "
              "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
              "explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer "
                       "the following question based on the above text, only give me the "
                       "answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，"
                       "只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": _QA_PASSAGES,
    "2wikimqa": _QA_PASSAGES,
    "musique": _QA_PASSAGES,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n"
                "问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of "
                  "the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the "
                  "report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or "
             "instruction. Answer the query in one or more sentences.\n\nTranscript:\n"
             "{context}\n\nNow, answer the query based on the above meeting transcript in one "
             "or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. "
                  "\n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\n"
                  "Summary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of "
            "questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do "
                "not output any other words. The following are some examples.\n\n{context}\n\n"
                "{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some "
              "examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may "
                     "be duplicates. Please carefully read these paragraphs and determine how "
                     "many unique paragraphs there are after removing duplicates. In other "
                     "words, how many non-repeating paragraphs are there in total?\n\n{context}"
                     "\n\nPlease enter the final count of unique paragraphs after removing "
                     "duplicates. The output format should only contain the number, such as 1, "
                     "2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. "
                            "Please determine which paragraph the abstract is from.\n\n"
                            "{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease "
                            "enter the number of the paragraph that the abstract is from. The "
                            "answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc."
                            "\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n"
                            "下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，"
                            "\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512,
    "qmsum": 512, "multi_news": 512, "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
    "lcc": 64, "repobench-p": 64,
}

METRICS = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1", "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1",
    "dureader": "rouge_l", "gov_report": "rouge_l", "qmsum": "rouge_l", "multi_news": "rouge_l",
    "vcsum": "rouge_l", "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge_l",
    "lsht": "classification", "passage_retrieval_en": "retrieval", "passage_count": "count",
    "passage_retrieval_zh": "retrieval", "lcc": "code_sim", "repobench-p": "code_sim",
}

# pred.py: "chat models are better off without build prompts on these tasks".
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# eval.py scores only the first non-empty line of these sets' predictions.
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})

# A file whose dataset LongBench does not name: context, then the question.
GENERIC_PROMPT = "{context}\n\nQuestion: {input}\nAnswer:"
GENERIC_MAX_NEW_TOKENS = 32


def dataset_key(name: str) -> Optional[str]:
  """LongBench's dataset name for `name` ("hotpotqa", or LongBench-E's "hotpotqa_e"); None
  when LongBench has no such dataset."""
  if name in PROMPTS:
    return name
  if name.endswith("_e") and name[:-2] in PROMPTS:
    return name[:-2]
  return None


def split_prompt(template: str, context: str, question: str) -> tuple[str, str]:
  """(instruction + context, the rest) of `template` filled with context and question.

  The two parts concatenate to LongBench's prompt; the first never holds the question.
  """
  if template.count("{context}") != 1:
    raise ValueError(f"template must hold {{context}} exactly once: {template!r}")
  head, tail = template.split("{context}")
  if "{input}" in head:
    raise ValueError(f"template puts {{input}} before {{context}}: {template!r}")
  return head + context, tail.replace("{input}", question)


def prompt_parts(dataset: str, context: str, question: str) -> tuple[str, str, dict]:
  """(context part, question part, how to run it) for one LongBench record.

  The dict holds `max_new_tokens`, `metric`, and the sample-meta entries `chat_form`
  ("none" for NO_CHAT sets, else "user": the whole prompt is the user's message) and
  `first_line` (score the first line only), plus `template`: "longbench" or "generic".
  """
  key = dataset_key(dataset)
  if key is None:
    ctx, q = split_prompt(GENERIC_PROMPT, context, question)
    return ctx, q, {"max_new_tokens": GENERIC_MAX_NEW_TOKENS, "metric": "qa_f1",
                    "template": "generic"}
  ctx, q = split_prompt(PROMPTS[key], context, question)
  return ctx, q, {"max_new_tokens": MAX_NEW_TOKENS[key], "metric": METRICS[key],
                  "template": "longbench", "chat_form": "none" if key in NO_CHAT else "user",
                  "first_line": key in FIRST_LINE}
