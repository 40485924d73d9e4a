"""Strategy switching by context length: the press a prompt gets depends on how long it is.

Short contexts are cheap and sensitive (every token may matter), long ones dominate memory
and tolerate eviction better (Li et al., 2024, "SnapKV"; kvpress benchmarks): so a prompt of
L tokens gets the press of the first rule with L <= max_len, applied once, right after the
prompt is in the cache (query-agnostic: before the answer is generated).

    LengthAdaptive(((512, None), (4096, KnormPress(0.25)), (None, KnormPress(0.5))))
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from kvjax.policy import base


class LengthAdaptive(base.Policy):
  """rules: ((max_len | None, press | None), ...) with ascending max_len; None = no limit."""

  def __init__(self, rules: Sequence[tuple[Optional[int], Any]]):
    if not rules:
      raise ValueError("LengthAdaptive needs at least one (max_len, press) rule")
    last = -1
    for i, (n, press) in enumerate(rules):
      if n is None and i != len(rules) - 1:
        raise ValueError("only the last rule may have max_len=None")
      if n is not None:
        if n <= last:
          raise ValueError(f"rule max_len values must increase; got {[r[0] for r in rules]}")
        last = n
      if press is not None:
        base.check_press(press)
    self.rules = tuple(rules)

  def press_for(self, tokens: int):
    for n, press in self.rules:
      if n is None or tokens <= n:
        return press
    return None

  def after_step(self, view):
    groups = {}
    for r in view.rows:
      if r.just_prefilled:
        press = self.press_for(r.tokens)
        if press is not None:
          groups.setdefault(press, []).append(r.row)
    return [base.Compress(tuple(rows), press) for press, rows in groups.items()]
