"""The press protocol: score -> choose -> gather, over one layer cache or a whole ModelCache.

A press is a frozen dataclass (hashable, so it is a static jit argument). Its pure
`__call__(layer_cache, obs, layer_idx=...) -> layer_cache` runs three separate steps:

  score   scores [B, Hkv, S] float32 per slot (higher = keep); one method per technique.
  choose  per-(batch, kv-head) keep counts from a *budget rule* (a static table
          keep[L] for every valid length L), protected slots first (attention sinks, the
          last window), then the best scores; returns kept slot indices [B, Hkv, K].
  gather  builds a new cache of static capacity K + room (room = slots left for decode),
          optionally merging evicted tokens into kept ones (merging.py) and re-rotating
          kept keys to contiguous positions (rerotate=True).

Budgets follow kvpress (NVIDIA/kvpress): `compression_ratio` is the fraction removed, so
a row with L valid slots keeps int(L * (1 - compression_ratio)); `budget=N` keeps
min(L, N) instead. Budgets are per row (and per kv head: `lengths` are [B, Hkv]), so
left-padded batches, whose rows have fewer valid slots than capacity, behave exactly as
each prompt alone. The kept capacity K is computed from the *static* capacity S only
(K = keep[S]), so one compile serves every input of a shape and `nbytes` really shrinks.

Protected slots (the `n_sink` first slots -- attention sinks, kvpress's name --, the
`protect_recent` last valid slots, plus a press's own window, e.g. SnapKV's `window_size`) are a
budget-rule option every scorer has. The budget is a hard limit: protected slots take
priority over scored ones, sinks before the recent window, so they are all kept whenever
the row's budget holds them.

Slot order is position order: kept slots stay in their original order, valid slots first,
so `lengths` keeps meaning "slots [0, length) are valid" and later appends stay ordered.

Shapes: B batch, Hkv kv heads, S input slots, K kept slots, D head dim, Hq query heads.

One file on purpose (about 700 lines): score / choose / gather and the model-level
compress_model are the one pipeline every press file plugs into.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as cache_lib
from kvjax import rope as rope_lib
from kvjax.observation import Observe

MERGE_MODES = (None, "cam", "d2o")


@dataclasses.dataclass(frozen=True)
class LayerContext:
  """Static facts about the layer a press runs on.

  Attributes:
    layer_idx: index of the layer in the model.
    num_layers: number of layers of the model (PyramidKV budgets, per-layer maps).
    rope: the model's RopeConfig (re-rotation, ExpectedAttention); None if unknown.
    room: empty slots to append after the kept ones (room for decode).
  """

  layer_idx: int = 0
  num_layers: int = 1
  rope: Optional[rope_lib.RopeConfig] = None
  room: int = 0


# --------------------------------------------------------------------------------------
# validation helpers


def check_ratio(name: str, value: float) -> None:
  """ValueError unless value is a real number in [0, 1) (Python or numpy float / int)."""
  if (isinstance(value, (bool, np.bool_)) or
      not isinstance(value, (int, float, np.integer, np.floating)) or not 0 <= value < 1):
    raise ValueError(f"{name}={value!r}; must be a float in [0, 1)")


def check_nonneg_int(name: str, value: int, minimum: int = 0) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name}={value!r}; must be an int >= {minimum}")


def check_layer_cache(press, cache) -> None:
  if not cache_lib.caps(cache).pressable:
    raise ValueError(
        f"{type(press).__name__} works on layer caches with k, v, positions, lengths "
        f"(kinds with CAPS.pressable, e.g. kvjax.cache.DenseKVCache); got "
        f"{type(cache).__name__}")


def require_observations(press, obs: dict, cache) -> None:
  """ValueError if the press needs statistics that obs lacks (or has the wrong shape)."""
  need = press.observe
  b, h, s = cache.positions.shape
  if need.colsum:
    if "colsum" not in obs or obs["colsum"] is None:
      raise ValueError(
          f"{type(press).__name__} needs attention statistics (obs['colsum'], "
          f"observe={need}); pass the press to models.prefill(press=...) / decode, or "
          "compute the observations with observe=press.observe")
    if tuple(obs["colsum"].shape) != (b, h, s):
      raise ValueError(f"obs['colsum'] has shape {tuple(obs['colsum'].shape)}; expected "
                       f"{(b, h, s)} (aligned with the cache slots)")
  if need.queries:
    if "queries" not in obs or obs["queries"] is None:
      raise ValueError(
          f"{type(press).__name__} needs the last {need.queries} queries (obs['queries'], "
          f"observe={need}); pass the press to models.prefill(press=...)")
    q = obs["queries"]
    if q.ndim != 4 or q.shape[0] != b or q.shape[1] % h or q.shape[2] < need.queries:
      raise ValueError(f"obs['queries'] has shape {tuple(q.shape)}; expected "
                       f"[{b}, Hq (multiple of {h}), >= {need.queries}, D]")


def next_positions(cache, obs: dict) -> jax.Array:
  """[B] position of the next token: obs['next_position'] or max slot position + 1."""
  if obs.get("next_position") is not None:
    return jnp.asarray(obs["next_position"], jnp.int32)
  valid = valid_slots(cache)
  return (jnp.max(jnp.where(valid, cache.positions, -1), axis=(1, 2)) + 1).astype(jnp.int32)


def valid_slots(cache) -> jax.Array:
  """[B, Hkv, S] bool: slot holds a token."""
  slot = jnp.arange(cache.positions.shape[-1], dtype=jnp.int32)
  return (slot < cache.lengths[..., None]) & (cache.positions >= 0)


# --------------------------------------------------------------------------------------
# choose: priorities and kept indices


def protection_tiers(lengths, capacity: int, n_sink: int, n_recent: int) -> jax.Array:
  """[B, Hkv, S] int32: 3 sink, 2 recent window, 1 scored, 0 invalid (slot >= length)."""
  slot = jnp.arange(capacity, dtype=jnp.int32)
  length = lengths[..., None]
  valid = slot < length
  tier = jnp.where(slot >= length - n_recent, 2, 1)
  tier = jnp.where(slot < n_sink, 3, tier)
  return jnp.where(valid, tier, 0).astype(jnp.int32)


def rank_slots(scores, valid, tiers, secondary=None) -> jax.Array:
  """Slot indices [B, Hkv, S] in keep-priority order: tier, then score, then secondary.

  Ties keep slot order (stable sort), so equal scores prefer earlier slots. NaN scores
  rank last among valid slots; invalid slots always rank last.
  """
  s = scores.shape[-1]
  sc = jnp.where(jnp.isnan(scores), -jnp.inf, scores.astype(jnp.float32))
  keys = [-jnp.where(valid, tiers, -1), -sc]
  if secondary is not None:
    keys.append(-jnp.where(jnp.isnan(secondary), -jnp.inf, secondary.astype(jnp.float32)))
  slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), scores.shape)
  out = jax.lax.sort((*keys, slot), dimension=-1, is_stable=True, num_keys=len(keys))
  return out[-1]


def take_kept(order, keep, capacity_kept: int, capacity_in: int) -> jax.Array:
  """First keep[b,h] slots of `order`, sorted ascending, padded with `capacity_in`.

  Args:
    order: [B, Hkv, S] slot indices in priority order.
    keep: [B, Hkv] int32 slots to keep (<= capacity_kept).
    capacity_kept: static K.
    capacity_in: S (the sentinel for "no slot").
  Returns: [B, Hkv, K] int32 kept slot indices, ascending, sentinel S after the kept ones.
  """
  s = order.shape[-1]
  if capacity_kept > s:
    order = jnp.pad(order, ((0, 0), (0, 0), (0, capacity_kept - s)),
                    constant_values=capacity_in)
  top = order[..., :capacity_kept]
  j = jnp.arange(capacity_kept, dtype=jnp.int32)
  idx = jnp.where(j < keep[..., None], top, capacity_in)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------
# gather


def _take(x, idx):
  """x [B, H, S, ...] gathered at idx [B, H, K] (idx already clamped)."""
  extra = x.ndim - 3
  ii = idx.reshape(idx.shape + (1,) * extra)
  return jnp.take_along_axis(x, ii, axis=2)


def gather_slots(cache, idx, lengths):
  """New cache holding the slots idx [B, Hkv, K] (sentinel >= S: empty) of `cache`.

  Kept slots are bit-identical copies; empty slots hold zeros and position -1.
  """
  s = cache.positions.shape[-1]
  kept = idx < s
  safe = jnp.minimum(idx, s - 1)
  k = _take(cache.k, safe)
  v = _take(cache.v, safe)
  k = jnp.where(kept[..., None], k, jnp.zeros((), k.dtype))
  v = jnp.where(kept[..., None], v, jnp.zeros((), v.dtype))
  pos = jnp.where(kept, jnp.take_along_axis(cache.positions, safe, axis=2), -1)
  return cache.replace(k=k, v=v, positions=pos.astype(jnp.int32),
                       lengths=lengths.astype(jnp.int32))


def gather_slot_obs(obs: dict, idx, capacity_in: int) -> dict:
  """Re-aligns slot-aligned observations (colsum) with the kept slots."""
  if obs.get("colsum") is None:
    return obs
  out = dict(obs)
  kept = idx < capacity_in
  col = jnp.take_along_axis(obs["colsum"], jnp.minimum(idx, capacity_in - 1), axis=2)
  out["colsum"] = jnp.where(kept, col, 0.0)
  return out


def pad_room(cache, room: int):
  """Appends `room` empty slots (zeros, position -1) to a layer cache."""
  if room == 0:
    return cache
  pad = lambda x, value=0: jnp.pad(x, ((0, 0), (0, 0), (0, room)) + ((0, 0),) * (x.ndim - 3),
                                   constant_values=value)
  return cache.replace(k=pad(cache.k), v=pad(cache.v), positions=pad(cache.positions, -1))


def pad_obs_room(obs: dict, room: int) -> dict:
  if room == 0 or obs.get("colsum") is None:
    return obs
  out = dict(obs)
  out["colsum"] = jnp.pad(obs["colsum"], ((0, 0), (0, 0), (0, room)))
  return out


def rerotate_contiguous(cache, rope: Optional[rope_lib.RopeConfig], next_position):
  """Re-indexes each row's valid slots to contiguous positions ending at next_position - 1.

  StreamingLLM (Xiao et al., 2023) re-indexes positions inside the cache so the distance
  from a new query to a kept key is its distance in the cache, not in the original text.
  kvjax keeps `next_position` at the original length (positions after eviction continue
  from it), so the kept keys are moved to [next_position - length, next_position): every
  query then sees exactly the relative offsets StreamingLLM's in-cache positions give.
  """
  if rope is None:
    raise ValueError("rerotate=True needs the model's RoPE config (pass rope=config.rope, "
                     "or use compress_model(..., config) / models.prefill(press=...))")
  s = cache.positions.shape[-1]
  slot = jnp.arange(s, dtype=jnp.int32)
  valid = (slot < cache.lengths[..., None]) & (cache.positions >= 0)
  new_pos = next_position[:, None, None] - cache.lengths[..., None] + slot
  new_pos = jnp.where(valid, new_pos, -1).astype(jnp.int32)
  k = rope_lib.rerotate(cache.k, cache.positions, jnp.where(valid, new_pos, cache.positions),
                        rope)
  k = jnp.where(valid[..., None], k, cache.k)
  return cache.replace(k=k, positions=new_pos)


# --------------------------------------------------------------------------------------
# budget tables


def ratio_table(capacity: int, compression_ratio: float) -> np.ndarray:
  """keep[L] = int(L * (1 - ratio)) for L = 0..capacity (kvpress's n_kept, in float64)."""
  lengths = np.arange(capacity + 1)
  return np.array([int(l * (1 - compression_ratio)) for l in lengths], np.int32)


def budget_table(capacity: int, budget: int) -> np.ndarray:
  """keep[L] = min(L, budget): rows shorter than the budget keep everything."""
  return np.minimum(np.arange(capacity + 1), budget).astype(np.int32)


def is_identity(table: np.ndarray) -> bool:
  return bool(np.array_equal(table, np.arange(table.shape[0])))


MEMORY_REPR_TOKENS = 4096  # the prompt length a press's repr quotes its real figure at


def repr_with_memory(press, capacity: int = MEMORY_REPR_TOKENS, head_dim: int = 128,
                     num_layers: Optional[int] = None) -> str:
  """The dataclass repr plus the press's real kept-bytes figure (memory_fraction), for
  presses whose bytes are not what their ratio alone says."""
  fields = ", ".join(f"{f.name}={getattr(press, f.name)!r}" for f in dataclasses.fields(press)
                     if f.repr)
  frac = press.memory_fraction(capacity, num_layers=num_layers, head_dim=head_dim)
  return (f"{type(press).__name__}({fields}; kv bytes kept {frac:.3g} of dense at {capacity} "
          f"tokens, head_dim {head_dim})")


# --------------------------------------------------------------------------------------
# the protocol


class Press:
  """Base of all presses (subclasses are frozen dataclasses).

  Subclasses implement `compress_layer(cache, obs, ctx) -> (cache, obs)`, which also
  re-aligns slot-aligned observations (colsum) with the new slots, so presses compose.
  """

  @property
  def observe(self) -> Observe:
    """Observations this press needs from the forward pass."""
    return Observe()

  @property
  def layer_invariant(self) -> bool:
    """True if the press does the same (static) thing in every layer, so compress_model
    can vmap it over a stacked segment of layers."""
    return False

  def compress_layer(self, cache, obs: dict, ctx: LayerContext):
    raise NotImplementedError

  def layer_capacity(self, capacity: int, ctx: LayerContext = LayerContext()) -> int:
    """Static kept slots (before room) of a layer whose input capacity is `capacity`."""
    raise NotImplementedError

  def with_budget(self, budget: int) -> "Press":
    """The same press with an absolute per-head budget (used by decode-time policies)."""
    raise ValueError(f"{type(self).__name__} does not support an absolute budget")

  def memory_fraction(self, capacity: int, *, num_layers: Optional[int] = None,
                      head_dim: int = 128) -> float:
    """The real figure: bytes per prompt token the compressed layers hold over the dense
    cache's, at `capacity` prompt slots, averaged over `num_layers` layers (decode room
    excluded; static padding included, since it is allocated).

    For a slot press this is the kept capacity over `capacity`; it is at most
    1 - compression_ratio (up to rounding) unless the press pads (head-wise budgets pad
    every head to the largest one), and such a press says so in its repr.
    """
    del head_dim
    n = num_layers or 1
    kept = [self.layer_capacity(capacity, LayerContext(layer_idx=i, num_layers=n))
            for i in range(n)]
    return sum(kept) / (n * capacity)

  def validate(self, *, capacity: int, prompt_length: Optional[int] = None,
               num_layers: Optional[int] = None) -> None:
    """Static checks against the cache capacity / prompt length (ValueError)."""
    del capacity, prompt_length, num_layers

  def validate_model(self, model_cache, prompt_length: Optional[int] = None) -> None:
    """validate() against every pressed layer of a ModelCache (before any work is done)."""
    validate_layers([self] * model_cache.num_layers, model_cache, prompt_length)

  def __call__(self, cache, obs: Optional[dict] = None, *, layer_idx: int = 0,
               num_layers: int = 1, rope: Optional[rope_lib.RopeConfig] = None,
               room: int = 0):
    """Compresses one layer cache. Pure and jittable (the press is static).

    Args:
      cache: a layer cache (DenseKVCache) [B, Hkv, S, D].
      obs: the layer's observations ({"colsum": [B, Hkv, S], "queries": [B, Hq, W, D],
        "next_position": [B]}), as models.prefill computes them for `self.observe`.
      layer_idx, num_layers: where the layer sits (PyramidKV, per-layer maps).
      rope: the model's RoPE config (needed by rerotate / ExpectedAttention).
      room: empty slots to leave after the kept ones for decode.

    Returns: a layer cache of static capacity layer_capacity(S) + room.
    """
    check_nonneg_int("room", room)
    ctx = LayerContext(layer_idx=layer_idx, num_layers=num_layers, rope=rope, room=room)
    new, _ = self.compress_layer(cache, dict(obs or {}), ctx)
    return new

  def compress_model(self, model_cache: cache_lib.ModelCache,
                     obs_list: Optional[Sequence[dict]] = None, config: Any = None, *,
                     room: int = 0, prompt_length: Optional[int] = None
                     ) -> cache_lib.ModelCache:
    """Applies the press to every layer of a ModelCache (jitted once per shape).

    Args:
      model_cache: the cache after the prompt.
      obs_list: per-layer observation dicts (from the forward pass), or None.
      config: model config, duck-typed: `num_layers`, `rope` (RopeConfig) are read.
      room: empty slots per layer after compression, for decode.
      prompt_length: tokens in the prompt (static), for window-vs-prompt checks.

    Returns: a ModelCache with the same `next_position` (the original length).
    """
    return compress_model([self] * model_cache.num_layers, model_cache, obs_list, config,
                          rooms=room, prompt_length=prompt_length)


def compress_model(layer_presses: Sequence[Optional[Press]], model_cache, obs_list=None,
                   config: Any = None, *, rooms: int | Sequence[int] = 0,
                   prompt_length: Optional[int] = None, return_obs: bool = False):
  """Applies layer_presses[i] (None = identity) to layer i; validates, then one jit call."""
  cache_lib.require_model_cache(model_cache, "model_cache")
  n = model_cache.num_layers
  num_layers = getattr(config, "num_layers", n) if config is not None else n
  if num_layers != n:
    raise ValueError(f"config.num_layers={num_layers} but the cache holds {n} layers")
  rope = getattr(config, "rope", None) if config is not None else None
  if len(layer_presses) != n:
    raise ValueError(f"{len(layer_presses)} layer presses for {n} layers")
  if isinstance(rooms, (int, np.integer)):
    rooms = (int(rooms),) * n
  rooms = tuple(int(r) for r in rooms)
  for r in rooms:
    check_nonneg_int("room", r)
  if obs_list is None:
    obs_list = [{} for _ in range(n)]
  if len(obs_list) != n:
    raise ValueError(f"obs_list has {len(obs_list)} entries; the cache has {n} layers")
  validate_layers(layer_presses, model_cache, prompt_length)
  obs_list = [{k: v for k, v in dict(o or {}).items() if v is not None} for o in obs_list]
  new, obs = _compress_model_jit(tuple(layer_presses), rooms, num_layers, rope, model_cache,
                                 obs_list)
  return (new, obs) if return_obs else new


_PRIVATE_OBS = ("next_position", "layer_index")


def _compress_one(press, layer, obs, ctx):
  if not cache_lib.caps(layer).pressable:
    c, o = layer, obs  # presses compress pressable kinds only (ModelCache.pressable_layers)
  elif press is None:
    c, o = pad_room(layer, ctx.room), pad_obs_room(obs, ctx.room)
  else:
    c, o = press.compress_layer(layer, obs, ctx)
  return c, {k: v for k, v in o.items() if k not in _PRIVATE_OBS}


def _entries(model_cache):
  """[(segment entry, [layer indices it stacks])] for the ModelCache's layout."""
  groups = getattr(model_cache, "groups", None)
  if groups is not None:
    out = []
    for e, p, r, first in groups():
      out.extend((e + j, [first + j + i * p for i in range(r)]) for j in range(p))
    return out
  out, a = [], 0
  for e, n in enumerate(model_cache.segment_sizes):
    out.append((e, list(range(a, a + n))))
    a += n
  return out


def _segment_layers(model_cache):
  """[(stacked segment, [layer indices])] without copying arrays."""
  return [(model_cache.segments[e], idxs) for e, idxs in _entries(model_cache)]


def validate_layers(layer_presses, model_cache, prompt_length=None) -> None:
  """Static checks of each layer's press against that layer's capacity (pressable layers)."""
  n = model_cache.num_layers
  for seg, idxs in _segment_layers(model_cache):
    if not cache_lib.caps(seg).pressable:
      continue
    cap = seg.positions.shape[-1]
    for i in idxs:
      if layer_presses[i] is not None:
        layer_presses[i].validate(capacity=cap, prompt_length=prompt_length, num_layers=n)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _compress_model_jit(layer_presses, rooms, num_layers, rope, model_cache, obs_list):
  nxt = model_cache.next_position
  entries = _entries(model_cache)

  def shared(idxs):
    ps = {layer_presses[i] for i in idxs}
    p = layer_presses[idxs[0]]
    return (len(ps) == 1 and len({rooms[i] for i in idxs}) == 1 and
            (p is None or p.layer_invariant) and
            len({tuple(sorted(obs_list[i])) for i in idxs}) == 1)

  if all(shared(idxs) for _, idxs in entries):
    # One vmapped compression per stacked segment: compile time stays flat in depth.
    segments, new_obs = list(model_cache.segments), [None] * len(layer_presses)
    for e, idxs in entries:
      press, i0 = layer_presses[idxs[0]], idxs[0]
      ctx = LayerContext(layer_idx=i0, num_layers=num_layers, rope=rope, room=rooms[i0])
      stacked_obs = jax.tree.map(lambda *xs: jnp.stack(xs), *[obs_list[i] for i in idxs])

      def one(layer, obs, index, press=press, ctx=ctx):
        obs = dict(obs, next_position=nxt, layer_index=index)
        return _compress_one(press, layer, obs, ctx)

      seg, obs_e = jax.vmap(one)(model_cache.segments[e], stacked_obs,
                                 jnp.asarray(idxs, jnp.int32))
      segments[e] = seg
      for j, i in enumerate(idxs):
        new_obs[i] = jax.tree.map(lambda x, j=j: x[j], obs_e)
    return model_cache.replace(segments=tuple(segments)), new_obs
  # Layers differ (per-layer budgets or presses): one call per layer, then regroup.
  new_layers, new_obs = [], []
  for i, (press, layer) in enumerate(zip(layer_presses, model_cache.layers())):
    obs = dict(obs_list[i], next_position=nxt, layer_index=jnp.asarray(i, jnp.int32))
    ctx = LayerContext(layer_idx=i, num_layers=num_layers, rope=rope, room=rooms[i])
    c, o = _compress_one(press, layer, obs, ctx)
    new_layers.append(c)
    new_obs.append(o)
  return regroup_like(model_cache, new_layers), new_obs


def regroup_like(model_cache, new_layers):
  """ModelCache of new_layers, keeping model_cache's scan groups when they still fit."""
  nxt = model_cache.next_position
  grouping = getattr(model_cache, "grouping", None)
  if grouping is not None:
    try:
      return cache_lib.ModelCache.from_layers(new_layers, nxt, grouping=grouping)
    except ValueError:
      pass
  return cache_lib.ModelCache.from_layers(new_layers, nxt)


# --------------------------------------------------------------------------------------
# score-based presses


@dataclasses.dataclass(frozen=True)
class ScorerPress(Press):
  """A press that scores every slot and keeps the best under a budget rule.

  Attributes:
    compression_ratio: fraction of each row's valid slots to remove, in [0, 1) (kvpress).
    budget: absolute alternative: keep min(L, budget) slots per (row, kv head). Exclusive
      with a nonzero compression_ratio.
    n_sink: always keep the first this-many slots (attention sinks).
    protect_recent: always keep the last this-many valid slots.
    merge: None | "cam" | "d2o": merge evicted tokens into kept ones (see merging.py).
    merge_threshold: "d2o" only: minimum key cosine similarity for a merge.
    rerotate: re-index kept keys to contiguous positions (StreamingLLM in-cache positions).
  """

  compression_ratio: float = 0.0
  budget: Optional[int] = None
  n_sink: int = 0
  protect_recent: int = 0
  merge: Optional[str] = None
  merge_threshold: float = 0.5
  rerotate: bool = False

  def __post_init__(self):
    check_ratio("compression_ratio", self.compression_ratio)
    # a numpy float hashes like the Python float: one compile for either spelling
    object.__setattr__(self, "compression_ratio", float(self.compression_ratio))
    if self.budget is not None:
      check_nonneg_int("budget", self.budget, 1)
      if self.compression_ratio:
        raise ValueError(f"pass either compression_ratio ({self.compression_ratio}) or "
                         f"budget ({self.budget}), not both")
    check_nonneg_int("n_sink", self.n_sink)
    check_nonneg_int("protect_recent", self.protect_recent)
    if self.merge not in MERGE_MODES:
      raise ValueError(f"merge={self.merge!r}; allowed: {MERGE_MODES}")
    if not -1 <= self.merge_threshold <= 1:
      raise ValueError(f"merge_threshold={self.merge_threshold}; must be in [-1, 1]")

  @property
  def layer_invariant(self) -> bool:
    return True

  # --- the three steps ---------------------------------------------------------------
  def score(self, cache, obs: dict, ctx: LayerContext) -> jax.Array:
    """[B, Hkv, S] float32 importance per slot (higher = keep)."""
    raise NotImplementedError

  def protected(self) -> tuple[int, int]:
    """(sinks, recent) slots this press always keeps (budget permitting)."""
    return self.n_sink, self.protect_recent

  def keep_table(self, capacity: int, ctx: LayerContext) -> np.ndarray:
    """Budget rule: keep[L] for L = 0..capacity (static numpy int32 [capacity + 1])."""
    if self.budget is not None:
      return budget_table(capacity, self.budget)
    return ratio_table(capacity, self.compression_ratio)

  def select(self, scores, cache, obs: dict, ctx: LayerContext, table: np.ndarray):
    """Chooses kept slots: ([B, Hkv, K] ascending indices (sentinel S), [B, Hkv] counts)."""
    del obs, ctx
    s = cache.positions.shape[-1]
    k_static = max(1, int(table.max()))
    keep = jnp.asarray(table)[cache.lengths]
    n_sink, n_recent = self.protected()
    order = rank_slots(scores, valid_slots(cache),
                       protection_tiers(cache.lengths, s, n_sink, n_recent))
    return take_kept(order, keep, k_static, s), keep

  # --- protocol -------------------------------------------------------------------------
  def layer_capacity(self, capacity: int, ctx: LayerContext = LayerContext()) -> int:
    return max(1, int(self.keep_table(capacity, ctx).max()))

  def with_budget(self, budget: int) -> "ScorerPress":
    return dataclasses.replace(self, compression_ratio=0.0, budget=int(budget))

  def validate(self, *, capacity: int, prompt_length: Optional[int] = None,
               num_layers: Optional[int] = None) -> None:
    del prompt_length, num_layers
    if self.budget is not None and self.budget > capacity:
      raise ValueError(f"budget={self.budget} is larger than the cache (capacity={capacity}); "
                       f"allowed: 1..{capacity}")

  def is_identity(self, table: np.ndarray) -> bool:
    return is_identity(table) and self.merge is None and not self.rerotate

  def compress_layer(self, cache, obs: dict, ctx: LayerContext):
    check_layer_cache(self, cache)
    s = cache.positions.shape[-1]
    self.validate(capacity=s)
    table = self.keep_table(s, ctx)
    if self.is_identity(table):
      return pad_room(cache, ctx.room), pad_obs_room(obs, ctx.room)
    require_observations(self, obs, cache)
    scores = self.score(cache, obs, ctx)
    idx, keep = self.select(scores, cache, obs, ctx, table)
    return finish(self, cache, obs, ctx, idx, keep)


def finish(press, cache, obs: dict, ctx: LayerContext, idx, keep):
  """Gather (+ merge, + rerotate), add room, re-align observations."""
  s = cache.positions.shape[-1]
  new = gather_slots(cache, idx, keep)
  merge = getattr(press, "merge", None)
  if merge is not None:
    from kvjax.presses import merging  # pylint: disable=import-outside-toplevel
    new = merging.merge_evicted(cache, new, idx, obs.get("colsum"), mode=merge,
                                threshold=press.merge_threshold)
  if getattr(press, "rerotate", False):
    new = rerotate_contiguous(new, ctx.rope, next_positions(cache, obs))
  new = pad_room(new, ctx.room)
  obs = pad_obs_room(gather_slot_obs(obs, idx, s), ctx.room)
  return new, obs


def compress_with_table(press, cache, obs: dict, ctx: LayerContext, table: np.ndarray):
  """score -> choose -> gather of any scorer (`score`, `select`, `is_identity`) under the
  budget rule `table` (keep[L] for L = 0..S), e.g. a wrapper's per-layer table."""
  check_layer_cache(press, cache)
  if press.is_identity(table):
    return pad_room(cache, ctx.room), pad_obs_room(obs, ctx.room)
  require_observations(press, obs, cache)
  scores = press.score(cache, obs, ctx)
  idx, keep = press.select(scores, cache, obs, ctx, table)
  return finish(press, cache, obs, ctx, idx, keep)


class ScorerWrapperPress(Press):
  """Base of presses that wrap a ScorerPress in a field `press` (AdaKV, ChunkKV).

  Delegates what the wrapper does not change: observations, ratio, layer invariance,
  budget replacement and validation.
  """

  def _check_scorer(self):
    if not isinstance(self.press, (ScorerPress, ScorerWrapperPress)):
      raise ValueError(f"{type(self).__name__}(press=...) needs a ScorerPress or a scorer "
                       f"wrapper (ChunkKVPress, PyramidBudgetPress, ...); got {self.press!r}")

  # A wrapper is itself a scorer: any budget rule can wrap it (AdaKV over ChunkKV, ...).
  def score(self, cache, obs: dict, ctx: LayerContext) -> jax.Array:
    return self.press.score(cache, obs, ctx)

  def keep_table(self, capacity: int, ctx: LayerContext) -> np.ndarray:
    return self.press.keep_table(capacity, ctx)

  def protected(self) -> tuple[int, int]:
    return self.press.protected()

  def is_identity(self, table: np.ndarray) -> bool:
    return self.press.is_identity(table)

  def select(self, scores, cache, obs: dict, ctx: LayerContext, table: np.ndarray):
    return ScorerPress.select(self, scores, cache, obs, ctx, table)

  def compress_layer(self, cache, obs: dict, ctx: LayerContext):
    """The checks, the inner press's keep table and scores, then the wrapper's own rule
    (`choose`); a table that keeps every slot only pads the room."""
    inner = self.press
    check_layer_cache(self, cache)
    s = cache.positions.shape[-1]
    self.validate(capacity=s)
    table = inner.keep_table(s, ctx)
    if inner.is_identity(table):
      return pad_room(cache, ctx.room), pad_obs_room(obs, ctx.room)
    require_observations(inner, obs, cache)
    return self.choose(cache, obs, ctx, table, inner.score(cache, obs, ctx))

  def choose(self, cache, obs: dict, ctx: LayerContext, table: np.ndarray, scores):
    """The wrapper's selection from the inner press's scores [B, Hkv, S]: the new cache."""
    raise NotImplementedError(f"{type(self).__name__} defines neither compress_layer nor "
                              "choose")

  @property
  def budget(self) -> Optional[int]:
    return self.press.budget

  @property
  def merge(self) -> Optional[str]:
    return self.press.merge

  @property
  def merge_threshold(self) -> float:
    return self.press.merge_threshold

  @property
  def rerotate(self) -> bool:
    return self.press.rerotate

  @property
  def observe(self) -> Observe:
    return self.press.observe

  @property
  def compression_ratio(self) -> float:
    return self.press.compression_ratio

  @property
  def layer_invariant(self) -> bool:
    return self.press.layer_invariant

  def with_budget(self, budget):
    return dataclasses.replace(self, press=self.press.with_budget(budget))

  def validate(self, *, capacity: int, prompt_length=None, num_layers=None) -> None:
    self.press.validate(capacity=capacity, prompt_length=prompt_length, num_layers=num_layers)
