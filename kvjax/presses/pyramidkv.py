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
saving is real (layers get different capacities, one compile per budget).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kvjax.presses import base, registry
from kvjax.presses.snapkv import SnapKVPress


def pyramid_keep(length: int, ratio: float, window_size: int, beta: float, layer_idx: int,
                 num_layers: int) -> int:
  """kvpress's PyramidKV layer budget for a row of `length` valid slots."""
  max_capacity = window_size + length * (1 - ratio)
  min_num = (max_capacity - window_size) / beta
  max_num = (max_capacity - window_size) * 2 - min_num
  if max_num >= length - window_size:
    max_num = length - window_size
    min_num = (max_capacity - window_size) * 2 - max_num
  if not length >= max_num >= min_num >= window_size:
    return int(round(length * (1 - ratio)))
  steps = (max_num - min_num) / max(num_layers - 1, 1)
  return int(round(max_num - layer_idx * steps))


@registry.register("pyramidkv", query_agnostic=False, needs=("colsum",))
@dataclasses.dataclass(frozen=True)
class PyramidKVPress(SnapKVPress):
  """SnapKV scores with pyramid per-layer budgets.

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
    return self.budget is not None  # the pyramid differs per layer

  def keep_table(self, capacity, ctx):
    if self.budget is not None:
      return base.budget_table(capacity, self.budget)
    if self.compression_ratio == 0:
      return np.arange(capacity + 1, dtype=np.int32)
    return np.array([
        min(l, max(0, pyramid_keep(l, self.compression_ratio, self.window_size, self.beta,
                                   ctx.layer_idx, ctx.num_layers)))
        for l in range(capacity + 1)], np.int32)
