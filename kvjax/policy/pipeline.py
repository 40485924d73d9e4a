"""Multi-stage pipelines with a technique per layer: evict, then quantize, layer by layer.

A *stage* is one layer's technique: an optional eviction press followed by an optional
quantized kind ("full" = neither). Names follow experiments.compare's labels:

    "full"   "snapkv@0.75" (press @ fraction removed)   "int4"   "snapkv@0.5+int8"

An `AdaptivePipeline` holds one stage per layer and is press-like (`observe`,
`compress_model(cache, obs, config, room=...)`, `validate`), so `models.prefill(press=...)`,
`kvjax.generate(press=...)` and the experiments harness take it as they take a press. The
per-layer choice comes from a calibration profile (kvjax.policy.calibrate) under a memory
budget, in the spirit of TailorKV (Yao et al., 2025: quantization-friendly vs
sparsity-friendly layers) and mixed-precision KV work; `single_at_budget` configures one
technique for every layer at the same budget, the baseline a pipeline must beat.

Budgets are fractions of a bf16 full cache holding the same tokens (kvjax.memory's
reference: keys, values and int32 positions). A press alone keeps that fraction of the
tokens; a quantized kind alone costs bytes_per_token(kind) / bytes_per_token(bf16) and is
infeasible above the budget; press + kind keeps the fraction that fits
(kvjax.mixed.budget_split).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

from kvjax import presses as press_lib
from kvjax.observation import Observe

QUANTS = ("int8", "int4", "int2", "kivi4", "kivi2", "fp8_e4m3", "fp8_e5m2")
# Single-technique families (a press, a kind, or press+kind), as single_at_budget takes them.
FULL = "full"


def press_names() -> tuple:
  """Presses a pipeline stage may use: every press in kvjax.presses.registry whose needs a
  prefill provides (observations, RoPE, the KVzip reconstruction, o_proj). Stages whose
  observation requests conflict (H2O's all-query colsum vs SnapKV's window) are rejected
  when the pipeline is built."""
  from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
  return registry.names(provides=registry.PREFILL_PROVIDES)


def __getattr__(name):
  if name == "PRESSES":   # computed on access: presses registered later are listed too
    return press_names()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_press(name: str, ratio: float):
  """A press by name with compression_ratio=ratio (fraction of tokens removed)."""
  from kvjax.presses import registry  # pylint: disable=import-outside-toplevel
  allowed = press_names()
  if name not in allowed:
    raise ValueError(f"press={name!r}; allowed: {allowed}")
  return registry.make(name, float(ratio))


@dataclasses.dataclass(frozen=True)
class Stage:
  """One layer's technique: press `press`@`ratio` (or none), then quantized kind `quant`."""

  press: Optional[str] = None
  ratio: float = 0.0
  quant: Optional[str] = None

  def __post_init__(self):
    if self.press is not None and self.press not in press_names():
      raise ValueError(f"press={self.press!r}; allowed: {press_names()} or None")
    if self.quant is not None and self.quant not in QUANTS:
      raise ValueError(f"quant={self.quant!r}; allowed: {QUANTS} or None")
    if self.press is not None and not 0 < self.ratio < 1:
      raise ValueError(f"ratio={self.ratio!r}; a press needs a fraction removed in (0, 1)")
    if self.press is None and self.ratio:
      raise ValueError(f"ratio={self.ratio!r} without a press")

  @classmethod
  def parse(cls, name: str) -> "Stage":
    """'full' | '<press>@<ratio>' | '<quant>' | '<press>@<ratio>+<quant>'."""
    name = name.strip()
    if name == FULL:
      return cls()
    head, _, quant = name.partition("+")
    if "@" not in head:
      if quant:
        raise ValueError(f"stage {name!r}: a press needs @<ratio>, e.g. snapkv@0.5+int8")
      return cls(quant=head)
    press, _, ratio = head.partition("@")
    try:
      r = float(ratio)
    except ValueError as e:
      raise ValueError(f"stage {name!r}: ratio {ratio!r} is not a number") from e
    return cls(press=press, ratio=r, quant=quant or None)

  @property
  def label(self) -> str:
    if self.press is None:
      return self.quant or FULL
    head = f"{self.press}@{self.ratio:g}"     # exact: ratios carry <= 6 decimals
    return f"{head}+{self.quant}" if self.quant else head

  @property
  def family(self) -> str:
    if self.press is None:
      return self.quant or FULL
    return f"{self.press}+{self.quant}" if self.quant else self.press

  def build_press(self):
    return None if self.press is None else make_press(self.press, self.ratio)


def layer_bytes(quant: Optional[str], tokens: int, head_dim: int, dtype="bfloat16") -> int:
  """Exact bytes one (row, kv head) of a layer holding `tokens` tokens takes (no room):
  a DenseKVCache of `dtype` (quant None) or a QuantizedKVCache of kind `quant`."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from kvjax import memory  # pylint: disable=import-outside-toplevel
  from kvjax.quant.cache import QuantizedKVCache  # pylint: disable=import-outside-toplevel
  from kvjax.quant.model import resolve_spec  # pylint: disable=import-outside-toplevel
  if quant is None:
    scale = jnp.dtype(dtype).itemsize / memory.BF16_BYTES
    kv = 2 * tokens * head_dim * memory.BF16_BYTES
    return int(kv * scale) + 4 * tokens + 4
  return QuantizedKVCache.init(1, 1, tokens, head_dim, resolve_spec(quant)).nbytes


def single_at_budget(family: str, memory_budget: float, head_dim: int, *,
                     tokens: Optional[int] = None, dtype="bfloat16") -> Optional[Stage]:
  """`family` ('snapkv', 'int4', 'snapkv+int8', 'full') configured to `memory_budget`.

  Args:
    family: a press, a kind, press+kind, or 'full'.
    memory_budget: fraction of the bf16 full cache, in (0, 1].
    head_dim: the model's.
    tokens: the context length the technique will see. Given, the configuration uses exact
      layer bytes at that length (fixed costs such as KIVI's full-precision residual window
      included, `dtype` the cache's full-precision dtype); else marginal bytes per token
      (kvjax.mixed.budget_split), which is exact only for long contexts.

  Returns None when the family cannot fit (a kind alone costing more than the budget, or
  full at a budget below 1).
  """
  from kvjax import mixed  # pylint: disable=import-outside-toplevel
  from kvjax import memory  # pylint: disable=import-outside-toplevel
  from kvjax.quant.model import resolve_spec  # pylint: disable=import-outside-toplevel
  if not 0 < memory_budget <= 1:
    raise ValueError(f"memory_budget={memory_budget!r}; must be in (0, 1]")
  if tokens is not None and (not isinstance(tokens, int) or tokens < 2):
    raise ValueError(f"tokens={tokens!r}; must be an int >= 2")
  if family == FULL:
    return Stage() if memory_budget >= 1 else None
  press, _, quant = family.partition("+")
  if press in QUANTS and not quant:
    press, quant = "", press
  if press and press not in press_names():
    raise ValueError(f"family={family!r}; allowed: 'full', a press {press_names()}, a kind "
                     f"{QUANTS}, or press+kind")
  if quant and quant not in QUANTS:
    raise ValueError(f"family={family!r}: kind {quant!r} not in {QUANTS}")
  if tokens is None:
    spec = resolve_spec(quant) if quant else None
    keep = mixed.budget_split(memory_budget, spec, head_dim)
    kept = None
  else:
    limit = memory_budget * memory.dense_bf16_bytes(1, 1, tokens, head_dim, head_dim)
    cost = lambda k: layer_bytes(quant or None, k, head_dim, dtype)  # noqa: E731
    if cost(tokens) <= limit:
      keep, kept = 1.0, tokens
    else:
      lo, hi = 0, tokens          # largest k with cost(k) <= limit (cost increases with k)
      while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= limit else (lo, mid)
      kept = lo
      keep = kept / tokens
  if not press:
    return Stage(quant=quant) if keep >= 1 else None
  if keep >= 1:
    return Stage(quant=quant or None) if quant else None   # nothing to evict
  if kept is not None:
    if kept < 1:
      return None
    ratio = math.ceil((1 - kept / tokens) * 1e6) / 1e6    # keeps int(T (1 - r)) <= kept
  else:
    ratio = round(1 - keep, 4)
  return Stage(press=press, ratio=ratio, quant=quant or None)


@dataclasses.dataclass(frozen=True)
class AdaptivePipeline:
  """A stage per layer, applied after the prompt (press-like; see the module docstring).

  Attributes:
    stages: one Stage per layer.
    name: a label for tables (default: the per-layer stage labels).
  """

  stages: tuple
  name: str = ""

  def __post_init__(self):
    stages = tuple(Stage.parse(s) if isinstance(s, str) else s for s in self.stages)
    if not stages:
      raise ValueError("stages must hold one Stage per layer; got none")
    for i, s in enumerate(stages):
      if not isinstance(s, Stage):
        raise ValueError(f"stages[{i}]={s!r} is not a Stage or a stage name")
    object.__setattr__(self, "stages", stages)
    self.observe  # conflicting observation requests fail here

  @classmethod
  def uniform(cls, stage: Stage | str, num_layers: int, name: str = "") -> "AdaptivePipeline":
    stage = Stage.parse(stage) if isinstance(stage, str) else stage
    return cls((stage,) * num_layers, name or stage.label)

  @property
  def label(self) -> str:
    return self.name or "[" + ", ".join(s.label for s in self.stages) + "]"

  @property
  def num_layers(self) -> int:
    return len(self.stages)

  @property
  def observe(self) -> Observe:
    need = Observe()
    for s in self.stages:
      p = s.build_press()
      if p is not None:
        need = need.merge(p.observe)
    return need

  def validate(self, *, capacity: int, prompt_length: Optional[int] = None,
               num_layers: Optional[int] = None) -> None:
    if num_layers is not None and num_layers != self.num_layers:
      raise ValueError(f"pipeline has {self.num_layers} stages; the model has {num_layers} "
                       "layers")
    for s in self.stages:
      p = s.build_press()
      if p is not None:
        p.validate(capacity=capacity, prompt_length=prompt_length, num_layers=num_layers)

  def compress_model(self, model_cache, obs_list: Optional[Sequence[dict]] = None,
                     config: Any = None, *, room: int = 0,
                     prompt_length: Optional[int] = None):
    """Evicts layer by layer, then quantizes; `room` free slots per layer for decode."""
    from kvjax.quant.model import quantize_model  # pylint: disable=import-outside-toplevel
    if model_cache.num_layers != self.num_layers:
      raise ValueError(f"pipeline has {self.num_layers} stages; the cache holds "
                       f"{model_cache.num_layers} layers")
    presses = [s.build_press() for s in self.stages]
    rooms = [0 if s.quant else room for s in self.stages]   # quantized layers: room after
    cache = model_cache
    if any(p is not None for p in presses) or any(rooms):
      cache = press_lib.compress_model(presses, model_cache, obs_list, config, rooms=rooms,
                                       prompt_length=prompt_length)
    if any(s.quant for s in self.stages):
      cache = quantize_model(cache, [s.quant for s in self.stages], room=room, config=config)
    return cache
