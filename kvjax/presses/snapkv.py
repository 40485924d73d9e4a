"""SnapKV: keep what the last queries attend to (Li et al., 2024, "SnapKV: LLM Knows What
You are Looking for Before Generation", arXiv:2404.14469).

Score = attention mass from the last `window_size` queries (the observation window) onto
each earlier slot, summed over the query heads of the kv group, then smoothed with a 1-D
average pool of width `kernel_size` (zero padding, divisor kernel_size, like torch's
avg_pool1d). The window's own slots are protected. The mass comes from the attention's
`colsum` output restricted to the window (`colsum_window`), so no S x S matrix exists.

Parameter names and defaults follow kvpress's SnapKVPress. Differences: kvpress averages
over queries and heads where this sums (same ranking); GQA groups are aggregated before
pooling (pooling is linear, so the same).

Evaluation note (docs/EVALUATION.md): at prefill the window is the end of the *context*
(query-agnostic); putting the question inside the window is the question-aware mode.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax.observation import Observe
from kvjax.presses import base, registry


def avg_pool_slots(x, kernel_size: int):
  """1-D average pool over the last axis, zero padding kernel_size // 2, same length."""
  if kernel_size == 1:
    return x
  p = kernel_size // 2
  summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, kernel_size), (1, 1, 1),
                                 ((0, 0), (0, 0), (p, p)))
  return summed / kernel_size


@registry.register("snapkv", query_agnostic=False, needs=("colsum",))
@registry.register("snapkv_cam", query_agnostic=False, needs=("colsum",),
                   defaults={"merge": "cam"},
                   summary="SnapKV with evicted values merged into kept ones (CaM)")
@dataclasses.dataclass(frozen=True)
class SnapKVPress(base.ScorerPress):
  """Observation-window attention + pooling.

  Attributes:
    window_size: last queries whose attention is observed; their slots are kept. 64.
    kernel_size: odd width of the average pool over slots. 5.
  """

  window_size: int = 64
  kernel_size: int = 5

  def __post_init__(self):
    super().__post_init__()
    base.check_nonneg_int("window_size", self.window_size, 1)
    base.check_nonneg_int("kernel_size", self.kernel_size, 1)
    if self.kernel_size % 2 == 0:
      raise ValueError(f"kernel_size={self.kernel_size}; must be odd (same-length pooling)")

  @property
  def observe(self) -> Observe:
    return Observe(colsum=True, colsum_window=self.window_size)

  def protected(self):
    return self.n_sink, max(self.protect_recent, self.window_size)

  def validate(self, *, capacity: int, prompt_length: Optional[int] = None,
               num_layers: Optional[int] = None) -> None:
    super().validate(capacity=capacity, prompt_length=prompt_length, num_layers=num_layers)
    limit = capacity if prompt_length is None else min(capacity, prompt_length)
    what = "cache capacity" if prompt_length is None else "prompt length"
    if self.window_size >= limit:
      raise ValueError(f"window_size={self.window_size} must be smaller than the {what} "
                       f"({limit}); allowed: 1..{limit - 1}")

  def score(self, cache, obs, ctx):
    del ctx
    s = cache.positions.shape[-1]
    slot = jnp.arange(s, dtype=jnp.int32)
    length = cache.lengths[..., None]
    outside = (slot < length - self.window_size) & (cache.positions >= 0)
    col = jnp.where(outside, obs["colsum"].astype(jnp.float32), 0.0)
    return avg_pool_slots(col, self.kernel_size)
