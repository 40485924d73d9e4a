"""Task generators: lengths as asked, answers recoverable from the input, determinism."""

import collections
import re

import pytest

from experiments import tasks as T
from experiments.tasks import ruler, synthetic
from models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
GENERATED = ["passkey", "kv_retrieval", "perplexity", "niah_single", "niah_multikey",
             "niah_multivalue", "vt", "cwe", "qa"]


@pytest.mark.parametrize("name", GENERATED)
@pytest.mark.parametrize("length", [512, 777])
def test_context_length_is_exact(name, length):
  for s in T.make(name).samples(length, 3, seed=1):
    ctx, q = s.prompt_tokens(TOK)
    assert len(ctx) == length            # BOS + context, the compressed part
    assert ctx[0] == TOK.BOS and len(q) > 0
    assert s.meta["length"] == length


@pytest.mark.parametrize("name", GENERATED)
def test_deterministic_in_seed(name):
  a = T.make(name).samples(640, 2, seed=3)
  b = T.make(name).samples(640, 2, seed=3)
  c = T.make(name).samples(640, 2, seed=4)
  assert a == b
  assert [s.context for s in a] != [s.context for s in c]


def test_passkey_answer_is_the_needle_in_the_context():
  for s in T.make("passkey").samples(1024, 4):
    key = re.search(r"The pass key is (\d+)\. Remember it\.", s.context).group(1)
    assert s.answers == (key,)
    assert s.question == synthetic.PASSKEY_QUESTION


def test_kv_retrieval_answer_is_the_value_of_the_asked_key():
  for s in T.make("kv_retrieval").samples(1024, 4):
    key = re.match(r'\nKey: "([0-9a-f]+)"\nValue: "$', s.question).group(1)
    pairs = dict(re.findall(r'"([0-9a-f]{6})": "([0-9a-f]{6})"', s.context))
    assert pairs[key] == s.answers[0]


def test_needle_grid_places_the_needle_at_each_depth():
  grid = synthetic.needle_grid([512, 1024], [0.0, 0.5, 1.0], n=2)
  assert len(grid) == 2 * 3 * 2
  for s in grid:
    where = s.context.find("The pass key is") / len(s.context)
    assert abs(where - s.meta["depth"]) < 0.15
    assert s.answers[0] in s.context and s.task == "needle"
  with pytest.raises(ValueError, match="depth"):
    synthetic.needle_grid([512], [1.5], 1)


def _magic(context):
  return re.findall(r"special magic numbers for (\w+) is: (\d+)\.", context)


def test_niah_answers_follow_their_key():
  for s in T.make("niah_single").samples(768, 3):
    (key, value), = _magic(s.context)
    assert s.answers == (value,) and key in s.question
  for s in T.make("niah_multikey").samples(768, 3):
    found = dict(_magic(s.context))
    assert len(found) == 4
    asked = re.search(r"number for (\w+) mentioned", s.question).group(1)
    assert found[asked] == s.answers[0]
  for s in T.make("niah_multivalue").samples(768, 3):
    found = _magic(s.context)
    assert {k for k, _ in found} == {re.search(r"numbers for (\w+) mentioned",
                                               s.question).group(1)}
    assert sorted(v for _, v in found) == sorted(s.answers)


def test_variable_tracking_answer_is_the_chain():
  for s in T.make("vt").samples(768, 3):
    value = re.search(r"assigned the value (\d+)", s.question).group(1)
    assigned = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", s.context))
    holds = {v for v, rhs in assigned.items() if rhs == value}
    grew = True
    while grew:
      new = {v for v, rhs in assigned.items() if rhs.startswith("VAR ") and rhs[4:] in holds}
      grew = not new <= holds
      holds |= new
    assert holds == set(s.answers)


def test_common_words_are_the_most_frequent():
  for s in T.make("cwe").samples(1024, 3):
    counts = collections.Counter(re.findall(r"\d+\. (\w+)", s.context))
    top = {w for w, _ in counts.most_common(len(s.answers))}
    assert top == set(s.answers)
    assert min(counts[w] for w in s.answers) > max(
        c for w, c in counts.items() if w not in s.answers)


def test_qa_answer_is_the_capital_of_the_asked_country():
  for s in T.make("qa").samples(768, 3):
    country = re.search(r"capital of (\w+)\?", s.question).group(1)
    assert re.search(rf"The capital of {country} is (\w+)\.", s.context).group(1) == \
        s.answers[0]
    assert s.metric == "string_match_part"


def test_perplexity_samples_are_held_out_text():
  task = T.perplexity.HeldOutPerplexity(continuation=32)
  s = task.samples(256, 2)
  assert all(len(x.prompt_tokens(TOK)[1]) == 32 and x.metric == "nll" for x in s)
  assert s[0].context != s[1].context


def test_code_haystack_and_bad_settings():
  s = ruler.make("niah_single", haystack="code").samples(512, 1)[0]
  assert "special magic number" in s.context and len(s.context) == 511
  with pytest.raises(ValueError, match="haystack"):
    ruler.make("niah_single", haystack="essays").samples(512, 1)
  with pytest.raises(ValueError, match="length"):
    T.make("passkey").samples(10, 1)
  with pytest.raises(ValueError, match="unknown task"):
    T.make("nope")
  assert T.expand(["ruler"]) == sorted(ruler.RULER_TASKS)
