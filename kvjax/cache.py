"""KV cache pytrees and the protocol every cache kind shares.

A cache kind is a registered pytree (flax.struct dataclass) with **static capacity**;
ragged validity is data: per-slot original `positions` and per-(batch, kv-head)
`lengths`. Every KV layer cache (`LayerCache`) implements:

  append(k_new, v_new, positions, *, layer=None)          -> cache'    write new tokens
  attend(q, k_new, v_new, q_positions, spec, *, sink_logits=None, return_colsum=False,
         colsum_window=None, return_lse=False, layer=None) -> (AttentionOutput, cache')
  check_room(positions)        raises ValueError if appending would overflow (concrete values)
  materialize()                -> KVView   what attention reads, decompressed
  to_dense(capacity=None, dtype=None) -> DenseKVCache of the same tokens
  nbytes                       -> int         exact bytes of every array held
  capacity                     -> int         static slot count
  length                       -> [B, Hkv]    valid slots (data)
  CAPS                         -> Capabilities (class attribute; see `Capabilities`)

`layer=i` runs the same operation on layer i of a cache whose leaves carry a leading layer
axis (a `ModelCache` segment inside the model's layer scan) and returns the whole stacked
cache. Kinds with `CAPS.inplace_layer` write layer i's slots in place; for the others the
shared base (`KVCacheBase`) slices the layer out, runs the operation and writes it back.

Shapes: k [B, Hkv, S, D], v [B, Hkv, S, Dv], positions [B, Hkv, S] (-1 = empty),
lengths [B, Hkv]. New tokens: k_new [B, Hkv, T, D], positions [B, T] (-1 = padding).
Valid new tokens may sit anywhere in the chunk (left or right padding); they are packed,
in order, into the slots after each row's current length.

Recurrent states (kvjax.recurrent) follow a protocol of their own, `RecurrentState`
(`scan(inputs, positions, **options) -> (outputs, state')`); they share `nbytes`,
`capacity` (0: no token slots), `length`, `check_room` and `CAPS` with the KV kinds, so both
ride in one `ModelCache`.

A model's cache is a `ModelCache`: per-layer caches stacked into *scan groups* (a run of
consecutive layers of identical structure, or a repeating pattern of layers such as Gemma 2's
local/global pairs), so the model can `lax.scan` over them, plus the position counter
`next_position [B]` shared by all layers (so the next position after eviction is always the
original length, in every layer).

Layout rule every cache kind follows: each array leaf of a layer cache is batch-leading
([B, ...]). `fork` (one context -> a batch of questions) and `kvjax.persist` rely on it.

One file on purpose (about 770 lines): the written protocol, its capabilities, the dense kind
that every other kind converts to, and ModelCache are the contract the rest of kvjax reads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple, Optional, Protocol, Sequence

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
  Valid tokens are packed in order (padding anywhere in the chunk is skipped); tokens past
  the capacity are dropped. One token per row is one window write per row, a longer chunk
  is scattered token by token.
  """
  t = positions_new.shape[-1]

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

  news = tuple(stored_as(n, b.dtype) for n, b in zip(news, bufs))
  # One token per row (decode): the window write is exact even on overflow (the window is
  # that token, dropped). Longer chunks go token by token. No lax.cond: XLA copies the whole
  # buffer around a conditional write (for a layer-stacked cache, every layer's).
  return packed(bufs) if t == 1 else tokenwise(bufs)


# XLA:CPU runs a write into (or a slice of) a bfloat16 buffer by converting the whole buffer
# to float32 and back; for a layer-stacked cache carried through the model's layer scan that
# is every layer's cache at every layer of every step (a 2K-token decode step took 10x the
# float32 one). So the scan carries bfloat16 keys and values as their uint16 bits
# (`to_bits` / `from_bits`, models/transformer.forward): writes store bits (`stored_as`) and
# attention converts each block it reads (kvjax.attention). A uint16 key/value buffer always
# holds bfloat16 bits.
BITS_DTYPE = jnp.uint16


def stored_as(new, dtype):
  """`new` as a buffer of `dtype` stores it: bfloat16 bits for a uint16 buffer."""
  if jnp.dtype(dtype) == BITS_DTYPE and jnp.issubdtype(new.dtype, jnp.floating):
    return jax.lax.bitcast_convert_type(new.astype(jnp.bfloat16), BITS_DTYPE)
  return new.astype(dtype)


def to_bits(layer_cache):
  """A pressable (dense-layout) cache with bfloat16 k/v as uint16 bits; else unchanged."""
  if not caps(layer_cache).pressable or layer_cache.k.dtype != jnp.bfloat16:
    return layer_cache
  return layer_cache.replace(k=jax.lax.bitcast_convert_type(layer_cache.k, BITS_DTYPE),
                             v=jax.lax.bitcast_convert_type(layer_cache.v, BITS_DTYPE))


def from_bits(layer_cache):
  """Inverse of `to_bits`."""
  if not caps(layer_cache).pressable or layer_cache.k.dtype != BITS_DTYPE:
    return layer_cache
  return layer_cache.replace(k=jax.lax.bitcast_convert_type(layer_cache.k, jnp.bfloat16),
                             v=jax.lax.bitcast_convert_type(layer_cache.v, jnp.bfloat16))


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


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """What a cache kind can do, declared once per class as `CAPS` and read through `caps()`.

  Callers branch on these flags, never on a kind's type or on the attributes it happens to
  have.

  Attributes:
    pressable: presses (kvjax.presses) score and gather its slots: it holds `k`, `v`,
      `positions`, `lengths` in DenseKVCache's slot layout. Presses compress exactly the
      pressable layers of a model and leave every other layer as it is.
    fixed_size: it holds a bounded number of tokens whatever the sequence length (sliding
      window rings, recurrent states), so it never overflows.
    colsum: `attend(..., return_colsum=True)` returns colsum aligned with its slots.
    inplace_layer: `attend(..., layer=i)` / `append(..., layer=i)` write layer i of a stacked
      cache in place; without it the shared base slices the layer out and writes it back,
      so the model scans such a segment as per-layer inputs instead of a carried stack.
    quantized: stores compressed codes (kvjax.quant); `to_dense()` decompresses them.
    convertible: `kvjax.quant.quantize` / `convert_layer` accept it (its `to_dense()`
      gives the tokens exactly as attention reads them).
    paged: its slots live in a page pool shared by every row (kvjax.paged), which the
      engine, offload and policies manage through the pool's own functions.
    recurrent: a `RecurrentState` (no token slots; `scan` instead of `attend`).
    offloaded: a whole model's cache held in host memory (kvjax.offload HostCache /
      QuestCache); it has a ModelCache's `next_position`, `batch`, `num_layers`, `nbytes`
      and `check_room`, and `offload_mode` says how a model runs a step over it.
  """

  pressable: bool = False
  fixed_size: bool = False
  colsum: bool = False
  inplace_layer: bool = False
  quantized: bool = False
  convertible: bool = False
  paged: bool = False
  recurrent: bool = False
  offloaded: bool = False


NO_CAPS = Capabilities()


def caps(cache) -> Capabilities:
  """The Capabilities of a layer cache's kind (a kind that declares none has none)."""
  return getattr(type(cache), "CAPS", NO_CAPS)


def is_model_cache(x) -> bool:
  """Whether x is a ModelCache (a whole model's cache, not one layer's)."""
  return isinstance(x, ModelCache)


def require_model_cache(x, name: str = "cache") -> None:
  """ValueError naming the argument unless x is a ModelCache."""
  if not is_model_cache(x):
    raise ValueError(f"{name} must be a kvjax.cache.ModelCache; got {type(x).__name__}")


class KVView(NamedTuple):
  """What attention reads from a KV layer cache, decompressed (`materialize()`)."""

  k: jax.Array          # [B, Hkv, S, D]
  v: jax.Array          # [B, Hkv, S, Dv]
  positions: jax.Array  # [B, Hkv, S] int32, -1 = empty
  final: jax.Array      # [B, Hkv, S] bool: valid and never rewritten by later appends


class LayerCache(Protocol):
  """The protocol of every KV layer cache kind (see the module docstring for shapes).

  append(k_new, v_new, positions, *, layer=None)
      write new tokens after each row's length; returns the new cache.
  attend(q, k_new, v_new, q_positions, spec, *, sink_logits, return_colsum, colsum_window,
         return_lse, layer=None)
      one attention step over past + new tokens: (AttentionOutput, cache').
  check_room(positions)   ValueError if appending would overflow (concrete values).
  materialize()           `KVView` of what attention reads.
  to_dense(capacity=None, dtype=None)   a DenseKVCache of the same tokens.
  nbytes                  exact bytes of every array held (scales, indices, residuals).
  capacity                static slot count.
  length                  valid slots per (batch, kv head), [B, Hkv] int32.
  head_dims               (D, Dv): key and value head dims attention reads (decompressed).
  CAPS                    the kind's `Capabilities` (a class attribute).
  """

  CAPS: ClassVar[Capabilities]

  def append(self, k_new, v_new, positions_new, *, layer=None) -> "LayerCache": ...

  def attend(self, q, k_new, v_new, q_positions, spec, *, sink_logits=None,
             return_colsum=False, colsum_window=None, return_lse=False, layer=None): ...

  def check_room(self, positions_new) -> None: ...

  def materialize(self) -> KVView: ...

  def to_dense(self, capacity=None, dtype=None) -> "DenseKVCache": ...

  @property
  def nbytes(self) -> int: ...

  @property
  def capacity(self) -> int: ...

  @property
  def length(self) -> jax.Array: ...

  @property
  def head_dims(self) -> tuple: ...


def take_layer(stacked, layer):
  """Layer `layer` of a cache whose leaves carry a leading layer axis."""
  return jax.tree.map(lambda x: x[layer], stacked)


def put_layer(stacked, layer, one):
  """`stacked` with layer `layer` replaced by the unstacked cache `one`."""
  return jax.tree.map(lambda s, x: s.at[layer].set(x.astype(s.dtype)), stacked, one)


class KVCacheBase:
  """The members every KV layer cache shares, written once.

  A kind implements `_append(k_new, v_new, positions_new)`, `_attend(q, k_new, v_new,
  q_positions, spec, **options)` on one (unstacked) layer, `materialize()` and `capacity`,
  and holds `lengths [B, Hkv]`. It gets `append` / `attend` with `layer=` (slice, run,
  write back; a kind with an in-place path overrides `_append_layer` / `_attend_layer`
  and sets `CAPS.inplace_layer`), `length`, `nbytes`, `batch`, `kv_heads`, `check_room`
  and `to_dense` from here.
  """

  CAPS: ClassVar[Capabilities] = NO_CAPS

  @property
  def length(self) -> jax.Array:
    return self.lengths

  @property
  def nbytes(self) -> int:
    return tree_nbytes(self)

  @property
  def batch(self) -> int:
    return self.lengths.shape[-2]

  @property
  def kv_heads(self) -> int:
    return self.lengths.shape[-1]

  @property
  def head_dims(self) -> tuple:
    """(D, Dv) of the keys and values attention reads."""
    return self.k.shape[-1], self.v.shape[-1]

  def check_room(self, positions_new) -> None:
    """Raises ValueError if appending positions_new [B, T] would overflow (concrete values)."""
    check_room(self.lengths, positions_new, self.capacity, what=type(self).__name__)

  def append(self, k_new, v_new, positions_new, *, layer=None):
    """Writes the valid new tokens (positions_new [B, T], -1 = padding) after each row's.

    With `layer`, appends to that layer of a stacked cache and returns the stacked cache.
    """
    if layer is None:
      return self._append(k_new, v_new, positions_new)
    return self._append_layer(layer, k_new, v_new, positions_new)

  def attend(self, q, k_new, v_new, q_positions, spec, *, sink_logits=None,
             return_colsum=False, colsum_window=None, return_lse=False, layer=None):
    """Attends q over the past and the new tokens, then stores the new tokens.

    Args:
      q: [B, Hq, T, D] queries (RoPE applied).
      k_new, v_new: [B, Hkv, T, D] / [B, Hkv, T, Dv] the chunk's keys and values.
      q_positions: [B, T] int32 (-1 = padding).
      spec: kvjax.attention.AttentionSpec.
      sink_logits, return_colsum, colsum_window, return_lse: as kvjax.attention.attention.
      layer: None, or the layer of a stacked cache (leaves [L, B, ...]) to run on.

    Returns:
      (AttentionOutput, new cache); `colsum` (if asked) is aligned with the new cache's
      slots. With `layer`, the new cache is the whole stacked cache.
    """
    akw = dict(sink_logits=sink_logits, return_colsum=return_colsum,
               colsum_window=colsum_window, return_lse=return_lse)
    if layer is None:
      return self._attend(q, k_new, v_new, q_positions, spec, **akw)
    return self._attend_layer(layer, q, k_new, v_new, q_positions, spec, **akw)

  def _append_layer(self, layer, k_new, v_new, positions_new):
    one = take_layer(self, layer)._append(k_new, v_new, positions_new)
    return put_layer(self, layer, one)

  def _attend_layer(self, layer, q, k_new, v_new, q_positions, spec, **akw):
    res, one = take_layer(self, layer)._attend(q, k_new, v_new, q_positions, spec, **akw)
    return res, put_layer(self, layer, one)

  def to_dense(self, capacity=None, dtype=None) -> "DenseKVCache":
    """A DenseKVCache of the decompressed tokens, packed in slot order (ragged lengths)."""
    view = self.materialize()
    valid = view.positions >= 0
    cap = self.capacity if capacity is None else capacity
    dest = chunk_destinations(jnp.zeros(valid.shape[:2], jnp.int32),
                                      jnp.where(valid, view.positions, -1), cap)
    dt = view.k.dtype if dtype is None else dtype
    b, h, _, d = view.k.shape
    dense = DenseKVCache.init(b, h, cap, d, dt, v_head_dim=view.v.shape[-1])
    return dense.replace(
        k=scatter_slots(dense.k, dest, view.k),
        v=scatter_slots(dense.v, dest, view.v),
        positions=scatter_slots(dense.positions, dest, view.positions),
        lengths=jnp.minimum(jnp.sum(valid, axis=-1).astype(jnp.int32), cap))


def chunk_destinations(lengths, pos, size):
  """Slot of each valid token after `lengths` [B, H]; pos [B, H, T] (-1 = padding), invalid
  tokens -> size (dropped)."""
  valid = pos >= 0
  rank = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1
  return jnp.where(valid, lengths[..., None] + rank, size)


@flax.struct.dataclass
class DenseKVCache(KVCacheBase):
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

  CAPS: ClassVar[Capabilities] = Capabilities(pressable=True, colsum=True, inplace_layer=True,
                                              convertible=True)

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

  def valid_mask(self) -> jax.Array:
    """[B, Hkv, S] bool: slot holds a token."""
    slot = jnp.arange(self.capacity, dtype=jnp.int32)
    return (slot < self.lengths[..., None]) & (self.positions >= 0)

  def check_room(self, positions_new) -> None:
    """Raises ValueError if appending positions_new [B, T] would overflow (concrete values)."""
    check_room(self.lengths, positions_new, self.capacity)

  def materialize(self) -> KVView:
    valid = self.valid_mask()
    return KVView(self.k, self.v, jnp.where(valid, self.positions, -1), valid)

  def to_dense(self, capacity=None, dtype=None) -> "DenseKVCache":
    """Itself (repacked only when another capacity or dtype is asked for)."""
    if capacity is None and dtype is None:
      return self
    return super().to_dense(capacity, dtype)

  def _append(self, k_new, v_new, positions_new) -> "DenseKVCache":
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

  def _attend(self, q, k_new, v_new, q_positions, spec: attn_lib.AttentionSpec, **akw):
    """Appends the new tokens, then attends q over the whole cache."""
    new = self._append(k_new, v_new, q_positions)
    res = attn_lib.attention(q, new.k, new.v, new.lengths, q_positions=q_positions,
                             k_positions=new.positions, spec=spec, **akw)
    return res, new

  # -- in-place layer path -------------------------------------------------------------------
  # When a model scans over a segment of layers, the segment's caches are one stacked pytree
  # carried through the scan. Writing the new tokens straight into the stacked arrays at
  # [layer, b, h, slot] keeps the update in place; slicing a layer out, updating it and
  # writing it back would copy the whole layer cache every step (measured ~10x slower).
  def _append_layer(self, layer, k_new, v_new, positions_new) -> "DenseKVCache":
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

  def _attend_layer(self, layer, q, k_new, v_new, q_positions, spec, **akw):
    new = self._append_layer(layer, k_new, v_new, q_positions)
    # k/v stay stacked: attention reads the layer's blocks in place (no [B,H,S,D] copy).
    res = attn_lib.attention(q, new.k, new.v, new.lengths[layer],
                             q_positions=q_positions, k_positions=new.positions[layer],
                             spec=spec, layer=layer, **akw)
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

  def pressable_layers(self) -> tuple:
    """Indices (layer order) of the layers presses compress: kinds with `CAPS.pressable`.

    The one rule for every model: presses compress these layers and leave the others
    (window rings, recurrent states, latents, quantized or paged layers) as they are.
    """
    return tuple(i for i, c in enumerate(self.layer_structs()) if caps(c).pressable)

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
