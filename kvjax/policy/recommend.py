"""`recommend(scenario, memory_budget, ...)`: a pipeline for a deployment scenario, verified.

The seven deployment scenarios of "KV Cache Optimization Strategies for Scalable and
Efficient LLM Inference" (arXiv:2603.20397) (primary constraint -> recommended family),
and what each maps to here:

  long_context        GPU memory capacity -> hybrid memory + aggressive compression:
                      strong eviction / low-bit kinds, and the layers streamed from host
                      memory (OffloadSpec(mode="stream"): the device holds prefetch + 1
                      layers' caches).
  high_throughput     memory bandwidth, throughput -> eviction + lightweight compression
                      (int8); at run time CompressOnPressure before preempting.
  edge                total memory, power -> heavy quantization (int4 / kivi2 / int2) and
                      eviction on top.
  multi_turn          cache reuse across turns -> conversation-aware eviction: query-
                      agnostic presses only (the next turn's question is unknown when the
                      cache is compressed); prefix sharing in the paged engine.
  accuracy_critical   minimal accuracy loss -> conservative compression (int8, mild
                      eviction) + selective offloading (exact streaming) for the rest.
  streaming           low latency -> recency: StreamingLLM (sinks + window), int8 on top.
  mixed               variable requirements -> the adaptive, multi-stage pipeline: every
                      family, per-layer choice from a calibration profile.

Without a profile the recommendation is the scenario's first family that fits the budget
(kvjax.policy.pipeline.single_at_budget), uniform over layers. With a profile
(kvjax.policy.calibrate.profile on the user's model) the per-layer plan is chosen among the
scenario's families (calibrate.choose). With `verify` (a callable running the user's model
through an evaluation harness, e.g. experiments.bench_policy.harness_verify) every
candidate is checked in order of preference until one loses no more than the scenario's
tolerance; the recommendation carries the measurements and whether it passed.

What is verified is the whole plan (`Plan`: the pipeline, the cache's placement and the
runtime policy), and a plan runs as it is verified: it is press-like (the pipeline, then
the compressed layers moved to host memory where the scenario streams them), and
`generate_kwargs()` / `prefill_kwargs()` hand it to kvjax.generate / models.prefill.
With `tokens`, a family whose press cannot run on a prompt of that length (SnapKV's
window as long as the prompt) is not a candidate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from kvjax.policy import calibrate
from kvjax.policy.pipeline import AdaptivePipeline, single_at_budget


@dataclasses.dataclass(frozen=True)
class Scenario:
  """A deployment scenario.

  Attributes:
    title, constraint, strategy: the survey's row.
    families: technique families in order of preference (single_at_budget names).
    tolerance: largest acceptable quality drop (verify's "quality_drop": relative
      perplexity increase or absolute accuracy drop, whichever is larger).
    offload: "stream" when the scenario puts the cache in host memory, else None.
    runtime: the kvjax.policy runtime policy name for the serving engine (from_name).
  """

  title: str
  constraint: str
  strategy: str
  families: tuple
  tolerance: float
  offload: Optional[str] = None
  runtime: str = "none"


SCENARIOS = {
    "long_context": Scenario(
        "Long-context single request", "GPU memory capacity",
        "hybrid memory, aggressive compression",
        ("snapkv+int4", "expected_attention+int4", "snapkv", "expected_attention", "kivi2",
         "int4", "snapkv+int8"), 0.10, offload="stream", runtime="swap_int8"),
    "high_throughput": Scenario(
        "High-throughput datacenter serving", "memory bandwidth, throughput",
        "eviction, lightweight compression",
        ("snapkv+int8", "knorm+int8", "snapkv", "knorm", "streaming_llm", "int8"), 0.05,
        runtime="compress"),
    "edge": Scenario(
        "Edge / mobile devices", "total memory, power",
        "heavy quantization, architectural changes",
        ("kivi2", "int4", "int2", "snapkv+int4", "knorm+int4", "snapkv+kivi2"), 0.15),
    "multi_turn": Scenario(
        "Multi-turn conversations", "cache reuse across turns", "conversation-aware eviction",
        ("expected_attention", "knorm", "keydiff", "streaming_llm", "knorm+int8",
         "expected_attention+int8"), 0.05, runtime="length"),
    "accuracy_critical": Scenario(
        "Accuracy-critical reasoning", "minimal accuracy loss",
        "conservative compression, selective offloading",
        ("int8", "snapkv+int8", "snapkv", "expected_attention", "kivi4", "int4"), 0.01,
        offload="stream", runtime="swap"),
    "streaming": Scenario(
        "Streaming applications", "low latency", "sliding window, recency-based eviction",
        ("streaming_llm", "streaming_llm+int8", "streaming_llm+int4"), 0.10),
    "mixed": Scenario(
        "Mixed workloads", "variable requirements", "adaptive, multi-stage pipelines",
        ("snapkv", "expected_attention", "knorm", "streaming_llm", "int8", "int4", "kivi2",
         "snapkv+int8", "expected_attention+int8", "snapkv+int4"), 0.05,
        runtime="compress"),
}


@dataclasses.dataclass(frozen=True)
class Plan:
  """One candidate plan: a pipeline, where its cache lives, and the serving policy.

  Press-like (`observe`, `validate`, `compress_model`), so an evaluation harness runs the
  whole plan where it runs a press: the pipeline compresses, then, with `offload` in
  stream mode, the layers move to host memory (a kvjax.offload.HostCache that
  models.decode streams through the device).

  Attributes:
    pipeline: the AdaptivePipeline.
    offload: kvjax.offload.OffloadSpec (mode "stream") or None (on device).
    runtime_policy: kvjax.policy.from_name name for the serving engine.
  """

  pipeline: AdaptivePipeline
  offload: Any = None
  runtime_policy: str = "none"

  @property
  def label(self) -> str:
    extra = [f"offload={self.offload.mode}"] if self.offload is not None else []
    if self.runtime_policy != "none":
      extra.append(f"runtime={self.runtime_policy}")
    return self.pipeline.label + (f" [{', '.join(extra)}]" if extra else "")

  @property
  def observe(self):
    return self.pipeline.observe

  def validate(self, **kw) -> None:
    self.pipeline.validate(**kw)

  def compress_model(self, model_cache, obs_list=None, config=None, *, room: int = 0,
                     prompt_length: Optional[int] = None):
    from kvjax import offload as offload_lib  # pylint: disable=import-outside-toplevel
    cache = self.pipeline.compress_model(model_cache, obs_list, config, room=room,
                                         prompt_length=prompt_length)
    if self.offload is None:
      return cache
    return offload_lib.HostCache.from_model_cache(cache, compress=self.offload.compress,
                                                  prefetch=self.offload.prefetch,
                                                  kind=self.offload.kind)

  def prefill_kwargs(self) -> dict:
    """models.prefill(model, tokens, **plan.prefill_kwargs(), ...)."""
    out = {"press": self.pipeline}
    if self.offload is not None:
      out["offload"] = self.offload
    return out

  def generate_kwargs(self) -> dict:
    """kvjax.generate(model, tokens, **plan.generate_kwargs(), ...)."""
    return self.prefill_kwargs()

  def runtime(self, **kw):
    """The runtime policy object (kvjax.policy.from_name(runtime_policy, **kw))."""
    from kvjax import policy  # pylint: disable=import-outside-toplevel
    return policy.from_name(self.runtime_policy, **kw)


@dataclasses.dataclass
class Recommendation:
  """What recommend returns.

  Attributes:
    scenario, memory_budget: the request.
    pipeline: the chosen AdaptivePipeline (press-like: models.prefill(press=...)).
    offload: kvjax.offload.OffloadSpec for the cache's placement, or None (on device).
    runtime_policy: kvjax.policy.from_name name for the serving engine.
    rationale: why, in words.
    tried: [(pipeline label, verification dict or None)] in the order tried.
    verification: the chosen pipeline's verification (None without verify).
    passed: verification within the scenario's tolerance (None without verify).

  `plan` is the whole recommendation as one Plan (what verify measured).
  """

  scenario: str
  memory_budget: float
  pipeline: AdaptivePipeline
  offload: Any
  runtime_policy: str
  rationale: str
  tried: list
  verification: Optional[dict] = None
  passed: Optional[bool] = None

  @property
  def plan(self) -> Plan:
    return Plan(self.pipeline, self.offload, self.runtime_policy)

  def __str__(self) -> str:
    s = SCENARIOS[self.scenario]
    lines = [f"scenario {self.scenario} ({s.title}; constraint: {s.constraint}) at "
             f"{self.memory_budget:g} of the bf16 full cache:",
             f"  pipeline: {self.pipeline.label} "
             f"(per layer: {', '.join(st.label for st in self.pipeline.stages)})",
             f"  offload: {self.offload}", f"  runtime policy: {self.runtime_policy}",
             f"  why: {self.rationale}"]
    if self.verification is not None:
      v = ", ".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}"
                    for k, x in self.verification.items())
      lines.append(f"  verified: {v} -> {'PASS' if self.passed else 'FAIL'} "
                   f"(tolerance {s.tolerance:g})")
    return "\n".join(lines)


def _sized(family, memory_budget, head_dim, tokens):
  """single_at_budget, or None where the family's kind does not apply to this head_dim
  (e.g. KIVI's 32-channel groups on head_dim 16)."""
  try:
    return single_at_budget(family, memory_budget, head_dim, tokens=tokens)
  except ValueError as e:
    if "must divide" in str(e):
      return None
    raise


def _runs_at(stage, tokens) -> bool:
  """The stage's press accepts a prompt of `tokens` tokens (None: any length)."""
  press = stage.build_press()
  if press is None or tokens is None:
    return True
  try:
    press.validate(capacity=tokens, prompt_length=tokens)
  except ValueError:
    return False
  return True


def _candidates(scenario: Scenario, memory_budget: float, num_layers: int, head_dim: int,
                profile: Optional[calibrate.Profile], evaluate, tokens) -> list:
  """[(pipeline, why)] in order of preference."""
  singles = []
  for fam in scenario.families:
    st = _sized(fam, memory_budget, head_dim, tokens)
    if st is not None and _runs_at(st, tokens) and all(st.label != s.label
                                                       for s, _ in singles):
      singles.append((st, fam))
  out = []
  if profile is not None:
    allowed = [n for n in profile.names
               if any(n == s.label for s, _ in singles) or n == "full"]
    if allowed:
      try:
        if evaluate is not None:
          pipe, kls = calibrate.choose(profile, memory_budget, evaluate, allowed=allowed,
                                       name=f"adaptive({scenario.strategy})")
          why = (f"calibrated per-layer plan, lowest measured KL among {len(kls)} plans "
                 f"({min(kls.values()):.4g})")
        else:
          pipe = AdaptivePipeline(calibrate.plan(profile, memory_budget, allowed=allowed),
                                  name=f"adaptive({scenario.strategy})")
          why = "calibrated per-layer plan (knapsack on per-layer KL)"
        out.append((pipe, why))
      except ValueError:
        pass   # nothing profiled fits: fall back to the scenario's singles
  for st, fam in singles:
    out.append((AdaptivePipeline.uniform(st, num_layers),
                f"{fam}: the scenario's preferred family that fits {memory_budget:g}"))
  return out


def recommend(scenario: str, memory_budget: float, *, num_layers: int, head_dim: int,
              profile: Optional[calibrate.Profile] = None,
              evaluate: Optional[Callable[[AdaptivePipeline], float]] = None,
              verify: Optional[Callable[[AdaptivePipeline], dict]] = None,
              max_tries: int = 3, tokens: Optional[int] = None) -> Recommendation:
  """A pipeline for `scenario` within `memory_budget`, verified when `verify` is given.

  Args:
    scenario: one of SCENARIOS.
    memory_budget: device KV bytes as a fraction of the bf16 full cache, in (0, 1].
    num_layers, head_dim: the model's (config.num_layers, config.head_dim).
    profile: a calibrate.Profile of the user's model (its candidates should include the
      scenario's families at this budget; see scenario_stages).
    evaluate: fn(pipeline) -> calibration KL, to pick among plans by measurement.
    verify: fn(plan) -> dict with "quality_drop" (and anything else to report); `plan` is
      a Plan (pipeline, offload, runtime policy), press-like, so the harness runs all of it.
    max_tries: candidates verified at most, in order of preference.
    tokens: typical context length: single techniques are sized by exact bytes at that
      length (pipeline.single_at_budget), else by marginal bytes per token.
  """
  from kvjax import offload as offload_lib  # pylint: disable=import-outside-toplevel
  if scenario not in SCENARIOS:
    raise ValueError(f"scenario={scenario!r}; allowed: {tuple(SCENARIOS)}")
  if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not (
      0 < memory_budget <= 1):
    raise ValueError(f"memory_budget={memory_budget!r}; must be in (0, 1] (a fraction of the "
                     "bf16 full cache)")
  if max_tries < 1:
    raise ValueError(f"max_tries={max_tries}; must be >= 1")
  sc = SCENARIOS[scenario]
  cands = _candidates(sc, float(memory_budget), num_layers, head_dim, profile, evaluate, tokens)
  if not cands:
    raise ValueError(f"memory_budget={memory_budget}: none of scenario {scenario!r}'s families "
                     f"{sc.families} fits; raise the budget")
  off = offload_lib.OffloadSpec(mode="stream") if sc.offload == "stream" else None
  tried = []
  if verify is None:
    pipe, why = cands[0]
    return Recommendation(scenario, float(memory_budget), pipe, off, sc.runtime,
                          f"{sc.strategy}: {why}", [(pipe.label, None)])
  best = None
  for pipe, why in cands[:max_tries]:
    v = dict(verify(Plan(pipe, off, sc.runtime)))
    if "quality_drop" not in v:
      raise ValueError("verify(plan) must return a dict with 'quality_drop'")
    tried.append((pipe.label, v))
    ok = v["quality_drop"] <= sc.tolerance
    if best is None or v["quality_drop"] < best[2]["quality_drop"]:
      best = (pipe, why, v, ok)
    if ok:
      best = (pipe, why, v, ok)
      break
  pipe, why, v, ok = best
  return Recommendation(scenario, float(memory_budget), pipe, off, sc.runtime,
                        f"{sc.strategy}: {why}", tried, v, ok)


def scenario_stages(memory_budget: float, head_dim: int, scenarios=None, *,
                    tokens: Optional[int] = None) -> list:
  """Stage labels of every scenario's families at this budget (what to profile)."""
  out = ["full"]
  for name in scenarios or SCENARIOS:
    for fam in SCENARIOS[name].families:
      st = _sized(fam, memory_budget, head_dim, tokens)
      if st is not None and st.label not in out:
        out.append(st.label)
  return out
