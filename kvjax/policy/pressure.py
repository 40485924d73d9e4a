"""Policies for memory pressure: preempt by swapping, or evict with a press first.

SwapOnPressure follows vLLM's preemption (Kwon et al., 2023): when the pool cannot hold the
next step, the most recently admitted requests are swapped out (here to host memory through
kvjax.offload, optionally int8-compressed) until the step fits; they resume, oldest first,
when pages free up. CompressOnPressure evicts instead (a press such as KNorm halves the
longest rows), which keeps every request running at some accuracy cost, and falls back to
another policy when rows are already at their floor.
"""

from __future__ import annotations

from typing import Optional

from kvjax.policy import base


class SwapOnPressure(base.Policy):
  """Swap out the latest-admitted rows until their private pages cover the shortfall.

  Args:
    compress: None (exact swap) or "int8" (quantized on the way out; lossy, 4x smaller
      for float32 pools, 2x for bf16).
  """

  def __init__(self, compress: Optional[str] = None):
    if compress not in (None, "int8"):
      raise ValueError(f"compress={compress!r}; allowed: (None, 'int8')")
    self.compress = compress

  def on_pressure(self, view):
    short = view.needed - view.free_pages
    picked, freed = [], 0
    for r in sorted(view.rows, key=lambda r: -r.admitted):
      if freed >= short:
        break
      if len(picked) == len(view.rows) - 1:
        break  # keep the oldest row running: it is the one that must finish
      picked.append(r.row)
      freed += r.private_pages
    return [base.SwapOut(tuple(picked), self.compress)] if picked else []


class CompressOnPressure(base.Policy):
  """Compress the longest rows (tokens >= min_tokens) with `press` until the need is met.

  Args:
    press: a query-agnostic kvjax press (e.g. KnormPress(compression_ratio=0.5)).
    min_tokens: rows shorter than this are never compressed (the floor).
    max_compressions: per-row limit (each pass compounds the loss).
    then: policy used when no row can be compressed (default: SwapOnPressure()).
  """

  def __init__(self, press, *, min_tokens: int = 16, max_compressions: int = 2,
               then: Optional[base.Policy] = None):
    base.check_press(press)
    ratio = getattr(press, "compression_ratio", None)
    if min_tokens < 1:
      raise ValueError(f"min_tokens={min_tokens}; must be >= 1")
    self.press, self.min_tokens, self.max_compressions = press, min_tokens, max_compressions
    self.ratio = ratio
    self.then = then if then is not None else SwapOnPressure()

  def _estimate(self, r, page_size):
    if not self.ratio:
      return 1
    keep = int(r.tokens * (1 - self.ratio))
    return max(0, r.pages - (-(-keep // page_size)))

  def on_pressure(self, view):
    short = view.needed - view.free_pages
    cand = [r for r in view.rows if r.state == "running" and r.tokens >= self.min_tokens
            and r.compressions < self.max_compressions]
    picked, freed = [], 0
    for r in sorted(cand, key=lambda r: -r.tokens):
      if freed >= short:
        break
      gain = self._estimate(r, view.page_size)
      if gain <= 0:
        continue
      picked.append(r.row)
      freed += gain
    if picked:
      return [base.Compress(tuple(picked), self.press)]
    return self.then.on_pressure(view)

  def after_step(self, view):
    return self.then.after_step(view)
