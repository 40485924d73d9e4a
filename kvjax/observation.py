"""What a forward pass reports per layer for presses (attention statistics, queries).

Presses declare what they need with an `Observe` (their `observe` attribute); the model
computes it inside attention (never as an S x S matrix) and hands each layer's dict to the
press: {"colsum": [B, Hkv, S] (aligned with the layer's cache slots),
        "queries": [B, Hq, W, D] last W valid queries, post-RoPE, zero-padded at the front}.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Observe:
  """Static request for per-layer observations.

  Attributes:
    colsum: attention probability mass per cache slot, summed over queries and the query
      heads of each kv group ([B, Hkv, S], float32).
    colsum_window: only the last `colsum_window` queries count (SnapKV's window).
    queries: keep the last `queries` query vectors (post-RoPE) [B, Hq, W, D].
  """

  colsum: bool = False
  colsum_window: Optional[int] = None
  queries: int = 0

  def merge(self, other: "Observe") -> "Observe":
    if self.colsum and other.colsum and self.colsum_window != other.colsum_window:
      raise ValueError(f"conflicting colsum_window requests: {self.colsum_window} vs "
                       f"{other.colsum_window}")
    return Observe(colsum=self.colsum or other.colsum,
                   colsum_window=self.colsum_window if self.colsum else other.colsum_window,
                   queries=max(self.queries, other.queries))
