"""Adaptive cache policies: runtime decisions over a paged serving engine (kvjax.engine).

A policy looks at the engine's rows (tokens held, pages, state) and the page pool, and
returns *actions* the engine applies: compress some rows with a press, or swap some rows
out to host memory (kvjax.offload). Two hooks:

  on_pressure(view)  the next step needs more pages than are free: free some
  after_step(view)   after every step: e.g. compress a prompt once it is in the cache

Policies (each one file):
  SwapOnPressure     vLLM-style preemption: swap out the most recently admitted rows
                     (optionally int8-compressed on the way out).
  CompressOnPressure evict with a press (query-agnostic, e.g. KnormPress) from the longest
                     rows first, down to a floor; then hand over to another policy.
  LengthAdaptive     strategy switching by context length: short prompts stay exact,
                     longer ones get progressively stronger presses, applied right after
                     the prompt is prefilled.
  Tiered             first policy that acts wins on pressure; all run after each step.

This is the "adaptive, multi-stage pipeline" the surveys in ../shared/seeds call for:
eviction, then offload, chosen at run time from memory pressure and context length.
"""

from kvjax.policy.base import Action, Compress, Policy, PoolView, RowView, SwapOut, Tiered
from kvjax.policy.length import LengthAdaptive
from kvjax.policy.pressure import CompressOnPressure, SwapOnPressure

__all__ = ["Action", "Compress", "SwapOut", "Policy", "PoolView", "RowView", "Tiered",
           "SwapOnPressure", "CompressOnPressure", "LengthAdaptive"]
