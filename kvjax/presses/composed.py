"""Composition: presses applied one after another on the same layer (kvpress's
ComposedPress). Slot-aligned observations (colsum) are re-aligned after every press, so a
later attention-based press scores the slots an earlier one kept; the room for decode is
added once, after the last press. The retained fraction is the product of the presses'.
"""

from __future__ import annotations

import dataclasses

from kvjax.observation import Observe
from kvjax.presses import base


@dataclasses.dataclass(frozen=True)
class ComposedPress(base.Press):
  """Presses applied in order.

  Attributes:
    presses: tuple of Press.
  """

  presses: tuple = ()

  def __post_init__(self):
    object.__setattr__(self, "presses", tuple(self.presses))
    if not self.presses:
      raise ValueError("ComposedPress needs at least one press")
    for i, p in enumerate(self.presses):
      if not isinstance(p, base.Press):
        raise ValueError(f"presses[{i}]={p!r} is not a Press")
    self.observe  # conflicting observation requests fail here, not inside jit

  @property
  def observe(self) -> Observe:
    need = Observe()
    for p in self.presses:
      need = need.merge(p.observe)
    return need

  @property
  def layer_invariant(self) -> bool:
    return all(p.layer_invariant for p in self.presses)

  @property
  def compression_ratio(self) -> float:
    kept = 1.0
    for p in self.presses:
      kept *= 1 - getattr(p, "compression_ratio", 0.0)
    return 1 - kept

  def layer_capacity(self, capacity, ctx=base.LayerContext()):
    for p in self.presses:
      capacity = p.layer_capacity(capacity, ctx)
    return capacity

  def with_budget(self, budget):
    *head, last = self.presses
    return ComposedPress(tuple(head) + (last.with_budget(budget),))

  def validate(self, *, capacity, prompt_length=None, num_layers=None):
    ctx = base.LayerContext(num_layers=num_layers or 1)
    for p in self.presses:
      p.validate(capacity=capacity, prompt_length=prompt_length, num_layers=num_layers)
      capacity = p.layer_capacity(capacity, ctx)
      prompt_length = None

  def compress_layer(self, cache, obs, ctx):
    n = len(self.presses)
    for i, p in enumerate(self.presses):
      room = ctx.room if i == n - 1 else 0
      cache, obs = p.compress_layer(cache, obs, dataclasses.replace(ctx, room=room))
    return cache, obs


def compose(*presses: base.Press) -> ComposedPress:
  """compose(p1, p2, ...): p1 first, then p2 on what p1 kept, ..."""
  return ComposedPress(tuple(presses))
