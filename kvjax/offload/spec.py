"""`OffloadSpec`: how a model's cache is held in host memory (`models.prefill(offload=...)`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from kvjax.offload.swap import COMPRESSIONS


STREAM, QUEST = "stream", "quest"
MODES = (STREAM, QUEST)


@dataclasses.dataclass(frozen=True)
class OffloadSpec:
  """How a model's cache is held in host memory (models.prefill(offload=...)).

  Attributes:
    mode: "stream": every layer's cache lives on the host (HostCache) and is streamed to
      the device layer by layer, `prefetch` layers ahead, during every forward pass; exact
      with compress=None. "quest": the prompt's keys/values live on the host in pages of
      `page_size` with per-page key bounds on the device (QuestCache); each decode step
      fetches the `top_k` pages per (row, kv head) with the largest bound, and attends to
      them plus a device window of the tokens decoded since (`room` slots).
    prefetch: stream: layers fetched ahead (int >= 0).
    compress: stream: None (bit-exact) or "int8" (quantized on the device before each
      write-back; error <= scale / 2 per entry, scale = max |x| / 127 per vector).
    page_size, top_k, room, keep_last: quest settings (keep_last forces the page with the
      latest prompt tokens in).
    kind: host memory kind (default: pinned_host where offered, else unpinned_host).
  """

  mode: str = STREAM
  prefetch: int = 1
  compress: Optional[str] = None
  page_size: int = 16
  top_k: int = 4
  room: int = 64
  keep_last: bool = True
  kind: Optional[str] = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r}; allowed: {MODES}")
    if self.compress not in COMPRESSIONS:
      raise ValueError(f"compress={self.compress!r}; allowed: {COMPRESSIONS}")
    for name, lo in (("prefetch", 0), ("page_size", 1), ("top_k", 1), ("room", 1)):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name}={v!r}; must be an int >= {lo}")
    if self.mode == QUEST and self.compress is not None:
      raise ValueError(f"compress={self.compress!r} applies to mode='stream' only; quest "
                       "pages move exactly")
    if self.kind not in (None, "pinned_host", "unpinned_host"):
      raise ValueError(f"kind={self.kind!r}; allowed: None, 'pinned_host', 'unpinned_host'")
