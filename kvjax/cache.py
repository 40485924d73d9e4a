"""KV cache pytrees and the protocol every cache kind shares.

A cache kind is a registered pytree (flax.struct dataclass) with **static capacity**;
ragged validity is data: per-slot original `positions` and per-(batch, kv-head)
`lengths`. Every kind implements:

  append(k_new, v_new, positions)          -> cache'      write new tokens
  attend(q, k_new, v_new, q_positions, spec, ...) -> (AttentionOutput, cache')
  nbytes                                   -> int         exact bytes of every array held
  capacity                                 -> int         static slot count
  length                                   -> [B, Hkv]    valid slots (data)

Shapes: k [B, Hkv, S, D], v [B, Hkv, S, Dv], positions [B, Hkv, S] (-1 = empty),
lengths [B, Hkv]. New tokens: k_new [B, Hkv, T, D], positions [B, T] (-1 = padding).
Valid new tokens may sit anywhere in the chunk (left or right padding); they are packed,
in order, into the slots after each row's current length.

A model's cache is a `ModelCache`: per-layer caches stacked into *scan groups* (a run of
consecutive layers of identical structure, or a repeating pattern of layers such as Gemma 2's
local/global pairs), so the model can `lax.scan` over them, plus the position counter
`next_position [B]` shared by all layers (so the next position after eviction is always the
original length, in every layer).

Layout rule every cache kind follows: each array leaf of a layer cache is batch-leading
([B, ...]). `fork` (one context -> a batch of questions) and `kvjax.persist` rely on it.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import attention as attn_lib


def tree_nbytes(tree) -> int:
  """Exact bytes of every array leaf (works on arrays and ShapeDtypeStructs)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    total += int(math.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def pack_destinations(lengths, positions_new, capacity):
  """Slot index for each new token: [B, Hkv, T]; invalid tokens map to `capacity` (dropped).

  Args:
    lengths: [B, Hkv] current lengths.
    positions_new: [B, T] positions of new tokens (-1 = padding).
    capacity: static slot count.
  """
  valid = positions_new >= 0                               # [B, T]
  rank = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1  # [B, T]
  dest = lengths[:, :, None] + rank[:, None, :]            # [B, Hkv, T]
  return jnp.where(valid[:, None, :], dest, capacity)


def scatter_slots(buf, dest, new):
  """buf [B, H, S, ...] <- new [B, H, T, ...] at slots dest [B, H, T] (out of range: dropped)."""
  b, h = dest.shape[:2]
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]
  return buf.at[bi, hi, dest].set(new.astype(buf.dtype), mode="drop")


def _window_scatter(buf, lead, start, new):
  """buf[*lead, b, h, start[b, h] : start[b, h] + T] = new[b, h] for every (b, h).

  One contiguous [T, ...] window per (batch, head) row instead of one scatter index per
  token: XLA:CPU's scatter loops over indices, so a 4K-token prefill written token by token
  spent seconds here. Callers guarantee start + T <= S.
  """
  b, h, t = new.shape[:3]
  nl = len(lead)
  bi, hi = jnp.meshgrid(jnp.arange(b, dtype=jnp.int32), jnp.arange(h, dtype=jnp.int32),
                        indexing="ij")
  cols = [jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b, h)) for x in lead]
  idx = jnp.stack(cols + [bi, hi, start.astype(jnp.int32)], axis=-1)  # [B, H, nl + 3]
  rest = new.ndim - 3
  dnums = jax.lax.ScatterDimensionNumbers(
      update_window_dims=tuple(range(2, 3 + rest)),
      inserted_window_dims=tuple(range(nl + 2)),
      scatter_dims_to_operand_dims=tuple(range(nl + 3)))
  return jax.lax.scatter(buf, idx, new.astype(buf.dtype), dnums, indices_are_sorted=True,
                         unique_indices=True, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def write_tokens(bufs, lead, lengths, positions_new, news, capacity):
  """Writes new tokens after each row's length into `bufs` (k, v, positions) in place.

  bufs: arrays [*lead_dims, B, H, S, ...]; lead: indices into the leading dims (e.g.
  (layer,) for a stacked cache); news: [B, H, T, ...] each; positions_new [B, T].
  Valid tokens are packed in order (padding anywhere in the chunk is skipped). When every
  row has room for the whole chunk (max(length) + T <= S, the usual case) each row is one
  contiguous window write, else tokens are scattered one by one and overflow is dropped.
  """
  t = positions_new.shape[-1]
  if t > capacity:
    fits = False
  else:
    fits = jnp.max(lengths) + t <= capacity

  def packed(bufs):
    valid = positions_new >= 0
    order = jnp.argsort(~valid, axis=-1, stable=True)            # valid tokens first
    n_new = jnp.sum(valid, axis=-1)
    keep = jnp.arange(t)[None, :] < n_new[:, None]               # [B, T]
    out = []
    for buf, new in zip(bufs, news):
      idx = order.reshape(order.shape[:1] + (1, t) + (1,) * (new.ndim - 3))
      g = jnp.take_along_axis(new, idx, axis=2)
      mask = keep.reshape(keep.shape[:1] + (1, t) + (1,) * (new.ndim - 3))
      fill = -1 if jnp.issubdtype(new.dtype, jnp.integer) else 0
      out.append(_window_scatter(buf, lead, lengths, jnp.where(mask, g, fill)))
    return tuple(out)

  def tokenwise(bufs):
    dest = pack_destinations(lengths, positions_new, capacity)
    b, h = dest.shape[:2]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    return tuple(buf.at[tuple(lead) + (bi, hi, dest)].set(new.astype(buf.dtype), mode="drop")
                 for buf, new in zip(bufs, news))

  if fits is False:
    return tokenwise(bufs)
  return jax.lax.cond(fits, packed, tokenwise, tuple(bufs))


def check_room(lengths, positions_new, capacity, what="cache"):
  """Raises ValueError if appending would exceed capacity (only when values are concrete)."""
  if not (_is_concrete(lengths) and _is_concrete(positions_new)):
    return
  n_new = np.asarray(positions_new >= 0).sum(axis=-1)  # [B]
  need = np.asarray(lengths) + n_new[:, None]
  if (need > capacity).any():
    raise ValueError(
        f"{what} overflow: appending {n_new.tolist()} tokens to lengths "
        f"{np.asarray(lengths).max(axis=-1).tolist()} exceeds capacity={capacity}; "
        "raise `capacity`, or compress with a press / use a window cache")


@flax.struct.dataclass
class DenseKVCache:
  """Full-precision cache with static capacity and ragged, head-wise validity.

  Attributes:
    k: [B, Hkv, S, D] keys (RoPE applied).
    v: [B, Hkv, S, Dv] values.
    positions: [B, Hkv, S] int32 original token position per slot (-1 = empty).
    lengths: [B, Hkv] int32 number of valid slots (slots [0, length) are valid).
  """

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  lengths: jax.Array

  @classmethod
  def init(cls, batch: int, kv_heads: int, capacity: int, head_dim: int,
           dtype=jnp.float32, v_head_dim: Optional[int] = None) -> "DenseKVCache":
    """An empty cache of `capacity` slots."""
    if capacity < 1:
      raise ValueError(f"capacity={capacity}; must be >= 1")
    dv = head_dim if v_head_dim is None else v_head_dim
    return cls(
        k=jnp.zeros((batch, kv_heads, capacity, head_dim), dtype),
        v=jnp.zeros((batch, kv_heads, capacity, dv), dtype),
        positions=jnp.full((batch, kv_heads, capacity), -1, jnp.int32),
        lengths=jnp.zeros((batch, kv_heads), jnp.int32),
    )

  @property
  def capacity(self) -> int:
    return self.k.shape[-2]

  @property
  def batch(self) -> int:
    return self.k.shape[0]

  @property
  def kv_heads(self) -> int:
    return self.k.shape[1]

  @property
  def length(self) -> jax.Array:
    return self.lengths

  @property
  def nbytes(self) -> int:
    return tree_nbytes(self)

  def valid_mask(self) -> jax.Array:
    """[B, Hkv, S] bool: slot holds a token."""
    slot = jnp.arange(self.capacity, dtype=jnp.int32)
    return (slot < self.lengths[..., None]) & (self.positions >= 0)

  def check_room(self, positions_new) -> None:
    """Raises ValueError if appending positions_new [B, T] would overflow (concrete values)."""
    check_room(self.lengths, positions_new, self.capacity)

  def append(self, k_new, v_new, positions_new) -> "DenseKVCache":
    """Writes the valid new tokens after each row's current length.

    Raises ValueError when concrete lengths would overflow the capacity; under jit the
    overflowing writes are dropped and lengths saturate (models.decode checks before jit).
    """
    check_room(self.lengths, positions_new, self.capacity)
    pos_b = jnp.broadcast_to(positions_new[:, None, :], k_new.shape[:3])
    n_new = jnp.sum(positions_new >= 0, axis=-1).astype(jnp.int32)
    k, v, pos = write_tokens((self.k, self.v, self.positions), (), self.lengths, positions_new,
                             (k_new, v_new, pos_b), self.capacity)
    return self.replace(k=k, v=v, positions=pos,
                        lengths=jnp.minimum(self.lengths + n_new[:, None], self.capacity))

  def attend(self, q, k_new, v_new, q_positions, spec: attn_lib.AttentionSpec, *,
             sink_logits=None, return_colsum=False, colsum_window=None, return_lse=False):
    """Appends the new tokens, then attends q over the whole cache.

    Returns (AttentionOutput, new_cache); `colsum` (if asked) is aligned with new_cache slots.
    """
    new = self.append(k_new, v_new, q_positions)
    res = attn_lib.attention(q, new.k, new.v, new.lengths, q_positions=q_positions,
                             k_positions=new.positions, spec=spec, sink_logits=sink_logits,
                             return_lse=return_lse, return_colsum=return_colsum,
                             colsum_window=colsum_window)
    return res, new

  # -- stacked (layer-scanned) variants -----------------------------------------------------
  # When a model scans over a segment of layers, the segment's caches are one stacked pytree
  # carried through the scan. Writing the new tokens straight into the stacked arrays at
  # [layer, b, h, slot] keeps the update in place; slicing a layer out, updating it and
  # writing it back would copy the whole layer cache every step (measured ~10x slower).
  def append_stacked(self, layer, k_new, v_new, positions_new) -> "DenseKVCache":
    """append() on layer `layer` of a cache whose leaves carry a leading layer axis."""
    cap = self.k.shape[-2]
    lengths = self.lengths[layer]
    pos_b = jnp.broadcast_to(positions_new[:, None, :], k_new.shape[:3])
    n_new = jnp.sum(positions_new >= 0, axis=-1).astype(jnp.int32)
    k, v, pos = write_tokens((self.k, self.v, self.positions), (layer,), lengths,
                             positions_new, (k_new, v_new, pos_b), cap)
    return self.replace(
        k=k, v=v, positions=pos,
        lengths=self.lengths.at[layer].set(jnp.minimum(lengths + n_new[:, None], cap)),
    )

  def attend_stacked(self, layer, q, k_new, v_new, q_positions, spec, *, sink_logits=None,
                     return_colsum=False, colsum_window=None, return_lse=False):
    """attend() on layer `layer` of a stacked cache; returns (AttentionOutput, new stacked)."""
    new = self.append_stacked(layer, k_new, v_new, q_positions)
    # k/v stay stacked: attention reads the layer's blocks in place (no [B,H,S,D] copy).
    res = attn_lib.attention(q, new.k, new.v, new.lengths[layer],
                             q_positions=q_positions, k_positions=new.positions[layer],
                             spec=spec, sink_logits=sink_logits, return_lse=return_lse,
                             return_colsum=return_colsum, colsum_window=colsum_window,
                             layer=layer)
    return res, new


def stack(caches: Sequence[Any]):
  """Stacks same-structure layer caches along a new leading layer axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *caches)


def unstack(stacked, n: int):
  return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def _signature(cache):
  leaves, treedef = jax.tree.flatten(cache)
  return treedef, tuple((l.shape, str(l.dtype)) for l in leaves)


def group_layers(keys: Sequence[Any]) -> tuple:
  """Splits layers into scan groups: a tuple of (num_layers, period), in layer order.

  A group of period p repeats the pattern keys[a : a + p] r >= 2 times (period 1: a run of
  equal keys), so a model scans r times over a body of p layers and compile time stays flat
  in depth (Gemma 2's local/global pairs: one group of period 2; Gemma 3's 5:1 blocks:
  period 6). Greedy from the first layer: the period that covers the most layers wins,
  the shortest on ties.

  Args:
    keys: one hashable per layer; layers may share a scan step only if their keys are equal.
  """
  keys = list(keys)
  n = len(keys)
  out, i = [], 0
  while i < n:
    run = 1
    while i + run < n and keys[i + run] == keys[i]:
      run += 1
    best_p, best_cover = 1, run
    for p in range(2, (n - i) // 2 + 1):
      m = p
      while i + m < n and keys[i + m] == keys[i + m - p]:
        m += 1
      cover = (m // p) * p
      if m // p >= 2 and cover > best_cover:
        best_p, best_cover = p, cover
    out.append((best_cover, best_p))
    i += best_cover
  return tuple(out)


def _check_grouping(grouping, n_layers):
  total = 0
  for g in grouping:
    if len(g) != 2 or g[1] < 1 or g[0] < 1 or g[0] % g[1]:
      raise ValueError(f"grouping entry {g}: need (num_layers, period) with num_layers a "
                       "positive multiple of period")
    total += g[0]
  if total != n_layers:
    raise ValueError(f"grouping {grouping} covers {total} layers; there are {n_layers}")


@flax.struct.dataclass
class ModelCache:
  """Per-layer caches of a model, stacked into scan groups.

  A *group* of period p and r repetitions covers p * r consecutive layers a .. a + p*r - 1
  and is stored as p consecutive entries of `segments`: entry j stacks layers
  a + j, a + j + p, ..., a + j + (r-1)*p along a leading axis of size r. Period 1 is a run
  of consecutive layers of equal structure (one entry). The model scans r times over a body
  of p layers (kvjax.cache.group_layers).

  Attributes:
    segments: tuple of stacked layer caches ([r_i, ...] leaves; every leaf of a layer cache
      is batch-leading, so stacked leaves are [r_i, B, ...]).
    next_position: [B] int32 position of the next token of each row (the *original*
      sequence length, unaffected by eviction).
    segment_sizes: static tuple r_i (layers held by entry i; sum = number of layers).
    segment_periods: static tuple, the period of the group each entry belongs to
      (empty = all 1, consecutive runs).
  """

  segments: tuple
  next_position: jax.Array
  segment_sizes: tuple = flax.struct.field(pytree_node=False, default=())
  segment_periods: tuple = flax.struct.field(pytree_node=False, default=())

  @classmethod
  def from_layers(cls, layers: Sequence[Any], next_position, *, keys=None,
                  grouping=None) -> "ModelCache":
    """Stacks per-layer caches into scan groups.

    Args:
      layers: per-layer caches.
      next_position: [B] int.
      keys: optional per-layer hashables (e.g. (attention spec, structure)) that decide the
        groups; default: each layer's structure (pytree def + leaf shapes/dtypes).
      grouping: explicit ((num_layers, period), ...); default group_layers(keys).
    """
    layers = list(layers)
    sigs = [_signature(c) for c in layers]
    if grouping is None:
      grouping = group_layers(sigs if keys is None else
                              [(k, s) for k, s in zip(keys, sigs)])
    _check_grouping(grouping, len(layers))
    segs, sizes, periods = [], [], []
    a = 0
    for n, p in grouping:
      r = n // p
      for j in range(p):
        idx = [a + j + i * p for i in range(r)]
        if any(sigs[i] != sigs[idx[0]] for i in idx):
          raise ValueError(f"layers {idx} differ in structure; they cannot share a scan group")
        segs.append(stack([layers[i] for i in idx]))
        sizes.append(r)
        periods.append(p)
      a += n
    periods = tuple(periods) if any(p != 1 for p in periods) else ()
    return cls(segments=tuple(segs), next_position=jnp.asarray(next_position, jnp.int32),
               segment_sizes=tuple(sizes), segment_periods=periods)

  def groups(self) -> list:
    """[(first entry, period, repetitions, first layer)] in layer order."""
    periods = self.segment_periods or (1,) * len(self.segments)
    out, e, layer = [], 0, 0
    while e < len(self.segments):
      p, r = periods[e], self.segment_sizes[e]
      out.append((e, p, r, layer))
      e += p
      layer += p * r
    return out

  @property
  def grouping(self) -> tuple:
    """((num_layers, period), ...) of the scan groups."""
    return tuple((p * r, p) for _, p, r, _ in self.groups())

  def entry_layers(self) -> list:
    """For each entry of `segments`, the model layer of each stacked index."""
    out = []
    for _, p, r, a in self.groups():
      out.extend([a + j + i * p for i in range(r)] for j in range(p))
    return out

  def _per_layer(self, seq_of_entry):
    """Orders per-entry lists (entry i -> its r_i items) into layer order."""
    out = []
    for e, p, r, _ in self.groups():
      items = [seq_of_entry(e + j) for j in range(p)]
      for i in range(r):
        out.extend(items[j][i] for j in range(p))
    return out

  def layers(self) -> list:
    """Per-layer caches (unstacked views), in layer order."""
    return self._per_layer(lambda e: unstack(self.segments[e], self.segment_sizes[e]))

  def layer_structs(self) -> list:
    """Per-layer caches with jax.ShapeDtypeStruct leaves (no copies), in layer order."""
    def entry(e):
      one = jax.eval_shape(lambda s: jax.tree.map(lambda x: x[0], s), self.segments[e])
      return [one] * self.segment_sizes[e]
    return self._per_layer(entry)

  def regroup(self, grouping) -> "ModelCache":
    """The same layers stacked into other scan groups (copies the arrays)."""
    if tuple(map(tuple, grouping)) == self.grouping:
      return self
    return ModelCache.from_layers(self.layers(), self.next_position, grouping=grouping)

  def map_layers(self, fn) -> "ModelCache":
    """Applies fn(layer_index, layer_cache) -> layer_cache' to every layer.

    Keeps the scan groups when the new layers still fit them, else regroups by structure.
    """
    new = [fn(i, c) for i, c in enumerate(self.layers())]
    try:
      return ModelCache.from_layers(new, self.next_position, grouping=self.grouping)
    except ValueError:
      return ModelCache.from_layers(new, self.next_position)

  @property
  def num_layers(self) -> int:
    return sum(self.segment_sizes)

  @property
  def batch(self) -> int:
    return self.next_position.shape[0]

  @property
  def nbytes(self) -> int:
    return tree_nbytes(self)

  @property
  def layer_nbytes(self) -> tuple:
    """Exact bytes held by each layer's cache (next_position not included)."""
    return tuple(c.nbytes for c in self.layer_structs())

  @property
  def layer_kinds(self) -> tuple:
    """Per-layer cache kind names, e.g. ('WindowKVCache', 'DenseKVCache', ...)."""
    return tuple(type(c).__name__ for c in self.layer_structs())

  @property
  def capacity(self) -> tuple:
    """Per-layer static capacity."""
    return tuple(c.capacity for c in self.layer_structs())

  @property
  def length(self):
    """Per-layer [B, Hkv] lengths."""
    return tuple(c.length for c in self.layers())


def fork(cache, n: int):
  """Repeats every batch row n times (B -> B * n; row b becomes rows b*n .. b*n + n - 1).

  Forks one prefilled (and possibly compressed) context into n questions without
  recomputing it. Works for any cache kind because of one layout rule all kinds follow:
  **every array leaf of a layer cache is batch-leading** ([B, ...]); in a ModelCache the
  stacked segment leaves are [layers, B, ...] and `next_position` is [B].

  Args:
    cache: a ModelCache or a single layer cache.
    n: copies per row (int >= 1).
  """
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
    raise ValueError(f"n={n!r}; must be an int >= 1")
  n = int(n)

  def rep(axis, b):
    def f(path, x):
      if x.ndim <= axis or x.shape[axis] != b:
        raise ValueError(f"leaf {jax.tree_util.keystr(path)} has shape {x.shape}; expected "
                         f"batch {b} on axis {axis} (every cache leaf must be batch-leading)")
      return jnp.repeat(x, n, axis=axis)
    return f

  if isinstance(cache, ModelCache):
    b = cache.batch
    segs = tuple(jax.tree_util.tree_map_with_path(rep(1, b), s) for s in cache.segments)
    return cache.replace(segments=segs, next_position=jnp.repeat(cache.next_position, n))
  b = cache.length.shape[0]
  return jax.tree_util.tree_map_with_path(rep(0, b), cache)
