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
size, M max pages per sequence, Hkv kv heads, D / Dv head dims, B rows, S partitions,
R residual window, G KIVI token group:

  k_pages     [N, Hkv, P, D]   keys (RoPE applied), dtype of the cache -- or, with `quant`,
                               integer codes packed along D (uint8 [N, Hkv, P, D*bits/8])
                               or FP8 codes [N, Hkv, P, D] (kvjax.quant layout)
  k_scale     [N, Hkv, P, D/g] per-token scales (quantized pools only, else None), or
              [N, Hkv, P/G, D] per-channel scales of each G-token group (KIVI keys)
  k_zero      like k_scale     zero points (asymmetric integer codes only, else None)
  v_pages, v_scale, v_zero     the same for values
  pos_pages   [N, Hkv, P] int32  original token position of each slot
  page_table  [B, M] int32     physical page of logical page j of row b; -1 = none.
                               Entries [0, held_b) are set, the rest are -1, with
                               held_b = ceil(max_h paged_b,h / P).
  lengths     [B, Hkv] int32   tokens of row b, head h (pages + residual window). Slot s of
                               row b (logical page s // P, offset s % P) is valid for head
                               h iff s < paged_b,h = lengths - res_lengths; contents of
                               slots beyond it are stale (never read).
  refcount    [N] int32        rows (per layer) pointing at each page; 0 = free
  free_stack  [N] int32        the free pages; partition s owns entries
                               [s*N/S, s*N/S + free_s) (top = last), global page ids
  num_free    [] int32         free pages, all partitions
  overflow    [] bool          sticky: some append found no free pages and was dropped
  part_free   [S] int32        free pages per partition (None when S = 1)
  k_res, v_res [B, Hkv, R, D|Dv], res_pos [B, Hkv, R], res_lengths [B, Hkv]
                               the residual window (None when R = 0): row b's newest
                               res_lengths tokens, exact, logically after its paged ones

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
    same condition raises `OutOfPages` (a ValueError carrying `needed`/`free`/`partition`,
    the signal a scheduler uses to queue or preempt); a row that could not fit even in an
    empty pool (partition) raises a plain ValueError naming the sizes.
  * `fork` shares a row's pages with other rows (prefix sharing); `release` drops a row's
    references and returns pages whose count reaches zero to the free list.
  * Eviction: `repage` rewrites rows from a compacted dense view into fresh pages and
    frees the old ones; `PagedPress` wraps any kvjax press so `models.prefill(press=...)`
    works on paged caches and the freed pages return to the pool.

Sharding and partitions (data parallel serving). `partitions=S` splits the pool into S
independent pools of N/S pages, each with its own free stack: rows [s*B/S, (s+1)*B/S)
allocate only from partition s, forks stay inside a partition (a cross-partition fork is
a ValueError), and admission (`OutOfPages.partition`) is per partition. This is vLLM's
data-parallel layout -- one KV pool per data-parallel replica, each serving its own
sequences -- expressed as one pytree: `kvjax.sharding` puts partition s's pages,
refcounts and free list on the data shard that holds its rows (pages [N, ...] over `data`
when the mesh's data size divides S; kv heads over `model` as always), and allocation,
the page gather and the page scatter are vmapped over partitions with local page ids, so
XLA's SPMD partitioner keeps every page access on its device: a decode step on a (data 2
x model 4) mesh moves no page between devices (only the new tokens' K/V across heads,
the tensor-parallel output projection and scalar page counts). S = 1 (the default) is one
pool shared by every row, replicated over `data`; page tables always shard over `data`.

Quantized pages. Per-token formats (int8, fp8, int4/int2 per_token) store each token
independently. A residual window (`quant.residual` = R > 0) keeps each row's newest
tokens exact outside the pool; when an append pushes it past R tokens, the oldest whole
groups leave it into pages (KIVI's streaming rule, as in kvjax.quant.QuantizedKVCache).
KIVI (Liu et al., 2024: keys per channel over groups of G tokens, values per token, an
exact window of R tokens) maps onto pages with G dividing P: a page holds P/G key groups,
each written once, whole, when it is flushed, with its own per-channel scale/zero
([N, Hkv, P/G, D]), so the grouping is exactly KIVI's and the decoded tokens equal those
of the dense kvjax.quant KIVI cache (tests compare them). Differences from KIVI: the
window is per row and per head in full precision outside the pool (R tokens of
[B, Hkv, R, D] per row, counted by `nbytes`/`row_nbytes`, like KIVI's own residual), and
the key/value windows are one window (as kvjax.quant does). Eviction on a KIVI row
(`repage`) re-appends the kept tokens, so they are re-grouped (and those already
quantized are quantized again). pre_rope and outlier formats are not supported. Pools
with a residual window, and partitioned pools, take the reference attention path (the
paged Pallas kernel reads per-token single-partition pools). kvjax.offload's row swap does
not carry residual windows: kvjax.engine preempts such rows by recomputation.

Attention (reference path): the row's pages are gathered into a dense [B, Hkv, M*P (+R),
D] view and `kvjax.attention.attention` runs on it, so the dense-slot index of logical slot
s is s and presses' `colsum` observations align with `to_dense()`. Quantized pools decode
the gathered codes and use the current chunk's own keys/values exactly (as kvjax.quant
does; with a residual window, attention reads the row as it was plus the exact chunk).

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
from kvjax.quant import base as quant_base

_static = lambda default=None: flax.struct.field(pytree_node=False, default=default)  # noqa: E731

POOL_FIELDS = ("k_pages", "k_scale", "k_zero", "v_pages", "v_scale", "v_zero", "pos_pages")
META_FIELDS = ("page_table", "lengths", "refcount", "free_stack", "num_free", "overflow",
               "part_free", "res_lengths")
ROW_FIELDS = ("k_res", "v_res", "res_pos")   # the full-precision residual window (KIVI)


class OutOfPages(ValueError):
  """The pool has too few free pages for this append right now (queue or preempt).

  Attributes:
    needed: pages the append needs (summed over rows, worst layer).
    free: free pages in the pool.
  """

  def __init__(self, needed: int, free: int, what: str = "PagedKVCache",
               partition: Optional[int] = None):
    self.needed, self.free, self.partition = int(needed), int(free), partition
    where = "" if partition is None else f" in pool partition {partition}"
    super().__init__(f"{what}: out of pages{where}: this append needs {self.needed} new pages "
                     f"but only {self.free} are free; release finished rows, swap rows out "
                     "(kvjax.offload), compress with a press, or enlarge num_pages")


# -- page codecs: how a token vector is stored in a page ---------------------------------------
def _check_quant(quant, head_dim, v_head_dim, page_size):
  if quant is None:
    return
  from kvjax.quant import spec as spec_lib  # pylint: disable=import-outside-toplevel
  if not isinstance(quant, spec_lib.QuantSpec):
    raise ValueError(f"quant must be a kvjax.quant.QuantSpec or None; got {type(quant).__name__}")
  bad = []
  if quant.pre_rope:
    bad.append("pre_rope=True (allowed: False)")
  if quant.outlier_frac:
    bad.append(f"outlier_frac={quant.outlier_frac} (allowed: 0)")
  if bad:
    raise ValueError(f"paged pools do not support {', '.join(bad)}; supported: per-token "
                     "formats (int8, fp8, per_token) and KIVI (per-channel keys, residual)")
  if quant.has_channel_axis and page_size % quant.group_size:
    raise ValueError(f"quant.group_size={quant.group_size} must divide page_size={page_size}: "
                     "a per-channel ('channel' axis, KIVI) token group lives inside one page")
  quant.check_dims(head_dim, v_head_dim)
  spec_lib.check_backend(quant)


def _encode(x, quant, bits, dtype, axis="token"):
  """x [..., S, D] -> (codes, scale | None, zero | None).

  axis="token": a scale per token (and channel group), scale [..., S, D/g];
  axis="channel": a scale per channel and group of G tokens (KIVI keys), scale [..., S/G, D].
  """
  if quant is None:
    return x.astype(dtype), None, None
  from kvjax.quant import formats, packing  # pylint: disable=import-outside-toplevel
  g = quant.channel_group(axis, x.shape[-1])
  if quant.fmt == "int":
    q = formats.quantize_int(x, bits=bits, axis=axis, group=g, symmetric=quant.symmetric,
                             scale_dtype=quant.scale_dtype)
    return packing.pack(q.codes, bits), q.scale, q.zero
  q = formats.quantize_fp8(x, fmt=quant.fmt, group=g, scale_dtype=quant.scale_dtype)
  return q.codes, q.scale, None


def _decode(codes, scale, zero, quant, bits, d, dtype, axis="token"):
  if quant is None:
    return codes
  from kvjax.quant import formats, packing  # pylint: disable=import-outside-toplevel
  g = quant.channel_group(axis, d)
  if quant.fmt == "int":
    x = formats.dequantize_int(packing.unpack(codes, bits, d), scale, zero, bits=bits,
                               axis=axis, group=g)
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
  part_free: Optional[jax.Array] = None
  k_res: Optional[jax.Array] = None
  v_res: Optional[jax.Array] = None
  res_pos: Optional[jax.Array] = None
  res_lengths: Optional[jax.Array] = None
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
      "overflow": "index", "part_free": "index", "k_res": "residual", "v_res": "residual",
      "res_pos": "residual", "res_lengths": "index"}

  def partition_axes(self, mesh=None) -> dict:
    """Mesh axes of each leaf's dims (kvjax.sharding; no leading layer axis).

    Pools shard kv heads over `model`. With `partitions` > 1 the page axis N and the
    allocator arrays shard over `data` too, one pool partition per data shard (when the
    mesh's data size divides `partitions`; otherwise the pool stays replicated over
    `data`, which is correct but not local). Row tables always shard rows over `data`.
    """
    s = self.partitions
    d = None if mesh is None else dict(zip(mesh.axis_names, mesh.devices.shape)).get("data")
    pages = "data" if s > 1 and d is not None and s % d == 0 else None
    pool4 = (pages, "model", None, None)
    return {
        "k_pages": pool4, "v_pages": pool4, "k_scale": pool4, "v_scale": pool4,
        "k_zero": pool4, "v_zero": pool4, "pos_pages": (pages, "model", None),
        "page_table": ("data", None), "lengths": ("data", "model"), "refcount": (pages,),
        "free_stack": (pages,), "num_free": (), "overflow": (), "part_free": (pages,),
        "k_res": ("data", "model", None, None), "v_res": ("data", "model", None, None),
        "res_pos": ("data", "model", None), "res_lengths": ("data", "model")}

  @classmethod
  def init(cls, batch: int, kv_heads: int, head_dim: int, *, num_pages: int, page_size: int,
           max_pages: Optional[int] = None, dtype=jnp.float32,
           v_head_dim: Optional[int] = None, quant=None, partitions: int = 1) -> "PagedKVCache":
    """An empty paged cache.

    Args:
      batch: rows B (sequence slots of the batch).
      kv_heads, head_dim, v_head_dim: shapes (v_head_dim defaults to head_dim).
      num_pages: pages N in the pool (all partitions together).
      page_size: tokens P per page.
      max_pages: page-table width M (max pages per row); default N / partitions.
      dtype: dtype of stored keys/values (of decoded values with `quant`).
      quant: optional kvjax.quant.QuantSpec: per-token formats (int8, fp8, per_token, with or
        without a residual window) or KIVI (per-channel keys; group_size must divide
        page_size). pre_rope and outliers are not supported.
      partitions: S independent pool partitions (module docstring): rows
        [s*B/S, (s+1)*B/S) allocate only from pages [s*N/S, (s+1)*N/S). S must divide both
        batch and num_pages.
    """
    for name, val in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim),
                      ("num_pages", num_pages), ("page_size", page_size),
                      ("partitions", partitions)):
      if not isinstance(val, (int, np.integer)) or val < 1:
        raise ValueError(f"{name}={val!r}; must be an int >= 1")
    if batch % partitions or num_pages % partitions:
      raise ValueError(f"partitions={partitions} must divide batch={batch} and "
                       f"num_pages={num_pages}")
    n, h, p, s = num_pages, kv_heads, page_size, partitions
    n_part = n // s
    m = n_part if max_pages is None else max_pages
    if not isinstance(m, (int, np.integer)) or m < 1:
      raise ValueError(f"max_pages={max_pages!r}; must be an int >= 1")
    dv = head_dim if v_head_dim is None else v_head_dim
    _check_quant(quant, head_dim, dv, page_size)
    dt = jnp.dtype(dtype)

    def pool(d, bits, axis):
      g = 1 if quant is None or axis == "token" else quant.group_size
      probe = jax.eval_shape(lambda x: _encode(x, quant, bits, dt, axis),
                             jax.ShapeDtypeStruct((1, 1, g, d), dt))
      out = []
      for i, a in enumerate(probe):
        if a is None:
          out.append(None)
          continue
        slots = p // g if (axis == "channel" and i > 0) else p   # channel scales: per group
        out.append(jnp.zeros((n, h, slots) + a.shape[3:], a.dtype))
      return out

    kb = vb = 8
    ka = va = "token"
    r = 0
    if quant is not None:
      kb, vb, ka, va, r = quant.k_bits, quant.v_bits, quant.k_axis, quant.v_axis, quant.residual
    kc, ks, kz = pool(head_dim, kb, ka)
    vc, vs, vz = pool(dv, vb, va)
    res = {}
    if r:
      res = dict(k_res=jnp.zeros((batch, h, r, head_dim), dt),
                 v_res=jnp.zeros((batch, h, r, dv), dt),
                 res_pos=jnp.full((batch, h, r), -1, jnp.int32),
                 res_lengths=jnp.zeros((batch, h), jnp.int32))
    # Each partition's stack holds its own (global) page ids; pages pop from the top, so
    # partition s hands out page s * N/S first.
    stack = (np.arange(s)[:, None] * n_part + np.arange(n_part - 1, -1, -1)[None]).reshape(-1)
    return cls(k_pages=kc, k_scale=ks, k_zero=kz, v_pages=vc, v_scale=vs, v_zero=vz,
               pos_pages=jnp.full((n, h, p), -1, jnp.int32),
               page_table=jnp.full((batch, m), -1, jnp.int32),
               lengths=jnp.zeros((batch, h), jnp.int32),
               refcount=jnp.zeros((n,), jnp.int32),
               free_stack=jnp.asarray(stack, jnp.int32),
               num_free=jnp.asarray(n, jnp.int32), overflow=jnp.asarray(False),
               part_free=jnp.full((s,), n_part, jnp.int32) if s > 1 else None,
               head_dim=int(head_dim), v_head_dim=int(dv), dtype=dt.name, quant=quant, **res)

  # -- static facts -------------------------------------------------------------------------
  @property
  def stacked(self) -> bool:
    """Whether leaves carry a leading layer axis (a ModelCache segment)."""
    return self.page_table.ndim == 3

  @property
  def num_pages(self) -> int:
    return self.refcount.shape[-1]

  @property
  def partitions(self) -> int:
    """Independent pool partitions S (1 = one shared pool)."""
    return 1 if self.part_free is None else self.part_free.shape[-1]

  @property
  def pages_per_partition(self) -> int:
    return self.num_pages // self.partitions

  def partition_of(self, row: int) -> int:
    """The pool partition row `row` allocates from."""
    return int(row) // (self.batch // self.partitions)

  @property
  def page_size(self) -> int:
    return self.pos_pages.shape[-1]

  @property
  def max_pages(self) -> int:
    return self.page_table.shape[-1]

  @property
  def residual(self) -> int:
    """Full-precision residual window R of each row (quant.residual; 0 = none)."""
    return 0 if self.quant is None else self.quant.residual

  @property
  def token_group(self) -> int:
    """Tokens quantized together (KIVI's group G with per-channel keys, else 1)."""
    return 1 if self.quant is None else self.quant.token_group

  @property
  def capacity(self) -> int:
    """Static token capacity of one row: max_pages * page_size (+ the residual window)."""
    return self.max_pages * self.page_size + self.residual

  def flushed_tokens(self, n_tokens: int) -> int:
    """Tokens of a row of n_tokens that live in pages (with a residual window: whole groups
    beyond the newest R - G + 1 .. R; else all of them)."""
    n, r, g = int(n_tokens), self.residual, self.token_group
    return max(0, -(-(n - r) // g)) * g if r else n

  def pages_for(self, n_tokens: int) -> int:
    """Pages a row of n_tokens holds (with a residual window: only its flushed tokens)."""
    return pages_needed(self.flushed_tokens(n_tokens), self.page_size)

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
    """Exact bytes of every array held (the whole pool, tables, free list and residuals)."""
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
  def row_nbytes(self) -> int:
    """Bytes each row holds outside the pool (residual window and tables; all layers)."""
    fields = ROW_FIELDS + ("page_table", "lengths", "res_lengths")
    return sum(cache_lib.tree_nbytes(getattr(self, f)) for f in fields) // self.batch

  @property
  def pages_in_use(self) -> jax.Array:
    """Pages with a nonzero reference count ([] or [L] when stacked)."""
    return self.num_pages - self.num_free

  @property
  def used_nbytes(self) -> jax.Array:
    """Bytes of pages in use plus every table and residual window."""
    meta = sum(cache_lib.tree_nbytes(getattr(self, f)) for f in META_FIELDS + ROW_FIELDS)
    return jnp.sum(self.pages_in_use) * self.page_nbytes + meta

  def _bits(self):
    if self.quant is None:
      return 8, 8
    return self.quant.k_bits, self.quant.v_bits

  def _axes(self):
    if self.quant is None:
      return "token", "token"
    return self.quant.k_axis, self.quant.v_axis

  # -- layer access (unstacked caches use layer=None) --------------------------------------
  def _get(self, f, layer):
    a = getattr(self, f)
    return a if (layer is None or a is None) else a[layer]

  def _meta(self, layer):
    return {f: self._get(f, layer) for f in META_FIELDS}

  def _with_meta(self, layer, meta):
    if layer is None:
      return self.replace(**meta)
    return self.replace(**{f: getattr(self, f).at[layer].set(meta[f]) for f in META_FIELDS
                           if getattr(self, f) is not None})

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
    pos_h = _headwise(q_positions, k_new.shape[1])
    if self.residual:
      return _attend_residual(self, layer, q, k_new, v_new, q_positions, pos_h, spec, **kw)
    new, dest = _write(self, layer, k_new, v_new, pos_h)
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
    """The rows as a DenseKVCache of capacity `capacity` (slot s = logical s)."""
    k, v, pos, lengths = dense_view(self)
    dt = k.dtype if dtype is None else dtype
    return cache_lib.DenseKVCache(k=k.astype(dt), v=v.astype(dt), positions=pos,
                                  lengths=lengths)


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
  cpos = buffer(get("res_pos"), pos_h, -1, jnp.int32)
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
         "res_pos": jnp.where(keep, quant_base.gather_slots(cpos, ridx), -1)}
  for f_, val in res.items():
    val = jnp.where(ok, val, get(f_))
    upd[f_] = val if layer is None else getattr(cache, f_).at[layer].set(val)
  meta2 = dict(plan.meta)
  meta2["res_lengths"] = jnp.where(ok, c - f, r).astype(jnp.int32)
  meta2["lengths"] = plan.meta["lengths"] + meta2["res_lengths"]
  return cache.replace(**upd)._with_meta(layer, meta2)  # pylint: disable=protected-access


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
    for f, x, fill in (("k_res", k, 0), ("v_res", v, 0), ("res_pos", pos, -1)):
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


def check_press(press, model_cache) -> None:
  """ValueError if a press that reads dense layers is given a cache with paged layers.

  Presses gather slots of `DenseKVCache` layers; on paged layers they run through
  `PagedPress` (which compacts a dense view and re-pages what is kept).
  """
  if isinstance(press, PagedPress) or not hasattr(model_cache, "layer_structs"):
    return
  if any(isinstance(c, PagedKVCache) for c in model_cache.layer_structs()):
    raise ValueError(
        f"press={type(press).__name__} works on dense KV layers, but the cache has "
        "PagedKVCache layers; wrap it as kvjax.paged.PagedPress(press) (PagedModel does "
        "this for kvjax.generate)")


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
  probe = next(sg for sg in mc.segments if isinstance(sg, PagedKVCache))
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
    if not isinstance(s, PagedKVCache) or s.partitions != 1:
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
