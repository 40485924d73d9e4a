"""Synthetic tasks: lengths as asked, answers recoverable from the prompt, determinism."""

import re

import numpy as np
import pytest

from train import tasks

ALL = [tasks.MQAR(length=65, num_pairs=8), tasks.MQAR(length=40, num_pairs=6, num_queries=3),
       tasks.Passkey(length=200), tasks.Passkey(length=300, digits=7, depth=0.0),
       tasks.KVRetrieval(length=160), tasks.KVRetrieval(length=300, key_chars=4, num_pairs=5),
       tasks.Copy(length=33), tasks.Copy(length=50, num_tokens=10, vocab=16),
       tasks.Repeats(length=120), tasks.Repeats(length=300, alphabet="ab0", min_span=3)]


@pytest.mark.parametrize("task", ALL, ids=lambda t: repr(t)[:40])
def test_shapes_answer_and_determinism(task):
  for index in range(5):
    ex = task.example(seed=3, index=index)
    assert ex.tokens.shape == (task.length,) and ex.tokens.dtype == np.int32
    assert ex.loss_mask.shape == (task.length,)
    assert ex.tokens.min() >= 0 and ex.tokens.max() < tasks.VOCAB_SIZE
    np.testing.assert_array_equal(np.flatnonzero(ex.loss_mask), ex.answer_positions)
    np.testing.assert_array_equal(ex.tokens[ex.answer_positions], ex.answer)
    assert ex.loss_mask[0] == 0 and ex.answer.size > 0
    again = task.example(seed=3, index=index)
    np.testing.assert_array_equal(ex.tokens, again.tokens)
  assert not np.array_equal(task.example(3, 0).tokens, task.example(3, 1).tokens)
  assert not np.array_equal(task.example(3, 0).tokens, task.example(4, 0).tokens)


def test_mqar_answer_recoverable():
  task = tasks.MQAR(length=129, num_pairs=16, num_queries=10)
  ex = task.example(0, 7)
  t = ex.tokens
  kv = dict(zip(t[1:33:2].tolist(), t[2:34:2].tolist()))
  assert len(kv) == 16  # distinct keys
  assert all(k < 128 <= v < 256 for k, v in kv.items())
  for p in ex.answer_positions:
    assert kv[int(t[p - 1])] == t[p]
  assert len(ex.answer_positions) == 10


def test_passkey_answer_recoverable_and_depth():
  for depth in (0.0, 0.5, 1.0):
    task = tasks.Passkey(length=400, depth=depth)
    ex = task.example(1, 2)
    text = bytes(int(x) for x in ex.tokens[1:]).decode()
    key = re.search(r"The pass key is (\d+)\. Remember", text).group(1)
    assert key == bytes(ex.answer.tolist()).decode()
    assert text.endswith("The pass key is " + key)
    where = text.index("The pass key is") / len(text)
    assert abs(where - depth * 0.7) < 0.25   # the needle moves with depth


def test_kv_retrieval_answer_recoverable():
  task = tasks.KVRetrieval(length=256)
  ex = task.example(5, 1)
  text = bytes(int(x) for x in ex.tokens[1:]).decode()
  pairs = dict(re.findall(r'"([0-9a-f]+)": "([0-9a-f]+)"', text))
  key = re.search(r'Key: "([0-9a-f]+)"', text).group(1)
  assert pairs[key] == bytes(ex.answer.tolist()).decode()
  assert len(pairs) == task.pairs > 3


def test_copy_answer_recoverable():
  ex = tasks.Copy(length=41).example(0, 0)
  n = len(ex.answer)
  np.testing.assert_array_equal(ex.tokens[1:1 + n], ex.answer)
  assert ex.tokens[1 + n] == tasks.SEP


@pytest.mark.parametrize("make, match", [
    (lambda: tasks.MQAR(length=16, num_pairs=8), "too short"),
    (lambda: tasks.MQAR(length=64, num_pairs=8, num_queries=9), "num_queries"),
    (lambda: tasks.Passkey(length=50), "too short"),
    (lambda: tasks.Passkey(length=500, depth=1.5), "depth"),
    (lambda: tasks.KVRetrieval(length=20), "too short"),
    (lambda: tasks.Copy(length=10, num_tokens=5), "too short"),
    (lambda: tasks.make_task("mqar", 64, pairs=3), "no setting"),
    (lambda: tasks.Repeats(length=256, alphabet="a"), "alphabet"),
    (lambda: tasks.Repeats(length=256, min_span=9, max_span=4), "min_span"),
    (lambda: tasks.Repeats(length=20, max_span=24), "too short"),
    (lambda: tasks.make_task("nope", 64), "unknown task"),
])
def test_bad_settings_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_mqar_query_replacement_asks_keys_repeatedly():
  task = tasks.MQAR(length=65, num_pairs=8, num_queries=24, query_replacement=True)
  ex = task.example(2, 0)
  t = ex.tokens
  kv = dict(zip(t[1:17:2].tolist(), t[2:18:2].tolist()))
  asked = [int(t[p - 1]) for p in ex.answer_positions]
  assert len(asked) == 24 and len(set(asked)) < 24            # some key asked twice
  assert all(kv[k] == int(t[p]) for k, p in zip(asked, ex.answer_positions))


def test_repeats_targets_are_copies_of_earlier_spans():
  """Each run of answer tokens continues an earlier occurrence of the token before it."""
  task = tasks.Repeats(length=400, alphabet="abcd", min_span=5, max_span=9, max_gap=50)
  for index in range(10):
    ex = task.example(0, index)
    t = ex.tokens
    pos = ex.answer_positions
    runs = np.split(pos, np.flatnonzero(np.diff(pos) > 1) + 1)
    assert len(runs) >= 2
    for run in runs:
      start, n = run[0] - 1, len(run) + 1        # the copy begins one token before its run
      assert task.min_span <= n <= task.max_span
      window = t[start:start + n]
      earlier = [s for s in range(1, start - n + 1) if np.array_equal(t[s:s + n], window)]
      assert earlier and start - (earlier[-1] + n) <= task.max_gap
