"""`WindowKVCache`: a ring buffer of exactly `window` slots for sliding-window layers.

A sliding-window layer (Mistral; Gemma 2/3 local layers; Beltagy et al., 2020, Longformer,
arXiv:2004.05150) lets a query at position p see the W tokens p-W+1 .. p. Its cache
therefore never needs more than the last W tokens: this kind holds them in a ring of W slots
(plus, optionally, `n_sink` slots that keep the first tokens forever, as StreamingLLM's
attention sinks do; Xiao et al., 2023, "Efficient Streaming Language Models with Attention
Sinks", arXiv:2309.17453), so decode runs to any length in fixed memory.

Dilation. With `dilation` d > 1 the layer sees only keys at positions that are multiples
of d (plus the sinks) within a span of `window * d` positions, and the ring holds only
those: the `window` most recent multiples of d. The stride has an absolute phase (the
strided pattern of Child et al., 2019, "Generating Long Sequences with Sparse
Transformers", arXiv:1904.10509) where Longformer's dilation is relative to each query; a
query-relative pattern touches every residue mod d over a decode, so its cache would need
the whole span. `dilated_positions` says which keys a dilated layer keeps.

Layout (same fields as `DenseKVCache`, plus a write counter):
  k [B, Hkv, S, D], v [B, Hkv, S, Dv], positions [B, Hkv, S] int32 (-1 = empty),
  lengths [B, Hkv] int32 valid slots = min(total, S), slots [0, lengths) are valid,
  total [B, Hkv] int32 tokens ever written (decides the next slot),
  S = n_sink + window (static).
The n-th token written to a row (n = 0, 1, ...; with dilation only the kept tokens count)
goes to slot n if n < n_sink, else to n_sink + (n - n_sink) mod window. Slots are not in
position order once the ring wraps; that does not matter to attention, which masks by
position (docs/CONVENTIONS.md).

Exactness. A chunk of T tokens is attended over [ring contents ; the chunk] (S + T keys),
then only the last `window` kept chunk tokens are written (earlier ones would be
overwritten in the same step anyway). Every key a chunk query may see (position >
q - W * d) is either in the chunk or among the last W kept tokens before it, so prefill of
a prompt longer than the window is exact. For T == 1 the new token is written first and
attended in place: it overwrites the token kept W writes earlier, whose position is
<= p - W * d, i.e. already outside the query's window. The layer's `AttentionSpec.window`
must be <= `window * dilation` (and its sinks <= `n_sink`); `attend` raises otherwise.

Differs from transformers' `DynamicSlidingWindowLayer`, which keeps W - 1 past tokens plus
the current chunk: here the ring holds W tokens so a cache never grows past W slots.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib


def dilated_positions(positions, dilation: int, n_sink: int = 0):
  """Positions a dilated layer keeps as keys; the others become -1 (invisible, not stored).

  A dilated layer (stride `dilation`, absolute phase) sees keys at positions that are
  multiples of `dilation`, plus the `n_sink` first tokens. Dilation 1 keeps every position.
  """
  if dilation == 1:
    return positions
  keep = (positions >= 0) & ((positions % dilation == 0) | (positions < n_sink))
  return jnp.where(keep, positions, -1)


def _ring_destinations(total, positions_new, n_sink: int, window: int):
  """Slots [B, Hkv, T] for the valid new tokens (positions_new [B, T], -1 = not written).

  Tokens that a later token of the same chunk overwrites are dropped (slot = capacity),
  so the scatter never writes one slot twice.
  """
  cap = n_sink + window
  valid = positions_new >= 0                                   # [B, T]
  rank = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1      # [B, T]
  n_new = jnp.sum(valid, axis=-1).astype(jnp.int32)            # [B]
  n = total[:, :, None] + rank[:, None, :]                     # [B, Hkv, T] write index
  slot = jnp.where(n < n_sink, n, n_sink + (n - n_sink) % window)
  survives = (n < n_sink) | (rank[:, None, :] >= n_new[:, None, None] - window)
  keep = valid[:, None, :] & survives
  return jnp.where(keep, slot, cap), n_new


@flax.struct.dataclass
class WindowKVCache(cache_lib.KVCacheBase):
  """Ring-buffer cache of `n_sink + window` slots (see module docstring).

  Attributes:
    k: [B, Hkv, S, D] keys (RoPE applied).
    v: [B, Hkv, S, Dv] values.
    positions: [B, Hkv, S] int32 original token position per slot (-1 = empty).
    lengths: [B, Hkv] int32 valid slots (min(total, S)).
    total: [B, Hkv] int32 tokens ever written.
    n_sink: static number of leading slots that keep the first tokens forever.
    dilation: static stride of the kept positions (1 = a sliding window).
  """

  k: jax.Array
  v: jax.Array
  positions: jax.Array
  lengths: jax.Array
  total: jax.Array
  n_sink: int = flax.struct.field(pytree_node=False, default=0)
  dilation: int = flax.struct.field(pytree_node=False, default=1)

  CAPS: ClassVar[cache_lib.Capabilities] = cache_lib.Capabilities(
      fixed_size=True, colsum=True, inplace_layer=True)
  BYTE_CATEGORIES = {"total": "index"}  # kvjax.memory: the write counter is bookkeeping

  @classmethod
  def init(cls, batch: int, kv_heads: int, window: int, head_dim: int, dtype=jnp.float32,
           v_head_dim: Optional[int] = None, *, n_sink: int = 0,
           dilation: int = 1) -> "WindowKVCache":
    """An empty ring of `n_sink + window` slots."""
    for name, val, lo in (("window", window, 1), ("n_sink", n_sink, 0),
                          ("dilation", dilation, 1)):
      if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
        raise ValueError(f"{name}={val!r}; must be an int >= {lo}")
    dv = head_dim if v_head_dim is None else v_head_dim
    cap = int(n_sink) + int(window)
    return cls(
        k=jnp.zeros((batch, kv_heads, cap, head_dim), dtype),
        v=jnp.zeros((batch, kv_heads, cap, dv), dtype),
        positions=jnp.full((batch, kv_heads, cap), -1, jnp.int32),
        lengths=jnp.zeros((batch, kv_heads), jnp.int32),
        total=jnp.zeros((batch, kv_heads), jnp.int32),
        n_sink=int(n_sink), dilation=int(dilation),
    )

  @property
  def capacity(self) -> int:
    return self.k.shape[-2]

  @property
  def window(self) -> int:
    return self.k.shape[-2] - self.n_sink

  @property
  def span(self) -> int:
    """Positions one query's window covers: window * dilation."""
    return self.window * self.dilation

  def spec(self, **kw) -> attn_lib.AttentionSpec:
    """The AttentionSpec whose mask this ring holds exactly (extra fields: softcap, backend)."""
    return attn_lib.AttentionSpec(window=self.span, n_sink=self.n_sink, **kw)

  def valid_mask(self) -> jax.Array:
    """[B, Hkv, S] bool: slot holds a token."""
    slot = jnp.arange(self.capacity, dtype=jnp.int32)
    return (slot < self.lengths[..., None]) & (self.positions >= 0)

  def materialize(self) -> cache_lib.KVView:
    valid = self.valid_mask()
    return cache_lib.KVView(self.k, self.v, jnp.where(valid, self.positions, -1), valid)

  def check_room(self, positions_new) -> None:
    """A ring never overflows: older tokens leave the window."""
    del positions_new

  def _check_spec(self, spec: attn_lib.AttentionSpec):
    if spec.window is None or spec.window > self.span:
      raise ValueError(f"WindowKVCache holds the last {self.window} kept tokens (a span of "
                       f"{self.span} positions) but the layer's AttentionSpec.window="
                       f"{spec.window}; a ring cache needs a window <= its own (use a "
                       "DenseKVCache for full-attention layers)")
    if spec.n_sink > self.n_sink:
      raise ValueError(f"AttentionSpec.n_sink={spec.n_sink} > the cache's "
                       f"n_sink={self.n_sink} slots")

  def _kept(self, positions_new):
    return dilated_positions(positions_new, self.dilation, self.n_sink)

  def _append(self, k_new, v_new, positions_new) -> "WindowKVCache":
    """Writes the kept new tokens; the oldest leave the ring (never raises)."""
    kept = self._kept(positions_new)
    dest, n_new = _ring_destinations(self.total, kept, self.n_sink, self.window)
    pos_b = jnp.broadcast_to(kept[:, None, :], dest.shape)
    total = self.total + n_new[:, None]
    return self.replace(
        k=cache_lib.scatter_slots(self.k, dest, k_new),
        v=cache_lib.scatter_slots(self.v, dest, v_new),
        positions=cache_lib.scatter_slots(self.positions, dest, pos_b),
        lengths=jnp.minimum(total, self.capacity),
        total=total,
    )

  def _attend(self, q, k_new, v_new, q_positions, spec: attn_lib.AttentionSpec, **akw):
    """Attends q over [ring ; chunk] (exact, see module docstring), then stores the chunk."""
    self._check_spec(spec)
    if q.shape[2] == 1:
      new = self._append(k_new, v_new, q_positions)
      res = attn_lib.attention(q, new.k, new.v, new.lengths, q_positions=q_positions,
                               k_positions=new.positions, spec=spec, **akw)
      return res, new
    res = self._attend_concat(q, self.k, self.v, self.positions, k_new, v_new, q_positions,
                              spec, akw)
    new = self._append(k_new, v_new, q_positions)
    if akw["return_colsum"]:
      res = res._replace(colsum=self._colsum_to_slots(self.total, q_positions, res.colsum))
    return res, new

  def _attend_concat(self, q, k, v, positions, k_new, v_new, q_positions, spec, akw):
    """Attention over [ring slots ; chunk]; empty slots and unkept tokens carry position -1."""
    b, h, s = positions.shape
    t = k_new.shape[2]
    kk = jnp.concatenate([k, k_new.astype(k.dtype)], axis=2)
    vv = jnp.concatenate([v, v_new.astype(v.dtype)], axis=2)
    pos_new = jnp.broadcast_to(self._kept(q_positions)[:, None, :], (b, h, t))
    kp = jnp.concatenate([positions, pos_new], axis=-1)
    return attn_lib.attention(q, kk, vv, jnp.full((b, h), s + t, jnp.int32),
                              q_positions=q_positions, k_positions=kp, spec=spec, **akw)

  def _colsum_to_slots(self, total, q_positions, colsum):
    """colsum over [S old slots ; T chunk tokens] -> [B, Hkv, S] aligned with the new ring."""
    s = self.capacity
    dest, _ = _ring_destinations(total, self._kept(q_positions), self.n_sink, self.window)
    return cache_lib.scatter_slots(colsum[..., :s], dest, colsum[..., s:])

  # -- in-place layer path: update [layer, b, h, slot] of a stacked ring ---------------------
  def _append_layer(self, layer, k_new, v_new, positions_new) -> "WindowKVCache":
    kept = self._kept(positions_new)
    dest, n_new = _ring_destinations(self.total[layer], kept, self.n_sink, self.window)
    b, h = dest.shape[:2]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    pos_b = jnp.broadcast_to(kept[:, None, :], dest.shape)
    total = self.total[layer] + n_new[:, None]
    return self.replace(
        k=self.k.at[layer, bi, hi, dest].set(k_new.astype(self.k.dtype), mode="drop"),
        v=self.v.at[layer, bi, hi, dest].set(v_new.astype(self.v.dtype), mode="drop"),
        positions=self.positions.at[layer, bi, hi, dest].set(pos_b, mode="drop"),
        lengths=self.lengths.at[layer].set(jnp.minimum(total, self.capacity)),
        total=self.total.at[layer].set(total),
    )

  def _attend_layer(self, layer, q, k_new, v_new, q_positions, spec, **akw):
    self._check_spec(spec)
    if q.shape[2] == 1:
      new = self._append_layer(layer, k_new, v_new, q_positions)
      res = attn_lib.attention(q, new.k[layer], new.v[layer], new.lengths[layer],
                               q_positions=q_positions, k_positions=new.positions[layer],
                               spec=spec, **akw)
      return res, new
    res = self._attend_concat(q, self.k[layer], self.v[layer], self.positions[layer], k_new,
                              v_new, q_positions, spec, akw)
    total = self.total[layer]
    new = self._append_layer(layer, k_new, v_new, q_positions)
    if akw["return_colsum"]:
      res = res._replace(colsum=self._colsum_to_slots(total, q_positions, res.colsum))
    return res, new
