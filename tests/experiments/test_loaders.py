"""JSONL loaders on tiny handmade files in the benchmarks' formats (tests/experiments/data)."""

import os

import pytest

from experiments import tasks as T
from experiments.tasks import loaders

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_longbench_skips_malformed_lines_and_keeps_the_rest():
  r = loaders.load_jsonl(os.path.join(DATA, "longbench", "hotpotqa.jsonl"), "longbench")
  assert [ln for ln, _ in r.errors] == [2, 3]          # truncated JSON; no "context"
  assert "context" in r.errors[1][1]
  assert len(r.samples) == 2
  s, c = r.samples
  assert s.task == "longbench/hotpotqa" and s.metric == "qa_f1" and s.answers == ("Oslo",)
  # LongBench's hotpotqa template: instruction + passages, then the question
  assert s.context.startswith("Answer the question based on the given passages.")
  assert s.context.endswith("passages.\nPassage 1: The Blue Museum is in Oslo. Passage 2: "
                            "The Red Museum is in Rome.")
  assert s.question.endswith("Question: Which city hosts the Blue Museum?\nAnswer:")
  assert c.metric == "classification" and c.meta["all_classes"] == ["positive", "negative"]
  assert s.meta["line"] == 1 and c.meta["line"] == 4


def test_infinitebench_task_from_file_name():
  r = loaders.load_jsonl(os.path.join(DATA, "infinitebench", "passkey.jsonl"), "infinitebench")
  assert [ln for ln, _ in r.errors] == [2]
  assert [s.answers for s in r.samples] == [("71432",), ("90210",)]
  assert all(s.task == "infinitebench/passkey" and s.metric == "prefix_match"
             for s in r.samples)
  assert r.samples[0].answers[0] in r.samples[0].context


def test_ruler_splits_the_query_off_the_context():
  r = loaders.load_jsonl(os.path.join(DATA, "ruler", "niah_single.jsonl"), "ruler")
  assert [ln for ln, _ in r.errors] == [2, 3]           # empty outputs; not an object
  s = r.samples[0]
  assert s.metric == "string_match_all" and s.answers == ("4412873",)
  assert "4412873" in s.context and "4412873" not in s.question
  assert s.question.startswith("\nWhat is the special magic number for gomatu")
  assert s.question.endswith("provided text is")


def test_truncation_and_directories():
  r = loaders.load_jsonl(os.path.join(DATA, "longbench", "hotpotqa.jsonl"), "longbench",
                         max_context_tokens=230)
  s = r.samples[0]
  assert 1 + len(s.context.encode()) + len(s.question.encode()) == 230
  assert s.context.startswith("Answer the question") and s.context.endswith("Rome.")
  assert "Oslo" not in s.context                        # the middle went
  d = loaders.load(os.path.join(DATA, "ruler"), "ruler")
  assert len(d.samples) == 2 and d.errors[0][0] == "niah_single.jsonl:2"
  res = T.load_file_task("infinitebench:" + os.path.join(DATA, "infinitebench"), limit=1)
  assert len(res.samples) == 1


def test_bad_paths_and_formats():
  with pytest.raises(ValueError, match="does not exist"):
    loaders.load_jsonl("/nonexistent/x.jsonl", "ruler")
  with pytest.raises(ValueError, match="unknown format"):
    loaders.load_jsonl(os.path.join(DATA, "ruler", "niah_single.jsonl"), "helm")
