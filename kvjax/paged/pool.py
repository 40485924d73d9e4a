"""The paged KV cache pytree, `PagedKVCache`: one layer's page pool, page tables, free stack and
reference counts (or a stack of layers in a `ModelCache` segment), with the layer-cache
protocol (`append`, `attend`, `nbytes`, `capacity`, `length`) over them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib
from kvjax.paged.admission import check_admission, pages_needed
from kvjax.paged.alloc import _write
from kvjax.paged.attend import (_attend_residual, _fused_attend, _headwise, _kernel_mode,
                                dense_view)
from kvjax.paged.layout import META_FIELDS, POOL_FIELDS, ROW_FIELDS, _check_quant, _encode


_static = lambda default=None: flax.struct.field(pytree_node=False, default=default)  # noqa: E731


# -- the pytree -----------------------------------------------------------------------------
@flax.struct.dataclass
class PagedKVCache(cache_lib.KVCacheBase):
  """One layer's paged cache (layout and semantics in the module docstring).

  Build with `PagedKVCache.init`; in a model, with `layer_factory` + `models.init_cache`.
  Implements the kvjax cache protocol (`kvjax.cache.LayerCache`), with an in-place path for
  `layer=` (the model's layer scan updates the stacked pool in place).
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
  res_positions: Optional[jax.Array] = None
  res_lengths: Optional[jax.Array] = None
  head_dim: int = _static()
  v_head_dim: int = _static()
  dtype: str = _static("float32")
  quant: Any = _static()

  CAPS: ClassVar[cache_lib.Capabilities] = cache_lib.Capabilities(
      colsum=True, inplace_layer=True, paged=True)

  # Component of each field in memory reports (kvjax.memory); quantized pools hold codes in
  # k_pages / v_pages but are reported under "kv" (the dict is per class).
  BYTE_CATEGORIES = {
      "k_pages": "kv", "v_pages": "kv", "k_scale": "scales", "v_scale": "scales",
      "k_zero": "zeros", "v_zero": "zeros", "pos_pages": "index", "page_table": "index",
      "lengths": "index", "refcount": "index", "free_stack": "index", "num_free": "index",
      "overflow": "index", "part_free": "index", "k_res": "residual", "v_res": "residual",
      "res_positions": "residual", "res_lengths": "index"}

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
        "res_positions": ("data", "model", None), "res_lengths": ("data", "model")}

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
                 res_positions=jnp.full((batch, h, r), -1, jnp.int32),
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

  def _append(self, k_new, v_new, positions_new) -> "PagedKVCache":
    """Writes the valid new tokens (positions_new [B, T], -1 = padding) after each row's."""
    self.check_room(positions_new)
    return _write(self, None, k_new, v_new, _headwise(positions_new, k_new.shape[1]))[0]

  def _append_layer(self, layer, k_new, v_new, positions_new) -> "PagedKVCache":
    """append() on layer `layer` of a stacked cache, updating the pool in place."""
    return _write(self, layer, k_new, v_new, _headwise(positions_new, k_new.shape[1]))[0]

  def _attend(self, q, k_new, v_new, q_positions, spec: attn_lib.AttentionSpec, **kw):
    """Appends the chunk, then attends q over the row's pages (gathered to a dense view).

    Returns (AttentionOutput, new_cache); colsum is aligned with `to_dense()` slots.
    """
    self.check_room(q_positions)
    return self._attend_pool(None, q, k_new, v_new, q_positions, spec, **kw)

  def _attend_layer(self, layer, q, k_new, v_new, q_positions, spec, **kw):
    return self._attend_pool(layer, q, k_new, v_new, q_positions, spec, **kw)

  def _attend_pool(self, layer, q, k_new, v_new, q_positions, spec, **kw):
    pos_h = _headwise(q_positions, k_new.shape[1])
    mode = _kernel_mode(self, q, spec, **kw)
    if self.residual:  # mode is "xla": the paged kernel reads no residual window
      return _attend_residual(self, layer, q, k_new, v_new, q_positions, pos_h, spec, **kw)
    new, dest = _write(self, layer, k_new, v_new, pos_h)
    if mode != "xla":
      return _fused_attend(self, new, layer, q, k_new, v_new, q_positions, spec,
                           interpret=mode == "interpret", **kw), new
    k, v, pos, lengths = dense_view(new, layer)
    if self.quant is not None:
      # The chunk's own keys/values are used exactly (the past is read decoded).
      k = cache_lib.scatter_slots(k, dest, k_new)
      v = cache_lib.scatter_slots(v, dest, v_new)
    res = attn_lib.attention(q, k, v, lengths, q_positions=q_positions, k_positions=pos,
                             spec=spec, **kw)
    return res, new

  @property
  def head_dims(self) -> tuple:
    return self.head_dim, self.v_head_dim

  def materialize(self) -> cache_lib.KVView:
    k, v, pos, lengths = dense_view(self)
    valid = (jnp.arange(pos.shape[-1]) < lengths[..., None]) & (pos >= 0)
    return cache_lib.KVView(k, v, jnp.where(valid, pos, -1), valid)

  def to_dense(self, capacity=None, dtype=None) -> cache_lib.DenseKVCache:
    """The rows as a DenseKVCache of capacity `capacity` (slot s = logical s)."""
    if capacity is not None:
      return super().to_dense(capacity, dtype)
    k, v, pos, lengths = dense_view(self)
    dt = k.dtype if dtype is None else dtype
    return cache_lib.DenseKVCache(k=k.astype(dt), v=v.astype(dt), positions=pos,
                                  lengths=lengths)
