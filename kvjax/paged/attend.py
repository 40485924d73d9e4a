"""Attention over a paged pool: the reference path (gather the row's pages into a dense view and
run `kvjax.attention`), the residual-window path (KIVI rows: the row as it was plus the exact
chunk), and the fused path through the paged decode kernel (`kvjax.attention.paged_decode`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    held = jnp.arange(cache.residual)[None, None] < get("res_lengths")[..., None]
    res_positions = jnp.where(held, get("res_positions"), -1)
    new, _ = _write(cache, layer, k_new, v_new, pos_h)
    dt = k.dtype
    kk = jnp.concatenate([k, get("k_res").astype(dt), k_new.astype(dt)], axis=2)
    vv = jnp.concatenate([v, get("v_res").astype(dt), v_new.astype(dt)], axis=2)
    pp = jnp.concatenate([pos, res_positions, pos_h], axis=-1)
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


def _kernel_mode(cache, q, spec, *, return_colsum=False, colsum_window=None, **_):
  """"xla" (the reference paths), "pallas" or "interpret": the paged decode kernel, by the
  dispatch rule of every cache kind (`kvjax.attention.kernel_backend`). Pools with a
  residual window (KIVI) or partitions are not read by the kernel."""
  return attn_lib.kernel_backend(spec, q, layout="paged", quant=cache.quant,
                                 num_kv_heads=cache.k_pages.shape[-3],
                                 head_dim_v=cache.v_head_dim,
                                 residual=bool(cache.residual), partitions=cache.partitions,
                                 return_colsum=return_colsum, colsum_window=colsum_window)


def _fused_attend(old, new, layer, q, k_new, v_new, q_positions, spec, *, interpret,
                  sink_logits=None, return_lse=False, **_):
  """The paged decode kernel, reading the pool in place (`_kernel_mode` chose it). Same
  semantics as the reference: quantized pools are read for the past tokens and the chunk
  is attended exactly."""
  meta, exact = new._meta(layer), None  # pylint: disable=protected-access
  lengths = meta["lengths"]
  if old.quant is not None:
    dt = jnp.dtype(old.dtype)
    lengths = old._meta(layer)["lengths"]  # pylint: disable=protected-access
    exact = (k_new.astype(dt), v_new.astype(dt), _headwise(q_positions, k_new.shape[1]))
  out, lse = attn_lib.paged_decode(
      q, (new.k_pages, new.v_pages, new.k_scale, new.k_zero, new.v_scale, new.v_zero,
          new.pos_pages), meta["page_table"], lengths, q_positions=q_positions, layer=layer,
      exact=exact, quant=old.quant, spec=spec, sink_logits=sink_logits, interpret=interpret)
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
    pos = cache_lib.scatter_slots(pad(pos, -1), ridx, get("res_positions"))
  return k, v, pos, lengths
