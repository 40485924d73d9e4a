"""Page allocation, copy-on-write and writes into a paged pool.

Allocation is array arithmetic on a free *stack* (`_push`, `_decref`, `_plan`), so a decode
step allocates inside jit with no host round trip. `_plan` decides, for every row of a call,
which pages to allocate and which shared pages (refcount > 1) to copy before writing; `_write`
applies the plan all-or-nothing and scatters the tokens (per-token codes, or KIVI groups
flushed out of the residual window by `_write_residual`). Partitioned pools vmap the pool
accessors (`_pool_copy`, `_pool_scatter`, `_pool_gather`) over partitions with local page ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from kvjax import cache as cache_lib
from kvjax.paged.layout import POOL_FIELDS, _encode
from kvjax.quant import base as quant_base

if TYPE_CHECKING:
  from kvjax.paged.pool import PagedKVCache


# -- the free list ----------------------------------------------------------------------------
def _push(free_stack, num_free, mask, ids):
  """Pushes ids[mask] (mask, ids [N]) onto the free stack."""
  n = free_stack.shape[0]
  rank = jnp.cumsum(mask.astype(jnp.int32)) - 1
  dst = jnp.where(mask, num_free + rank, n)
  free_stack = free_stack.at[dst].set(ids, mode="drop")
  return free_stack, num_free + jnp.sum(mask).astype(jnp.int32)


def _decref(meta, pages_mask, pages):
  """Drops one reference from pages[pages_mask] (duplicates count); frees those at zero,
  each onto its own partition's stack."""
  rc = meta["refcount"]
  n = rc.shape[0]
  rc2 = rc.at[jnp.where(pages_mask, pages, n)].add(-1, mode="drop")
  freed = (rc2 == 0) & (rc > 0)
  ids = jnp.arange(n, dtype=jnp.int32)
  pf = meta.get("part_free")
  if pf is None:
    fs, nf = _push(meta["free_stack"], meta["num_free"], freed, ids)
    return dict(meta, refcount=rc2, free_stack=fs, num_free=nf)
  s = pf.shape[0]
  fs, pf2 = jax.vmap(_push)(meta["free_stack"].reshape(s, -1), pf, freed.reshape(s, -1),
                            ids.reshape(s, -1))
  return dict(meta, refcount=rc2, free_stack=fs.reshape(n), part_free=pf2,
              num_free=jnp.sum(pf2).astype(jnp.int32))


class _Plan(NamedTuple):
  meta: dict          # tables after the append (unchanged if not ok)
  ok: jax.Array       # [] bool: the append happens
  pid: jax.Array      # [B, H, T] physical page of each new token (N = dropped)
  off: jax.Array      # [B, H, T] offset inside the page
  dest: jax.Array     # [B, H, T] logical slot (capacity = dropped)
  cow_src: jax.Array  # [S * K] pages to copy (N = none), K entries per partition
  cow_dst: jax.Array  # [S * K] their fresh copies
  need_rows: jax.Array  # [B] pages each row holds after the append
  total: jax.Array      # [] pages allocated
  part_total: jax.Array  # [S] pages allocated per partition


def _plan(meta, pos_h, page_size: int) -> _Plan:
  """Allocation + copy-on-write plan of one layer for new tokens at head-wise pos_h [B,H,T].

  A partitioned pool (meta["part_free"] [S]) plans each partition on its own rows and pages
  (local ids, vmapped, so sharded partitions stay on their devices); the append is still
  all-or-nothing over the whole call.
  """
  pf = meta.get("part_free")
  if pf is None:
    plan = _plan_one(meta, pos_h, page_size)
    return plan._replace(part_total=plan.total[None])
  s = pf.shape[0]
  n = meta["refcount"].shape[0]
  np_ = n // s
  b, m = meta["page_table"].shape
  base = jnp.arange(s, dtype=jnp.int32) * np_

  def rows(x):
    return x.reshape((s, b // s) + x.shape[1:])

  def to_global(x, none):
    bb = base.reshape((s,) + (1,) * (x.ndim - 1))
    return jnp.where((x >= 0) & (x < np_), x + bb, none)

  pt = rows(meta["page_table"])
  loc = dict(page_table=jnp.where(pt >= 0, pt - base[:, None, None], -1),
             lengths=rows(meta["lengths"]), refcount=meta["refcount"].reshape(s, np_),
             free_stack=meta["free_stack"].reshape(s, np_) - base[:, None], num_free=pf,
             overflow=jnp.zeros((s,), bool))
  pos_s = rows(pos_h)
  oks = jax.vmap(lambda mm, pp: _plan_one(mm, pp, page_size).ok)(loc, pos_s)
  gate = jnp.all(oks)
  pl = jax.vmap(lambda mm, pp: _plan_one(mm, pp, page_size, gate))(loc, pos_s)
  mm = pl.meta
  meta2 = dict(meta, page_table=to_global(mm["page_table"], -1).reshape(b, m),
               lengths=mm["lengths"].reshape(meta["lengths"].shape),
               refcount=mm["refcount"].reshape(n),
               free_stack=(mm["free_stack"] + base[:, None]).reshape(n),
               part_free=mm["num_free"], num_free=jnp.sum(mm["num_free"]).astype(jnp.int32),
               overflow=meta["overflow"] | ~gate)
  return _Plan(meta2, gate, to_global(pl.pid, n).reshape(pos_h.shape),
               pl.off.reshape(pos_h.shape), pl.dest.reshape(pos_h.shape),
               to_global(pl.cow_src, n).reshape(-1), to_global(pl.cow_dst, n).reshape(-1),
               pl.need_rows.reshape(b), jnp.sum(pl.total).astype(jnp.int32), pl.total)


def _plan_one(meta, pos_h, page_size: int, gate=True) -> _Plan:
  """_plan for one pool (no partitions); `gate` False forces the append to be dropped."""
  pt, lengths, rc = meta["page_table"], meta["lengths"], meta["refcount"]
  fs, nf = meta["free_stack"], meta["num_free"]
  n_pages = rc.shape[0]
  b, m = pt.shape
  h, t = pos_h.shape[1:]
  p = page_size
  valid = pos_h >= 0
  n_new = jnp.sum(valid, axis=-1).astype(jnp.int32)            # [B, H]
  new_len = lengths + n_new
  held = jnp.sum(pt >= 0, axis=-1).astype(jnp.int32)           # [B]
  need = jnp.maximum((jnp.max(new_len, axis=-1) + p - 1) // p, held)
  j = jnp.arange(m, dtype=jnp.int32)
  fresh = (j >= held[:, None]) & (j < need[:, None])           # [B, M]
  # Pages a head writes: logical pages len_h // P .. (new_len_h - 1) // P, at most C of them.
  c_max = min(m, (t + p - 1) // p + 1)
  jj = lengths[..., None] // p + jnp.arange(c_max, dtype=jnp.int32)        # [B, H, C]
  touched = ((n_new[..., None] > 0) & (jj <= (new_len[..., None] - 1) // p)
             & (jj < held[:, None, None]))
  bi = jnp.broadcast_to(jnp.arange(b)[:, None, None], jj.shape)
  tmask = jnp.zeros((b, m), bool).at[bi, jnp.where(touched, jj, m)].set(True, mode="drop")
  ptc = jnp.clip(pt, 0, n_pages - 1)
  cow = tmask & (pt >= 0) & (rc[ptc] > 1)
  alloc = fresh | cow
  total = jnp.sum(alloc).astype(jnp.int32)
  ok = (total <= nf) & jnp.all(need <= m) & gate
  take = alloc & ok
  rank = (jnp.cumsum(alloc.reshape(-1)) - 1).reshape(b, m).astype(jnp.int32)
  new_ids = fs[jnp.clip(nf - 1 - rank, 0, n_pages - 1)]
  pt2 = jnp.where(take, new_ids, pt)
  meta2 = dict(meta, page_table=pt2, num_free=nf - jnp.where(ok, total, 0))
  meta2["refcount"] = rc.at[jnp.where(take, new_ids, n_pages)].add(1, mode="drop")
  # Copy-on-write drops the row's reference to the shared page (it may reach zero when
  # several rows of this batch copied it).
  meta2 = _decref(meta2, cow & ok, ptc)
  meta2["lengths"] = jnp.where(ok, new_len, lengths)
  meta2["overflow"] = meta["overflow"] | ~ok
  k_cow = min(b * m, b * h * c_max)
  (idx,) = jnp.nonzero((cow & ok).reshape(-1), size=k_cow, fill_value=b * m)
  has = idx < b * m
  idx = jnp.clip(idx, 0, b * m - 1)
  cow_src = jnp.where(has, ptc.reshape(-1)[idx], n_pages)
  cow_dst = jnp.where(has, pt2.reshape(-1)[idx], n_pages)
  # Token destinations.
  rank_t = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1
  dest = lengths[..., None] + rank_t
  write = valid & ok
  lp = jnp.clip(dest // p, 0, m - 1)
  pid = jnp.take_along_axis(pt2[:, None, :], lp, axis=-1)           # [B, H, T]
  pid = jnp.where(write, pid, n_pages)
  dest = jnp.where(write, dest, m * p)
  return _Plan(meta2, ok, pid, dest % p, dest, cow_src, cow_dst, jnp.where(ok, need, held),
               total, total[None])


# -- pool access, one partition at a time -------------------------------------------------------
def _pool_apply(arr, layer, s, fn, *args):
  """fn(pool, *args_s) per partition s: pool is [N/S, ...] (or [L, N/S, ...] with a layer
  axis), args [S, ...]. vmapped over the partition axis so that a pool sharded over `data`
  is read and written where it lives."""
  if layer is None:
    a = arr.reshape((s, arr.shape[0] // s) + arr.shape[1:])
    return jax.vmap(fn)(a, *args).reshape(arr.shape)
  a = arr.reshape(arr.shape[:1] + (s, arr.shape[1] // s) + arr.shape[2:])
  out = jax.vmap(fn, in_axes=(1,) + (0,) * len(args), out_axes=1)(a, *args)
  return out.reshape(arr.shape)


def _localize(ids, s, n):
  """Global page ids [X, ...] (N = none) -> local ids [S, X/S, ...] (N/S = none)."""
  np_ = n // s
  loc = ids.reshape((s, ids.shape[0] // s) + ids.shape[1:])
  base = (jnp.arange(s, dtype=jnp.int32) * np_).reshape((s,) + (1,) * (loc.ndim - 1))
  return jnp.where((loc >= base) & (loc < base + np_), loc - base, np_)


def _pool_copy(arr, layer, src, dst, s=1):
  """arr[dst] = arr[src] for page lists [S * K] (src/dst = N: skip)."""
  def fn(a, sr, ds):
    nn = a.shape[0] if layer is None else a.shape[1]
    src_c = jnp.clip(sr, 0, nn - 1)
    if layer is None:
      return a.at[ds].set(a[src_c], mode="drop")
    return a.at[layer, ds].set(a[layer, src_c], mode="drop")
  if s == 1:
    return fn(arr, src, dst)
  n = arr.shape[0] if layer is None else arr.shape[1]
  return _pool_apply(arr, layer, s, fn, _localize(src, s, n), _localize(dst, s, n))


def _pool_scatter(arr, layer, pid, off, val, s=1):
  """arr[pid[b,h,t], h, off[b,h,t]] = val[b,h,t] (pid = N: dropped)."""
  hi = jnp.arange(pid.shape[1])[None, :, None]
  val = val.astype(arr.dtype)

  def fn(a, p, o, v):
    if layer is None:
      return a.at[p, hi, o].set(v, mode="drop")
    return a.at[layer, p, hi, o].set(v, mode="drop")
  if s == 1:
    return fn(arr, pid, off, val)
  n = arr.shape[0] if layer is None else arr.shape[1]
  split = lambda x: x.reshape((s, x.shape[0] // s) + x.shape[1:])  # noqa: E731
  return _pool_apply(arr, layer, s, fn, _localize(pid, s, n), split(off), split(val))


def _pool_gather(arr, layer, pt, s=1):
  """arr[pt] per row: pt [B, M] global ids (clipped) -> [B, M, ...] (one layer)."""
  a = arr if layer is None else arr[layer]
  n = a.shape[0]
  ptc = jnp.clip(pt, 0, n - 1)
  if s == 1:
    return a[ptc]
  b, m = pt.shape
  loc = jnp.clip(_localize(ptc, s, n), 0, n // s - 1)                 # [S, B/S, M]
  a = a.reshape((s, n // s) + a.shape[1:])
  return jax.vmap(lambda x, t: x[t])(a, loc).reshape((b, m) + a.shape[2:])


# -- appends ------------------------------------------------------------------------------------
def _write(cache: PagedKVCache, layer, k_new, v_new, pos_h):
  """Appends head-wise tokens to one layer. Returns (cache', dest [B,H,T]; capacity = none;
  None for caches with a residual window)."""
  if cache.residual:
    return _write_residual(cache, layer, k_new, v_new, pos_h), None
  plan = _plan(cache._meta(layer), pos_h, cache.page_size)  # pylint: disable=protected-access
  kb, vb = cache._bits()  # pylint: disable=protected-access
  dt = jnp.dtype(cache.dtype)
  kc, ks, kz = _encode(k_new, cache.quant, kb, dt)
  vc, vs, vz = _encode(v_new, cache.quant, vb, dt)
  vals = {"k_pages": kc, "k_scale": ks, "k_zero": kz, "v_pages": vc, "v_scale": vs,
          "v_zero": vz, "pos_pages": pos_h}
  upd, s = {}, cache.partitions
  for f in POOL_FIELDS:
    arr = getattr(cache, f)
    if arr is None:
      continue
    arr = _pool_copy(arr, layer, plan.cow_src, plan.cow_dst, s)
    upd[f] = _pool_scatter(arr, layer, plan.pid, plan.off, vals[f], s)
  new = cache.replace(**upd)._with_meta(layer, plan.meta)  # pylint: disable=protected-access
  return new, plan.dest


def _flush_counts(meta, pos_h, r_cap: int, g: int):
  """Residual-window bookkeeping of an append (KIVI's streaming rule).

  The residual (r tokens) and the chunk's valid tokens form a buffer of c = r + n tokens;
  when c > R, the oldest f = ceil((c - R) / G) * G tokens (whole groups) are flushed into
  pages and the rest stay exact. Returns (meta with lengths = flushed tokens only,
  buffer positions [B,H,p] valid for the flushed slots only, c, f, p).
  """
  r = meta["res_lengths"]
  t = pos_h.shape[-1]
  p = -(-(r_cap + t) // g) * g
  c = r + jnp.sum(pos_h >= 0, axis=-1).astype(jnp.int32)
  f = jnp.maximum(0, -(-(c - r_cap) // g)) * g
  flush = jnp.arange(p, dtype=jnp.int32) < f[..., None]
  qmeta = dict(meta, lengths=meta["lengths"] - r)
  return qmeta, jnp.where(flush, 0, -1), c, f, p


def _write_residual(cache: PagedKVCache, layer, k_new, v_new, pos_h) -> PagedKVCache:
  """Append for caches with a residual window: whole groups leave the window into pages.

  Pages only ever receive whole token groups, written once, so a per-channel key scale of
  a page group covers exactly the G tokens KIVI would group (the group starts at a multiple
  of G of the row's flushed tokens, as in kvjax.quant.QuantizedKVCache).
  """
  meta = cache._meta(layer)  # pylint: disable=protected-access
  r_cap, g = cache.residual, cache.token_group
  qmeta, pos_flush, c, f, p = _flush_counts(meta, pos_h, r_cap, g)
  plan = _plan(qmeta, pos_flush, cache.page_size)
  r = meta["res_lengths"]
  b, h, _ = pos_h.shape
  dest = quant_base.chunk_destinations(r, pos_h, p)
  dt = jnp.dtype(cache.dtype)
  get = lambda f_: cache._get(f_, layer)  # noqa: E731  pylint: disable=protected-access

  def buffer(res, new, fill, dtype):
    buf = jnp.full((b, h, p) + new.shape[3:], fill, dtype)
    buf = buf.at[:, :, :r_cap].set(res.astype(dtype))
    return cache_lib.scatter_slots(buf, dest, new)

  ck = buffer(get("k_res"), k_new, 0, dt)
  cv = buffer(get("v_res"), v_new, 0, dt)
  cpos = buffer(get("res_positions"), pos_h, -1, jnp.int32)
  kb, vb = cache._bits()  # pylint: disable=protected-access
  ka, va = cache._axes()  # pylint: disable=protected-access
  kc, ks, kz = _encode(ck, cache.quant, kb, dt, ka)
  vc, vs, vz = _encode(cv, cache.quant, vb, dt, va)
  tok = (plan.pid, plan.off)
  grp = (plan.pid[..., ::g], plan.off[..., ::g] // g)     # a group's page = its first token's
  where = {"k_pages": (kc, tok), "k_scale": (ks, grp if ka == "channel" else tok),
           "k_zero": (kz, grp if ka == "channel" else tok), "v_pages": (vc, tok),
           "v_scale": (vs, grp if va == "channel" else tok),
           "v_zero": (vz, grp if va == "channel" else tok), "pos_pages": (cpos, tok)}
  upd, s = {}, cache.partitions
  for f_ in POOL_FIELDS:
    arr = getattr(cache, f_)
    if arr is None:
      continue
    val, (pid, off) = where[f_]
    arr = _pool_copy(arr, layer, plan.cow_src, plan.cow_dst, s)
    upd[f_] = _pool_scatter(arr, layer, pid, off, val, s)
  ridx = f[..., None] + jnp.arange(r_cap, dtype=jnp.int32)
  keep = ridx < c[..., None]
  ok = plan.ok
  res = {"k_res": jnp.where(keep[..., None], quant_base.gather_slots(ck, ridx), 0).astype(dt),
         "v_res": jnp.where(keep[..., None], quant_base.gather_slots(cv, ridx), 0).astype(dt),
         "res_positions": jnp.where(keep, quant_base.gather_slots(cpos, ridx), -1)}
  for f_, val in res.items():
    val = jnp.where(ok, val, get(f_))
    upd[f_] = val if layer is None else getattr(cache, f_).at[layer].set(val)
  meta2 = dict(plan.meta)
  meta2["res_lengths"] = jnp.where(ok, c - f, r).astype(jnp.int32)
  meta2["lengths"] = plan.meta["lengths"] + meta2["res_lengths"]
  return cache.replace(**upd)._with_meta(layer, meta2)  # pylint: disable=protected-access
