"""Paged caches in a model: building a paged `ModelCache` (`layer_factory`, `model_cache_fn`),
and the row operations a server runs on all its paged layers at once (prefix sharing,
release, splitting rows out and joining them back, narrowing page tables, dense views).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as cache_lib
from kvjax.paged.admission import pages_needed
from kvjax.paged.layout import POOL_FIELDS, ROW_FIELDS
from kvjax.paged.pool import PagedKVCache
from kvjax.paged.rows import _check_fork_rows, _fork, _release, _rows_mask, repage


# -- models: construction, prefix sharing, eviction -------------------------------------------
def layer_factory(batch: int, kv_heads: int, head_dim: int, *, num_pages: int, page_size: int,
                  dtype=jnp.float32, v_head_dim: Optional[int] = None, quant=None,
                  max_pages: Optional[int] = None,
                  partitions: int = 1) -> Callable[[int, int], PagedKVCache]:
  """fn(layer_index, capacity) -> PagedKVCache for `models.init_cache(layer_factory=...)`.

  `capacity` (tokens per row) sets max_pages to the pages a row of that many tokens holds
  (ceil(capacity / page_size); with a residual window, only its flushed tokens count)
  unless max_pages is given; every layer gets a pool of num_pages pages in `partitions`
  partitions.
  """
  if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)) or page_size < 1:
    raise ValueError(f"page_size={page_size!r}; must be an int >= 1")

  def make(i, capacity):
    del i
    m = max_pages
    if m is None:
      n = capacity
      if quant is not None and quant.residual:
        g = quant.token_group
        n = max(0, -(-(capacity - quant.residual) // g)) * g
      m = max(1, pages_needed(n, page_size))
    return PagedKVCache.init(batch, kv_heads, head_dim, num_pages=num_pages,
                             page_size=page_size, max_pages=m, dtype=dtype,
                             v_head_dim=v_head_dim, quant=quant, partitions=partitions)
  return make


def model_cache_fn(init_cache: Callable, config, *, num_pages: int, page_size: int,
                   max_tokens: int, quant=None, dtype=None,
                   partitions: int = 1) -> Callable[[int], Any]:
  """fn(batch) -> an empty paged ModelCache, through the model's own `init_cache`.

  kvjax never imports models, so the caller passes it: `model_cache_fn(models.init_cache,
  cfg, num_pages=256, page_size=16, max_tokens=4096)`. `config` is duck-typed
  (num_kv_heads, head_dim, dtype); max_tokens sets each row's page-table width.
  """
  def make(batch):
    fac = layer_factory(batch, config.num_kv_heads, config.head_dim, num_pages=num_pages,
                        page_size=page_size, quant=quant, partitions=partitions,
                        dtype=dtype if dtype is not None else config.dtype)
    return init_cache(config, batch, max_tokens, layer_factory=fac)
  return make


def _paged_segments(mc: cache_lib.ModelCache):
  return [cache_lib.caps(s).paged for s in mc.segments]


def _map_paged(mc, fn):
  segs = tuple(fn(s) if cache_lib.caps(s).paged else s for s in mc.segments)
  return mc.replace(segments=segs)


@jax.jit
def _fork_model(mc, src, dst, n_tokens):
  mc = _map_paged(mc, lambda s: _fork(s, src, dst, n_tokens))
  nxt = mc.next_position[src] if n_tokens is None else n_tokens
  return mc.replace(next_position=mc.next_position.at[dst].set(nxt))


def fork_rows(mc: cache_lib.ModelCache, src, dst, n_tokens=None) -> cache_lib.ModelCache:
  """`fork` on every paged layer of a ModelCache; next_position follows the shared prefix."""
  if not any(_paged_segments(mc)):
    raise ValueError("fork_rows needs a ModelCache with PagedKVCache layers")
  src = jnp.atleast_1d(jnp.asarray(src, jnp.int32))
  dst = jnp.atleast_1d(jnp.asarray(dst, jnp.int32))
  n = None if n_tokens is None else jnp.broadcast_to(jnp.asarray(n_tokens, jnp.int32), src.shape)
  # Validate concretely (cheap checks on indices), then run jitted.
  probe = next(sg for sg in mc.segments if cache_lib.caps(sg).paged)
  _check_fork_rows(src, dst, mc.batch, probe.partitions)
  return _fork_model(mc, src, dst, n)


@functools.partial(jax.jit, static_argnames=("width",))
def with_table_width(mc: cache_lib.ModelCache, width: int) -> cache_lib.ModelCache:
  """Every paged layer's page tables cut or padded (with -1) to `width` entries.

  The reference attention path gathers a row's whole table (max_pages * page_size slots),
  so a server narrows tables to what its longest row holds and widens them as rows grow:
  one compile per width, attention cost following the live rows instead of the maximum.
  Cutting below a row's held pages is the caller's error (those pages would leak).
  """
  def fit(s):
    pt = s.page_table
    m = pt.shape[-1]
    if width <= m:
      return s.replace(page_table=pt[..., :width])
    pad = jnp.full(pt.shape[:-1] + (width - m,), -1, pt.dtype)
    return s.replace(page_table=jnp.concatenate([pt, pad], axis=-1))
  return _map_paged(mc, fit)


ROW_AXIS_FIELDS = ("page_table", "lengths", "res_lengths") + ROW_FIELDS
SHARED_FIELDS = POOL_FIELDS + ("refcount", "free_stack", "num_free", "overflow", "part_free")


@jax.jit
def split_rows(mc: cache_lib.ModelCache, rows):
  """(sub, rest): a ModelCache of `rows` only (int [R], distinct) over the same pools, and
  the other rows' state without the pools, for `join_rows` after the sub-batch ran.

  Lets a server run a step on a few rows (e.g. prefill chunks on a small static batch while
  decoding rows take a [B, 1] step) without copying any page. Every segment must be paged
  with one pool partition (a sub-batch does not keep the partition layout).
  """
  subs, rests = [], []
  for s in mc.segments:
    if not cache_lib.caps(s).paged or s.partitions != 1:
      raise ValueError("split_rows needs a ModelCache whose segments are all single-partition "
                       f"PagedKVCaches; got {type(s).__name__}")
    ax = 1 if s.stacked else 0
    take = {f: jnp.take(getattr(s, f), rows, axis=ax) for f in ROW_AXIS_FIELDS
            if getattr(s, f) is not None}
    subs.append(s.replace(**take))
    rests.append(s.replace(**{f: None for f in SHARED_FIELDS}))
  return (mc.replace(segments=tuple(subs), next_position=mc.next_position[rows]),
          mc.replace(segments=tuple(rests)))


@jax.jit
def join_rows(rest: cache_lib.ModelCache, sub: cache_lib.ModelCache, rows):
  """Inverse of `split_rows`: the sub-batch's rows written back, its pools kept."""
  segs = []
  for r, s in zip(rest.segments, sub.segments):
    ax = 1 if s.stacked else 0
    idx = (slice(None),) * ax + (rows,)
    upd = {f: getattr(r, f).at[idx].set(getattr(s, f)) for f in ROW_AXIS_FIELDS
           if getattr(r, f) is not None}
    segs.append(r.replace(**upd, **{f: getattr(s, f) for f in SHARED_FIELDS}))
  return rest.replace(segments=tuple(segs),
                      next_position=rest.next_position.at[rows].set(sub.next_position))


@jax.jit
def _release_model(mc, mask):
  mc = _map_paged(mc, lambda s: _release(s, mask))
  return mc.replace(next_position=jnp.where(mask, 0, mc.next_position))


def release_rows(mc: cache_lib.ModelCache, rows) -> cache_lib.ModelCache:
  """Releases rows on every paged layer and resets their next_position to 0."""
  return _release_model(mc, _rows_mask(rows, mc.batch))


def pages_in_use(mc) -> np.ndarray:
  """Pages in use per layer ([L] int, layer order) of a ModelCache (or of one PagedKVCache)."""
  if cache_lib.caps(mc).paged:
    return np.atleast_1d(np.asarray(mc.pages_in_use))
  out = np.zeros((mc.num_layers,), np.int64)
  for seg, layers in zip(mc.segments, mc.entry_layers()):
    if cache_lib.caps(seg).paged:
      out[layers] = np.atleast_1d(np.asarray(seg.pages_in_use))
  return out


def overflowed(mc) -> bool:
  """Whether any append on any paged layer was dropped for lack of pages (sticky flag)."""
  segs = [mc] if cache_lib.caps(mc).paged else mc.segments
  return any(bool(np.any(np.asarray(s.overflow))) for s in segs if cache_lib.caps(s).paged)


@jax.jit
def _to_dense_model(mc):
  layers = [c.to_dense() if cache_lib.caps(c).paged else c for c in mc.layers()]
  return cache_lib.ModelCache.from_layers(layers, mc.next_position, grouping=mc.grouping)


@jax.jit
def _repage_model(mc, dense_mc, rows):
  new = []
  for c, d in zip(mc.layers(), dense_mc.layers()):
    if cache_lib.caps(c).paged:
      c = repage(c, d.k, d.v, d.positions, d.lengths, rows)
    new.append(c)
  return cache_lib.ModelCache.from_layers(new, mc.next_position, grouping=mc.grouping)


def to_dense(mc: cache_lib.ModelCache) -> cache_lib.ModelCache:
  """A ModelCache of DenseKVCache layers with the same tokens (capacity M * P per layer)."""
  return _to_dense_model(mc)
