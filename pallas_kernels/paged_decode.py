"""Paged decode attention: few queries against a page pool addressed by page tables.

PagedAttention (Kwon et al., 2023): keys and values live in fixed-size pages of a shared
pool and each sequence owns a page table. This kernel reads the pool in place -- no
gathered dense copy of a row's pages is ever written to HBM -- with head-wise ragged
lengths, positions as data (causal / window / sinks / padding), optional per-token
quantized pools (INT8 / FP8 / packed INT4 / INT2 codes with per-token scales, dequantized
in VMEM / registers by the machinery of `quantized_decode.py`), split-K with an exact
merge and learned sink logits.

Layout (exactly `kvjax.paged.PagedKVCache`; N pages, P page size, M table width):

  k_pages     [N, Hkv, P, D] float      or quantized codes [N, Hkv, P, D * bits / 8] uint8
                                        / FP8 codes [N, Hkv, P, D] (float8 or uint8 bits)
  k_scale     [N, Hkv, P, D // g]       per-token scales (quantized pools), else None
  k_zero      [N, Hkv, P, D // g]       zero points (asymmetric int), else None
  v_pages, v_scale, v_zero              the same for values
  pos_pages   [N, Hkv, P] int32 or None original token position of each slot (None: the
                                        logical slot index s is the position)
  page_table  [B, M] int32              physical page of logical page j of row b
  lengths     [B, Hkv] int32            logical slot s of row b (page s // P, offset s % P)
                                        is valid for head h iff s < lengths[b, h]

TPU (like jax's `pallas.ops.tpu.paged_attention`): the page table, lengths and block
ranges are scalar-prefetched into SMEM and drive the index maps. Each grid step covers
`pages_per_block` logical pages: the pool is passed once per page slot j of the block,
each with its own BlockSpec whose index map reads `page_table[b, block * ppb + j]`, so
Pallas's pipeline DMAs the physical pages (double-buffered) straight from the pool.
Pages past the length map to the page that input already holds, so no DMA is issued for
them. Grid (B, Hkv, num_splits, steps), the running state in VMEM scratch. jax's kernel
issues its page copies by hand instead; the BlockSpec form keeps the pipeline (and TPU
interpret mode) in charge of the DMAs.

Stacked pools ([L, N, ...], a kvjax ModelCache segment) are read in place at `layer`
(a scalar-prefetched / loaded index), never sliced into a per-layer copy. Optional exact
slots (`k_res` ..., e.g. the current chunk of a quantized pool) are attended by the dense
decode kernel and merged by an exact log-sum-exp combine.

GPU (Triton): grid (B, Hkv, num_splits); each program loops over blocks of `block_k`
logical slots, loads the block's page numbers from the table, and gathers K/V rows from
the pool with indexed, masked loads (page, head, offset, column), so any page size works.

The pool is a KV source (`PagedKV`) of the one decode pipeline
(`decode_attention.decode_with_source`): only its BlockSpecs and loads are its own.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as C
from pallas_kernels import decode_attention as dense
from pallas_kernels import kv_source as S
from pallas_kernels.reference import attention_reference

_SQ = None
DEFAULT_PAGES_PER_BLOCK = 8     # TPU
DEFAULT_BLOCK_K = 64            # GPU


@dataclasses.dataclass(frozen=True)
class PagedKV:
  """A page pool read in place through page tables (module docstring for the layout).

  Arrays, in order: K's (pages, [scale, [zero]]), V's, then pos_pages when `has_pos`;
  each with a leading layer axis [L, N, Hkv, P, ...]. Index arrays (`prefetch` of the
  pipeline): page_table [B, M] int32 and layer [1] int32.
  """
  k_format: S.KVFormat
  v_format: S.KVFormat
  head_dim: int
  head_dim_v: int
  page_size: int
  max_pages: int
  pages_per_block: int    # TPU: pages per grid step
  num_kv_heads: int
  has_pos: bool

  num_prefetch = 2
  name = "paged_decode_attention"

  @property
  def num_slots(self) -> int:
    return self.max_pages * self.page_size

  def _split(self, arrays):
    nk, nv = self.k_format.num_arrays(), self.v_format.num_arrays()
    pos = arrays[nk + nv] if self.has_pos else None
    return list(arrays[:nk]), list(arrays[nk:nk + nv]), pos

  # TPU: the pool is passed once per page j of a block, each with its own BlockSpec whose
  # index map reads the page table (scalar-prefetched), so Pallas DMAs the pages.
  def tpu_inputs(self, arrays):
    k_arrays, v_arrays, pos = self._split(arrays)
    page = k_arrays + v_arrays
    if pos is not None:
      page.append(pos.reshape(pos.shape[:3] + (1, self.page_size)))
    return page * self.pages_per_block

  def tpu_in_specs(self, block_k: int, index):
    del block_k
    ppb, size, m_pages = self.pages_per_block, self.page_size, self.max_pages

    def page_map(j):
      def imap(*args):
        bi, hi, blk = index(*args)
        lengths_ref, pt_ref, layer_ref = args[4], args[6], args[7]
        length = lengths_ref[bi * self.num_kv_heads + hi]
        last = jnp.maximum(lax.div(length + (size - 1), size) - 1, 0)
        logical = blk * ppb + j
        # Past the length: the page this input held for the previous block (resident when
        # that block was the previous step, so no DMA), else the last valid page.
        prev = logical - ppb
        logical = jnp.where(logical <= last, logical, jnp.where(prev >= 0, prev, last))
        logical = jnp.clip(logical, 0, m_pages - 1)
        page = jnp.maximum(pt_ref[bi * m_pages + logical], 0)
        return layer_ref[0], page, hi, 0, 0
      return imap

    specs = []
    for j in range(ppb):
      rows = page_map(j)
      for fmt, dim in ((self.k_format, self.head_dim), (self.v_format, self.head_dim_v)):
        specs.append(pl.BlockSpec((_SQ, _SQ, _SQ, size, dim // fmt.per), rows))
        if fmt.has_scale:
          ng = dim // fmt.channel_group(dim)
          specs += [pl.BlockSpec((_SQ, _SQ, _SQ, size, ng), rows)] * (1 + fmt.has_zero)
      if self.has_pos:
        specs.append(pl.BlockSpec((_SQ, _SQ, _SQ, 1, size), rows))
    return specs

  def tpu_blocks(self, refs, block_k: int):
    """One sub-block per page of the grid step: [(offset, P, K, V, positions or None)]."""
    del block_k
    kf, vf = self.k_format, self.v_format
    nk, nv = kf.num_arrays(), vf.num_arrays()
    per_page = nk + nv + self.has_pos
    out = []
    for j in range(self.pages_per_block):
      prefs = refs[j * per_page:(j + 1) * per_page]
      kb = S.tpu_block(prefs[:nk], kf, kf.scale_mode(self.head_dim), self.page_size,
                       self.head_dim, col_layout=True)
      vb = S.tpu_block(prefs[nk:nk + nv], vf, vf.scale_mode(self.head_dim_v), self.page_size,
                       self.head_dim_v, col_layout=True)
      kpos = prefs[nk + nv][...] if self.has_pos else None
      out.append((j * self.page_size, self.page_size, kb, vb, kpos))
    return out

  # GPU: whole pools; each block of slots gathers its rows (page, head, offset, column).
  def gpu_prefetch_specs(self):
    return [pl.BlockSpec((_SQ, self.max_pages), lambda bi, hi, sp: (bi, 0)),
            pl.BlockSpec((1,), lambda bi, hi, sp: (0,))]

  def gpu_in_specs(self, arrays, dpk_pad: int, dpv_pad: int):
    del dpk_pad, dpv_pad
    return [pl.BlockSpec(a.shape, lambda bi, hi, sp, n=a.ndim: (0,) * n) for a in arrays]

  def gpu_block(self, refs, prefetch_refs, head, first, slot, valid, dpk_pad: int,
                dpv_pad: int):
    """(K Block, V Block, positions [n]) of the logical slots `slot` of this row, kv head
    `head`."""
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    del first
    pt_ref, layer_ref = prefetch_refs
    k_refs, v_refs, pos_ref = self._split(refs)
    h = head
    layer = layer_ref[0]
    lp = lax.div(slot, self.page_size)
    off = slot - lp * self.page_size
    page = plgpu.load(pt_ref.at[jnp.minimum(lp, self.max_pages - 1)], mask=valid, other=0)
    page = jnp.maximum(page, 0)

    def row_index(rows):
      # rows: the block's slots ([n] or [n, cols]) -> (layer, page, head, offset).
      pg, of = (page, off) if rows.ndim == 1 else (page[:, None], off[:, None])
      return (jnp.full(rows.shape, layer, jnp.int32), jnp.broadcast_to(pg, rows.shape),
              jnp.full(rows.shape, h, jnp.int32), jnp.broadcast_to(of, rows.shape))

    kf, vf = self.k_format, self.v_format
    kb = S.gpu_block(k_refs, kf, kf.scale_mode(self.head_dim), self.head_dim, slot, valid,
                     dpk_pad, row_index)
    vb = S.gpu_block(v_refs, vf, vf.scale_mode(self.head_dim_v), self.head_dim_v, slot,
                     valid, dpv_pad, row_index)
    kpos = slot
    if pos_ref is not None:
      kpos = plgpu.load(pos_ref.at[row_index(slot)], mask=valid, other=-1)
    return kb, vb, kpos


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------

def gather_pages(pool, page_table):
  """[N, Hkv, P, ...] pool, [B, M] table -> [B, Hkv, M * P, ...] (reference / tests only)."""
  n = pool.shape[0]
  g = pool[jnp.clip(page_table, 0, n - 1)]                     # [B, M, Hkv, P, ...]
  g = jnp.moveaxis(g, 2, 1)                                     # [B, Hkv, M, P, ...]
  return g.reshape(g.shape[:2] + (g.shape[2] * g.shape[3],) + g.shape[4:])


def logical_positions(pos_pages, page_table, lengths, num_slots: int):
  """[B, Hkv, M * P] int32 positions of the logical slots (-1 past the length)."""
  b, hkv = lengths.shape
  slot = jnp.arange(num_slots, dtype=jnp.int32)
  if pos_pages is None:
    pos = jnp.broadcast_to(slot, (b, hkv, num_slots))
  else:
    pos = gather_pages(pos_pages, page_table).astype(jnp.int32)
  return jnp.where(slot < lengths[..., None], pos, -1)


_STATIC = ("fmt", "k_bits", "v_bits", "group_size", "scale", "causal", "window",
           "n_sink", "softcap", "pages_per_block", "block_k", "num_splits", "platform",
           "interpret", "num_warps", "num_stages")


def _layer_views(layer, arrays: dict):
  """Pools as [L, N, ...] plus an int32[1] layer index, and 4-D shape views to validate.

  Unstacked pools get a unit layer axis (a free reshape); stacked ones ([L, N, Hkv, P, ..],
  a kvjax ModelCache segment) are read in place at `layer`, never sliced into a copy.
  """
  if layer is None:
    stacked = {k: None if a is None else a[None] for k, a in arrays.items()}
    index = jnp.zeros((1,), jnp.int32)
  else:
    for k, a in arrays.items():
      if a is not None and a.ndim != (4 if k == "pos_pages" else 5):
        raise ValueError(f"with layer=, {k} must carry a leading layer axis; got shape "
                         f"{a.shape}")
    stacked = arrays
    index = jnp.asarray(layer, jnp.int32).reshape(1)
  views = {k: None if a is None else jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
           for k, a in stacked.items()}
  return stacked, index, views


@functools.partial(jax.jit, static_argnames=_STATIC)
def paged_decode_attention(
    q, k_pages, v_pages, page_table, lengths, *, q_positions, pos_pages=None, k_scale=None,
    k_zero=None, v_scale=None, v_zero=None, layer=None, k_res=None, v_res=None,
    res_positions=None, res_lengths=None, sink_logits=None, fmt: str = "float",
    k_bits: int = 8, v_bits: int = 8, group_size: Optional[int] = None,
    scale: Optional[float] = None, causal: bool = True, window: Optional[int] = None,
    n_sink: int = 0, softcap: Optional[float] = None,
    pages_per_block: Optional[int] = None, block_k: Optional[int] = None,
    num_splits: Optional[int] = None, platform: str = "gpu", interpret: Any = False,
    num_warps: int = 4, num_stages: int = 2):
  """Ragged decode attention over a paged KV pool (module docstring for the layout).

  Args:
    q: [B, Hq, T, D] queries, T small.
    k_pages, v_pages: [N, Hkv, P, D | Dv] pools (codes for quantized pools).
    page_table: [B, M] int32 physical page of each logical page (-1 = none; never read
      below the length).
    lengths: [B, Hkv] int32 valid logical slots, <= M * P.
    q_positions: [B, T] int32 (-1 = padding query).
    pos_pages: optional [N, Hkv, P] int32 slot positions (None: position = logical slot).
    k_scale, k_zero, v_scale, v_zero: per-token scales / zeros [N, Hkv, P, D // g] of a
      quantized pool (zeros None = symmetric codes).
    layer: optional int32 scalar: the pools (and pos_pages) then carry a leading layer
      axis [L, N, ...] (a stacked kvjax cache) and layer `layer` is read in place;
      page_table / lengths are that layer's.
    k_res, v_res, res_positions, res_lengths: optional exact slots attended besides the
      pool ([B, Hkv, R, D], [B, Hkv, R, Dv], [B, Hkv, R], [B, Hkv]), e.g. the current
      chunk of a quantized pool; merged exactly (dense decode kernel + lse combine).
    sink_logits: optional [Hq] learned sink logits.
    fmt: "float" (plain pool) | "int" | "fp8_e4m3" | "fp8_e5m2"; k_bits / v_bits for
      "int"; group_size: channels per scale (None = whole head).
    scale, causal, window, n_sink, softcap: docs/CONVENTIONS.md.
    pages_per_block: TPU pages per grid step (default 8, fewer when M is smaller).
    block_k: GPU slots per loop step (power of two >= 16, default 64).
    num_splits: split-K parts (default 1 on TPU, enough programs to fill a GPU).
    platform: "tpu" | "gpu"; interpret: interpret mode (CPU tests).

  Returns:
    out [B, Hq, T, Dv] (q.dtype), lse [B, Hq, T] float32.
  """
  C.check_platform(platform)
  if fmt not in S.FORMATS:
    raise ValueError(f"fmt={fmt!r}; allowed: {S.FORMATS}")
  stacked, layer_index, views = _layer_views(layer, dict(
      k_pages=k_pages, v_pages=v_pages, k_scale=k_scale, k_zero=k_zero, v_scale=v_scale,
      v_zero=v_zero, pos_pages=pos_pages))
  k_pages, v_pages, pos_pages = views["k_pages"], views["v_pages"], views["pos_pages"]
  if k_pages.ndim != 4 or v_pages.ndim != 4:
    raise ValueError(f"pools must be [N, Hkv, P, D]; got k_pages{k_pages.shape}, "
                     f"v_pages{v_pages.shape}")
  b, hq, t, d = q.shape
  n_pages, hkv, page_size, _ = k_pages.shape
  if page_table.ndim != 2 or page_table.shape[0] != b:
    raise ValueError(f"page_table shape {page_table.shape}; expected ({b}, M)")
  if not jnp.issubdtype(page_table.dtype, jnp.integer):
    raise ValueError(f"page_table dtype {page_table.dtype}; must be an integer type")
  m_pages = page_table.shape[1]
  slots = m_pages * page_size
  dense.check_queries(q, lengths, q_positions, None, sink_logits, hkv, slots)
  kf, vf = S.make_formats(fmt, k_bits, v_bits, "token", "token", group_size, k_zero, v_zero)
  dv = v_pages.shape[-1] * vf.per
  C.check_head_dim("value head_dim", dv)
  kf.check(k_pages, views["k_scale"], views["k_zero"], dim=d, slots=page_size,
           what="k_pages")
  vf.check(v_pages, views["v_scale"], views["v_zero"], dim=dv, slots=page_size,
           what="v_pages")
  if v_pages.shape[:3] != (n_pages, hkv, page_size):
    raise ValueError(f"v_pages shape {v_pages.shape}; expected leading dims "
                     f"{(n_pages, hkv, page_size)}")
  if pos_pages is not None and pos_pages.shape != (n_pages, hkv, page_size):
    raise ValueError(f"pos_pages shape {pos_pages.shape}; expected "
                     f"{(n_pages, hkv, page_size)}")
  res = (k_res, v_res, res_positions, res_lengths)
  if any(x is not None for x in res) and not all(x is not None for x in res):
    raise ValueError("k_res, v_res, res_positions and res_lengths go together")

  if platform == "tpu":
    ppb = min(DEFAULT_PAGES_PER_BLOCK, m_pages) if pages_per_block is None else pages_per_block
    if not isinstance(ppb, int) or ppb < 1:
      raise ValueError(f"pages_per_block={pages_per_block!r}; must be a positive int")
    bk = ppb * page_size
  else:
    ppb = 1
    bk = dense.resolve_block_k(platform, block_k, slots, default=DEFAULT_BLOCK_K)
  splits = dense.resolve_splits(platform, num_splits, b, hkv, C.cdiv(slots, bk))
  spec = dense.mask_spec(d, scale=scale, causal=causal, window=window,
                         n_sink=n_sink, softcap=softcap)
  q_positions = q_positions.astype(jnp.int32)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, slots)
  page_table = page_table.astype(jnp.int32)
  kpos = None
  if window is not None:
    # Block ranges need slot positions: int32 only, never K/V.
    pos_l = None if pos_pages is None else stacked["pos_pages"][layer_index[0]]
    kpos = logical_positions(pos_l, page_table, lengths, slots)
  source = PagedKV(kf, vf, d, dv, page_size, m_pages, ppb, hkv, pos_pages is not None)
  arrays = [stacked[k] for k in ("k_pages", "k_scale", "k_zero", "v_pages", "v_scale",
                                 "v_zero") if stacked[k] is not None]
  if pos_pages is not None:
    arrays.append(stacked["pos_pages"].astype(jnp.int32))
  exact = None if k_res is None else (k_res, v_res, res_positions, res_lengths)
  return dense.decode(source, arrays, q, lengths, q_positions, k_positions=kpos,
                      prefetch=(page_table, layer_index), exact=exact,
                      sink_logits=sink_logits, spec=spec, block_k=bk, num_splits=splits,
                      platform=platform, interpret=interpret, num_warps=num_warps,
                      num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("fmt", "k_bits", "v_bits", "group_size", "scale",
                                             "causal", "window", "n_sink", "softcap"))
def paged_decode_reference(q, k_pages, v_pages, page_table, lengths, *, q_positions,
                           pos_pages=None, k_scale=None, k_zero=None, v_scale=None,
                           v_zero=None, layer=None, k_res=None, v_res=None,
                           res_positions=None, res_lengths=None, sink_logits=None,
                           fmt="float", k_bits=8,
                           v_bits=8, group_size=None, scale=None, causal=True, window=None,
                           n_sink=0, softcap=None):
  """Pure-jnp reference: gather the pages into a dense view, dequantize, attend."""
  if layer is not None:
    sl = lambda a: None if a is None else a[layer]
    k_pages, v_pages, pos_pages = sl(k_pages), sl(v_pages), sl(pos_pages)
    k_scale, k_zero, v_scale, v_zero = sl(k_scale), sl(k_zero), sl(v_scale), sl(v_zero)
  kf, vf = S.make_formats(fmt, k_bits, v_bits, "token", "token", group_size, k_zero,
                          v_zero)
  d = q.shape[-1]
  dv = v_pages.shape[-1] * vf.per
  gather = lambda a: None if a is None else gather_pages(a, page_table)
  k = S.dequantize(gather(k_pages), gather(k_scale), gather(k_zero), kf, d)
  v = S.dequantize(gather(v_pages), gather(v_scale), gather(v_zero), vf, dv)
  slots = k.shape[2]
  pos = logical_positions(pos_pages, page_table, lengths, slots)
  if k_res is not None:
    rslot = jnp.arange(k_res.shape[2], dtype=jnp.int32)
    k = jnp.concatenate([k, k_res.astype(jnp.float32)], axis=2)
    v = jnp.concatenate([v, v_res.astype(jnp.float32)], axis=2)
    pos = jnp.concatenate([pos, jnp.where(rslot < res_lengths[..., None], res_positions, -1)],
                          axis=-1)
    slots = k.shape[2]
    lengths = jnp.full(lengths.shape, slots, jnp.int32)
  out, lse, _ = attention_reference(q, k, v, jnp.clip(lengths, 0, slots),
                                    q_positions=q_positions, k_positions=pos, scale=scale,
                                    causal=causal, window=window, n_sink=n_sink,
                                    softcap=softcap, sink_logits=sink_logits)
  return out, lse
