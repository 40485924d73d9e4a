"""Per-layer budgets and per-layer press maps.

`PerLayerCompressionPress(press, compression_ratios)`: one scorer, a compression ratio per
layer (kvpress's PerLayerCompressionPress; there it masks, here each layer really gets its
own static capacity).

`PerLayerPress(presses)`: a different press (or None = keep everything) per layer, e.g.
no compression in the first layers and SnapKV above. `per_layer({0: None, 3: p}, n,
default=q)` builds one from a dict.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from kvjax.observation import Observe
from kvjax.presses import base


@dataclasses.dataclass(frozen=True)
class PerLayerCompressionPress(base.Press):
  """A ScorerPress with a compression ratio per layer.

  Attributes:
    press: the scorer (its compression_ratio is replaced per layer).
    compression_ratios: one ratio in [0, 1) per layer.
  """

  press: base.ScorerPress = None
  compression_ratios: tuple = ()

  def __post_init__(self):
    if not isinstance(self.press, base.ScorerPress):
      raise ValueError(f"PerLayerCompressionPress(press=...) needs a ScorerPress; got "
                       f"{self.press!r}")
    object.__setattr__(self, "compression_ratios", tuple(float(r) for r in
                                                         self.compression_ratios))
    for i, r in enumerate(self.compression_ratios):
      base.check_ratio(f"compression_ratios[{i}]", r)

  @property
  def observe(self) -> Observe:
    return self.press.observe

  @property
  def compression_ratio(self) -> float:
    return sum(self.compression_ratios) / max(len(self.compression_ratios), 1)

  def layer_press(self, layer_idx: int) -> base.ScorerPress:
    return dataclasses.replace(self.press, compression_ratio=self.compression_ratios[layer_idx],
                               budget=None)

  def layer_capacity(self, capacity, ctx=base.LayerContext()):
    return self.layer_press(ctx.layer_idx).layer_capacity(capacity, ctx)

  def with_budget(self, budget):
    return self.press.with_budget(budget)

  def validate(self, *, capacity, prompt_length=None, num_layers=None):
    if num_layers is not None and len(self.compression_ratios) != num_layers:
      raise ValueError(f"compression_ratios has {len(self.compression_ratios)} entries; the "
                       f"model has num_layers={num_layers}")
    self.layer_press(0).validate(capacity=capacity, prompt_length=prompt_length)

  def compress_layer(self, cache, obs, ctx):
    self.validate(capacity=cache.positions.shape[-1], num_layers=ctx.num_layers)
    return self.layer_press(ctx.layer_idx).compress_layer(cache, obs, ctx)


@dataclasses.dataclass(frozen=True)
class PerLayerPress(base.Press):
  """A press per layer (None = keep everything, room still added).

  Attributes:
    presses: tuple with one Press or None per layer.
  """

  presses: tuple = ()

  def __post_init__(self):
    object.__setattr__(self, "presses", tuple(self.presses))
    for i, p in enumerate(self.presses):
      if p is not None and not isinstance(p, base.Press):
        raise ValueError(f"presses[{i}]={p!r} is not a Press or None")

  @property
  def observe(self) -> Observe:
    need = Observe()
    for p in self.presses:
      if p is not None:
        need = need.merge(p.observe)
    return need

  def layer_capacity(self, capacity, ctx=base.LayerContext()):
    p = self.presses[ctx.layer_idx]
    return capacity if p is None else p.layer_capacity(capacity, ctx)

  def with_budget(self, budget):
    return PerLayerPress(tuple(None if p is None else p.with_budget(budget)
                               for p in self.presses))

  def validate(self, *, capacity, prompt_length=None, num_layers=None):
    if num_layers is not None and len(self.presses) != num_layers:
      raise ValueError(f"PerLayerPress has {len(self.presses)} presses; the model has "
                       f"num_layers={num_layers}")
    for p in self.presses:
      if p is not None:
        p.validate(capacity=capacity, prompt_length=prompt_length, num_layers=num_layers)

  def compress_layer(self, cache, obs, ctx):
    if ctx.layer_idx >= len(self.presses):
      raise ValueError(f"PerLayerPress has {len(self.presses)} presses; layer "
                       f"{ctx.layer_idx} has none")
    p = self.presses[ctx.layer_idx]
    if p is None:
      return base.pad_room(cache, ctx.room), base.pad_obs_room(obs, ctx.room)
    return p.compress_layer(cache, obs, ctx)


def per_layer(presses: Mapping[int, Optional[base.Press]], num_layers: int,
              default: Optional[base.Press] = None) -> PerLayerPress:
  """PerLayerPress from {layer_index: press or None}; other layers get `default`."""
  for i in presses:
    if not 0 <= i < num_layers:
      raise ValueError(f"layer index {i} outside 0..{num_layers - 1}")
  return PerLayerPress(tuple(presses.get(i, default) for i in range(num_layers)))
