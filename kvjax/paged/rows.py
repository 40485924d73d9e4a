"""Row operations on one paged layer cache: `release` (drop a row's references, free pages
whose count reaches zero), `fork` (prefix sharing: rows point at another row's pages) and
`repage` (eviction: rewrite rows from a compacted dense view into fresh pages).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as cache_lib
from kvjax.paged.alloc import _decref, _pool_scatter, _write
from kvjax.paged.attend import dense_view
from kvjax.paged.pool import PagedKVCache
from kvjax.quant import base as quant_base


# -- pure operations on one layer -------------------------------------------------------------
def _rows_mask(rows, batch):
  rows = jnp.asarray(rows)
  if rows.dtype == jnp.bool_:
    if rows.shape != (batch,):
      raise ValueError(f"rows mask shape {rows.shape}; expected {(batch,)}")
    return rows
  return jnp.zeros((batch,), bool).at[rows].set(True)


def release(cache: PagedKVCache, rows) -> PagedKVCache:
  """Drops rows' references (rows: indices or bool mask [B]); pages at zero become free."""
  return _release(cache, _rows_mask(rows, cache.batch))


@jax.jit
def _release(cache: PagedKVCache, mask) -> PagedKVCache:
  if cache.stacked:
    return jax.vmap(lambda c: _release(c, mask))(cache)
  meta = cache._meta(None)  # pylint: disable=protected-access
  pt = meta["page_table"]
  meta = _decref(meta, mask[:, None] & (pt >= 0), pt)
  meta["page_table"] = jnp.where(mask[:, None], -1, pt)
  meta["lengths"] = jnp.where(mask[:, None], 0, meta["lengths"])
  if meta["res_lengths"] is not None:
    meta["res_lengths"] = jnp.where(mask[:, None], 0, meta["res_lengths"])
  return cache.replace(**meta)


def _check_fork_rows(src, dst, batch: int, partitions: int):
  d, s = np.asarray(dst).reshape(-1), np.asarray(src).reshape(-1)
  if len(set(d.tolist())) != d.size or set(d.tolist()) & set(s.tolist()):
    raise ValueError(f"fork dst rows {d.tolist()} must be distinct and disjoint from src "
                     f"rows {s.tolist()}")
  if (d < 0).any() or (d >= batch).any() or (s < 0).any() or (s >= batch).any():
    raise ValueError(f"fork rows out of range [0, {batch}): src {s.tolist()}, dst {d.tolist()}")
  per = batch // partitions
  if partitions > 1 and ((s // per) != (d // per)).any():
    raise ValueError(f"fork src rows {s.tolist()} and dst rows {d.tolist()} must be in the same "
                     f"pool partition (partitions={partitions}, {per} rows each: partition = "
                     f"row // {per}); pages are never shared across partitions")


def fork(cache: PagedKVCache, src, dst, n_tokens=None) -> PagedKVCache:
  """Prefix sharing: row dst[i] shares the first n_tokens[i] tokens of row src[i].

  The dst rows' previous pages are released first. Shared pages gain a reference; the
  first write into a shared page (by any row) copies it. Without n_tokens, the whole
  row is shared (its head-wise lengths too). With a residual window (KIVI) the dst row
  gets a copy of the src row's window; a prefix that ends inside the flushed tokens shares
  the pages of its whole groups and takes the rest (< G tokens, as the src row reads them,
  decoded) into its window.

  Args:
    cache: a layer cache (or a stacked segment).
    src, dst: int arrays [K]; dst rows must be distinct, not among src, and in the same
      pool partition as their src row.
    n_tokens: optional int array [K] (<= the src row's length; a prefix of a row whose heads
      have equal lengths, i.e. one no head-wise press has compacted).
  """
  src = jnp.atleast_1d(jnp.asarray(src, jnp.int32))
  dst = jnp.atleast_1d(jnp.asarray(dst, jnp.int32))
  if src.shape != dst.shape:
    raise ValueError(f"src {src.shape} and dst {dst.shape} must have the same shape")
  concrete = cache_lib._is_concrete  # pylint: disable=protected-access
  if concrete(dst) and concrete(src):
    _check_fork_rows(src, dst, cache.batch, cache.partitions)
  n = None if n_tokens is None else jnp.broadcast_to(
      jnp.asarray(n_tokens, jnp.int32), src.shape)
  return _fork(cache, src, dst, n)


@jax.jit
def _fork(cache: PagedKVCache, src, dst, n_tokens) -> PagedKVCache:
  if cache.stacked:
    return jax.vmap(lambda c: _fork(c, src, dst, n_tokens))(cache)
  cache = _release(cache, jnp.zeros((cache.batch,), bool).at[dst].set(True))
  meta = cache._meta(None)  # pylint: disable=protected-access
  pt, lengths = meta["page_table"], meta["lengths"]
  src_len = lengths[src]                                           # [K, H]
  new_len = src_len if n_tokens is None else jnp.minimum(src_len, n_tokens[:, None])
  p = cache.page_size
  upd = {}
  paged_len = new_len
  if cache.residual:
    r_cap, g = cache.residual, cache.token_group
    q_src = src_len - meta["res_lengths"][src]
    # flushed tokens kept as pages: whole groups of the prefix (all of q_src if it fits)
    paged_len = jnp.where(new_len <= q_src, (new_len // g) * g, q_src)
    k, v, pos, _ = dense_view(cache)
    ridx = paged_len[..., None] + jnp.arange(r_cap, dtype=jnp.int32)
    keep = ridx < new_len[..., None]
    for f, x, fill in (("k_res", k, 0), ("v_res", v, 0), ("res_positions", pos, -1)):
      val = quant_base.gather_slots(x[src], ridx)
      val = jnp.where(keep[..., None] if val.ndim == 4 else keep, val, fill)
      upd[f] = getattr(cache, f).at[dst].set(val.astype(getattr(cache, f).dtype))
    meta["res_lengths"] = meta["res_lengths"].at[dst].set(new_len - paged_len)
  n_share = (jnp.max(paged_len, axis=-1) + p - 1) // p               # [K]
  j = jnp.arange(cache.max_pages)
  share = (j[None, :] < n_share[:, None]) & (pt[src] >= 0)          # [K, M]
  rows = jnp.where(share, pt[src], -1)
  meta["page_table"] = pt.at[dst].set(rows)
  meta["lengths"] = lengths.at[dst].set(new_len)
  meta["refcount"] = meta["refcount"].at[jnp.where(share, rows, cache.num_pages)].add(
      1, mode="drop")
  return cache.replace(**meta, **upd)


def repage(cache: PagedKVCache, k, v, positions, lengths, rows=None) -> PagedKVCache:
  """Rewrites rows from a dense view into fresh pages and frees their old pages.

  Use after a press compacts a row (`to_dense` -> press -> `repage`): the kept tokens are
  packed into ceil(len / P) pages and the rest return to the pool. Old pages shared with
  other rows are not freed (the other rows still read them). With a residual window the
  kept tokens are appended afresh: the newest stay exact in the window, the rest are
  re-quantized in new groups (KIVI groups cannot survive eviction).

  Args:
    cache: an unstacked layer cache.
    k, v: [B, H, S', D|Dv] dense rows; positions [B, H, S'] (-1 = empty); lengths [B, H]:
      slots [0, lengths) are the row's tokens, in order.
    rows: rows to rewrite (indices or bool mask [B]); default all.
  """
  if cache.stacked:
    raise ValueError("repage works on one layer; use PagedPress for a ModelCache")
  mask = jnp.ones((cache.batch,), bool) if rows is None else _rows_mask(rows, cache.batch)
  cache = _release(cache, mask)
  slot = jnp.arange(positions.shape[-1], dtype=jnp.int32)
  keep = (slot < lengths[..., None]) & mask[:, None, None]
  # A kept slot whose position is -1 would be skipped by the writer; give it a position
  # so the row stays packed (its position stays -1 in the pool below).
  pos_w = jnp.where(keep, jnp.maximum(positions, 0), -1)
  new, dest = _write(cache, None, k, v, pos_w)
  if cache.residual:
    return new
  # Restore the true positions (-1 kept as -1).
  pt = new.page_table
  lp = jnp.clip(dest // cache.page_size, 0, cache.max_pages - 1)
  pid = jnp.take_along_axis(pt[:, None, :], lp, axis=-1)
  pid = jnp.where(dest < cache.max_pages * cache.page_size, pid, cache.num_pages)
  pos_pages = _pool_scatter(new.pos_pages, None, pid, dest % cache.page_size, positions,
                            cache.partitions)
  return new.replace(pos_pages=pos_pages)
