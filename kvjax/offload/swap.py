"""Swapping caches to host memory and back: `swap_out` / `swap_in` for any cache pytree, and
`swap_out_rows` / `swap_in_rows` for rows of a paged cache (vLLM-style preemption by
swapping). Exact by default; `compress="int8"` quantizes floating arrays on the device
before they leave (per-token symmetric int8 with a float32 scale per vector).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as cache_lib
from kvjax import paged as paged_lib
from kvjax.offload.placement import to_device, to_host
from kvjax.paged import alloc as paged_alloc


COMPRESSIONS = (None, "int8")


# -- compression-aware swapping -----------------------------------------------------------------
@flax.struct.dataclass
class Int8Tensor:
  """A float array stored as per-vector symmetric int8 codes (last axis = vector).

  codes uint8 [..., D] (code 128 = 0), scale float32 [..., 1]; x ~= (codes - 128) * scale.
  """

  codes: jax.Array
  scale: jax.Array
  dtype: str = flax.struct.field(pytree_node=False, default="float32")

  @property
  def shape(self) -> tuple:
    return tuple(self.codes.shape)


def quantize_int8(x) -> Int8Tensor:
  """Per-vector (last axis) symmetric int8 via kvjax.quant.formats (|error| <= scale / 2)."""
  from kvjax.quant import formats  # pylint: disable=import-outside-toplevel
  q = formats.quantize_int(x, bits=8, axis="token", symmetric=True, scale_dtype="float32")
  return Int8Tensor(q.codes, q.scale, jnp.dtype(x.dtype).name)


def dequantize_int8(t: Int8Tensor) -> jax.Array:
  from kvjax.quant import formats  # pylint: disable=import-outside-toplevel
  return formats.dequantize_int(t.codes, t.scale, None, bits=8, axis="token").astype(t.dtype)


def _compressible(x) -> bool:
  return (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2
          and x.shape[-1] > 1)


@flax.struct.dataclass
class HostCopy:
  """What `swap_out` returns: the tree with (optionally int8-coded) leaves in host memory."""

  tree: Any
  compress: Optional[str] = flax.struct.field(pytree_node=False, default=None)

  @property
  def nbytes(self) -> int:
    return cache_lib.tree_nbytes(self.tree)


@functools.partial(jax.jit, static_argnames=("compress",))
def _encode_tree(tree, compress):
  del compress
  return jax.tree.map(lambda x: quantize_int8(x) if _compressible(x) else x, tree)


@jax.jit
def _decode_tree(tree):
  return jax.tree.map(lambda x: dequantize_int8(x) if isinstance(x, Int8Tensor) else x, tree,
                      is_leaf=lambda x: isinstance(x, Int8Tensor))


def swap_out(tree, *, compress: Optional[str] = None, kind: Optional[str] = None) -> HostCopy:
  """Moves a cache (any pytree of arrays) to host memory, optionally int8-compressed.

  With compress="int8" every floating array of rank >= 2 is quantized *on the device*
  before the transfer; integer arrays (positions, lengths, tables) move exactly.
  """
  if compress not in COMPRESSIONS:
    raise ValueError(f"compress={compress!r}; allowed: {COMPRESSIONS}")
  if compress == "int8":
    tree = _encode_tree(tree, compress)
  return HostCopy(to_host(tree, kind), compress)


def swap_in(copy: HostCopy):
  """Inverse of swap_out: back on the device (dequantized if it was compressed)."""
  tree = to_device(copy.tree)
  return _decode_tree(tree) if copy.compress else tree


# -- paged rows: preemption by swapping -----------------------------------------------------------
@flax.struct.dataclass
class SwappedRows:
  """Pages of some rows of a paged ModelCache (or PagedKVCache), held on the host.

  pages: per paged segment, {pool field: [L, R, n, Hkv, P, ...]} (n = most pages any swapped
    row held), in host memory (HostCopy, maybe int8-coded).
  lengths: per paged segment [L, R, Hkv] (exact, host).
  next_position: [R] (exact, host) or None for a lone layer cache.
  """

  pages: Any
  lengths: Any
  next_position: Any


def _segments(cache):
  if cache_lib.caps(cache).paged:
    return [cache]
  return list(cache.segments)


def _stacked(seg):
  return seg if seg.stacked else jax.tree.map(lambda x: x[None], seg)


@functools.partial(jax.jit, static_argnames=("n",))
def _gather_rows(seg, rows, n):
  """{field: [L, R, n, H, P, ...]} pages of `rows` (first n table entries)."""
  pt = jnp.clip(seg.page_table[:, rows, :n], 0, seg.num_pages - 1)     # [L, R, n]
  out = {}
  for f in paged_lib.POOL_FIELDS:
    a = getattr(seg, f)
    if a is not None:
      out[f] = jax.vmap(lambda pool, t: pool[t])(a, pt)
  return out


def swap_out_rows(cache, rows: Sequence[int], *, compress: Optional[str] = None):
  """Copies rows' pages to host memory and releases them. Returns (SwappedRows, cache').

  Bit-exact with compress=None (the raw page bytes move, codes and scales of a quantized
  pool included). With compress="int8" floating page data is int8-coded on the way out.
  """
  rows = np.asarray(rows, np.int32).reshape(-1)
  segs = _segments(cache)
  pages, lengths = [], []
  for seg in segs:
    if not cache_lib.caps(seg).paged:
      pages.append(None)
      lengths.append(None)
      continue
    s = _stacked(seg)
    held = np.asarray(jnp.sum(s.page_table[:, rows] >= 0, axis=-1))
    n = max(int(held.max(initial=0)), 1)
    pages.append(swap_out(_gather_rows(s, jnp.asarray(rows), n), compress=compress))
    lengths.append(np.asarray(s.lengths[:, rows]))
  if cache_lib.caps(cache).paged:
    out = SwappedRows(pages, lengths, None)
    return out, paged_lib.release(cache, rows)
  out = SwappedRows(pages, lengths, np.asarray(cache.next_position)[rows])
  return out, paged_lib.release_rows(cache, rows)


@jax.jit
def _restore_rows(seg, rows, lengths, data):
  """Allocates pages for rows (released first) and copies `data` pages into them."""
  def one(c, lens, dat):
    c = paged_lib.release(c, rows)
    # Plan an append of `lens` tokens per (row, head): allocates ceil(max len / P) pages.
    b, h = c.lengths.shape
    t = c.capacity
    full = jnp.zeros((b, h), jnp.int32).at[rows].set(lens)
    pos_h = jnp.where(jnp.arange(t)[None, None, :] < full[..., None], 0, -1)
    plan = paged_alloc._plan(c._meta(None), pos_h, c.page_size)  # pylint: disable=protected-access
    n = next(iter(dat.values())).shape[1]
    dst = plan.meta["page_table"][rows, :n]                     # [R, n]
    held = (jnp.max(lens, -1) + c.page_size - 1) // c.page_size
    dst = jnp.where((jnp.arange(n)[None] < held[:, None]) & plan.ok, dst, c.num_pages)
    upd = {f: getattr(c, f).at[dst].set(dat[f].astype(getattr(c, f).dtype), mode="drop")
           for f in dat}
    return c.replace(**upd).replace(**plan.meta)
  return jax.vmap(one)(seg, lengths, data)


def swap_in_rows(cache, swapped: SwappedRows, rows: Sequence[int]):
  """Writes swapped rows back into `rows` (any rows; their current pages are released).

  Raises OutOfPages (before changing anything) if the pool lacks free pages.
  """
  rows = np.asarray(rows, np.int32).reshape(-1)
  segs = _segments(cache)
  if len(segs) != len(swapped.pages):
    raise ValueError(f"swapped rows come from a cache with {len(swapped.pages)} segments; "
                     f"this one has {len(segs)}")
  new_segs = []
  for seg, pages, lens in zip(segs, swapped.pages, swapped.lengths):
    if pages is None:
      new_segs.append(seg)
      continue
    s = _stacked(seg)
    if lens.shape[1] != rows.size:
      raise ValueError(f"{lens.shape[1]} rows were swapped out; got {rows.size} target rows")
    # Admission: pages needed vs free after releasing the target rows (worst layer).
    need = -(-lens.max(-1) // s.page_size)                              # [L, R]
    released = paged_lib.release(s, rows)
    free = np.asarray(released.num_free)
    if (need.sum(-1) > free).any():
      i = int(np.argmax(need.sum(-1) - free))
      raise paged_lib.OutOfPages(need.sum(-1)[i], free[i], "swap_in_rows")
    data = swap_in(pages)
    new = _restore_rows(s, jnp.asarray(rows), jnp.asarray(lens), data)
    new_segs.append(new if seg.stacked else jax.tree.map(lambda x: x[0], new))
  if cache_lib.caps(cache).paged:
    return new_segs[0]
  nxt = cache.next_position.at[rows].set(jnp.asarray(swapped.next_position))
  return cache.replace(segments=tuple(new_segs), next_position=nxt)
