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

A model's cache is a `ModelCache`: per-layer caches grouped into *segments* of consecutive
layers with identical structure (stacked along a leading layer axis so the model can
`lax.scan` over them), plus the position counter `next_position [B]` shared by all layers
(so the next position after eviction is always the original length, in every layer).
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
    dest = pack_destinations(self.lengths, positions_new, self.capacity)
    pos_b = jnp.broadcast_to(positions_new[:, None, :], dest.shape)
    n_new = jnp.sum(positions_new >= 0, axis=-1).astype(jnp.int32)
    return self.replace(
        k=scatter_slots(self.k, dest, k_new),
        v=scatter_slots(self.v, dest, v_new),
        positions=scatter_slots(self.positions, dest, pos_b),
        lengths=jnp.minimum(self.lengths + n_new[:, None], self.capacity),
    )

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
    dest = pack_destinations(lengths, positions_new, cap)
    b, h = dest.shape[:2]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    pos_b = jnp.broadcast_to(positions_new[:, None, :], dest.shape)
    n_new = jnp.sum(positions_new >= 0, axis=-1).astype(jnp.int32)
    return self.replace(
        k=self.k.at[layer, bi, hi, dest].set(k_new.astype(self.k.dtype), mode="drop"),
        v=self.v.at[layer, bi, hi, dest].set(v_new.astype(self.v.dtype), mode="drop"),
        positions=self.positions.at[layer, bi, hi, dest].set(pos_b, mode="drop"),
        lengths=self.lengths.at[layer].set(jnp.minimum(lengths + n_new[:, None], cap)),
    )

  def attend_stacked(self, layer, q, k_new, v_new, q_positions, spec, *, sink_logits=None,
                     return_colsum=False, colsum_window=None, return_lse=False):
    """attend() on layer `layer` of a stacked cache; returns (AttentionOutput, new stacked)."""
    new = self.append_stacked(layer, k_new, v_new, q_positions)
    res = attn_lib.attention(q, new.k[layer], new.v[layer], new.lengths[layer],
                             q_positions=q_positions, k_positions=new.positions[layer],
                             spec=spec, sink_logits=sink_logits, return_lse=return_lse,
                             return_colsum=return_colsum, colsum_window=colsum_window)
    return res, new


def stack(caches: Sequence[Any]):
  """Stacks same-structure layer caches along a new leading layer axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *caches)


def unstack(stacked, n: int):
  return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def _signature(cache):
  leaves, treedef = jax.tree.flatten(cache)
  return treedef, tuple((l.shape, str(l.dtype)) for l in leaves)


@flax.struct.dataclass
class ModelCache:
  """Per-layer caches of a model, grouped into stacked segments of consecutive layers.

  Attributes:
    segments: tuple of layer caches, each stacked over its layers ([n_i, ...] leaves).
    next_position: [B] int32 position of the next token of each row (the *original*
      sequence length, unaffected by eviction).
    segment_sizes: static tuple n_i (sum = number of layers).
  """

  segments: tuple
  next_position: jax.Array
  segment_sizes: tuple = flax.struct.field(pytree_node=False, default=())

  @classmethod
  def from_layers(cls, layers: Sequence[Any], next_position) -> "ModelCache":
    """Groups consecutive layers of identical structure and stacks them."""
    segs, sizes = [], []
    run = [layers[0]]
    for c in layers[1:]:
      if _signature(c) == _signature(run[-1]):
        run.append(c)
      else:
        segs.append(stack(run))
        sizes.append(len(run))
        run = [c]
    segs.append(stack(run))
    sizes.append(len(run))
    return cls(segments=tuple(segs), next_position=jnp.asarray(next_position, jnp.int32),
               segment_sizes=tuple(sizes))

  def layers(self) -> list:
    """Per-layer caches (unstacked views)."""
    out = []
    for seg, n in zip(self.segments, self.segment_sizes):
      out.extend(unstack(seg, n))
    return out

  def map_layers(self, fn) -> "ModelCache":
    """Applies fn(layer_index, layer_cache) -> layer_cache' to every layer, regrouping."""
    new = [fn(i, c) for i, c in enumerate(self.layers())]
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
  def capacity(self) -> tuple:
    """Per-layer static capacity."""
    return tuple(c.capacity for c in self.layers())

  @property
  def length(self):
    """Per-layer [B, Hkv] lengths."""
    return tuple(c.length for c in self.layers())
