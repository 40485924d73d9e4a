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
  capacity, lengths [B,Hkv];
and gets `append` / `attend` (with `layer=`), `check_room`, `length`, `nbytes`, `to_dense`
from `CompressedCache` and the protocol's shared base (kvjax.cache.KVCacheBase).

Attention semantics (reference path): `attend` reads the cache as it was, decompressed,
plus the current chunk's own keys/values exactly, and then stores the chunk; this is what a
serving system does when it prefills with full-precision keys and writes the cache
compressed. So prefill logits are exact and each decode step sees its own token exactly.
`attend` returns `colsum` aligned with the slots of the returned cache (through `src`).
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib
from kvjax.cache import KVView, chunk_destinations  # noqa: F401  (re-exported)


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def headwise_positions(positions_new, kv_heads):
  """[B, T] -> [B, Hkv, T]."""
  b, t = positions_new.shape
  return jnp.broadcast_to(positions_new[:, None, :], (b, kv_heads, t))


def gather_slots(x, idx):
  """x [B,H,S,...] at idx [B,H,R] -> [B,H,R,...] (idx clipped into range)."""
  idx = jnp.clip(idx, 0, x.shape[2] - 1)
  extra = x.ndim - 3
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * extra), axis=2)


class CompressedCache(cache_lib.KVCacheBase):
  """Base of the kinds that implement `_write` and `materialize` (see module docstring)."""

  CAPS: ClassVar[cache_lib.Capabilities] = cache_lib.Capabilities(colsum=True,
                                                                  convertible=True)

  def _append(self, k_new, v_new, positions_new):
    """Stores the valid new tokens (positions_new [B, T], -1 = padding) after each row's."""
    self.check_room(positions_new)
    return self._write(k_new, v_new, headwise_positions(positions_new, k_new.shape[1]))[0]

  def _attend(self, q, k_new, v_new, q_positions, spec: attn_lib.AttentionSpec, *,
              sink_logits=None, return_colsum=False, colsum_window=None, return_lse=False):
    """Attends q over the decompressed cache plus the exact chunk, then stores the chunk."""
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
