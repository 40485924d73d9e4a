"""Admission control and invariants of a paged pool: whether an append or a request fits (the
`OutOfPages` signal a scheduler queues or preempts on), and the structural invariants that
tests and debugging check (refcounts, free stack, tables, partitions).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.paged.alloc import _flush_counts, _plan
from kvjax.paged.layout import OutOfPages

if TYPE_CHECKING:
  from kvjax.paged.pool import PagedKVCache


@functools.partial(jax.jit, static_argnames=("page_size", "r_cap", "g", "stacked"))
def _admission(meta, pos_h, page_size, r_cap, g, stacked):
  fn = functools.partial(_admission_counts, page_size=page_size, r_cap=r_cap, g=g)
  return jax.vmap(fn, in_axes=(0, None))(meta, pos_h) if stacked else fn(meta, pos_h)


def _admission_counts(meta, pos_h, page_size, r_cap, g):
  toks = jnp.max(meta["lengths"] + jnp.sum(pos_h >= 0, axis=-1), axis=-1)
  if r_cap:
    meta, pos_h, *_ = _flush_counts(meta, pos_h, r_cap, g)
  plan = _plan(meta, pos_h, page_size)
  n_new = jnp.sum(pos_h >= 0, axis=-1)
  rows_need = (jnp.max(meta["lengths"] + n_new, axis=-1) + page_size - 1) // page_size
  free = meta["num_free"][None] if meta["part_free"] is None else meta["part_free"]
  return plan.part_total, free, rows_need, toks


def _pool_words(cache: PagedKVCache) -> str:
  if cache.partitions == 1:
    return f"the whole pool has num_pages={cache.num_pages}"
  return (f"the whole pool has num_pages={cache.num_pages} in partitions={cache.partitions}, "
          f"so a row can use at most {cache.pages_per_partition}")


def check_admission(cache: PagedKVCache, pos_h) -> None:
  """Raises ValueError / OutOfPages if appending head-wise tokens pos_h [B,H,T] would fail."""
  meta = cache._meta(None)  # pylint: disable=protected-access
  total, free, rows_need, toks = jax.device_get(_admission(
      meta, pos_h, cache.page_size, cache.residual, cache.token_group, cache.stacked))
  total, free = np.asarray(total).reshape(-1, cache.partitions), np.asarray(free).reshape(
      -1, cache.partitions)
  rows_need, toks = np.asarray(rows_need).reshape(-1), np.asarray(toks).reshape(-1)
  worst = int(rows_need.max(initial=0))
  if worst > cache.pages_per_partition:
    raise ValueError(
        f"PagedKVCache: a row of {int(toks.max())} tokens needs {worst} pages of "
        f"page_size={cache.page_size}, but {_pool_words(cache)}; this request can never "
        "fit: enlarge the pool or split/compress the request")
  if worst > cache.max_pages:
    raise ValueError(
        f"PagedKVCache overflow: a row of {int(toks.max())} tokens needs {worst} pages but "
        f"max_pages={cache.max_pages} (capacity={cache.capacity} tokens per row)")
  short = total - free
  if (short > 0).any():
    layer, part = np.unravel_index(int(np.argmax(short)), short.shape)
    raise OutOfPages(total[layer, part], free[layer, part],
                     partition=int(part) if cache.partitions > 1 else None)


def pages_needed(n_tokens: int, page_size: int) -> int:
  if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)) or page_size < 1:
    raise ValueError(f"page_size={page_size!r}; must be an int >= 1")
  return -(-int(n_tokens) // int(page_size))


def check_request(cache: PagedKVCache, n_tokens: int, max_pages: Optional[int] = None) -> None:
  """Admission control: ValueError if a request of n_tokens can never fit one row.

  max_pages: the table width rows may grow to (default the cache's own; a server that
  narrows tables between steps, see `with_table_width`, passes its full width)."""
  need = cache.pages_for(n_tokens)
  m = cache.max_pages if max_pages is None else int(max_pages)
  cap = m * cache.page_size + cache.residual
  if need > cache.pages_per_partition:
    raise ValueError(f"request of {n_tokens} tokens needs {need} pages of page_size="
                     f"{cache.page_size}, but {_pool_words(cache)}")
  if need > m or n_tokens > cap:
    raise ValueError(f"request of {n_tokens} tokens needs {need} pages but max_pages="
                     f"{m} (capacity={cap} tokens per row)")


def check_invariants(cache: PagedKVCache) -> None:
  """Raises AssertionError unless the allocator state of every layer is consistent.

  Checks: each partition's free stack holds exactly its pages with refcount 0, without
  duplicates; refcount[p] equals the number of table entries pointing at p; each row holds
  ceil(max_h paged length / P) pages, contiguously from entry 0, all in its partition; a
  residual window holds at most R tokens.
  """
  layers = [cache.layer(i) for i in range(cache.page_table.shape[0])] if cache.stacked \
      else [cache]
  s, np_ = cache.partitions, cache.pages_per_partition
  for c in layers:
    rc, fs, nf = np.asarray(c.refcount), np.asarray(c.free_stack), int(c.num_free)
    pt, lengths = np.asarray(c.page_table), np.asarray(c.lengths)
    parts = [nf] if s == 1 else np.asarray(c.part_free).tolist()
    assert sum(parts) == nf, f"num_free {nf} != sum of partition counts {parts}"
    free = []
    for i, k in enumerate(parts):
      mine = fs[i * np_:i * np_ + k]
      assert ((mine >= i * np_) & (mine < (i + 1) * np_)).all(), (
          f"partition {i}'s free stack holds foreign pages: {mine.tolist()}")
      free += mine.tolist()
    assert len(set(free)) == nf, f"duplicate pages on the free stack: {free}"
    assert set(free) == set(np.flatnonzero(rc == 0).tolist()), (
        f"free stack {sorted(free)} != refcount-0 pages {np.flatnonzero(rc == 0).tolist()}")
    counts = np.bincount(pt[pt >= 0], minlength=c.num_pages)
    assert (counts == rc).all(), f"refcount {rc.tolist()} != table references {counts.tolist()}"
    paged_len = lengths
    if c.residual:
      rl = np.asarray(c.res_lengths)
      assert (rl >= 0).all() and (rl <= c.residual).all(), f"residual lengths {rl.tolist()}"
      paged_len = lengths - rl
      assert (paged_len % c.token_group == 0).all(), (
          f"flushed lengths {paged_len.tolist()} not whole groups of {c.token_group}")
    held = (pt >= 0).sum(-1)
    want = -(-paged_len.max(-1) // c.page_size)
    assert (held == want).all(), f"rows hold {held.tolist()} pages; lengths need {want.tolist()}"
    per = c.batch // s
    for b in range(pt.shape[0]):
      assert (pt[b, :held[b]] >= 0).all() and (pt[b, held[b]:] < 0).all(), (
          f"row {b} table not contiguous: {pt[b].tolist()}")
      row = pt[b][pt[b] >= 0]
      assert len(set(row.tolist())) == row.size, f"row {b} maps a page twice: {row.tolist()}"
      part = b // per
      assert ((row >= part * np_) & (row < (part + 1) * np_)).all(), (
          f"row {b} (partition {part}) maps pages of another partition: {row.tolist()}")
