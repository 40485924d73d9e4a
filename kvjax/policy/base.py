"""What policies see (RowView, PoolView), what they return (actions), and composition."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class RowView:
  """One engine row holding a request.

  Attributes:
    row: batch row index.
    request_id: the request's id.
    state: "prefilling" (prompt not fully in the cache) or "running" (decoding).
    tokens: tokens the row's cache holds (after eviction, fewer than `position`).
    position: the row's original sequence length (next token position).
    pages: pages the row's table points at.
    private_pages: pages only this row points at (what releasing it frees).
    admitted: admission order (larger = admitted later).
    compressions: times a press has compressed this row.
    just_prefilled: the prompt finished entering the cache in the last step.
  """

  row: int
  request_id: int
  state: str
  tokens: int
  position: int
  pages: int
  private_pages: int
  admitted: int
  compressions: int = 0
  just_prefilled: bool = False


@dataclasses.dataclass(frozen=True)
class PoolView:
  """The page pool (one layer's; every layer is the same) and the current need.

  Attributes:
    num_pages, page_size: pool geometry.
    free_pages: free pages now.
    needed: pages the pending step needs (0 outside on_pressure).
    rows: the rows holding requests (prefix rows excluded: policies never touch them).
  """

  num_pages: int
  page_size: int
  free_pages: int
  needed: int
  rows: tuple


@dataclasses.dataclass(frozen=True)
class Compress:
  """Compress `rows` with `press` (a kvjax press needing no observations)."""
  rows: tuple
  press: Any


@dataclasses.dataclass(frozen=True)
class SwapOut:
  """Swap `rows` out to host memory; `compress` = None (exact) or "int8"."""
  rows: tuple
  compress: Optional[str] = None


Action = Any  # Compress | SwapOut


def check_press(press) -> None:
  """Policies run presses without attention observations: reject presses that need them."""
  obs = getattr(press, "observe", None)
  if obs is None or not hasattr(press, "compress_model"):
    raise ValueError(f"{press!r} is not a kvjax press (needs observe and compress_model)")
  if obs.colsum or obs.queries:
    raise ValueError(f"{type(press).__name__} needs attention observations ({obs}); policies "
                     "compress between steps without them: use a query-agnostic press "
                     "(KnormPress, StreamingLLMPress, KeyDiffPress, RandomPress, ...)")


class Policy:
  """Base policy: does nothing (the engine then preempts by swapping as a last resort)."""

  def on_pressure(self, view: PoolView) -> list:
    del view
    return []

  def after_step(self, view: PoolView) -> list:
    del view
    return []


class Tiered(Policy):
  """On pressure the first policy that returns actions wins; after a step all run."""

  def __init__(self, policies: Sequence[Policy]):
    if not policies:
      raise ValueError("Tiered needs at least one policy")
    self.policies = tuple(policies)

  def on_pressure(self, view):
    for p in self.policies:
      acts = p.on_pressure(view)
      if acts:
        return acts
    return []

  def after_step(self, view):
    out = []
    for p in self.policies:
      out.extend(p.after_step(view))
    return out
