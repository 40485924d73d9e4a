"""Paged KV cache: a page pool, per-sequence page tables, a free list and reference counts.

PagedAttention (Kwon et al., 2023, vLLM): keys and values live in fixed-size *pages* of a
shared pool; each sequence owns a page table mapping its logical pages to physical ones.
Memory is allocated a page at a time as sequences grow, freed pages go back to a free list,
and sequences that share a prefix (a system prompt) point at the same physical pages, with
reference counts and copy-on-write so one sequence's write never changes another's view.

Everything here is a pure, jittable function over one pytree (`PagedKVCache`); allocation
and freeing are array operations on a free *stack*, so a decode step allocates its pages
inside jit with no host round trip.

Layout (one layer; what the `pallas_kernels` paged decode kernel reads). N pages, P page
size, M max pages per sequence, Hkv kv heads, D / Dv head dims, B rows:

  k_pages     [N, Hkv, P, D]   keys (RoPE applied), dtype of the cache -- or, with `quant`,
                               integer codes packed along D (uint8 [N, Hkv, P, D*bits/8])
                               or FP8 codes [N, Hkv, P, D] (kvjax.quant layout, per token)
  k_scale     [N, Hkv, P, D/g] per-token scales (quantized pools only, else None)
  k_zero      [N, Hkv, P, D/g] zero points (asymmetric integer codes only, else None)
  v_pages, v_scale, v_zero     the same for values
  pos_pages   [N, Hkv, P] int32  original token position of each slot
  page_table  [B, M] int32     physical page of logical page j of row b; -1 = none.
                               Entries [0, held_b) are set, the rest are -1, with
                               held_b = ceil(max_h lengths[b, h] / P).
  lengths     [B, Hkv] int32   tokens of row b, head h. Slot s of row b (logical page s // P,
                               offset s % P) is valid for head h iff s < lengths[b, h];
                               contents of slots beyond it are stale (never read).
  refcount    [N] int32        rows (per layer) pointing at each page; 0 = free
  free_stack  [N] int32        free_stack[:num_free] are the free pages (top = last)
  num_free    [] int32
  overflow    [] bool          sticky: some append found no free pages and was dropped

A model's cache stacks one such pytree per layer (`ModelCache` segments add a leading
layer axis to every leaf): each layer has its own pool and its own copy of the (small)
tables, and since every layer sees the same appends, the tables stay identical across
layers. Nothing is shared between layers, so a layer can be offloaded on its own.

Semantics:
  * append writes the valid new tokens of each row after its current length, head-wise
    (head-wise lengths from presses such as AdaKV are supported). It first allocates the
    pages the row is missing, then copies every *shared* page the write would touch
    (refcount > 1) to a fresh page (copy-on-write), then scatters the tokens.
  * Allocation is all-or-nothing per call: if the pool lacks free pages for every row of
    the call, nothing is written, lengths and tables are unchanged and `overflow` is set.
    Outside jit (`check_room`, which `models.prefill/decode` call before the step) the
    same condition raises `OutOfPages` (a ValueError carrying `needed`/`free`, the signal
    a scheduler uses to queue or preempt); a row that could not fit even in an empty pool
    raises a plain ValueError naming the sizes.
  * `fork` shares a row's pages with other rows (prefix sharing); `release` drops a row's
    references and returns pages whose count reaches zero to the free list.
  * Eviction: `repage` rewrites rows from a compacted dense view into fresh pages and
    frees the old ones; `PagedPress` wraps any kvjax press so `models.prefill(press=...)`
    works on paged caches and the freed pages return to the pool.

Attention (reference path): the row's pages are gathered into a dense [B, Hkv, M*P, D]
view and `kvjax.attention.attention` runs on it, so the dense-slot index of logical slot s
is s and presses' `colsum` observations align with `to_dense()`. Quantized pools decode the
gathered codes and use the current chunk's own keys/values exactly (as kvjax.quant does).

Where this differs from vLLM: pages hold all kv heads of a token (vLLM: the same); page
tables are per layer copies (vLLM shares one block table across layers); copy-on-write is
per page at write time, and a batch in which two rows copy the same shared page gives each
a copy and frees the original (vLLM lets the last writer keep it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib

_static = lambda default=None: flax.struct.field(pytree_node=False, default=default)  # noqa: E731

POOL_FIELDS = ("k_pages", "k_scale", "k_zero", "v_pages", "v_scale", "v_zero", "pos_pages")
META_FIELDS = ("page_table", "lengths", "refcount", "free_stack", "num_free", "overflow")


class OutOfPages(ValueError):
  """The pool has too few free pages for this append right now (queue or preempt).

  Attributes:
    needed: pages the append needs (summed over rows, worst layer).
    free: free pages in the pool.
  """

  def __init__(self, needed: int, free: int, what: str = "PagedKVCache"):
    self.needed, self.free = int(needed), int(free)
    super().__init__(f"{what}: out of pages: this append needs {self.needed} new pages but "
                     f"only {self.free} are free; release finished rows, swap rows out "
                     "(kvjax.offload), compress with a press, or enlarge num_pages")


# -- page codecs: how a token vector is stored in a page ---------------------------------------
def _check_quant(quant, head_dim, v_head_dim):
  if quant is None:
    return
  from kvjax.quant import spec as spec_lib  # pylint: disable=import-outside-toplevel
  if not isinstance(quant, spec_lib.QuantSpec):
    raise ValueError(f"quant must be a kvjax.quant.QuantSpec or None; got {type(quant).__name__}")
  bad = []
  if quant.has_channel_axis:
    bad.append(f"k_axis/v_axis={quant.k_axis!r}/{quant.v_axis!r} (need 'token')")
  if quant.residual:
    bad.append(f"residual={quant.residual} (need 0)")
  if quant.pre_rope:
    bad.append("pre_rope=True")
  if quant.outlier_frac:
    bad.append(f"outlier_frac={quant.outlier_frac}")
  if bad:
    raise ValueError("paged pools store each token independently, so only per-token formats "
                     f"fit a page (int8, fp8, per_token); unsupported: {', '.join(bad)}")
  quant.check_dims(head_dim, v_head_dim)
  spec_lib.check_backend(quant)


def _encode(x, quant, bits, dtype):
  """x [..., D] -> (codes, scale | None, zero | None)."""
  if quant is None:
    return x.astype(dtype), None, None
  from kvjax.quant import formats, packing  # pylint: disable=import-outside-toplevel
  g = quant.channel_group("token", x.shape[-1])
  if quant.fmt == "int":
    q = formats.quantize_int(x, bits=bits, axis="token", group=g, symmetric=quant.symmetric,
                             scale_dtype=quant.scale_dtype)
    return packing.pack(q.codes, bits), q.scale, q.zero
  q = formats.quantize_fp8(x, fmt=quant.fmt, group=g, scale_dtype=quant.scale_dtype)
  return q.codes, q.scale, None


def _decode(codes, scale, zero, quant, bits, d, dtype):
  if quant is None:
    return codes
  from kvjax.quant import formats, packing  # pylint: disable=import-outside-toplevel
  g = quant.channel_group("token", d)
  if quant.fmt == "int":
    x = formats.dequantize_int(packing.unpack(codes, bits, d), scale, zero, bits=bits,
                               axis="token", group=g)
  else:
    x = formats.dequantize_fp8(codes, scale, group=g)
  return x.astype(dtype)


# -- the pytree -----------------------------------------------------------------------------
@flax.struct.dataclass
class PagedKVCache:
  """One layer's paged cache (layout and semantics in the module docstring).

  Build with `PagedKVCache.init`; in a model, with `layer_factory` + `models.init_cache`.
  Implements the kvjax cache protocol (append / attend / nbytes / capacity / length /
  check_room, and the in-place stacked variants used when a model scans its layers).
  """

  k_pages: jax.Array
  k_scale: Optional[jax.Array]
  k_zero: Optional[jax.Array]
  v_pages: jax.Array
  v_scale: Optional[jax.Array]
  v_zero: Optional[jax.Array]
  pos_pages: jax.Array
  page_table: jax.Array
  lengths: jax.Array
  refcount: jax.Array
  free_stack: jax.Array
  num_free: jax.Array
  overflow: jax.Array
  head_dim: int = _static()
  v_head_dim: int = _static()
  dtype: str = _static("float32")
  quant: Any = _static()

  # Component of each field in memory reports (kvjax.memory); quantized pools hold codes in
  # k_pages / v_pages but are reported under "kv" (the dict is per class).
  BYTE_CATEGORIES = {
      "k_pages": "kv", "v_pages": "kv", "k_scale": "scales", "v_scale": "scales",
      "k_zero": "zeros", "v_zero": "zeros", "pos_pages": "index", "page_table": "index",
      "lengths": "index", "refcount": "index", "free_stack": "index", "num_free": "index",
      "overflow": "index"}

  # Mesh axes of each leaf's dims (kvjax.sharding): pools shard over kv heads, tables over
  # batch; the pool is replicated over `data` because any row may use any page.
  PARTITION = {
      "k_pages": (None, "model", None, None), "v_pages": (None, "model", None, None),
      "k_scale": (None, "model", None, None), "v_scale": (None, "model", None, None),
      "k_zero": (None, "model", None, None), "v_zero": (None, "model", None, None),
      "pos_pages": (None, "model", None), "page_table": ("data", None),
      "lengths": ("data", "model"), "refcount": (None,), "free_stack": (None,),
      "num_free": (), "overflow": ()}

  @classmethod
  def init(cls, batch: int, kv_heads: int, head_dim: int, *, num_pages: int, page_size: int,
           max_pages: Optional[int] = None, dtype=jnp.float32,
           v_head_dim: Optional[int] = None, quant=None) -> "PagedKVCache":
    """An empty paged cache.

    Args:
      batch: rows B (sequence slots of the batch).
      kv_heads, head_dim, v_head_dim: shapes (v_head_dim defaults to head_dim).
      num_pages: pages N in the pool (shared by all rows).
      page_size: tokens P per page.
      max_pages: page-table width M (max pages per row); default N.
      dtype: dtype of stored keys/values (of decoded values with `quant`).
      quant: optional kvjax.quant.QuantSpec with per-token axes (int8, fp8, per_token).
    """
    for name, val in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim),
                      ("num_pages", num_pages), ("page_size", page_size)):
      if not isinstance(val, (int, np.integer)) or val < 1:
        raise ValueError(f"{name}={val!r}; must be an int >= 1")
    m = num_pages if max_pages is None else max_pages
    if not isinstance(m, (int, np.integer)) or m < 1:
      raise ValueError(f"max_pages={max_pages!r}; must be an int >= 1")
    dv = head_dim if v_head_dim is None else v_head_dim
    _check_quant(quant, head_dim, dv)
    dt = jnp.dtype(dtype)
    n, h, p = num_pages, kv_heads, page_size

    def pool(d, bits):
      probe = jax.eval_shape(lambda x: _encode(x, quant, bits, dt),
                             jax.ShapeDtypeStruct((1, 1, 1, d), dt))
      return [None if a is None else jnp.zeros((n, h, p) + a.shape[3:], a.dtype) for a in probe]

    kb = vb = 8
    if quant is not None:
      kb, vb = quant.k_bits, quant.v_bits
    kc, ks, kz = pool(head_dim, kb)
    vc, vs, vz = pool(dv, vb)
    return cls(k_pages=kc, k_scale=ks, k_zero=kz, v_pages=vc, v_scale=vs, v_zero=vz,
               pos_pages=jnp.full((n, h, p), -1, jnp.int32),
               page_table=jnp.full((batch, m), -1, jnp.int32),
               lengths=jnp.zeros((batch, h), jnp.int32),
               refcount=jnp.zeros((n,), jnp.int32),
               # pages pop from the top: page 0 first
               free_stack=jnp.arange(n - 1, -1, -1, dtype=jnp.int32),
               num_free=jnp.asarray(n, jnp.int32), overflow=jnp.asarray(False),
               head_dim=int(head_dim), v_head_dim=int(dv), dtype=dt.name, quant=quant)

  # -- static facts -------------------------------------------------------------------------
  @property
  def stacked(self) -> bool:
    """Whether leaves carry a leading layer axis (a ModelCache segment)."""
    return self.page_table.ndim == 3

  @property
  def num_pages(self) -> int:
    return self.refcount.shape[-1]

  @property
  def page_size(self) -> int:
    return self.pos_pages.shape[-1]

  @property
  def max_pages(self) -> int:
    return self.page_table.shape[-1]

  @property
  def capacity(self) -> int:
    """Static token capacity of one row: max_pages * page_size."""
    return self.max_pages * self.page_size

  @property
  def batch(self) -> int:
    return self.page_table.shape[-2]

  @property
  def kv_heads(self) -> int:
    return self.pos_pages.shape[-2]

  @property
  def length(self) -> jax.Array:
    return self.lengths

  @property
  def nbytes(self) -> int:
    """Exact bytes of every array held (the whole pool, tables and free list)."""
    return cache_lib.tree_nbytes(self)

  @property
  def page_nbytes(self) -> int:
    """Bytes one page occupies (keys, values, scales, zeros and positions; one layer)."""
    total, lead = 0, 2 if self.stacked else 1
    for f in POOL_FIELDS:
      a = getattr(self, f)
      if a is not None:
        total += int(np.prod(a.shape[lead:])) * jnp.dtype(a.dtype).itemsize
    return total

  @property
  def pages_in_use(self) -> jax.Array:
    """Pages with a nonzero reference count ([] or [L] when stacked)."""
    return self.num_pages - self.num_free

  @property
  def used_nbytes(self) -> jax.Array:
    """Bytes of pages in use plus every table (what the live sequences actually occupy)."""
    meta = sum(cache_lib.tree_nbytes(getattr(self, f)) for f in META_FIELDS)
    return jnp.sum(self.pages_in_use) * self.page_nbytes + meta

  def _bits(self):
    if self.quant is None:
      return 8, 8
    return self.quant.k_bits, self.quant.v_bits

  # -- layer access (unstacked caches use layer=None) --------------------------------------
  def _meta(self, layer):
    return {f: getattr(self, f) if layer is None else getattr(self, f)[layer]
            for f in META_FIELDS}

  def _with_meta(self, layer, meta):
    if layer is None:
      return self.replace(**meta)
    return self.replace(**{f: getattr(self, f).at[layer].set(meta[f]) for f in META_FIELDS})

  def layer(self, i: int) -> "PagedKVCache":
    """Layer i of a stacked cache."""
    return jax.tree.map(lambda x: x[i], self)

  # -- protocol -------------------------------------------------------------------------------
  def check_room(self, positions_new) -> None:
    """Raises before an append that cannot succeed (only with concrete values).

    ValueError: a row would exceed max_pages * page_size tokens, or need more pages than
    the whole pool holds. OutOfPages: the pool has too few free pages right now.
    """
    if not (cache_lib._is_concrete(positions_new)  # pylint: disable=protected-access
            and cache_lib._is_concrete(self.lengths)):  # pylint: disable=protected-access
      return
    pos = jnp.asarray(positions_new)
    pos_h = jnp.broadcast_to(pos[:, None, :], (pos.shape[0], self.kv_heads, pos.shape[1]))
    check_admission(self, pos_h)

  def append(self, k_new, v_new, positions_new) -> "PagedKVCache":
    """Writes the valid new tokens (positions_new [B, T], -1 = padding) after each row's."""
    self.check_room(positions_new)
    return _write(self, None, k_new, v_new, _headwise(positions_new, k_new.shape[1]))[0]

  def append_stacked(self, layer, k_new, v_new, positions_new) -> "PagedKVCache":
    """append() on layer `layer` of a stacked cache, updating the pool in place."""
    return _write(self, layer, k_new, v_new, _headwise(positions_new, k_new.shape[1]))[0]

  def attend(self, q, k_new, v_new, q_positions, spec: attn_lib.AttentionSpec, *,
             sink_logits=None, return_colsum=False, colsum_window=None, return_lse=False):
    """Appends the chunk, then attends q over the row's pages (gathered to a dense view).

    Returns (AttentionOutput, new_cache); colsum is aligned with `to_dense()` slots.
    """
    self.check_room(q_positions)
    return self._attend(None, q, k_new, v_new, q_positions, spec, sink_logits=sink_logits,
                        return_colsum=return_colsum, colsum_window=colsum_window,
                        return_lse=return_lse)

  def attend_stacked(self, layer, q, k_new, v_new, q_positions, spec, *, sink_logits=None,
                     return_colsum=False, colsum_window=None, return_lse=False):
    return self._attend(layer, q, k_new, v_new, q_positions, spec, sink_logits=sink_logits,
                        return_colsum=return_colsum, colsum_window=colsum_window,
                        return_lse=return_lse)

  def _attend(self, layer, q, k_new, v_new, q_positions, spec, **kw):
    new, dest = _write(self, layer, k_new, v_new, _headwise(q_positions, k_new.shape[1]))
    fused = _fused_attend(self, new, layer, q, k_new, v_new, q_positions, spec, **kw)
    if fused is not None:
      return fused, new
    k, v, pos, lengths = dense_view(new, layer)
    if self.quant is not None:
      # The chunk's own keys/values are used exactly (the past is read decoded).
      k = cache_lib.scatter_slots(k, dest, k_new)
      v = cache_lib.scatter_slots(v, dest, v_new)
    res = attn_lib.attention(q, k, v, lengths, q_positions=q_positions, k_positions=pos,
                             spec=spec, **kw)
    return res, new

  def to_dense(self, dtype=None) -> cache_lib.DenseKVCache:
    """The rows as a DenseKVCache of capacity max_pages * page_size (slot s = logical s)."""
    k, v, pos, lengths = dense_view(self)
    dt = k.dtype if dtype is None else dtype
    return cache_lib.DenseKVCache(k=k.astype(dt), v=v.astype(dt), positions=pos,
                                  lengths=lengths)


def _headwise(positions_new, kv_heads):
  b, t = positions_new.shape
  return jnp.broadcast_to(positions_new[:, None, :], (b, kv_heads, t))


# -- the free list ----------------------------------------------------------------------------
def _push(free_stack, num_free, mask):
  """Pushes pages where mask [N] onto the free stack."""
  n = free_stack.shape[0]
  rank = jnp.cumsum(mask.astype(jnp.int32)) - 1
  dst = jnp.where(mask, num_free + rank, n)
  free_stack = free_stack.at[dst].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
  return free_stack, num_free + jnp.sum(mask).astype(jnp.int32)


def _decref(meta, pages_mask, pages):
  """Drops one reference from pages[pages_mask] (duplicates count); frees those at zero."""
  rc = meta["refcount"]
  n = rc.shape[0]
  rc2 = rc.at[jnp.where(pages_mask, pages, n)].add(-1, mode="drop")
  freed = (rc2 == 0) & (rc > 0)
  fs, nf = _push(meta["free_stack"], meta["num_free"], freed)
  return dict(meta, refcount=rc2, free_stack=fs, num_free=nf)


class _Plan(NamedTuple):
  meta: dict          # tables after the append (unchanged if not ok)
  ok: jax.Array       # [] bool: the append happens
  pid: jax.Array      # [B, H, T] physical page of each new token (N = dropped)
  off: jax.Array      # [B, H, T] offset inside the page
  dest: jax.Array     # [B, H, T] logical slot (capacity = dropped)
  cow_src: jax.Array  # [K] pages to copy (N = none)
  cow_dst: jax.Array  # [K] their fresh copies
  need_rows: jax.Array  # [B] pages each row holds after the append
  total: jax.Array      # [] pages allocated


def _plan(meta, pos_h, page_size: int):
  """Allocation + copy-on-write plan of one layer for new tokens at head-wise pos_h [B,H,T]."""
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
  ok = (total <= nf) & jnp.all(need <= m)
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
               total)


def _pool_copy(arr, layer, src, dst):
  """arr[dst] = arr[src] for page lists [K] (src/dst = N: skip)."""
  n = arr.shape[1] if layer is not None else arr.shape[0]
  srcc = jnp.clip(src, 0, n - 1)
  if layer is None:
    return arr.at[dst].set(arr[srcc], mode="drop")
  return arr.at[layer, dst].set(arr[layer, srcc], mode="drop")


def _pool_scatter(arr, layer, pid, off, val):
  """arr[pid[b,h,t], h, off[b,h,t]] = val[b,h,t] (pid = N: dropped)."""
  hi = jnp.arange(pid.shape[1])[None, :, None]
  val = val.astype(arr.dtype)
  if layer is None:
    return arr.at[pid, hi, off].set(val, mode="drop")
  return arr.at[layer, pid, hi, off].set(val, mode="drop")


def _write(cache: PagedKVCache, layer, k_new, v_new, pos_h):
  """Appends head-wise tokens to one layer. Returns (cache', dest [B,H,T]; capacity = none)."""
  plan = _plan(cache._meta(layer), pos_h, cache.page_size)  # pylint: disable=protected-access
  kb, vb = cache._bits()  # pylint: disable=protected-access
  dt = jnp.dtype(cache.dtype)
  kc, ks, kz = _encode(k_new, cache.quant, kb, dt)
  vc, vs, vz = _encode(v_new, cache.quant, vb, dt)
  vals = {"k_pages": kc, "k_scale": ks, "k_zero": kz, "v_pages": vc, "v_scale": vs,
          "v_zero": vz, "pos_pages": pos_h}
  upd = {}
  for f in POOL_FIELDS:
    arr = getattr(cache, f)
    if arr is None:
      continue
    arr = _pool_copy(arr, layer, plan.cow_src, plan.cow_dst)
    upd[f] = _pool_scatter(arr, layer, plan.pid, plan.off, vals[f])
  new = cache.replace(**upd)._with_meta(layer, plan.meta)  # pylint: disable=protected-access
  return new, plan.dest


def _fused_attend(old, new, layer, q, k_new, v_new, q_positions, spec, *, sink_logits=None,
                  return_colsum=False, colsum_window=None, return_lse=False):
  """The pallas_kernels paged decode kernel, reading the pool in place, when spec.backend
  resolves to "pallas" and the kernel handles the options ("auto": on GPU/TPU; "pallas" on
  CPU: interpret mode); else None (reference path). Same semantics as the reference:
  quantized pools are read for the past tokens and the chunk is attended exactly."""
  del colsum_window
  on_accel = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
  if spec.backend == "xla" or return_colsum or (spec.backend == "auto" and not on_accel):
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


def dense_view(cache: PagedKVCache, layer=None):
  """Gathers each row's pages: (k [B,H,M*P,D], v [B,H,M*P,Dv], positions, lengths [B,H]).

  Decodes quantized pages. Slots of missing pages get position -1.
  """
  meta = cache._meta(layer)  # pylint: disable=protected-access
  pt = meta["page_table"]
  b, m = pt.shape
  ptc = jnp.clip(pt, 0, cache.num_pages - 1)

  def gather(arr):
    if arr is None:
      return None
    g = arr[ptc] if layer is None else arr[layer, ptc]          # [B, M, H, P, ...]
    g = jnp.moveaxis(g, 2, 1)                                     # [B, H, M, P, ...]
    return g.reshape(g.shape[:2] + (m * g.shape[3],) + g.shape[4:])

  kb, vb = cache._bits()  # pylint: disable=protected-access
  dt = jnp.dtype(cache.dtype)
  k = _decode(gather(cache.k_pages), gather(cache.k_scale), gather(cache.k_zero), cache.quant,
              kb, cache.head_dim, dt)
  v = _decode(gather(cache.v_pages), gather(cache.v_scale), gather(cache.v_zero), cache.quant,
              vb, cache.v_head_dim, dt)
  pos = gather(cache.pos_pages)
  slot = jnp.arange(m * cache.page_size, dtype=jnp.int32)
  valid = slot[None, None, :] < meta["lengths"][..., None]
  pos = jnp.where(valid, pos, -1)
  return k, v, pos, meta["lengths"]


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
  return cache.replace(**meta)


def fork(cache: PagedKVCache, src, dst, n_tokens=None) -> PagedKVCache:
  """Prefix sharing: row dst[i] shares the first n_tokens[i] tokens of row src[i].

  The dst rows' previous pages are released first. Shared pages gain a reference; the
  first write into a shared page (by any row) copies it. Without n_tokens, the whole
  row is shared (its head-wise lengths too).

  Args:
    cache: a layer cache (or a stacked segment).
    src, dst: int arrays [K]; dst rows must be distinct and not among src.
    n_tokens: optional int array [K] (<= the src row's length; a prefix of a row whose heads
      have equal lengths, i.e. one no head-wise press has compacted).
  """
  src = jnp.atleast_1d(jnp.asarray(src, jnp.int32))
  dst = jnp.atleast_1d(jnp.asarray(dst, jnp.int32))
  if src.shape != dst.shape:
    raise ValueError(f"src {src.shape} and dst {dst.shape} must have the same shape")
  concrete = cache_lib._is_concrete  # pylint: disable=protected-access
  if concrete(dst) and concrete(src):
    d, s = np.asarray(dst), np.asarray(src)
    if len(set(d.tolist())) != d.size or set(d.tolist()) & set(s.tolist()):
      raise ValueError(f"fork dst rows {d.tolist()} must be distinct and disjoint from src "
                       f"rows {s.tolist()}")
    if (d < 0).any() or (d >= cache.batch).any() or (s < 0).any() or (s >= cache.batch).any():
      raise ValueError(f"fork rows out of range [0, {cache.batch}): src {s.tolist()}, "
                       f"dst {d.tolist()}")
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
  n_share = (jnp.max(new_len, axis=-1) + p - 1) // p                 # [K]
  j = jnp.arange(cache.max_pages)
  share = (j[None, :] < n_share[:, None]) & (pt[src] >= 0)          # [K, M]
  rows = jnp.where(share, pt[src], -1)
  meta["page_table"] = pt.at[dst].set(rows)
  meta["lengths"] = lengths.at[dst].set(new_len)
  meta["refcount"] = meta["refcount"].at[jnp.where(share, rows, cache.num_pages)].add(
      1, mode="drop")
  return cache.replace(**meta)


def repage(cache: PagedKVCache, k, v, positions, lengths, rows=None) -> PagedKVCache:
  """Rewrites rows from a dense view into fresh pages and frees their old pages.

  Use after a press compacts a row (`to_dense` -> press -> `repage`): the kept tokens are
  packed into ceil(len / P) pages and the rest return to the pool. Old pages shared with
  other rows are not freed (the other rows still read them).

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
  # Restore the true positions (-1 kept as -1).
  pt = new.page_table
  b, h, _ = dest.shape
  lp = jnp.clip(dest // cache.page_size, 0, cache.max_pages - 1)
  pid = jnp.take_along_axis(pt[:, None, :], lp, axis=-1)
  pid = jnp.where(dest < cache.capacity, pid, cache.num_pages)
  pos_pages = _pool_scatter(new.pos_pages, None, pid, dest % cache.page_size, positions)
  return new.replace(pos_pages=pos_pages)


@functools.partial(jax.jit, static_argnames=("page_size",))
def _admission_counts(meta, pos_h, page_size):
  plan = _plan(meta, pos_h, page_size)
  lengths = meta["lengths"]
  n_new = jnp.sum(pos_h >= 0, axis=-1)
  rows_need = (jnp.max(lengths + n_new, axis=-1) + page_size - 1) // page_size
  return plan.total, meta["num_free"], rows_need, jnp.max(lengths + n_new, axis=-1)


def check_admission(cache: PagedKVCache, pos_h) -> None:
  """Raises ValueError / OutOfPages if appending head-wise tokens pos_h [B,H,T] would fail."""
  meta = cache._meta(None)  # pylint: disable=protected-access
  fn = functools.partial(_admission_counts, page_size=cache.page_size)
  if cache.stacked:
    total, free, rows_need, toks = jax.vmap(fn, in_axes=(0, None))(meta, pos_h)
  else:
    total, free, rows_need, toks = fn(meta, pos_h)
  total, free = np.atleast_1d(np.asarray(total)), np.atleast_1d(np.asarray(free))
  rows_need, toks = np.asarray(rows_need).reshape(-1), np.asarray(toks).reshape(-1)
  worst = int(rows_need.max(initial=0))
  if worst > cache.num_pages:
    raise ValueError(
        f"PagedKVCache: a row of {int(toks.max())} tokens needs {worst} pages of "
        f"page_size={cache.page_size}, but the whole pool has num_pages={cache.num_pages}; "
        "this request can never fit: enlarge the pool or split/compress the request")
  if worst > cache.max_pages:
    raise ValueError(
        f"PagedKVCache overflow: a row of {int(toks.max())} tokens needs {worst} pages but "
        f"max_pages={cache.max_pages} (capacity={cache.capacity} tokens per row)")
  short = total > free
  if short.any():
    i = int(np.argmax(total - free))
    raise OutOfPages(total[i], free[i])


def pages_needed(n_tokens: int, page_size: int) -> int:
  return -(-int(n_tokens) // int(page_size))


def check_request(cache: PagedKVCache, n_tokens: int) -> None:
  """Admission control: ValueError if a request of n_tokens can never fit one row."""
  need = pages_needed(n_tokens, cache.page_size)
  if need > cache.num_pages:
    raise ValueError(f"request of {n_tokens} tokens needs {need} pages of page_size="
                     f"{cache.page_size}, but the whole pool has num_pages={cache.num_pages}")
  if need > cache.max_pages:
    raise ValueError(f"request of {n_tokens} tokens needs {need} pages but max_pages="
                     f"{cache.max_pages} (capacity={cache.capacity} tokens per row)")


def check_invariants(cache: PagedKVCache) -> None:
  """Raises AssertionError unless the allocator state of every layer is consistent.

  Checks: the free stack holds exactly the pages with refcount 0, without duplicates;
  refcount[p] equals the number of table entries pointing at p; each row holds
  ceil(max_h length / P) pages, contiguously from entry 0.
  """
  layers = [cache.layer(i) for i in range(cache.page_table.shape[0])] if cache.stacked \
      else [cache]
  for c in layers:
    rc, fs, nf = np.asarray(c.refcount), np.asarray(c.free_stack), int(c.num_free)
    pt, lengths = np.asarray(c.page_table), np.asarray(c.lengths)
    free = fs[:nf]
    assert len(set(free.tolist())) == nf, f"duplicate pages on the free stack: {free}"
    assert set(free.tolist()) == set(np.flatnonzero(rc == 0).tolist()), (
        f"free stack {sorted(free.tolist())} != refcount-0 pages "
        f"{np.flatnonzero(rc == 0).tolist()}")
    counts = np.bincount(pt[pt >= 0], minlength=c.num_pages)
    assert (counts == rc).all(), f"refcount {rc.tolist()} != table references {counts.tolist()}"
    held = (pt >= 0).sum(-1)
    want = -(-lengths.max(-1) // c.page_size)
    assert (held == want).all(), f"rows hold {held.tolist()} pages; lengths need {want.tolist()}"
    for b in range(pt.shape[0]):
      assert (pt[b, :held[b]] >= 0).all() and (pt[b, held[b]:] < 0).all(), (
          f"row {b} table not contiguous: {pt[b].tolist()}")
    # no row references a page twice
    for b in range(pt.shape[0]):
      row = pt[b][pt[b] >= 0]
      assert len(set(row.tolist())) == row.size, f"row {b} maps a page twice: {row.tolist()}"


# -- models: construction, prefix sharing, eviction -------------------------------------------
def layer_factory(batch: int, kv_heads: int, head_dim: int, *, num_pages: int, page_size: int,
                  dtype=jnp.float32, v_head_dim: Optional[int] = None, quant=None,
                  max_pages: Optional[int] = None) -> Callable[[int, int], PagedKVCache]:
  """fn(layer_index, capacity) -> PagedKVCache for `models.init_cache(layer_factory=...)`.

  `capacity` (tokens per row) sets max_pages = ceil(capacity / page_size) unless max_pages
  is given; every layer gets a pool of num_pages pages.
  """
  def make(i, capacity):
    del i
    m = max_pages if max_pages is not None else pages_needed(capacity, page_size)
    return PagedKVCache.init(batch, kv_heads, head_dim, num_pages=num_pages,
                             page_size=page_size, max_pages=m, dtype=dtype,
                             v_head_dim=v_head_dim, quant=quant)
  return make


def model_cache_fn(init_cache: Callable, config, *, num_pages: int, page_size: int,
                   max_tokens: int, quant=None, dtype=None) -> Callable[[int], Any]:
  """fn(batch) -> an empty paged ModelCache, through the model's own `init_cache`.

  kvjax never imports models, so the caller passes it: `model_cache_fn(models.init_cache,
  cfg, num_pages=256, page_size=16, max_tokens=4096)`. `config` is duck-typed
  (num_kv_heads, head_dim, dtype); max_tokens sets each row's page-table width.
  """
  def make(batch):
    fac = layer_factory(batch, config.num_kv_heads, config.head_dim, num_pages=num_pages,
                        page_size=page_size, quant=quant,
                        dtype=dtype if dtype is not None else config.dtype)
    return init_cache(config, batch, max_tokens, layer_factory=fac)
  return make


def _paged_segments(mc: cache_lib.ModelCache):
  return [isinstance(s, PagedKVCache) for s in mc.segments]


def _map_paged(mc, fn):
  segs = tuple(fn(s) if isinstance(s, PagedKVCache) else s for s in mc.segments)
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
  d, s_ = np.asarray(dst), np.asarray(src)
  if len(set(d.tolist())) != d.size or set(d.tolist()) & set(s_.tolist()):
    raise ValueError(f"fork dst rows {d.tolist()} must be distinct and disjoint from src "
                     f"rows {s_.tolist()}")
  b = mc.batch
  if (d < 0).any() or (d >= b).any() or (s_ < 0).any() or (s_ >= b).any():
    raise ValueError(f"fork rows out of range [0, {b}): src {s_.tolist()}, dst {d.tolist()}")
  return _fork_model(mc, src, dst, n)


@jax.jit
def _release_model(mc, mask):
  mc = _map_paged(mc, lambda s: _release(s, mask))
  return mc.replace(next_position=jnp.where(mask, 0, mc.next_position))


def release_rows(mc: cache_lib.ModelCache, rows) -> cache_lib.ModelCache:
  """Releases rows on every paged layer and resets their next_position to 0."""
  return _release_model(mc, _rows_mask(rows, mc.batch))


def pages_in_use(mc) -> np.ndarray:
  """Pages in use per layer ([L] int, layer order) of a ModelCache (or of one PagedKVCache)."""
  if isinstance(mc, PagedKVCache):
    return np.atleast_1d(np.asarray(mc.pages_in_use))
  out = np.zeros((mc.num_layers,), np.int64)
  for seg, layers in zip(mc.segments, mc.entry_layers()):
    if isinstance(seg, PagedKVCache):
      out[layers] = np.atleast_1d(np.asarray(seg.pages_in_use))
  return out


def overflowed(mc) -> bool:
  """Whether any append on any paged layer was dropped for lack of pages (sticky flag)."""
  segs = [mc] if isinstance(mc, PagedKVCache) else mc.segments
  return any(bool(np.any(np.asarray(s.overflow))) for s in segs if isinstance(s, PagedKVCache))


@jax.jit
def _to_dense_model(mc):
  layers = [c.to_dense() if isinstance(c, PagedKVCache) else c for c in mc.layers()]
  return cache_lib.ModelCache.from_layers(layers, mc.next_position, grouping=mc.grouping)


@jax.jit
def _repage_model(mc, dense_mc, rows):
  new = []
  for c, d in zip(mc.layers(), dense_mc.layers()):
    if isinstance(c, PagedKVCache):
      c = repage(c, d.k, d.v, d.positions, d.lengths, rows)
    new.append(c)
  return cache_lib.ModelCache.from_layers(new, mc.next_position, grouping=mc.grouping)


def to_dense(mc: cache_lib.ModelCache) -> cache_lib.ModelCache:
  """A ModelCache of DenseKVCache layers with the same tokens (capacity M * P per layer)."""
  return _to_dense_model(mc)


@dataclasses.dataclass(frozen=True)
class PagedPress:
  """Runs any kvjax press on a paged ModelCache, returning the freed pages to the pool.

  `models.prefill(model, tokens, cache=paged, press=PagedPress(SnapKVPress(...)))`: the
  pages are gathered into a dense view (slots aligned with the attention observations),
  the press compacts it, and `repage` writes the kept tokens into fresh pages.
  """

  press: Any

  @property
  def observe(self):
    return self.press.observe

  def compress_model(self, model_cache, obs_list=None, config=None, *, rows=None, **kw):
    """Compresses every row (or only `rows`: indices or bool mask [B]) of every paged layer."""
    kw.pop("room", None)  # pages are allocated on demand; no room to reserve
    mask = (jnp.ones((model_cache.batch,), bool) if rows is None
            else _rows_mask(rows, model_cache.batch))
    dense = self.press.compress_model(to_dense(model_cache), obs_list, config, **kw)
    return _repage_model(model_cache, dense, mask)

  def maybe_compress(self, cache, step, obs=None):
    """Decode-time hook (kvjax.generate(decode_press=PagedPress(DecodingPress(...)))).

    The wrapped press sees the dense view (so "full" means a row filled its page table, not
    that the pool is short: pool pressure is kvjax.policy's job) and the rows are re-paged
    only when it compressed. The view is gathered every step: O(cache) extra reads.
    """
    inner = getattr(self.press, "maybe_compress", None)
    if inner is None:
      raise ValueError(f"{type(self.press).__name__} has no maybe_compress")
    before = getattr(self.press, "compressions", None)
    dense = to_dense(cache)
    out = inner(dense, step) if obs is None else inner(dense, step, obs=obs)
    if out is dense or (before is not None and self.press.compressions == before):
      return cache
    return _repage_model(cache, out, jnp.ones((cache.batch,), bool))

  def reset(self):
    if hasattr(self.press, "reset"):
      self.press.reset()


class PagedModel:
  """Duck-typed model adapter: `kvjax.generate(PagedModel(model, make_cache), tokens)`.

  `make_cache(batch, capacity)` builds an empty paged ModelCache, e.g.
  `lambda b, cap: models.init_cache(cfg, b, cap, layer_factory=paged.layer_factory(...))`.
  prefill() fills it (wrapping a `press` in PagedPress); decode() is the model's.
  """

  def __init__(self, model, make_cache: Callable[[int, int], cache_lib.ModelCache]):
    self.model = model
    self.make_cache = make_cache
    self.config = getattr(model, "config", None)

  def prefill(self, tokens, *, capacity: Optional[int] = None, press=None, cache=None, **kw):
    b, t = tokens.shape
    if cache is None:
      cache = self.make_cache(b, t if capacity is None else capacity)
    if press is not None and not isinstance(press, PagedPress):
      press = PagedPress(press)
    if press is not None:
      kw["press"] = press
    kw.pop("cache_dtype", None)  # the paged cache fixes its own dtype
    return self.model.prefill(tokens, cache=cache, **kw)

  def decode(self, tokens, cache, **kw):
    return self.model.decode(tokens, cache, **kw)
