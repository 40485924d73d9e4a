"""What every compressed cache kind shares: the protocol on top of two primitives.

A compressed kind implements
  _write(k [B,Hkv,T,D], v [B,Hkv,T,Dv], pos [B,Hkv,T]) -> (cache', src [B,Hkv,S'])
      stores the valid new tokens (pos >= 0; head-wise positions, so a head-wise evicted
      dense cache converts too); `src[b,h,s']` says where the token in slot s' of cache'
      came from: an index into [the S slots of the old cache | the T chunk tokens], -1 if
      the slot is empty;
  materialize() -> KVView
      what attention reads, decompressed: k [B,Hkv,S,D], v, positions (-1 = empty), and
      `final` (slots whose content will never change again: a residual window is not final);
  capacity, nbytes (from the arrays), lengths [B,Hkv];
and gets from `CompressedCache`: append, attend, check_room, length, to_dense.

Attention semantics (reference path): `attend` reads the cache as it was, decompressed,
plus the current chunk's own keys/values exactly, and then stores the chunk; this is what a
serving system does when it prefills with full-precision keys and writes the cache
compressed. So prefill logits are exact and each decode step sees its own token exactly.
`attend` returns `colsum` aligned with the slots of the returned cache (through `src`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib


class KVView(NamedTuple):
  k: jax.Array          # [B, Hkv, S, D]
  v: jax.Array          # [B, Hkv, S, Dv]
  positions: jax.Array  # [B, Hkv, S] int32, -1 = empty
  final: jax.Array      # [B, Hkv, S] bool: valid and never rewritten by later appends


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def headwise_positions(positions_new, kv_heads):
  """[B, T] -> [B, Hkv, T]."""
  b, t = positions_new.shape
  return jnp.broadcast_to(positions_new[:, None, :], (b, kv_heads, t))


def chunk_destinations(lengths, pos, size):
  """Slot of each valid chunk token after `lengths` [B,H]; invalid -> size (dropped)."""
  valid = pos >= 0
  rank = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1
  return jnp.where(valid, lengths[..., None] + rank, size)


def gather_slots(x, idx):
  """x [B,H,S,...] at idx [B,H,R] -> [B,H,R,...] (idx clipped into range)."""
  idx = jnp.clip(idx, 0, x.shape[2] - 1)
  extra = x.ndim - 3
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * extra), axis=2)


class CompressedCache:
  """Mixin: the cache protocol for kinds that implement `_write` and `materialize`."""

  @property
  def length(self) -> jax.Array:
    return self.lengths

  @property
  def nbytes(self) -> int:
    return cache_lib.tree_nbytes(self)

  @property
  def batch(self) -> int:
    return self.lengths.shape[-2]

  @property
  def kv_heads(self) -> int:
    return self.lengths.shape[-1]

  def check_room(self, positions_new) -> None:
    """Raises ValueError if appending positions_new [B, T] would overflow (concrete values)."""
    cache_lib.check_room(self.lengths, positions_new, self.capacity,
                         what=type(self).__name__)

  def append(self, k_new, v_new, positions_new):
    """Stores the valid new tokens (positions_new [B, T], -1 = padding) after each row's."""
    self.check_room(positions_new)
    return self._write(k_new, v_new, headwise_positions(positions_new, k_new.shape[1]))[0]

  def attend(self, q, k_new, v_new, q_positions, spec: attn_lib.AttentionSpec, *,
             sink_logits=None, return_colsum=False, colsum_window=None, return_lse=False):
    """Attends q over the decompressed cache plus the exact chunk, then stores the chunk.

    Returns (AttentionOutput, new_cache); colsum (if asked) is aligned with new_cache slots.
    """
    self.check_room(q_positions)
    pos_new = headwise_positions(q_positions, k_new.shape[1])
    past = self.materialize()
    new, src = self._write(k_new, v_new, pos_new)
    dt = past.k.dtype
    k = jnp.concatenate([past.k, k_new.astype(dt)], axis=2)
    v = jnp.concatenate([past.v, v_new.astype(dt)], axis=2)
    pos = jnp.concatenate([past.positions, pos_new], axis=-1)
    b, h, s = pos.shape
    res = attn_lib.attention(q, k, v, jnp.full((b, h), s, jnp.int32), q_positions=q_positions,
                             k_positions=pos, spec=spec, sink_logits=sink_logits,
                             return_lse=return_lse, return_colsum=return_colsum,
                             colsum_window=colsum_window)
    if return_colsum:
      colsum = jnp.where(src >= 0, jnp.take_along_axis(res.colsum, jnp.maximum(src, 0), -1), 0.)
      res = res._replace(colsum=colsum)
    return res, new

  def to_dense(self, capacity=None, dtype=None) -> cache_lib.DenseKVCache:
    """A DenseKVCache of the decompressed tokens, packed in slot order (ragged lengths)."""
    view = self.materialize()
    valid = view.positions >= 0
    cap = self.capacity if capacity is None else capacity
    dest = chunk_destinations(jnp.zeros(valid.shape[:2], jnp.int32),
                              jnp.where(valid, view.positions, -1), cap)
    dt = view.k.dtype if dtype is None else dtype
    b, h, _, d = view.k.shape
    dense = cache_lib.DenseKVCache.init(b, h, cap, d, dt, v_head_dim=view.v.shape[-1])
    return dense.replace(
        k=cache_lib.scatter_slots(dense.k, dest, view.k),
        v=cache_lib.scatter_slots(dense.v, dest, view.v),
        positions=cache_lib.scatter_slots(dense.positions, dest, view.positions),
        lengths=jnp.minimum(jnp.sum(valid, axis=-1).astype(jnp.int32), cap))
