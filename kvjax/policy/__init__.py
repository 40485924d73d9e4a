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

This is the "adaptive, multi-stage pipeline" that "KV Cache Optimization Strategies for
Scalable and Efficient LLM Inference" (arXiv:2603.20397) calls for: eviction, then
offload, chosen at run time from memory pressure and context length.

Before run time (each one file):
  pipeline   Stage (one layer's technique: press@ratio, then a quantized kind) and
             AdaptivePipeline (a stage per layer; press-like, so models.prefill(press=...)
             and the experiments harness take it); single_at_budget configures one
             technique for a memory budget.
  calibrate  the profiler: per-layer (and per-kv-head) KL of every candidate stage on
             calibration data, exact byte fractions; plan / choose pick a stage per layer
             under a budget.
  recommend  recommend(scenario, memory_budget, ...) for the seven deployment scenarios of
             arXiv:2603.20397, verified on the user's model through a harness callback
             (experiments.bench_policy.recommend_on_model wires the experiments harness).
"""

from kvjax.policy.base import Action, Compress, Policy, PoolView, RowView, SwapOut, Tiered
from kvjax.policy.length import LengthAdaptive
from kvjax.policy.pressure import CompressOnPressure, SwapOnPressure
from kvjax.policy import calibrate
from kvjax.policy.calibrate import Profile, choose, plan, profile
from kvjax.policy.pipeline import AdaptivePipeline, Stage, single_at_budget
from kvjax.policy.recommend import (SCENARIOS, Plan, Recommendation, Scenario, recommend,
                                    scenario_stages)

NAMES = ("none", "swap", "swap_int8", "compress", "length")


def press_names() -> tuple:
  """Presses a runtime policy can run: query-agnostic and needing nothing but the cache
  (policies compress between engine steps, without observations or a model forward), read
  from kvjax.presses.registry so a newly registered press is listed here too."""
  from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
  return registry.names(query_agnostic=True, provides=())


def make_press(name: str, ratio: float):
  """A press from press_names() (kvjax.presses.registry), with compression_ratio=ratio."""
  from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
  allowed = press_names()
  if name not in allowed:
    raise ValueError(f"press={name!r}; allowed: {allowed}")
  return registry.make(name, ratio)


def __getattr__(name):
  if name == "PRESSES":   # computed on access: presses registered later are listed too
    return press_names()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def from_name(name: str, *, press: str = "knorm", ratio: float = 0.5,
              threshold: int = 256) -> Policy:
  """A policy by name (the launchers' --policy flag).

  none: the engine's fallback only (swap the latest request); swap / swap_int8:
  SwapOnPressure exact / int8; compress: CompressOnPressure(press, min_tokens=threshold//4)
  then swap; length: LengthAdaptive (prompts longer than `threshold` get the press) + swap.
  """
  if name == "none":
    return Policy()
  if name == "swap":
    return SwapOnPressure()
  if name == "swap_int8":
    return SwapOnPressure(compress="int8")
  if name == "compress":
    return CompressOnPressure(make_press(press, ratio), min_tokens=max(threshold // 4, 1))
  if name == "length":
    return Tiered([LengthAdaptive(((threshold, None), (None, make_press(press, ratio)))),
                   SwapOnPressure()])
  raise ValueError(f"policy={name!r}; allowed: {NAMES}")


__all__ = ["Action", "Compress", "SwapOut", "Policy", "PoolView", "RowView", "Tiered",
           "SwapOnPressure", "CompressOnPressure", "LengthAdaptive", "from_name",
           "make_press", "press_names", "NAMES", "PRESSES", "calibrate", "Profile", "profile",
           "plan", "choose", "AdaptivePipeline", "Stage", "single_at_budget", "SCENARIOS", "Scenario",
           "Plan", "Recommendation", "recommend", "scenario_stages"]
