"""PyramidKV: layer-wise pyramid budgets (Cai et al., 2024, "PyramidKV: Dynamic KV Cache
Compression based on Pyramidal Information Funneling", arXiv:2406.02069).

Lower layers keep more slots, higher layers fewer, with the same total as a uniform
`compression_ratio`; slots are chosen by SnapKV scores. The per-layer budget is kvpress's
PyramidKVPress.get_layer_budget (itself from KVCache-Factory), evaluated for every valid
length L so ragged rows get their own budgets:

  max_capacity = window_size + L * (1 - ratio)
  min_num = (max_capacity - window_size) / beta
  max_num = 2 * (max_capacity - window_size) - min_num   (capped at L - window_size)
  keep(layer) = round(max_num - layer * (max_num - min_num) / (num_layers - 1))
  (falls back to round(L * (1 - ratio)) when the pyramid does not fit)

Each layer's static capacity is its own budget at the full capacity, so the per-layer
saving is real (layers get different capacities, one compile per budget). An absolute
`budget=N` (decode-time compression uses one, `with_budget`) is the pyramid's mean, so
decode-time PyramidKV stays a pyramid. `PyramidBudgetPress(press)` puts any scorer under
the same rule.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from kvjax.presses import base, registry
from kvjax.presses.snapkv import SnapKVPress


def pyramid_keep(length: int, ratio: float, window_size: int, beta: float, layer_idx: int,
                 num_layers: int) -> int:
  """kvpress's PyramidKV layer budget for a row of `length` valid slots."""
  return pyramid_keep_mean(length, length * (1 - ratio), window_size, beta, layer_idx,
                           num_layers)


def pyramid_keep_mean(length: int, mean_keep: float, window_size: int, beta: float,
                      layer_idx: int, num_layers: int) -> int:
  """The pyramid budget of layer `layer_idx` whose mean over layers is `mean_keep` slots
  (kvpress's formula with max_capacity = window_size + mean_keep), for a row of `length`
  valid slots; round(mean_keep) when the pyramid does not fit."""
  max_capacity = window_size + mean_keep
  min_num = (max_capacity - window_size) / beta
  max_num = (max_capacity - window_size) * 2 - min_num
  if max_num >= length - window_size:
    max_num = length - window_size
    min_num = (max_capacity - window_size) * 2 - max_num
  if not length >= max_num >= min_num >= window_size:
    return int(round(mean_keep))
  steps = (max_num - min_num) / max(num_layers - 1, 1)
  return int(round(max_num - layer_idx * steps))


def pyramid_table(capacity: int, ratio: float, budget: Optional[int], window_size: int,
                  beta: float, ctx: base.LayerContext) -> np.ndarray:
  """keep[L] for L = 0..capacity of layer ctx.layer_idx: the pyramid around the uniform
  rule's mean (L * (1 - ratio), or min(L, budget) for an absolute budget)."""
  if budget is None and ratio == 0:
    return np.arange(capacity + 1, dtype=np.int32)
  mean = (lambda l: min(l, budget)) if budget is not None else (lambda l: l * (1 - ratio))
  return np.array([
      min(l, max(0, pyramid_keep_mean(l, mean(l), window_size, beta, ctx.layer_idx,
                                      ctx.num_layers)))
      for l in range(capacity + 1)], np.int32)


@registry.register("pyramidkv", query_agnostic=False, needs=("colsum",))
@dataclasses.dataclass(frozen=True)
class PyramidKVPress(SnapKVPress):
  """SnapKV scores with pyramid per-layer budgets (a ratio or an absolute mean budget).

  Attributes:
    beta: steepness of the pyramid (>= 1); default 20 (kvpress).
  """

  beta: int = 20

  def __post_init__(self):
    super().__post_init__()
    if not self.beta >= 1:
      raise ValueError(f"beta={self.beta}; must be >= 1")

  @property
  def layer_invariant(self) -> bool:
    return False  # the pyramid differs per layer, for a ratio and for a budget alike

  def keep_table(self, capacity, ctx):
    return pyramid_table(capacity, self.compression_ratio, self.budget, self.window_size,
                         self.beta, ctx)


@dataclasses.dataclass(frozen=True)
class PyramidBudgetPress(base.ScorerWrapperPress):
  """The pyramid budget rule over any scorer (its ratio or budget sets the mean).

  Attributes:
    press: the scorer (a ScorerPress, or a scorer wrapper such as ChunkKVPress).
    beta: steepness (>= 1). 20.
    window_size: the pyramid's window term (kvpress's PyramidKV window). 64.
  """

  press: base.ScorerPress = None
  beta: int = 20
  window_size: int = 64

  def __post_init__(self):
    self._check_scorer()
    if not self.beta >= 1:
      raise ValueError(f"beta={self.beta}; must be >= 1")
    base.check_nonneg_int("window_size", self.window_size)

  @property
  def layer_invariant(self) -> bool:
    return False

  def keep_table(self, capacity, ctx):
    p = self.press
    return pyramid_table(capacity, p.compression_ratio, getattr(p, "budget", None),
                         self.window_size, self.beta, ctx)

  def layer_capacity(self, capacity, ctx=base.LayerContext()):
    return max(1, int(self.keep_table(capacity, ctx).max()))

  def compress_layer(self, cache, obs, ctx):
    return base.compress_with_table(self, cache, obs, ctx, self.keep_table(
        cache.positions.shape[-1], ctx))
