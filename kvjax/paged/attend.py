"""Attention over a paged pool: the reference path (gather the row's pages into a dense view and
run `kvjax.attention`), the residual-window path (KIVI rows: the row as it was plus the exact
chunk), and the fused path through the `pallas_kernels` paged decode kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib
from kvjax.paged.alloc import _pool_gather, _write
from kvjax.paged.layout import _decode
from kvjax.quant import base as quant_base

if TYPE_CHECKING:
  from kvjax.paged.pool import PagedKVCache


def _headwise(positions_new, kv_heads):
  b, t = positions_new.shape
  return jnp.broadcast_to(positions_new[:, None, :], (b, kv_heads, t))


def _attend_residual(cache, layer, q, k_new, v_new, q_positions, pos_h, spec, *,
                     return_colsum=False, **kw):
  """Caches with a residual window: attention reads the row as it was (pages decoded, the
  residual exact) plus the chunk exactly, then stores the chunk -- kvjax.quant's semantics,
  so tokens flushed by this very append are still seen exactly. colsum is mapped to the
  slots of the returned cache's `to_dense()` view."""
  b, h, t = pos_h.shape
  if not return_colsum:
    # Slot order does not matter to attention (positions carry it): [pages | window |
    # chunk] in one concatenation, without placing the window after each row's pages.
    k, v, pos, _ = _pages_view(cache, layer)
    get = lambda f: cache._get(f, layer)  # noqa: E731  pylint: disable=protected-access
    res_pos = jnp.where(jnp.arange(cache.residual)[None, None] < get("res_lengths")[..., None],
                        get("res_pos"), -1)
    new, _ = _write(cache, layer, k_new, v_new, pos_h)
    dt = k.dtype
    kk = jnp.concatenate([k, get("k_res").astype(dt), k_new.astype(dt)], axis=2)
    vv = jnp.concatenate([v, get("v_res").astype(dt), v_new.astype(dt)], axis=2)
    pp = jnp.concatenate([pos, res_pos, pos_h], axis=-1)
    res = attn_lib.attention(q, kk, vv, jnp.full((b, h), pp.shape[-1], jnp.int32),
                             q_positions=q_positions, k_positions=pp, spec=spec, **kw)
    return res, new
  k, v, pos, old_len = dense_view(cache, layer)
  new, _ = _write(cache, layer, k_new, v_new, pos_h)
  dt = k.dtype
  s = k.shape[2]
  kk = jnp.concatenate([k, k_new.astype(dt)], axis=2)
  vv = jnp.concatenate([v, v_new.astype(dt)], axis=2)
  pp = jnp.concatenate([pos, pos_h], axis=-1)
  res = attn_lib.attention(q, kk, vv, jnp.full((b, h), s + t, jnp.int32),
                           q_positions=q_positions, k_positions=pp, spec=spec,
                           return_colsum=return_colsum, **kw)
  if return_colsum:
    # New view = the old one with the chunk's valid tokens packed after old_len.
    new_len = new._get("lengths", layer)  # pylint: disable=protected-access
    rank = quant_base.chunk_destinations(jnp.zeros((b, h), jnp.int32), pos_h, t)
    inv = cache_lib.scatter_slots(jnp.zeros((b, h, t), jnp.int32), rank,
                                  jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, h, t)))
    slot = jnp.arange(s, dtype=jnp.int32)[None, None]
    from_chunk = s + jnp.take_along_axis(inv, jnp.clip(slot - old_len[..., None], 0, t - 1), -1)
    src = jnp.where(slot < old_len[..., None], slot,
                    jnp.where(slot < new_len[..., None], from_chunk, -1))
    colsum = jnp.where(src >= 0, jnp.take_along_axis(res.colsum, jnp.maximum(src, 0), -1), 0.)
    res = res._replace(colsum=colsum)
  return res, new


def _fused_attend(old, new, layer, q, k_new, v_new, q_positions, spec, *, sink_logits=None,
                  return_colsum=False, colsum_window=None, return_lse=False):
  """The pallas_kernels paged decode kernel, reading the pool in place, when spec.backend
  resolves to "pallas" and the kernel handles the options ("auto": on GPU/TPU; "pallas" on
  CPU: interpret mode); else None (reference path). Same semantics as the reference:
  quantized pools are read for the past tokens and the chunk is attended exactly. Pools
  with a residual window (KIVI) and partitioned pools take the reference path."""
  del colsum_window
  on_accel = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
  if spec.backend == "xla" or return_colsum or (spec.backend == "auto" and not on_accel):
    return None
  if old.residual or old.partitions > 1:
    return None
  try:
    import pallas_kernels  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  quant = old.quant
  fmt = {} if quant is None else dict(fmt=quant.fmt, k_bits=quant.k_bits, v_bits=quant.v_bits,
                                      group_size=quant.group_size)
  if not pallas_kernels.supports_paged(
      **fmt, head_dim=old.head_dim, head_dim_v=old.v_head_dim, dtype=q.dtype,
      num_queries=q.shape[2], scale=spec.scale, window=spec.window,
      sink_tokens=spec.sink_tokens, softcap=spec.softcap):
    return None
  meta, extra = new._meta(layer), {}  # pylint: disable=protected-access
  lengths = meta["lengths"]
  if quant is not None:
    dt = jnp.dtype(old.dtype)
    lengths = old._meta(layer)["lengths"]  # pylint: disable=protected-access
    extra = dict(k_res=k_new.astype(dt), v_res=v_new.astype(dt),
                 res_positions=_headwise(q_positions, k_new.shape[1]),
                 res_lengths=jnp.full(lengths.shape, k_new.shape[2], jnp.int32))
  out, lse = pallas_kernels.paged_attention(
      q, new.k_pages, new.v_pages, meta["page_table"], lengths, q_positions=q_positions,
      pos_pages=new.pos_pages, k_scale=new.k_scale, k_zero=new.k_zero, v_scale=new.v_scale,
      v_zero=new.v_zero, layer=layer, sink_logits=sink_logits, scale=spec.scale,
      causal=spec.causal, window=spec.window, sink_tokens=spec.sink_tokens,
      softcap=spec.softcap, interpret=not on_accel, **fmt, **extra)
  return attn_lib.AttentionOutput(out, lse if return_lse else None, None)


def _pages_view(cache: PagedKVCache, layer=None):
  """The paged part of each row: (k [B,H,M*P,D], v, positions (-1 past the row's paged
  tokens), paged lengths [B,H]); pages decoded."""
  meta = cache._meta(layer)  # pylint: disable=protected-access
  pt = meta["page_table"]
  b, m = pt.shape
  s = cache.partitions

  def gather(arr):
    if arr is None:
      return None
    g = _pool_gather(arr, layer, pt, s)                            # [B, M, H, P, ...]
    g = jnp.moveaxis(g, 2, 1)                                     # [B, H, M, P, ...]
    return g.reshape(g.shape[:2] + (m * g.shape[3],) + g.shape[4:])

  kb, vb = cache._bits()  # pylint: disable=protected-access
  ka, va = cache._axes()  # pylint: disable=protected-access
  dt = jnp.dtype(cache.dtype)
  k = _decode(gather(cache.k_pages), gather(cache.k_scale), gather(cache.k_zero), cache.quant,
              kb, cache.head_dim, dt, ka)
  v = _decode(gather(cache.v_pages), gather(cache.v_scale), gather(cache.v_zero), cache.quant,
              vb, cache.v_head_dim, dt, va)
  paged_len = meta["lengths"]
  if cache.residual:
    paged_len = paged_len - meta["res_lengths"]
  pos = gather(cache.pos_pages)
  slot = jnp.arange(pos.shape[-1], dtype=jnp.int32)
  pos = jnp.where(slot[None, None, :] < paged_len[..., None], pos, -1)
  return k, v, pos, paged_len


def dense_view(cache: PagedKVCache, layer=None):
  """Gathers each row's pages: (k [B,H,S,D], v [B,H,S,Dv], positions, lengths [B,H]).

  S = max_pages * page_size (+ R: a residual window's tokens follow the row's flushed
  ones, so slots [0, lengths) are the row in order). Decodes quantized pages. Slots past
  a row's length get position -1.
  """
  k, v, pos, paged_len = _pages_view(cache, layer)
  lengths = cache._get("lengths", layer)  # pylint: disable=protected-access
  r = cache.residual
  if r:
    res_len = lengths - paged_len
    size = pos.shape[-1] + r
    pad = lambda x, fill: jnp.concatenate(  # noqa: E731
        [x, jnp.full(x.shape[:2] + (r,) + x.shape[3:], fill, x.dtype)], axis=2)
    i = jnp.arange(r, dtype=jnp.int32)
    ridx = jnp.where(i < res_len[..., None], paged_len[..., None] + i, size)
    get = lambda f: cache._get(f, layer)  # noqa: E731  pylint: disable=protected-access
    k = cache_lib.scatter_slots(pad(k, 0), ridx, get("k_res"))
    v = cache_lib.scatter_slots(pad(v, 0), ridx, get("v_res"))
    pos = cache_lib.scatter_slots(pad(pos, -1), ridx, get("res_pos"))
  return k, v, pos, lengths
