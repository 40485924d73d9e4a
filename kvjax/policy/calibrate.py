"""Calibration profiler: how much each technique hurts each layer (and kv head), on data.

    prof = profile(next_logits, cache, ["full", "snapkv@0.75", "int4", "knorm@0.5+int8"],
                   obs_list=obs, config=cfg, room=R, heads=True)
    stages = plan(prof, memory_budget=0.3)        # one stage label per layer, within budget
    best, kls = choose(prof, 0.3, evaluate)       # DP plan vs uniform plans, measured

`next_logits(model_cache) -> logits [N, V]` is any function of a cache (kvjax never imports
a model), e.g. the teacher-forced logits of a held-out continuation (or of task answers)
fed through `models.decode`, keeping only the valid positions. The reference is the
uncompressed cache (padded with the same room). Sensitivity of layer l to stage c is the
mean KL(p_full || p_c) when only layer l gets stage c (every other layer full); with
heads=True also when only kv head h of layer l gets it (the layer becomes a
kvjax.mixed.HeadSplitCache of untouched and converted heads), so retrieval heads show up
as the heads whose compression costs most (DuoAttention's observation, Xiao et al., 2024,
measured here by output KL rather than by learned gates).

Bytes are exact: the converted layer's bytes (every array, scales and positions included)
over the bf16 full cache of the same prompt tokens, as `fraction` (without the decode room,
which every technique adds alike; computed from shapes, nothing runs). `plan` solves the
multiple-choice knapsack min sum_l KL[c_l, l] s.t. mean_l fraction[c_l, l] <= budget
exactly, by dynamic programming
over discretised bytes (TailorKV-style per-layer assignment, KVTuner-style sensitivity;
kvjax.mixed.assign_budget is the greedy variant). Per-layer KLs are only approximately
additive, so `choose` also measures the real KL of the planned pipeline and of every uniform
plan that fits, and returns the best: on calibration data the result is never worse than
any single technique applied to every layer at the same budget.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as cache_lib
from kvjax import memory
from kvjax.policy.pipeline import AdaptivePipeline, Stage


class Profile(NamedTuple):
  """Calibration result.

  Attributes:
    names: candidate stage labels (C).
    kl: [C, L] mean KL(full || layer l alone converted).
    fraction: [C, L] converted layer bytes / bf16 full layer bytes of the same prompt
      tokens (no decode room: budgets are fractions of the context's cache).
    head_kl: [C, L, H] KL with only kv head h of layer l converted, or None.
  """

  names: tuple
  kl: np.ndarray
  fraction: np.ndarray
  head_kl: Optional[np.ndarray] = None

  def index(self, name: str) -> int:
    if name not in self.names:
      raise ValueError(f"stage {name!r} was not profiled; profiled: {self.names}")
    return self.names.index(name)

  def table(self) -> str:
    """Per-layer KL and byte fraction of every candidate, as text."""
    n_layers = self.kl.shape[1]
    w = max(len(n) for n in self.names)
    head = f"{'stage':<{w}}  " + "  ".join(f"L{l} KL (bytes)".rjust(16) for l in range(n_layers))
    lines = [head, "-" * len(head)]
    for i, n in enumerate(self.names):
      cells = [f"{self.kl[i, l]:.4f} ({self.fraction[i, l]:.2f})".rjust(16)
               for l in range(n_layers)]
      lines.append(f"{n:<{w}}  " + "  ".join(cells))
    if self.head_kl is not None:
      lines.append("per-head KL (layer: head values), stage by stage:")
      for i, n in enumerate(self.names):
        rows = "; ".join(f"L{l}: " + " ".join(f"{x:.4f}" for x in self.head_kl[i, l])
                         for l in range(n_layers))
        lines.append(f"  {n:<{w}}  {rows}")
    return "\n".join(lines)


def kl_divergence(p_logits, q_logits) -> float:
  """Mean over rows of KL(softmax(p) || softmax(q)), float32."""
  lp = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), axis=-1)
  lq = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), axis=-1)
  return max(0.0, float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1))))


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)   # next_logits may donate its argument


def _heads_slice(layer, a, b):
  return jax.tree.map(lambda x: x[:, a:b], layer)


def _one_head(base_layer, conv_layer, h):
  """Layer whose kv head h comes from conv_layer, the others from base_layer."""
  from kvjax import mixed  # pylint: disable=import-outside-toplevel
  n = base_layer.lengths.shape[-1]
  parts = []
  if h > 0:
    parts.append(_heads_slice(base_layer, 0, h))
  parts.append(_heads_slice(conv_layer, h, h + 1))
  if h + 1 < n:
    parts.append(_heads_slice(base_layer, h + 1, n))
  return mixed.HeadSplitCache.from_parts(parts)


def layer_fractions(pipeline: AdaptivePipeline, model_cache: cache_lib.ModelCache,
                    obs_list=None, config=None, *, prompt_length: Optional[int] = None,
                    tokens: Optional[int] = None) -> np.ndarray:
  """[L] bytes of each layer after `pipeline` (no decode room) over a bf16 full layer of
  `tokens` tokens (default: the longest row's next_position). Shapes only: nothing is run."""
  out = jax.eval_shape(lambda c, o: pipeline.compress_model(c, o, config, room=0,
                                                            prompt_length=prompt_length),
                       model_cache, obs_list)
  t = int(np.max(np.asarray(model_cache.next_position))) if tokens is None else int(tokens)
  fr = []
  for layer in out.layer_structs():
    b, h = layer.length.shape
    d, dv = layer.head_dims
    fr.append(cache_lib.tree_nbytes(layer) / memory.dense_bf16_bytes(b, h, t, d, dv))
  return np.asarray(fr)


def profile(next_logits: Callable, model_cache: cache_lib.ModelCache,
            candidates: Sequence[Stage | str], *, obs_list=None, config=None, room: int = 0,
            prompt_length: Optional[int] = None, heads: bool = False) -> Profile:
  """Measures every candidate stage at every layer (and kv head, with heads=True).

  Args:
    next_logits: fn(ModelCache) -> logits [N, V] (called 1 + C*L (+ C*L*H) times, each on a
      fresh copy).
    model_cache: the full-precision cache of the calibration prompts.
    candidates: stages or stage names ('full', 'snapkv@0.5', 'int4', 'knorm@0.5+int8').
    obs_list: the prefill's per-layer observations (the candidates' presses need them).
    config: model config (num_layers, rope).
    room: free slots each converted cache keeps for what next_logits feeds (not counted
      in `fraction`, which is of the prompt's tokens, as budgets are).
    prompt_length: static prompt length (press checks).
    heads: also measure each kv head alone.
  """
  stages = [Stage.parse(c) if isinstance(c, str) else c for c in candidates]
  names = tuple(s.label for s in stages)
  if len(set(names)) != len(names):
    raise ValueError(f"candidates repeat a stage: {names}")
  n = model_cache.num_layers
  full = AdaptivePipeline.uniform(Stage(), n)
  base_cache = full.compress_model(_copy(model_cache), obs_list, config, room=room,
                                   prompt_length=prompt_length)
  base = next_logits(_copy(base_cache))
  base_layers = base_cache.layers()
  h = int(base_layers[0].lengths.shape[-1])
  kl = np.zeros((len(stages), n))
  frac = np.zeros((len(stages), n))
  head_kl = np.zeros((len(stages), n, h)) if heads else None
  for ci, st in enumerate(stages):
    for li in range(n):
      plan_ = [Stage()] * n
      plan_[li] = st
      pipe = AdaptivePipeline(tuple(plan_))
      frac[ci, li] = layer_fractions(pipe, model_cache, obs_list, config,
                                     prompt_length=prompt_length)[li]
      conv = pipe.compress_model(_copy(model_cache), obs_list, config, room=room,
                                 prompt_length=prompt_length)
      kl[ci, li] = kl_divergence(base, next_logits(_copy(conv)))
      if heads:
        conv_layer = conv.layers()[li]
        for hi in range(h):
          layers = list(base_layers)
          layers[li] = _one_head(base_layers[li], conv_layer, hi)
          mc = cache_lib.ModelCache.from_layers([_copy(c) for c in layers],
                                                jnp.copy(model_cache.next_position))
          head_kl[ci, li, hi] = kl_divergence(base, next_logits(mc))
  return Profile(names, kl, frac, head_kl)


def _fits(fraction_sum, n, budget, slack=0.0):
  return fraction_sum <= budget * n * (1 + slack) + 1e-9


def plan(prof: Profile, memory_budget: float, *, allowed: Optional[Sequence[str]] = None,
         resolution: float = 1e-3, slack: float = 0.0) -> tuple:
  """One stage label per layer minimising summed KL with mean byte fraction <= budget.

  The multiple-choice knapsack is solved exactly by dynamic programming over bytes
  discretised to `resolution` of a layer's bf16 bytes (fractions rounded up, so a plan never
  exceeds the budget * (1 + slack)). Raises ValueError when even the cheapest stage of
  every layer exceeds it.
  """
  if not 0 < memory_budget <= 1:
    raise ValueError(f"memory_budget={memory_budget!r}; must be in (0, 1]")
  if not 0 < resolution <= 0.1:
    raise ValueError(f"resolution={resolution!r}; must be in (0, 0.1]")
  idx = list(range(len(prof.names))) if allowed is None else [prof.index(a) for a in allowed]
  kl, fr = prof.kl[idx], prof.fraction[idx]
  c, n = kl.shape
  w = np.ceil(fr / resolution - 1e-9).astype(np.int64)             # [C, L] units
  cap = int(np.floor(memory_budget * (1 + slack) * n / resolution + 1e-9))
  if int(w.min(0).sum()) > cap:
    raise ValueError(f"memory_budget={memory_budget} is below the cheapest plan "
                     f"({fr.min(0).sum() / n:.3f} of the bf16 full cache: every layer at its "
                     "cheapest stage)")
  best = np.full(cap + 1, np.inf)     # best[u]: least KL of the layers so far in <= u units
  best[:] = 0.0
  picks = []
  for l in range(n):
    new = np.full(cap + 1, np.inf)
    arg = np.zeros(cap + 1, np.int64)
    for j in range(c):
      if w[j, l] > cap:
        continue
      cand = np.full(cap + 1, np.inf)
      cand[w[j, l]:] = best[:cap + 1 - w[j, l]] + kl[j, l]
      better = cand < new
      new[better] = cand[better]
      arg[better] = j
    picks.append(arg)
    best = new
  u = cap
  choice = [0] * n
  for l in range(n - 1, -1, -1):
    j = int(picks[l][u])
    choice[l] = j
    u -= int(w[j, l])
  return tuple(prof.names[idx[j]] for j in choice)


def choose(prof: Profile, memory_budget: float, evaluate: Callable[[AdaptivePipeline], float],
           *, allowed: Optional[Sequence[str]] = None, name: str = "adaptive",
           slack: float = 0.01) -> tuple[AdaptivePipeline, dict]:
  """The best of the planned pipeline and every uniform plan that fits, by measured KL.

  Args:
    evaluate: fn(pipeline) -> KL on calibration data (lower is better).
    allowed: restrict to these profiled stage labels.
    slack: byte fractions may exceed the budget by this relative amount (token rounding
      and the rows' ragged lengths move a technique sized for the budget by a hair).

  Returns: (pipeline named `name`, {candidate label: measured KL}).
  """
  names = list(prof.names if allowed is None else allowed)
  n = prof.kl.shape[1]
  cands = {}
  try:
    planned = plan(prof, memory_budget, allowed=names, slack=slack)
    cands["[" + ", ".join(planned) + "]"] = planned
  except ValueError:
    pass
  for s in names:
    i = prof.index(s)
    if _fits(float(prof.fraction[i].sum()), n, memory_budget, slack):
      cands.setdefault("[" + ", ".join([s] * n) + "]", (s,) * n)
  if not cands:
    raise ValueError(f"memory_budget={memory_budget}: no profiled stage fits (allowed: {names})")
  kls = {label: evaluate(AdaptivePipeline(stages)) for label, stages in cands.items()}
  best = min(kls, key=kls.get)
  return AdaptivePipeline(cands[best], name=name), kls


def head_scores(prof: Profile, stage: str) -> tuple:
  """[L][Hkv] per-head sensitivity to `stage` (needs heads=True), as nested tuples: e.g.
  DuoAttentionPress(head_scores=head_scores(prof, 'streaming_llm@0.9')) keeps the heads
  that streaming hurts most as retrieval heads."""
  if prof.head_kl is None:
    raise ValueError("the profile has no per-head KL; run profile(..., heads=True)")
  return tuple(tuple(float(x) for x in row) for row in prof.head_kl[prof.index(stage)])
