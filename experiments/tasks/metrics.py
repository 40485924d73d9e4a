"""Scoring a generation against reference answers, as each benchmark defines it.

Every metric is `fn(prediction: str, answers: Sequence[str]) -> float in [0, 1]`.

  prefix_match        the prediction (leading whitespace dropped) starts with an answer
                      (pass key / kv retrieval: the generated digits are the answer)
  exact_match         normalised prediction == normalised answer (SQuAD normalisation:
                      lower case, no punctuation/articles, single spaces)
  substring           some answer occurs in the prediction (case-insensitive)
  string_match_all    RULER: fraction of answers that occur in the prediction
  string_match_part   RULER: 1 if any answer occurs in the prediction
  qa_f1               LongBench / SQuAD token F1 (max over answers)
  rouge_l             ROUGE-L F-measure on whitespace tokens (LongBench's rouge_score
                      uses the `rouge` package's rouge-l f; this is the same LCS formula)
  classification      LongBench: 1 if the answer class occurs in the prediction, shared
                      among classes that occur (uses meta "all_classes" when given)
  retrieval           LongBench passage retrieval: the digits of "Paragraph N" match
  count               LongBench passage_count: fraction of numbers in the prediction
                      equal to the answer
  code_sim            LongBench code: difflib similarity of the first non-comment line
  choice              InfiniteBench multiple choice: the answer letter/option appears
"""

from __future__ import annotations

import collections
import difflib
import re
import string
from typing import Callable, Optional, Sequence

_PUNCT = set(string.punctuation)


def normalize(s: str) -> str:
  """SQuAD normalisation: lower, drop punctuation and articles, collapse whitespace."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def prefix_match(pred: str, answers: Sequence[str], **_) -> float:
  p = pred.lstrip()
  return float(any(a and p.startswith(a.strip()) for a in answers))


def exact_match(pred: str, answers: Sequence[str], **_) -> float:
  return float(any(normalize(pred) == normalize(a) for a in answers))


def substring(pred: str, answers: Sequence[str], **_) -> float:
  p = pred.lower()
  return float(any(a and a.lower() in p for a in answers))


def string_match_all(pred: str, answers: Sequence[str], **_) -> float:
  if not answers:
    return 0.0
  p = pred.lower()
  return sum(a.lower() in p for a in answers) / len(answers)


def string_match_part(pred: str, answers: Sequence[str], **_) -> float:
  return substring(pred, answers)


def _f1(pred_toks: list, gold_toks: list) -> float:
  common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
  same = sum(common.values())
  if same == 0:
    return 0.0
  p, r = same / len(pred_toks), same / len(gold_toks)
  return 2 * p * r / (p + r)


def qa_f1(pred: str, answers: Sequence[str], **_) -> float:
  return max((_f1(normalize(pred).split(), normalize(a).split()) for a in answers), default=0.0)


def _lcs(a: list, b: list) -> int:
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(pred: str, answers: Sequence[str], **_) -> float:
  best = 0.0
  p = pred.split()
  for a in answers:
    g = a.split()
    if not p or not g:
      continue
    lcs = _lcs(p, g)
    if lcs:
      prec, rec = lcs / len(p), lcs / len(g)
      best = max(best, 2 * prec * rec / (prec + rec))
  return best


def classification(pred: str, answers: Sequence[str], all_classes: Optional[Sequence[str]] = None,
                   **_) -> float:
  classes = list(all_classes or answers)
  hits = [c for c in classes if c in pred]
  hits = [c for c in hits if not any(c != o and c in o for o in hits)]  # drop substrings
  return max((1.0 / len(hits) if a in hits else 0.0 for a in answers), default=0.0) if hits \
      else 0.0


def retrieval(pred: str, answers: Sequence[str], **_) -> float:
  best = 0.0
  for a in answers:
    m = re.findall(r"\d+", a)
    if not m:
      continue
    nums = re.findall(r"\d+", pred)
    if nums:
      best = max(best, sum(n == m[0] for n in nums) / len(nums))
  return best


def count(pred: str, answers: Sequence[str], **_) -> float:
  nums = re.findall(r"\d+", pred)
  if not nums:
    return 0.0
  return max(sum(n == str(a).strip() for n in nums) / len(nums) for a in answers)


def code_sim(pred: str, answers: Sequence[str], **_) -> float:
  line = next((l for l in pred.lstrip("\n").split("\n")
               if l.strip() and not l.strip().startswith(("`", "#", "//"))), "")
  return max((difflib.SequenceMatcher(None, line, a).ratio() for a in answers), default=0.0)


def choice(pred: str, answers: Sequence[str], options: Optional[Sequence[str]] = None,
           **_) -> float:
  p = pred.strip()
  for a in answers:
    if options and a in options:
      letter = "ABCD"[list(options).index(a)] if list(options).index(a) < 4 else None
      if letter and re.match(rf"^\(?{letter}\b", p):
        return 1.0
    if a and a.lower() in p.lower():
      return 1.0
  return 0.0


METRICS: dict[str, Callable[..., float]] = {
    "prefix_match": prefix_match, "exact_match": exact_match, "substring": substring,
    "string_match_all": string_match_all, "string_match_part": string_match_part,
    "qa_f1": qa_f1, "rouge_l": rouge_l, "classification": classification,
    "retrieval": retrieval, "count": count, "code_sim": code_sim, "choice": choice,
}


def score(metric: str, pred: str, answers: Sequence[str], *, first_line: bool = False,
          **meta) -> float:
  """The named metric; extra keyword data (all_classes, options) is passed through.

  `first_line=True` scores only the prediction's first line after leading newlines, as
  LongBench's eval.py does for its few-shot sets (trec, triviaqa, samsum, lsht).
  """
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; known: {sorted(METRICS)}")
  if first_line:
    pred = pred.lstrip("\n").split("\n")[0]
  return float(METRICS[metric](pred, list(answers), **meta))
