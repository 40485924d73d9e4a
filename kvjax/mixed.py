"""Mixed compression: per-layer kinds chosen under a memory budget, and evict-then-quantize.

Per-layer sensitivity (TailorKV, Yao et al., 2025, splits layers into quantization-friendly
and sparsity-friendly ones; KVTuner / mixed-precision KV work assigns bits per layer):

    cands = {"bf16": None, "int8": quant.int8(), "kivi2": quant.kivi(2), "snap": snapkv_fn}
    sens = layer_sensitivity(next_logits, dense_cache, cands)      # KL per (candidate, layer)
    plan = assign_budget(sens, budget_bytes)                        # one candidate per layer
    cache = apply_plan(dense_cache, plan, cands)                    # a mixed ModelCache

`next_logits(model_cache) -> logits` is any function of a cache (kvjax never imports a
model), e.g. `lambda c: models.decode(model, calib_tokens, c)[0]` (teacher-forced
continuation logits). Sensitivity of layer l under candidate c is the mean
KL(p_full || p_c) over those logits when only layer l is converted; bytes are the converted
layer's exact nbytes. `assign_budget` solves the multiple-choice knapsack greedily (start
from each layer's smallest candidate, repeatedly take the upgrade with the largest KL drop
per extra byte that still fits); it is exact when sensitivities are convex in bytes.

Per-head mixed precision (`HeadSplitCache`): a layer cache whose kv heads are split into
contiguous groups, each group its own cache kind (e.g. retrieval heads in bf16, the rest in
INT2, as DuoAttention/RazorAttention split heads for eviction).

Evict-then-quantize (`EvictThenQuantize`): any press (kvjax.presses, or any object with
`compress_model(model_cache, obs_list, config, ...)` or a per-layer
`__call__(layer_cache, obs, layer_idx=...)`) followed by any quantized kind. `order`
"evict_first" scores on the exact cache; "quantize_first" quantizes first and lets the
press score the decompressed cache (what attention will read), then re-quantizes the kept
tokens. `memory_budget` (a fraction of the bf16 full cache) splits the budget: the spec
fixes the bytes per kept token, the press keeps the fraction that fits (set through its
`compression_ratio` field, kvpress's convention); see `budget_split`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib
from kvjax.observation import Observe
from kvjax.cache import KVView
from kvjax.quant.cache import QuantizedKVCache
from kvjax.quant.model import convert_layer, resolve_spec
from kvjax.quant.spec import QuantSpec

ORDERS = ("evict_first", "quantize_first")


# -- budget split ---------------------------------------------------------------------------
def bytes_per_token(spec: Optional[QuantSpec], head_dim: int, v_head_dim: Optional[int] = None,
                    dtype=jnp.bfloat16) -> float:
  """Marginal bytes one token adds to one kv head of a layer (codes, scales, outliers,
  position), without fixed costs (residual window). None = a dense cache of `dtype`."""
  dv = v_head_dim or head_dim
  if spec is None:
    return (head_dim + dv) * jnp.dtype(dtype).itemsize + 4
  g = spec.token_group * 64
  small = QuantizedKVCache.init(1, 1, spec.residual + g, head_dim, spec, v_head_dim=dv)
  big = QuantizedKVCache.init(1, 1, spec.residual + 2 * g, head_dim, spec, v_head_dim=dv)
  return (big.nbytes - small.nbytes) / g


def budget_split(memory_budget: float, spec: Optional[QuantSpec], head_dim: int,
                 v_head_dim: Optional[int] = None) -> float:
  """Fraction of tokens to keep so that kept tokens in `spec` cost `memory_budget` of bf16."""
  if not 0 < memory_budget <= 1:
    raise ValueError(f"memory_budget={memory_budget}; must be in (0, 1]")
  full = bytes_per_token(None, head_dim, v_head_dim)
  return float(min(1.0, memory_budget * full / bytes_per_token(spec, head_dim, v_head_dim)))


def _press_call(press, model_cache, obs_list, config, room, prompt_length):
  """Runs any press: model-level compress_model if it has one, else per-layer __call__."""
  fn = getattr(press, "compress_model", None)
  if fn is not None:
    try:
      return fn(model_cache, obs_list, config, room=room, prompt_length=prompt_length)
    except TypeError:  # older signature: compress_model(cache, obs, config)
      return fn(model_cache, obs_list, config)
  if not callable(press):
    raise ValueError(f"press {press!r} has neither compress_model(...) nor __call__(...)")
  obs_list = obs_list or [{} for _ in range(model_cache.num_layers)]
  new = [press(c, obs_list[i], layer_idx=i) for i, c in enumerate(model_cache.layers())]
  return cache_lib.ModelCache.from_layers(new, model_cache.next_position)


@dataclasses.dataclass(frozen=True)
class EvictThenQuantize:
  """A press followed by quantization (or the reverse order), as one press-like object.

  Attributes:
    press: any press (see module docstring).
    spec: quantized kind for the kept tokens (QuantSpec, preset name, or one per layer).
    order: "evict_first" | "quantize_first".
    memory_budget: optional total budget as a fraction of the bf16 full cache; sets the
      press's `ratio_field` so that kept tokens x bytes per token fit (budget_split).
    ratio_field: the press's field holding the fraction removed.
  """

  press: Any
  spec: Any
  order: str = "evict_first"
  memory_budget: Optional[float] = None
  ratio_field: str = "compression_ratio"

  def __post_init__(self):
    if self.order not in ORDERS:
      raise ValueError(f"order={self.order!r}; allowed: {ORDERS}")
    if self.memory_budget is not None and not 0 < self.memory_budget <= 1:
      raise ValueError(f"memory_budget={self.memory_budget}; must be in (0, 1]")

  @property
  def observe(self) -> Observe:
    return getattr(self.press, "observe", Observe())

  def planned_press(self, head_dim: int, config=None):
    """The press with its ratio set from memory_budget (unchanged without a budget)."""
    if self.memory_budget is None:
      return self.press
    if not dataclasses.is_dataclass(self.press) or not hasattr(self.press, self.ratio_field):
      raise ValueError(f"memory_budget needs a dataclass press with a {self.ratio_field!r} "
                       f"field; got {type(self.press).__name__}")
    spec = resolve_spec(self.spec if not isinstance(self.spec, (list, tuple)) else self.spec[0],
                        config)
    keep = budget_split(self.memory_budget, spec, head_dim)
    return dataclasses.replace(self.press, **{self.ratio_field: 1.0 - keep})

  def compress_model(self, model_cache, obs_list=None, config=None, *, room: int = 0,
                     prompt_length: Optional[int] = None):
    from kvjax.quant.model import quantize_model  # pylint: disable=import-outside-toplevel
    head_dim = model_cache.layers()[0].k.shape[-1] if config is None else config.head_dim
    press = self.planned_press(head_dim, config)
    if self.order == "quantize_first":
      q = quantize_model(model_cache, self.spec, config=config)
      dense = [c.to_dense() if cache_lib.caps(c).quantized else c for c in q.layers()]
      # KIVI rounds the capacity up: read the tokens back into the input's slots, so that
      # slot-aligned observations (colsum) still line up with them
      dense = [d if d.capacity == c.capacity else qc.to_dense(c.capacity, c.k.dtype)
               for d, qc, c in zip(dense, q.layers(), model_cache.layers())]
      model_cache = cache_lib.ModelCache.from_layers(dense, model_cache.next_position)
    evicted = _press_call(press, model_cache, obs_list, config, room, prompt_length)
    return quantize_model(evicted, self.spec, config=config)


# -- per-head mixed precision ---------------------------------------------------------------
def _pad_slots(x, s, fill):
  pad = s - x.shape[2]
  if pad == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 3), constant_values=fill)


@flax.struct.dataclass
class HeadSplitCache(cache_lib.KVCacheBase):
  """A layer cache whose kv heads [h_0, h_1), [h_1, h_2), ... are held by separate caches.

  Attributes:
    parts: tuple of layer caches; part i holds `heads[i]` consecutive kv heads (any kinds:
      DenseKVCache, QuantizedKVCache, ...). Query heads follow their kv head (GQA order).
    heads: static tuple of kv-head counts per part.
  `capacity` is the smallest part's; `colsum` and `materialize` pad parts to the largest
  part's slot count (padding slots are empty).
  """

  parts: tuple
  heads: tuple = flax.struct.field(pytree_node=False, default=())

  CAPS: ClassVar[cache_lib.Capabilities] = cache_lib.Capabilities(colsum=True)

  @classmethod
  def from_parts(cls, parts: Sequence[Any]) -> "HeadSplitCache":
    parts = tuple(parts)
    if not parts:
      raise ValueError("parts must hold at least one cache")
    return cls(parts=parts, heads=tuple(int(p.length.shape[-1]) for p in parts))

  @property
  def capacity(self) -> int:
    return min(p.capacity for p in self.parts)

  @property
  def lengths(self) -> jax.Array:
    return jnp.concatenate([p.length for p in self.parts], axis=-1)

  @property
  def head_dims(self) -> tuple:
    return self.parts[0].head_dims

  @property
  def kind_label(self) -> str:
    from kvjax import memory  # pylint: disable=import-outside-toplevel
    return "heads[" + ",".join(f"{n}:{memory.kind_label(p)}"
                               for n, p in zip(self.heads, self.parts)) + "]"

  def _bounds(self):
    out, a = [], 0
    for n in self.heads:
      out.append((a, a + n))
      a += n
    return out

  def check_room(self, positions_new) -> None:
    for p in self.parts:
      p.check_room(positions_new)

  def _append(self, k_new, v_new, positions_new) -> "HeadSplitCache":
    return self.replace(parts=tuple(
        p.append(k_new[:, a:b], v_new[:, a:b], positions_new)
        for p, (a, b) in zip(self.parts, self._bounds())))

  def _attend(self, q, k_new, v_new, q_positions, spec: attn_lib.AttentionSpec, *,
              sink_logits=None, return_colsum=False, colsum_window=None, return_lse=False):
    g = q.shape[1] // sum(self.heads)
    outs, new = [], []
    for p, (a, b) in zip(self.parts, self._bounds()):
      sl = None if sink_logits is None else sink_logits[a * g:b * g]
      res, c = p.attend(q[:, a * g:b * g], k_new[:, a:b], v_new[:, a:b], q_positions, spec,
                        sink_logits=sl, return_colsum=return_colsum,
                        colsum_window=colsum_window, return_lse=return_lse)
      outs.append(res)
      new.append(c)
    colsum = None
    if return_colsum:
      s = max(o.colsum.shape[-1] for o in outs)
      colsum = jnp.concatenate([_pad_slots(o.colsum, s, 0.0) for o in outs], axis=1)
    res = attn_lib.AttentionOutput(
        jnp.concatenate([o.out for o in outs], axis=1),
        jnp.concatenate([o.lse for o in outs], axis=1) if return_lse else None, colsum)
    return res, self.replace(parts=tuple(new))

  def materialize(self) -> KVView:
    views = [p.materialize() for p in self.parts]
    s = max(v.positions.shape[-1] for v in views)
    cat = lambda i, fill: jnp.concatenate(  # noqa: E731
        [_pad_slots(v[i], s, fill) for v in views], axis=1)
    return KVView(cat(0, 0), cat(1, 0), cat(2, -1), cat(3, False))

  def to_dense(self, capacity=None, dtype=None):
    return super().to_dense(capacity or max(p.capacity for p in self.parts), dtype)


def split_heads(layer_cache, groups: Sequence[tuple], *, config=None) -> HeadSplitCache:
  """Converts a dense layer cache: groups = ((n_heads, kind), ...) in kv-head order."""
  if sum(n for n, _ in groups) != layer_cache.k.shape[1]:
    raise ValueError(f"groups cover {sum(n for n, _ in groups)} kv heads; the cache has "
                     f"{layer_cache.k.shape[1]}")
  parts, a = [], 0
  for n, kind in groups:
    sub = jax.tree.map(lambda x, a=a, n=n: x[:, a:a + n], layer_cache)
    parts.append(convert_layer(sub, kind, config=config))
    a += n
  return HeadSplitCache.from_parts(parts)


# -- per-layer sensitivity and budgeted assignment ------------------------------------------
class Sensitivity(NamedTuple):
  names: tuple               # candidate names
  kl: np.ndarray             # [C, L] mean KL(full || only layer l converted)
  nbytes: np.ndarray         # [C, L] bytes of layer l converted


def _as_transform(kind, config):
  """A candidate -> fn(layer_cache, layer_idx, obs) -> layer_cache."""
  if kind is None or isinstance(kind, (QuantSpec, str)):
    return lambda c, i, obs: convert_layer(c, kind, config=config)
  if callable(kind):
    return kind
  raise ValueError(f"candidate {kind!r}; allowed: None, a QuantSpec, a preset name, or "
                   "fn(layer_cache, layer_idx, obs)")


def _kl(p_logits, q_logits):
  lp = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), axis=-1)
  lq = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), axis=-1)
  return float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)))


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)   # callers' functions may donate the cache


def layer_sensitivity(next_logits: Callable, model_cache: cache_lib.ModelCache,
                      candidates: Mapping[str, Any], *, obs_list=None,
                      config=None) -> Sensitivity:
  """KL and bytes of every candidate at every layer, converting one layer at a time.

  Args:
    next_logits: fn(ModelCache) -> logits [..., V] (called 1 + C * L times; it may donate
      its argument, each call gets a fresh copy).
    model_cache: the full-precision cache of the calibration prompt.
    candidates: name -> kind (None = keep full precision, QuantSpec / preset name, or
      fn(layer_cache, layer_idx, obs) -> layer_cache, e.g. an eviction press).
    obs_list: per-layer observations for press candidates.
  """
  names = tuple(candidates)
  fns = [_as_transform(candidates[n], config) for n in names]
  layers = model_cache.layers()
  base = next_logits(_copy(model_cache))
  kl = np.zeros((len(names), len(layers)))
  nb = np.zeros((len(names), len(layers)), np.int64)
  obs_list = obs_list or [{} for _ in layers]
  for ci, fn in enumerate(fns):
    for li, layer in enumerate(layers):
      conv = fn(layer, li, obs_list[li])
      nb[ci, li] = cache_lib.tree_nbytes(conv)
      trial = list(layers)
      trial[li] = conv
      mc = cache_lib.ModelCache.from_layers([_copy(c) for c in trial], model_cache.next_position)
      kl[ci, li] = max(0.0, _kl(base, next_logits(mc)))
  return Sensitivity(names, kl, nb)


def assign_budget(sens: Sensitivity, budget_bytes: int) -> tuple:
  """One candidate name per layer minimising total KL with total bytes <= budget_bytes."""
  kl, nb = sens.kl, sens.nbytes
  c, n = kl.shape
  choice = [int(np.argmin(nb[:, l] + 1e-9 * kl[:, l])) for l in range(n)]
  total = int(sum(nb[choice[l], l] for l in range(n)))
  if total > budget_bytes:
    raise ValueError(f"budget_bytes={budget_bytes:,} is below the smallest plan "
                     f"({total:,} bytes: every layer at its cheapest candidate)")
  while True:
    best, best_gain = None, 0.0
    for l in range(n):
      cur = choice[l]
      for j in range(c):
        extra = int(nb[j, l] - nb[cur, l])
        drop = kl[cur, l] - kl[j, l]
        if drop <= 0 or total + extra > budget_bytes:
          continue
        gain = drop / max(extra, 1)
        if gain > best_gain:
          best, best_gain = (l, j, extra), gain
    if best is None:
      break
    l, j, extra = best
    choice[l] = j
    total += extra
  return tuple(sens.names[j] for j in choice)


def apply_plan(model_cache: cache_lib.ModelCache, plan: Sequence[str],
               candidates: Mapping[str, Any], *, obs_list=None, config=None):
  """Converts layer l with candidates[plan[l]]; layers of differing kinds form segments."""
  layers = model_cache.layers()
  if len(plan) != len(layers):
    raise ValueError(f"plan has {len(plan)} entries; the cache has {len(layers)} layers")
  obs_list = obs_list or [{} for _ in layers]
  new = []
  for li, (layer, name) in enumerate(zip(layers, plan)):
    if name not in candidates:
      raise ValueError(f"plan[{li}]={name!r}; allowed: {tuple(candidates)}")
    new.append(_as_transform(candidates[name], config)(layer, li, obs_list[li]))
  return cache_lib.ModelCache.from_layers(new, model_cache.next_position)
