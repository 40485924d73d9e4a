"""`WindowKVCache`: a ring buffer of exactly `window` slots for sliding-window layers.

A sliding-window layer (Mistral; Gemma 2/3 local layers; Beltagy et al., 2020, Longformer)
lets a query at position p see the W tokens p-W+1 .. p. Its cache therefore never needs
more than the last W tokens: this kind holds them in a ring of W slots (plus, optionally,
`sink` slots that keep the first tokens forever, as StreamingLLM's attention sinks do;
Xiao et al., 2023), so decode runs to any length in fixed memory.

Layout (same fields as `DenseKVCache`, plus a write counter):
  k [B, Hkv, S, D], v [B, Hkv, S, Dv], positions [B, Hkv, S] int32 (-1 = empty),
  lengths [B, Hkv] int32 valid slots = min(total, S), slots [0, lengths) are valid,
  total [B, Hkv] int32 tokens ever written (decides the next slot),
  S = sink + window (static).
The n-th token written to a row (n = 0, 1, ...) goes to slot n if n < sink, else to
sink + (n - sink) mod window. Slots are not in position order once the ring wraps; that
does not matter to attention, which masks by position (docs/CONVENTIONS.md).

Exactness. A chunk of T tokens is attended over [ring contents ; the chunk] (S + T keys),
then only the last `window` chunk tokens are written (earlier ones would be overwritten in
the same step anyway). Every key a chunk query may see (position > q - W) is either in
the chunk or among the last W tokens before it, so prefill of a prompt longer than the
window is exact. For T == 1 the new token is written first and attended in place: it
overwrites the token written W steps earlier, whose position is <= p - W, i.e. already
outside the query's window. The layer's `AttentionSpec.window` must be <= this cache's
window (and its `sink_tokens` <= `sink`); `attend` raises otherwise.

Differs from transformers' `DynamicSlidingWindowLayer`, which keeps W - 1 past tokens plus
the current chunk: here the ring holds W tokens so a cache never grows past W slots.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib


def _ring_destinations(total, positions_new, sink: int, window: int):
  """Slots [B, Hkv, T] for the valid new tokens (positions_new [B, T], -1 = padding).

  Tokens that a later token of the same chunk overwrites are dropped (slot = capacity),
  so the scatter never writes one slot twice.
  """
  cap = sink + window
  valid = positions_new >= 0                                   # [B, T]
  rank = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1      # [B, T]
  n_new = jnp.sum(valid, axis=-1).astype(jnp.int32)            # [B]
  n = total[:, :, None] + rank[:, None, :]                     # [B, Hkv, T] write index
  slot = jnp.where(n < sink, n, sink + (n - sink) % window)
  survives = (n < sink) | (rank[:, None, :] >= n_new[:, None, None] - window)
  keep = valid[:, None, :] & survives
  return jnp.where(keep, slot, cap), n_new


@flax.struct.dataclass
class WindowKVCache:
  """Ring-buffer cache of `sink + window` slots (see module docstring).

  Attributes:
    k: [B, Hkv, S, D] keys (RoPE applied).
    v: [B, Hkv, S, Dv] values.
    positions: [B, Hkv, S] int32 original token position per slot (-1 = empty).
    lengths: [B, Hkv] int32 valid slots (min(total, S)).
    total: [B, Hkv] int32 tokens ever written.
    sink: static number of leading slots that keep the first tokens forever.
  """

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  lengths: jax.Array
  total: jax.Array
  sink: int = flax.struct.field(pytree_node=False, default=0)

  BYTE_CATEGORIES = {"total": "index"}  # kvjax.memory: the write counter is bookkeeping

  @classmethod
  def init(cls, batch: int, kv_heads: int, window: int, head_dim: int, dtype=jnp.float32,
           v_head_dim: Optional[int] = None, sink: int = 0) -> "WindowKVCache":
    """An empty ring of `sink + window` slots."""
    if not isinstance(window, int) or window < 1:
      raise ValueError(f"window={window!r}; must be an int >= 1")
    if not isinstance(sink, int) or sink < 0:
      raise ValueError(f"sink={sink!r}; must be an int >= 0")
    dv = head_dim if v_head_dim is None else v_head_dim
    cap = sink + window
    return cls(
        k=jnp.zeros((batch, kv_heads, cap, head_dim), dtype),
        v=jnp.zeros((batch, kv_heads, cap, dv), dtype),
        positions=jnp.full((batch, kv_heads, cap), -1, jnp.int32),
        lengths=jnp.zeros((batch, kv_heads), jnp.int32),
        total=jnp.zeros((batch, kv_heads), jnp.int32),
        sink=sink,
    )

  @property
  def capacity(self) -> int:
    return self.k.shape[-2]

  @property
  def window(self) -> int:
    return self.k.shape[-2] - self.sink

  @property
  def batch(self) -> int:
    return self.k.shape[-4]

  @property
  def kv_heads(self) -> int:
    return self.k.shape[-3]

  @property
  def length(self) -> jax.Array:
    return self.lengths

  @property
  def nbytes(self) -> int:
    return cache_lib.tree_nbytes(self)

  def valid_mask(self) -> jax.Array:
    """[B, Hkv, S] bool: slot holds a token."""
    slot = jnp.arange(self.capacity, dtype=jnp.int32)
    return (slot < self.lengths[..., None]) & (self.positions >= 0)

  def check_room(self, positions_new) -> None:
    """A ring never overflows: older tokens leave the window."""
    del positions_new

  def _check_spec(self, spec: attn_lib.AttentionSpec):
    if spec.window is None or spec.window > self.window:
      raise ValueError(f"WindowKVCache holds the last {self.window} tokens but the layer's "
                       f"AttentionSpec.window={spec.window}; a ring cache needs a window "
                       "<= its own (use a DenseKVCache for full-attention layers)")
    if spec.sink_tokens > self.sink:
      raise ValueError(f"AttentionSpec.sink_tokens={spec.sink_tokens} > the cache's "
                       f"sink={self.sink} slots")

  def append(self, k_new, v_new, positions_new) -> "WindowKVCache":
    """Writes the valid new tokens; the oldest leave the ring (never raises)."""
    dest, n_new = _ring_destinations(self.total, positions_new, self.sink, self.window)
    pos_b = jnp.broadcast_to(positions_new[:, None, :], dest.shape)
    total = self.total + n_new[:, None]
    return self.replace(
        k=cache_lib.scatter_slots(self.k, dest, k_new),
        v=cache_lib.scatter_slots(self.v, dest, v_new),
        positions=cache_lib.scatter_slots(self.positions, dest, pos_b),
        lengths=jnp.minimum(total, self.capacity),
        total=total,
    )

  def attend(self, q, k_new, v_new, q_positions, spec: attn_lib.AttentionSpec, *,
             sink_logits=None, return_colsum=False, colsum_window=None, return_lse=False):
    """Attends q over [ring ; chunk] (exact, see module docstring), then stores the chunk.

    Returns (AttentionOutput, new_cache); `colsum` (if asked) is aligned with new_cache slots.
    """
    self._check_spec(spec)
    akw = dict(spec=spec, sink_logits=sink_logits, return_lse=return_lse,
               return_colsum=return_colsum, colsum_window=colsum_window)
    if q.shape[2] == 1:
      new = self.append(k_new, v_new, q_positions)
      res = attn_lib.attention(q, new.k, new.v, new.lengths, q_positions=q_positions,
                               k_positions=new.positions, **akw)
      return res, new
    res = _attend_concat(q, self.k, self.v, self.positions, k_new, v_new, q_positions, akw)
    new = self.append(k_new, v_new, q_positions)
    if return_colsum:
      res = res._replace(colsum=self._colsum_to_slots(self.total, q_positions, res.colsum))
    return res, new

  def _colsum_to_slots(self, total, q_positions, colsum):
    """colsum over [S old slots ; T chunk tokens] -> [B, Hkv, S] aligned with the new ring."""
    s = self.capacity
    dest, _ = _ring_destinations(total, q_positions, self.sink, self.window)
    return cache_lib.scatter_slots(colsum[..., :s], dest, colsum[..., s:])

  # -- stacked (layer-scanned) variants: update [layer, b, h, slot] in place -------------
  def append_stacked(self, layer, k_new, v_new, positions_new) -> "WindowKVCache":
    """append() on layer `layer` of a cache whose leaves carry a leading layer axis."""
    dest, n_new = _ring_destinations(self.total[layer], positions_new, self.sink, self.window)
    b, h = dest.shape[:2]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    pos_b = jnp.broadcast_to(positions_new[:, None, :], dest.shape)
    total = self.total[layer] + n_new[:, None]
    return self.replace(
        k=self.k.at[layer, bi, hi, dest].set(k_new.astype(self.k.dtype), mode="drop"),
        v=self.v.at[layer, bi, hi, dest].set(v_new.astype(self.v.dtype), mode="drop"),
        positions=self.positions.at[layer, bi, hi, dest].set(pos_b, mode="drop"),
        lengths=self.lengths.at[layer].set(jnp.minimum(total, self.capacity)),
        total=self.total.at[layer].set(total),
    )

  def attend_stacked(self, layer, q, k_new, v_new, q_positions, spec, *, sink_logits=None,
                     return_colsum=False, colsum_window=None, return_lse=False):
    """attend() on layer `layer` of a stacked cache; returns (AttentionOutput, new stacked)."""
    self._check_spec(spec)
    akw = dict(spec=spec, sink_logits=sink_logits, return_lse=return_lse,
               return_colsum=return_colsum, colsum_window=colsum_window)
    if q.shape[2] == 1:
      new = self.append_stacked(layer, k_new, v_new, q_positions)
      res = attn_lib.attention(q, new.k[layer], new.v[layer], new.lengths[layer],
                               q_positions=q_positions, k_positions=new.positions[layer], **akw)
      return res, new
    res = _attend_concat(q, self.k[layer], self.v[layer], self.positions[layer], k_new, v_new,
                         q_positions, akw)
    total = self.total[layer]
    new = self.append_stacked(layer, k_new, v_new, q_positions)
    if return_colsum:
      res = res._replace(colsum=self._colsum_to_slots(total, q_positions, res.colsum))
    return res, new


def _attend_concat(q, k, v, positions, k_new, v_new, q_positions, akw):
  """Attention over [ring slots ; chunk]; empty slots and padding carry position -1."""
  b, h, s = positions.shape
  t = k_new.shape[2]
  kk = jnp.concatenate([k, k_new.astype(k.dtype)], axis=2)
  vv = jnp.concatenate([v, v_new.astype(v.dtype)], axis=2)
  pos_new = jnp.broadcast_to(q_positions[:, None, :], (b, h, t))
  kp = jnp.concatenate([positions, pos_new], axis=-1)
  return attn_lib.attention(q, kk, vv, jnp.full((b, h), s + t, jnp.int32),
                            q_positions=q_positions, k_positions=kp, **akw)
