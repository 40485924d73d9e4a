"""Metrics against hand-computed values."""

import pytest

from experiments.tasks import metrics as M


def test_prefix_and_exact():
  assert M.prefix_match(" 12345xyz", ["12345"]) == 1.0
  assert M.prefix_match("1234", ["12345"]) == 0.0
  assert M.exact_match("The  Oslo!", ["oslo"]) == 1.0    # article, case, punctuation dropped
  assert M.exact_match("Oslo city", ["oslo"]) == 0.0


def test_ruler_string_matches():
  assert M.string_match_all("a 111 and 333", ["111", "222", "333"]) == pytest.approx(2 / 3)
  assert M.string_match_part("a 111", ["222", "111"]) == 1.0
  assert M.string_match_all("x", []) == 0.0


def test_qa_f1_by_hand():
  # pred tokens {ada, lovelace, wrote}, gold {ada, lovelace}: P = 2/3, R = 1, F1 = 0.8
  assert M.qa_f1("Ada Lovelace wrote", ["Ada Lovelace"]) == pytest.approx(0.8)
  assert M.qa_f1("nothing", ["Ada"]) == 0.0


def test_rouge_l_by_hand():
  # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4 -> F = 0.75
  assert M.rouge_l("a b c d", ["a c d e"]) == pytest.approx(0.75)
  assert M.rouge_l("", ["a"]) == 0.0


def test_longbench_specials():
  assert M.classification("it is positive", ["positive"],
                          all_classes=["positive", "negative"]) == 1.0
  assert M.classification("positive or negative", ["positive"],
                          all_classes=["positive", "negative"]) == 0.5
  assert M.retrieval("Paragraph 3", ["Paragraph 3"]) == 1.0
  assert M.retrieval("3 or 4", ["Paragraph 3"]) == 0.5
  assert M.count("there are 7", ["7"]) == 1.0
  assert M.code_sim("# c\nx = 1", ["x = 1"]) == 1.0
  assert M.choice("B. the dog", ["the dog"], options=["cat", "the dog"]) == 1.0


def test_score_dispatch():
  assert M.score("substring", "xx OSLO", ["oslo"]) == 1.0
  with pytest.raises(ValueError, match="unknown metric"):
    M.score("bleu", "a", ["a"])
