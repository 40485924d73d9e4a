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
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as C
from pallas_kernels import decode_attention as dense
from pallas_kernels import quantized_decode as Q
from pallas_kernels.reference import attention_reference

_SQ = None
DEFAULT_PAGES_PER_BLOCK = 8     # TPU
DEFAULT_BLOCK_K = 64            # GPU


def _formats(fmt, k_bits, v_bits, group_size, k_zero, v_zero):
  if fmt == "float":
    return Q.KVFormat("float"), Q.KVFormat("float")
  return Q.make_formats(fmt, k_bits, v_bits, "token", "token", group_size, k_zero, v_zero)


# ----------------------------------------------------------------------------------------
# TPU kernel
# ----------------------------------------------------------------------------------------

def _kernel_tpu(lengths_ref, ranges_ref, pt_ref, layer_ref, qpos_ref, q_ref, *refs, st,
                ppb: int, page_size: int, num_kv_heads: int, has_pos: bool):
  kf, vf = st.kf, st.vf
  nk, nv = kf.num_arrays(), vf.num_arrays()
  per_page = nk + nv + has_pos
  page_refs = [refs[j * per_page:(j + 1) * per_page] for j in range(ppb)]
  o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[ppb * per_page:]
  b, h, split, i = (pl.program_id(0), pl.program_id(1), pl.program_id(2),
                    pl.program_id(3))
  bh = b * num_kv_heads + h
  length = lengths_ref[bh]
  a1, n1, a2, n2 = (ranges_ref[4 * bh], ranges_ref[4 * bh + 1], ranges_ref[4 * bh + 2],
                    ranges_ref[4 * bh + 3])
  start, end = dense._split_bounds(a1, n1, a2, n2, split, st.num_splits)  # pylint: disable=protected-access
  del pt_ref, layer_ref

  @pl.when(i == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, C.NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  step = start + i

  @pl.when(step < end)
  def _compute():
    blk = C.step_to_block(step, a1, n1, a2)
    q_planes = [q_ref[j] for j in range(kf.per)]
    qpos = qpos_ref[...][:, :1]
    m, l = m_scr[...][:, :1], l_scr[...][:, :1]
    accs = [acc_scr[j] for j in range(vf.per)]
    for j in range(ppb):
      prefs = page_refs[j]
      first = (blk * ppb + j) * page_size
      slot_row = first + lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
      slot_col = first + lax.broadcasted_iota(jnp.int32, (page_size, 1), 0)
      kb = Q.tpu_block(prefs[:nk], kf, kf.scale_mode(st.d), page_size, st.d, col_layout=True)
      vb = Q.tpu_block(prefs[nk:nk + nv], vf, vf.scale_mode(st.dv), page_size, st.dv,
                       col_layout=True)
      kpos = prefs[nk + nv][...] if has_pos else slot_row
      s = Q.block_logits(q_planes, kb, st.spec, st.mm_dtype)
      # Pages past the length are masked here (their refs hold a repeated page).
      vis = C.visible(qpos, kpos, slot_row, length, st.spec)
      p, alpha, m, l = Q.softmax_update(s, vis, m, l)
      pv = Q.block_pv(p, vb, slot_col < length, slot_row < length, st.mm_dtype, vf)
      accs = [alpha * a + c for a, c in zip(accs, pv)]
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
    for j, a in enumerate(accs):
      acc_scr[j] = a

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    m, l = m_scr[...][:, :1], l_scr[...][:, :1]
    for j in range(vf.per):
      out, lse = C.finalize(m, l, acc_scr[j])
      o_ref[j] = out
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _run_tpu(k_arrays, v_arrays, pos_view, page_table, layer, q_rows, row_pos, lengths,
             ranges, *, st, ppb, page_size, num_blocks, interpret):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  b, hkv, r, _ = q_rows.shape
  m_pages = page_table.shape[1]
  per_k, per_v = st.kf.per, st.vf.per
  dpv = st.dv // per_v
  steps = C.cdiv(num_blocks, st.num_splits)
  q_planes = Q.split_query_planes(q_rows, per_k)
  qpos_lanes = jnp.broadcast_to(row_pos[:, :, None], (b, r, C.LANES)).astype(jnp.int32)

  def page_map(j):
    def imap(bi, hi, split, i, lengths_ref, ranges_ref, pt_ref, layer_ref):
      bh = bi * hkv + hi
      base = 4 * bh
      blk = dense._resident_block(ranges_ref[base], ranges_ref[base + 1],  # pylint: disable=protected-access
                                  ranges_ref[base + 2], ranges_ref[base + 3], split, i,
                                  st.num_splits)
      last = jnp.maximum(lax.div(lengths_ref[bh] + (page_size - 1), page_size) - 1, 0)
      logical = blk * ppb + j
      # Past the length: the page this input held for the previous block (resident when
      # that block was the previous step, so no DMA), else the last valid page.
      prev = logical - ppb
      logical = jnp.where(logical <= last, logical, jnp.where(prev >= 0, prev, last))
      logical = jnp.clip(logical, 0, m_pages - 1)
      page = jnp.maximum(pt_ref[bi * m_pages + logical], 0)
      return layer_ref[0], page, hi
    return imap

  def page_specs(j):
    imap = page_map(j)
    rows = lambda *a: (*imap(*a), 0, 0)
    specs = []
    for fmt, dim in ((st.kf, st.d), (st.vf, st.dv)):
      specs.append(pl.BlockSpec((_SQ, _SQ, _SQ, page_size, dim // fmt.per), rows))
      if fmt.has_scale:
        ng = dim // fmt.channel_group(dim)
        specs += [pl.BlockSpec((_SQ, _SQ, _SQ, page_size, ng), rows)] * (1 + fmt.has_zero)
    if pos_view is not None:
      specs.append(pl.BlockSpec((_SQ, _SQ, _SQ, 1, page_size), rows))
    return specs

  page_arrays = list(k_arrays) + list(v_arrays) + ([pos_view] if pos_view is not None else [])
  in_specs = [
      pl.BlockSpec((_SQ, r, C.LANES), lambda bi, hi, sp, i, *_: (bi, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, per_k, r, st.d // per_k),
                   lambda bi, hi, sp, i, *_: (bi, hi, 0, 0, 0)),
  ]
  for j in range(ppb):
    in_specs += page_specs(j)
  out_specs = [
      pl.BlockSpec((_SQ, _SQ, _SQ, per_v, r, dpv), lambda bi, hi, sp, i, *_: (bi, hi, sp, 0, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, _SQ, r, C.LANES), lambda bi, hi, sp, i, *_: (bi, hi, sp, 0, 0)),
  ]
  kernel = functools.partial(_kernel_tpu, st=st, ppb=ppb, page_size=page_size,
                             num_kv_heads=hkv, has_pos=pos_view is not None)
  o_parts, lse_parts = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(b, hkv, st.num_splits, steps),
          in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((r, C.LANES), jnp.float32),
                          pltpu.VMEM((r, C.LANES), jnp.float32),
                          pltpu.VMEM((per_v, r, dpv), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, hkv, st.num_splits, per_v, r, dpv), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, st.num_splits, r, C.LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=C.resolve_interpret("tpu", interpret),
      name="paged_decode_attention_tpu",
  )(lengths.reshape(-1), ranges.reshape(-1), page_table.reshape(-1), layer, qpos_lanes,
    q_planes, *(page_arrays * ppb))
  return o_parts, lse_parts[..., 0]


# ----------------------------------------------------------------------------------------
# GPU kernel
# ----------------------------------------------------------------------------------------

def _kernel_gpu(lengths_ref, ranges_ref, pt_ref, layer_ref, qpos_ref, q_ref, *refs, st,
                page_size: int, has_pos: bool):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  kf, vf = st.kf, st.vf
  nk, nv = kf.num_arrays(), vf.num_arrays()
  k_refs, v_refs = refs[:nk], refs[nk:nk + nv]
  pos_ref = refs[nk + nv] if has_pos else None
  o_ref, lse_ref = refs[nk + nv + has_pos:]
  h, split = pl.program_id(1), pl.program_id(2)
  layer = layer_ref[0]
  length = lengths_ref[...]
  a1, n1, a2, n2 = ranges_ref[0], ranges_ref[1], ranges_ref[2], ranges_ref[3]
  start, end = dense._split_bounds(a1, n1, a2, n2, split, st.num_splits)  # pylint: disable=protected-access
  q_planes = [q_ref[j] for j in range(kf.per)]
  qpos = qpos_ref[...][:, None]
  r = qpos.shape[0]
  dpk_pad, dpv_pad = q_planes[0].shape[-1], o_ref.shape[-1]
  m_pages = pt_ref.shape[0]
  bk = st.block_k

  def body(step, carry):
    m, l, accs = carry
    first = C.step_to_block(step, a1, n1, a2) * bk
    slot = first + jnp.arange(bk, dtype=jnp.int32)
    valid = slot < length
    lp = lax.div(slot, page_size)
    off = slot - lp * page_size
    page = plgpu.load(pt_ref.at[jnp.minimum(lp, m_pages - 1)], mask=valid, other=0)
    page = jnp.maximum(page, 0)

    def row_index(rows):
      # rows: the block's slots ([n] or [n, cols]) -> (layer, page, head, offset).
      pg, of = (page, off) if rows.ndim == 1 else (page[:, None], off[:, None])
      return (jnp.full(rows.shape, layer, jnp.int32), jnp.broadcast_to(pg, rows.shape),
              jnp.full(rows.shape, h, jnp.int32), jnp.broadcast_to(of, rows.shape))

    kb = Q.gpu_block(k_refs, kf, kf.scale_mode(st.d), st.d, slot, valid, dpk_pad, row_index)
    vb = Q.gpu_block(v_refs, vf, vf.scale_mode(st.dv), st.dv, slot, valid, dpv_pad,
                     row_index)
    if pos_ref is not None:
      kpos = plgpu.load(pos_ref.at[row_index(slot)], mask=valid, other=-1)
    else:
      kpos = slot
    s = Q.block_logits(q_planes, kb, st.spec, st.mm_dtype)
    vis = C.visible(qpos, kpos[None, :], slot[None, :], length, st.spec)
    p, alpha, m, l = Q.softmax_update(s, vis, m, l)
    pv = Q.block_pv(p, vb, valid[:, None], valid[None, :], st.mm_dtype, vf)
    return m, l, tuple(alpha * a + c for a, c in zip(accs, pv))

  init = (jnp.full((r, 1), C.NEG_INF, jnp.float32), jnp.zeros((r, 1), jnp.float32),
          tuple(jnp.zeros((r, dpv_pad), jnp.float32) for _ in range(vf.per)))
  m, l, accs = lax.fori_loop(start, end, body, init)
  for j, acc in enumerate(accs):
    out, lse = C.finalize(m, l, acc)
    o_ref[j] = out
  lse_ref[...] = lse.reshape(r)


def _run_gpu(k_arrays, v_arrays, pos_pages, page_table, layer, q_rows, row_pos, lengths,
             ranges, *, st, page_size, interpret, num_warps, num_stages):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  b, hkv, r, d = q_rows.shape
  m_pages = page_table.shape[1]
  per_k, per_v = st.kf.per, st.vf.per
  dpk_pad, dpv_pad = Q.gpu_plane_pad(st.d, per_k), Q.gpu_plane_pad(st.dv, per_v)
  q_planes = Q.split_query_planes(q_rows, per_k)
  q_planes = jnp.pad(q_planes, ((0, 0),) * 4 + ((0, dpk_pad - d // per_k),))
  pool = list(k_arrays) + list(v_arrays) + ([pos_pages] if pos_pages is not None else [])
  whole = lambda a: pl.BlockSpec(a.shape, lambda bi, hi, sp: (0,) * a.ndim)
  in_specs = [
      pl.BlockSpec((_SQ, _SQ), lambda bi, hi, sp: (bi, hi)),
      pl.BlockSpec((_SQ, _SQ, 4), lambda bi, hi, sp: (bi, hi, 0)),
      pl.BlockSpec((_SQ, m_pages), lambda bi, hi, sp: (bi, 0)),
      pl.BlockSpec((1,), lambda bi, hi, sp: (0,)),
      pl.BlockSpec((_SQ, r), lambda bi, hi, sp: (bi, 0)),
      pl.BlockSpec((_SQ, _SQ, per_k, r, dpk_pad), lambda bi, hi, sp: (bi, hi, 0, 0, 0)),
      *[whole(a) for a in pool],
  ]
  out_specs = [
      pl.BlockSpec((_SQ, _SQ, _SQ, per_v, r, dpv_pad),
                   lambda bi, hi, sp: (bi, hi, sp, 0, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, _SQ, r), lambda bi, hi, sp: (bi, hi, sp, 0)),
  ]
  return pl.pallas_call(
      functools.partial(_kernel_gpu, st=st, page_size=page_size,
                        has_pos=pos_pages is not None),
      grid=(b, hkv, st.num_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct((b, hkv, st.num_splits, per_v, r, dpv_pad),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, st.num_splits, r), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=C.resolve_interpret("gpu", interpret),
      name="paged_decode_attention_gpu",
  )(lengths, ranges, page_table, layer, row_pos, q_planes, *pool)


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
           "sink_tokens", "softcap", "pages_per_block", "block_k", "num_splits", "platform",
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
    sink_tokens: int = 0, softcap: Optional[float] = None,
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
    scale, causal, window, sink_tokens, softcap: docs/CONVENTIONS.md.
    pages_per_block: TPU pages per grid step (default 8, fewer when M is smaller).
    block_k: GPU slots per loop step (power of two >= 16, default 64).
    num_splits: split-K parts (default 1 on TPU, enough programs to fill a GPU).
    platform: "tpu" | "gpu"; interpret: interpret mode (CPU tests).

  Returns:
    out [B, Hq, T, Dv] (q.dtype), lse [B, Hq, T] float32.
  """
  C.check_platform(platform)
  C.check_static(window=window, sink_tokens=sink_tokens, softcap=softcap, scale=scale)
  if fmt not in Q.FORMATS:
    raise ValueError(f"fmt={fmt!r}; allowed: {Q.FORMATS}")
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
  Q.check_common(q, lengths, q_positions, None, sink_logits, hkv, slots)
  kf, vf = _formats(fmt, k_bits, v_bits, group_size, k_zero, v_zero)
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

  if platform == "tpu":
    ppb = min(DEFAULT_PAGES_PER_BLOCK, m_pages) if pages_per_block is None else pages_per_block
    if not isinstance(ppb, int) or ppb < 1:
      raise ValueError(f"pages_per_block={pages_per_block!r}; must be a positive int")
    bk = ppb * page_size
  else:
    bk = DEFAULT_BLOCK_K if block_k is None else block_k
    if not isinstance(bk, int) or bk < 16 or bk & (bk - 1):
      raise ValueError(f"block_k={block_k!r}; the GPU kernel needs a power of two >= 16")
    bk = min(bk, max(16, C.next_pow2(slots)))
  nkb = C.cdiv(slots, bk)
  splits = (dense.default_num_splits(platform, b, hkv, nkb) if num_splits is None
            else num_splits)
  if not isinstance(splits, int) or splits < 1:
    raise ValueError(f"num_splits={num_splits!r}; must be a positive int")
  splits = min(splits, nkb)
  spec = C.MaskSpec(scale=d ** -0.5 if scale is None else float(scale), causal=causal,
                    window=window, sink_tokens=sink_tokens, softcap=softcap)
  q_positions = q_positions.astype(jnp.int32)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, slots)
  page_table = page_table.astype(jnp.int32)
  st = Q._Static(kf, vf, d, dv, spec, bk, splits, q.dtype)  # pylint: disable=protected-access

  q_rows, _ = Q.arrange_rows(q, hkv, platform)
  row_pos = Q.row_positions(q_positions, hq // hkv, q_rows.shape[2])
  if window is None:
    ranges = C.length_ranges(lengths, bk)
  else:
    # Block ranges need slot positions: int32 only, never K/V.
    pos_l = None if pos_pages is None else stacked["pos_pages"][layer_index[0]]
    kpos = logical_positions(pos_l, page_table, lengths, slots)
    ranges = C.key_ranges(q_positions, kpos, lengths, block_q=t, block_k=bk, spec=spec)
  ranges = ranges.packed()[:, :, 0]
  k_arrays = [stacked[k] for k in ("k_pages", "k_scale", "k_zero") if stacked[k] is not None]
  v_arrays = [stacked[k] for k in ("v_pages", "v_scale", "v_zero") if stacked[k] is not None]
  pos = None if pos_pages is None else stacked["pos_pages"].astype(jnp.int32)
  if platform == "tpu":
    pos_view = None if pos is None else pos.reshape(pos.shape[:3] + (1, page_size))
    o_parts, lse_parts = _run_tpu(k_arrays, v_arrays, pos_view, page_table, layer_index,
                                  q_rows, row_pos, lengths, ranges, st=st,
                                  ppb=bk // page_size, page_size=page_size, num_blocks=nkb,
                                  interpret=interpret)
  else:
    o_parts, lse_parts = _run_gpu(k_arrays, v_arrays, pos, page_table, layer_index, q_rows,
                                  row_pos, lengths, ranges, st=st, page_size=page_size,
                                  interpret=interpret, num_warps=num_warps,
                                  num_stages=num_stages)
  o_rows, lse_rows = Q.combine_parts(o_parts, lse_parts, dv)
  parts = [Q.unarrange_rows(o_rows, lse_rows, hq=hq, t=t)]
  res = (k_res, v_res, res_positions, res_lengths)
  if any(x is not None for x in res):
    if not all(x is not None for x in res):
      raise ValueError("k_res, v_res, res_positions and res_lengths go together")
    parts.append(Q.residual_part(q, k_res, v_res, res_lengths, q_positions, res_positions,
                                 spec=spec, platform=platform, interpret=interpret,
                                 num_warps=num_warps, num_stages=num_stages))
  out, lse = Q.merge_exact(parts)
  if sink_logits is not None:
    out, lse = C.apply_sink_logits(out, lse, sink_logits)
  return out.astype(q.dtype), lse


@functools.partial(jax.jit, static_argnames=("fmt", "k_bits", "v_bits", "group_size", "scale",
                                             "causal", "window", "sink_tokens", "softcap"))
def paged_decode_reference(q, k_pages, v_pages, page_table, lengths, *, q_positions,
                           pos_pages=None, k_scale=None, k_zero=None, v_scale=None,
                           v_zero=None, layer=None, k_res=None, v_res=None,
                           res_positions=None, res_lengths=None, sink_logits=None,
                           fmt="float", k_bits=8,
                           v_bits=8, group_size=None, scale=None, causal=True, window=None,
                           sink_tokens=0, softcap=None):
  """Pure-jnp reference: gather the pages into a dense view, dequantize, attend."""
  if layer is not None:
    sl = lambda a: None if a is None else a[layer]
    k_pages, v_pages, pos_pages = sl(k_pages), sl(v_pages), sl(pos_pages)
    k_scale, k_zero, v_scale, v_zero = sl(k_scale), sl(k_zero), sl(v_scale), sl(v_zero)
  kf, vf = _formats(fmt, k_bits, v_bits, group_size, k_zero, v_zero)
  d = q.shape[-1]
  dv = v_pages.shape[-1] * vf.per
  gather = lambda a: None if a is None else gather_pages(a, page_table)
  k = Q.dequantize(gather(k_pages), gather(k_scale), gather(k_zero), kf, d)
  v = Q.dequantize(gather(v_pages), gather(v_scale), gather(v_zero), vf, dv)
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
                                    causal=causal, window=window, sink_tokens=sink_tokens,
                                    softcap=softcap, sink_logits=sink_logits)
  return out, lse
