"""The decode pipeline: few queries against a head-wise ragged KV source, and dense decode.

Flash-decoding (Dao et al., 2023 blog "Flash-Decoding for long-context inference"): the
slot axis is cut into `num_splits` parts processed by independent programs, each part
returns a normalised partial output and its log-sum-exp, and a tiny jnp epilogue merges
them exactly. Differences from jax's `pallas.ops.gpu.decode_attention` and
`pallas.ops.tpu.paged_attention`:

* Ragged per (batch, kv head): `k_lengths [B, Hkv]`, and the splits divide the *valid*
  blocks of each (batch, kv head), not the static capacity, so a short row finishes early
  and a long one is spread over all programs. Blocks past `k_lengths` are never loaded
  (GPU: the loop stops; TPU: the index map repeats the last valid block, so Pallas issues
  no DMA, and the compute is skipped).
* All G query heads of a kv group and all T queries form the rows of one program
  (R = T * G rows, row r = t * G + g), so each K/V block is read once per group.
* Positions are data: causal, sliding window, sink tokens and padding are evaluated from
  `q_positions` / `k_positions`; with a window, only the key blocks that can be in some
  query's window (or hold a sink) are visited.
* Logit soft-capping (Gemma 2), learned sink logits, optional per-slot `colsum` (H2O) from a
  second pass over K with the final lse (`pallas_kernels.colsum`).

Layout (docs/CONVENTIONS.md): q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv],
k_lengths [B, Hkv], q_positions [B, T], k_positions [B, Hkv, S].

Grid. TPU (Mosaic): (B, Hkv, num_splits, steps) with the last axis "arbitrary"; K/V blocks
arrive by BlockSpec pipelining (double-buffered DMA) and the running max, denominator and
accumulators live in VMEM scratch. GPU (Triton lowering): (B, Hkv, num_splits); each
program loops over its blocks with masked loads, keeping the state in registers.

`decode_with_source` is that pipeline for any KV source (`kv_source.py`): the dense cache
here, the quantized cache (`quantized_decode.py`) and the page pool (`paged_decode.py`) are
sources of it -- they differ only in their arrays, BlockSpecs and loads. The wrapper pieces
they share (tiling, validation, exact merge of disjoint slot sets) are here too.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as C
from pallas_kernels import colsum as colsum_lib
from pallas_kernels import kv_source as S

DEFAULT_BLOCK_K = {"tpu": 512, "gpu": 128}
_SQ = None  # squeezed block dimension


class _Static(NamedTuple):
  """Static options of one pipeline run (hashable; passed into the kernel bodies)."""
  spec: C.MaskSpec
  block_k: int
  num_splits: int
  mm_dtype: Any


# ----------------------------------------------------------------------------------------
# Split bookkeeping shared by kernels and index maps
# ----------------------------------------------------------------------------------------

def _split_bounds(a1, n1, a2, n2, split, num_splits: int):
  """Steps [start, end) of split `split` over the n1 + n2 valid blocks of one (b, h)."""
  del a1, a2
  total = n1 + n2
  per_split = lax.div(total + (num_splits - 1), num_splits)
  start = split * per_split
  end = jnp.minimum(start + per_split, total)
  return start, end


def _resident_block(a1, n1, a2, n2, split, i, num_splits: int):
  """Block a TPU grid step (split, i) holds: its own, or the last one already loaded."""
  start, end = _split_bounds(a1, n1, a2, n2, split, num_splits)
  step = jnp.maximum(jnp.minimum(start + i, end - 1), 0)
  return C.step_to_block(step, a1, n1, a2)


def _attend_block(q_planes, qpos, kb, vb, kpos, slot, valid_col, valid_row, length, m, l,
                  accs, st: _Static, v_format):
  """One online-softmax update (Dao et al., 2022) of the state (m, l, accs) by a block."""
  s = S.block_logits(q_planes, kb, st.spec, st.mm_dtype)
  vis = C.visible(qpos, kpos, slot, length, st.spec)
  p, alpha, m, l = S.softmax_update(s, vis, m, l)
  pv = S.block_pv(p, vb, valid_col, valid_row, st.mm_dtype, v_format)
  return m, l, [alpha * a + c for a, c in zip(accs, pv)]


# ----------------------------------------------------------------------------------------
# TPU (Mosaic) kernel
# ----------------------------------------------------------------------------------------

def _decode_kernel_tpu(lengths_ref, ranges_ref, *refs, source, st: _Static,
                       num_kv_heads: int):
  """One (b, h, split, step) grid point.

  Refs: scalar-prefetched source indices, qpos [R, 128] int32 (lane-replicated), q planes
  [per_k, R, D / per_k], the source's block refs, outputs o [per_v, R, Dv / per_v] float32
  and lse [R, 128] float32, scratch m / l [R, 128] and acc [per_v, R, Dv / per_v].
  """
  npf = source.num_prefetch
  qpos_ref, q_ref = refs[npf], refs[npf + 1]
  in_refs = refs[npf + 2:-5]
  o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[-5:]
  per_k, per_v = source.k_format.per, source.v_format.per
  b, h, split, i = (pl.program_id(0), pl.program_id(1), pl.program_id(2),
                    pl.program_id(3))
  bh = b * num_kv_heads + h
  length = lengths_ref[bh]
  a1, n1, a2, n2 = (ranges_ref[4 * bh], ranges_ref[4 * bh + 1], ranges_ref[4 * bh + 2],
                    ranges_ref[4 * bh + 3])
  start, end = _split_bounds(a1, n1, a2, n2, split, st.num_splits)

  @pl.when(i == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, C.NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  step = start + i

  @pl.when(step < end)
  def _compute():
    first = C.step_to_block(step, a1, n1, a2) * st.block_k
    q_planes = [q_ref[j] for j in range(per_k)]
    qpos = qpos_ref[...][:, :1]
    m, l = m_scr[...][:, :1], l_scr[...][:, :1]
    accs = [acc_scr[j] for j in range(per_v)]
    # Slots past the length (a partial block, or pages a paged source repeats) are masked.
    for off, n, kb, vb, kpos in source.tpu_blocks(in_refs, st.block_k):
      slot_row = first + off + lax.broadcasted_iota(jnp.int32, (1, n), 1)
      slot_col = first + off + lax.broadcasted_iota(jnp.int32, (n, 1), 0)
      m, l, accs = _attend_block(q_planes, qpos, kb, vb,
                                 slot_row if kpos is None else kpos, slot_row,
                                 slot_col < length, slot_row < length, length, m, l, accs,
                                 st, source.v_format)
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
    for j, a in enumerate(accs):
      acc_scr[j] = a

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    m, l = m_scr[...][:, :1], l_scr[...][:, :1]
    for j in range(per_v):
      out, lse = C.finalize(m, l, acc_scr[j])
      o_ref[j] = out
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _decode_tpu(source, arrays, prefetch, q_rows, row_pos, k_lengths, ranges, *,
                st: _Static, interpret):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  b, hkv, r, d = q_rows.shape
  per_k, per_v = source.k_format.per, source.v_format.per
  dpv = source.head_dim_v // per_v
  steps = C.cdiv(C.cdiv(source.num_slots, st.block_k), st.num_splits)
  q_planes = S.split_query_planes(q_rows, per_k)
  qpos_lanes = jnp.broadcast_to(row_pos[:, :, None], (b, r, C.LANES)).astype(jnp.int32)

  def index(bi, hi, split, i, lengths_ref, ranges_ref, *_):
    del lengths_ref
    base = 4 * (bi * hkv + hi)
    blk = _resident_block(ranges_ref[base], ranges_ref[base + 1], ranges_ref[base + 2],
                          ranges_ref[base + 3], split, i, st.num_splits)
    return bi, hi, blk

  per_bh = lambda *block: lambda bi, hi, sp, i, *_: (bi, hi) + block  # noqa: E731
  in_specs = [
      pl.BlockSpec((_SQ, r, C.LANES), lambda bi, hi, sp, i, *_: (bi, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, per_k, r, d // per_k), per_bh(0, 0, 0)),
      *source.tpu_in_specs(st.block_k, index),
  ]
  out_specs = [
      pl.BlockSpec((_SQ, _SQ, _SQ, per_v, r, dpv),
                   lambda bi, hi, sp, i, *_: (bi, hi, sp, 0, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, _SQ, r, C.LANES), lambda bi, hi, sp, i, *_: (bi, hi, sp, 0, 0)),
  ]
  kernel = functools.partial(_decode_kernel_tpu, source=source, st=st, num_kv_heads=hkv)
  o_parts, lse_parts = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2 + source.num_prefetch,
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
      name=source.name + "_tpu",
  )(k_lengths.reshape(-1), ranges.reshape(-1), *[a.reshape(-1) for a in prefetch],
    qpos_lanes, q_planes, *source.tpu_inputs(arrays))
  return o_parts, lse_parts[..., 0]


# ----------------------------------------------------------------------------------------
# GPU (Triton) kernel
# ----------------------------------------------------------------------------------------

def _decode_kernel_gpu(lengths_ref, ranges_ref, *refs, source, st: _Static):
  """One (b, h, split) program: loops over its key blocks with masked loads.

  Refs: lengths [] int32, ranges [4] int32, the source's index refs, qpos [R] int32,
  q planes [per_k, R, Dp_pad], the source's array refs, outputs o [per_v, R, Dvp_pad]
  float32 and lse [R] float32.
  """
  npf = source.num_prefetch
  prefetch_refs = refs[:npf]
  qpos_ref, q_ref = refs[npf], refs[npf + 1]
  in_refs = refs[npf + 2:-2]
  o_ref, lse_ref = refs[-2:]
  head, split = pl.program_id(1), pl.program_id(2)   # outside the loop (interpret mode)
  length = lengths_ref[...]
  a1, n1, a2, n2 = ranges_ref[0], ranges_ref[1], ranges_ref[2], ranges_ref[3]
  start, end = _split_bounds(a1, n1, a2, n2, split, st.num_splits)
  q_planes = [q_ref[j] for j in range(source.k_format.per)]
  qpos = qpos_ref[...][:, None]
  r = qpos.shape[0]
  dpk_pad, dpv_pad = q_planes[0].shape[-1], o_ref.shape[-1]
  bk = st.block_k

  def body(step, carry):
    m, l, accs = carry
    first = pl.multiple_of(C.step_to_block(step, a1, n1, a2) * bk, bk)
    slot = first + jnp.arange(bk, dtype=jnp.int32)
    valid = slot < length
    kb, vb, kpos = source.gpu_block(in_refs, prefetch_refs, head, first, slot, valid,
                                    dpk_pad, dpv_pad)
    m, l, accs = _attend_block(q_planes, qpos, kb, vb, kpos[None, :], slot[None, :],
                               valid[:, None], valid[None, :], length, m, l, accs, st,
                               source.v_format)
    return m, l, tuple(accs)

  init = (jnp.full((r, 1), C.NEG_INF, jnp.float32), jnp.zeros((r, 1), jnp.float32),
          tuple(jnp.zeros((r, dpv_pad), jnp.float32) for _ in range(source.v_format.per)))
  m, l, accs = lax.fori_loop(start, end, body, init)
  for j, acc in enumerate(accs):
    out, lse = C.finalize(m, l, acc)
    o_ref[j] = out
  lse_ref[...] = lse.reshape(r)


def _decode_gpu(source, arrays, prefetch, q_rows, row_pos, k_lengths, ranges, *,
                st: _Static, interpret, num_warps, num_stages):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  b, hkv, r, d = q_rows.shape
  per_k, per_v = source.k_format.per, source.v_format.per
  dpk_pad = S.gpu_plane_pad(d, per_k)
  dpv_pad = S.gpu_plane_pad(source.head_dim_v, per_v)
  q_planes = S.split_query_planes(q_rows, per_k)
  q_planes = jnp.pad(q_planes, ((0, 0),) * 4 + ((0, dpk_pad - d // per_k),))
  in_specs = [
      pl.BlockSpec((_SQ, _SQ), lambda bi, hi, sp: (bi, hi)),
      pl.BlockSpec((_SQ, _SQ, 4), lambda bi, hi, sp: (bi, hi, 0)),
      *source.gpu_prefetch_specs(),
      pl.BlockSpec((_SQ, r), lambda bi, hi, sp: (bi, 0)),
      pl.BlockSpec((_SQ, _SQ, per_k, r, dpk_pad), lambda bi, hi, sp: (bi, hi, 0, 0, 0)),
      *source.gpu_in_specs(arrays, dpk_pad, dpv_pad),
  ]
  out_specs = [
      pl.BlockSpec((_SQ, _SQ, _SQ, per_v, r, dpv_pad),
                   lambda bi, hi, sp: (bi, hi, sp, 0, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, _SQ, r), lambda bi, hi, sp: (bi, hi, sp, 0)),
  ]
  return pl.pallas_call(
      functools.partial(_decode_kernel_gpu, source=source, st=st),
      grid=(b, hkv, st.num_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct((b, hkv, st.num_splits, per_v, r, dpv_pad),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, st.num_splits, r), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=C.resolve_interpret("gpu", interpret),
      name=source.name + "_gpu",
  )(k_lengths, ranges.reshape(b, hkv, 4), *prefetch, row_pos, q_planes, *arrays)


# ----------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------

def arrange_rows(q, hkv: int, platform: str):
  """q [B, Hq, T, D] -> rows [B, Hkv, Rp, D] (row r = t * G + g), Rp padded per platform."""
  b, hq, t, d = q.shape
  g = hq // hkv
  r = t * g
  q_rows = q.reshape(b, hkv, g, t, d).transpose(0, 1, 3, 2, 4).reshape(b, hkv, r, d)
  r_pad = C.round_up(r, C.SUBLANES) if platform == "tpu" else max(16, C.next_pow2(r))
  return jnp.pad(q_rows, ((0, 0), (0, 0), (0, r_pad - r), (0, 0)))


def row_positions(q_positions, g: int, r_pad: int):
  """[B, T] query positions -> [B, Rp] row positions (padding rows -1)."""
  r = q_positions.shape[1] * g
  rp = jnp.repeat(q_positions, g, axis=1)
  return jnp.pad(rp, ((0, 0), (0, r_pad - r)), constant_values=-1)


def unarrange_rows(o_rows, lse_rows, *, hq: int, t: int):
  """[B, Hkv, Rp, Dv], [B, Hkv, Rp] -> out [B, Hq, T, Dv], lse [B, Hq, T]."""
  b, hkv, _, dv = o_rows.shape
  g = hq // hkv
  r = t * g
  out = o_rows[:, :, :r].reshape(b, hkv, t, g, dv).transpose(0, 1, 3, 2, 4)
  lse = lse_rows[:, :, :r].reshape(b, hkv, t, g).transpose(0, 1, 3, 2)
  return out.reshape(b, hq, t, dv), lse.reshape(b, hq, t)


def combine_parts(o_parts, lse_parts, dv: int):
  """Kernel outputs [B, H, P, per, Rp, Dp_pad], [B, H, P, Rp] -> [B, H, Rp, Dv], [B, H, Rp]."""
  o = S.merge_value_planes(o_parts, dv)
  if o.shape[2] == 1:
    return o[:, :, 0], lse_parts[:, :, 0]
  return C.combine_splits(o, lse_parts)


def decode_with_source(source, arrays, q, k_lengths, q_positions, *, k_positions=None,
                       prefetch=(), spec: C.MaskSpec, block_k: int, num_splits: int,
                       platform: str, interpret: Any = False, num_warps: int = 4,
                       num_stages: int = 2):
  """The decode pipeline for any KV source (`kv_source.ContiguousKV`, `PagedKV`).

  Arranges the query rows (and their code planes), computes the block ranges, runs the
  TPU or GPU kernel with `source` reading `arrays` (indexed by the `prefetch` arrays:
  scalar-prefetched on TPU), and merges the splits. Inputs must already be validated:
  int32 positions / lengths (lengths clipped to [0, source.num_slots]), `block_k`
  resolved for the platform, 1 <= num_splits <= number of key blocks.

  Args:
    k_positions: [B, Hkv, S] int32 logical slot positions; read only with a window (to
      find the blocks that can fall in it).

  Returns:
    out [B, Hq, T, Dv] float32, lse [B, Hq, T] float32 (no sink logits applied).
  """
  b, hq, t, _ = q.shape
  hkv = k_lengths.shape[1]
  q_rows = arrange_rows(q, hkv, platform)
  row_pos = row_positions(q_positions, hq // hkv, q_rows.shape[2])
  if spec.window is None:
    ranges = C.length_ranges(k_lengths, block_k)
  else:
    ranges = C.key_ranges(q_positions, k_positions, k_lengths, block_q=t, block_k=block_k,
                          spec=spec)
  ranges = ranges.packed()[:, :, 0]                          # [B, Hkv, 4]
  st = _Static(spec, block_k, num_splits, q.dtype)
  if platform == "tpu":
    o_parts, lse_parts = _decode_tpu(source, arrays, prefetch, q_rows, row_pos, k_lengths,
                                     ranges, st=st, interpret=interpret)
  else:
    o_parts, lse_parts = _decode_gpu(source, arrays, prefetch, q_rows, row_pos, k_lengths,
                                     ranges, st=st, interpret=interpret,
                                     num_warps=num_warps, num_stages=num_stages)
  o_rows, lse_rows = combine_parts(o_parts, lse_parts, source.head_dim_v)
  return unarrange_rows(o_rows, lse_rows, hq=hq, t=t)


# ----------------------------------------------------------------------------------------
# Wrapper pieces shared by the decode entry points (dense, quantized, paged)
# ----------------------------------------------------------------------------------------

def default_num_splits(platform: str, batch: int, kv_heads: int, num_blocks: int) -> int:
  """Split-K heuristic: fill ~2 waves of a large GPU; TPU grids run in order, so 1."""
  if platform == "tpu":
    return 1
  return max(1, min(num_blocks, 32, 264 // max(1, batch * kv_heads)))


def resolve_splits(platform: str, num_splits: Optional[int], batch: int, kv_heads: int,
                   num_blocks: int) -> int:
  """Validated split count, at most the number of key blocks."""
  splits = (default_num_splits(platform, batch, kv_heads, num_blocks) if num_splits is None
            else num_splits)
  if not isinstance(splits, int) or splits < 1:
    raise ValueError(f"num_splits={num_splits!r}; must be a positive int")
  return min(splits, num_blocks)


def resolve_block_k(platform: str, block_k: Optional[int], num_slots: int, *,
                    default: Optional[int] = None, unit: int = C.LANES) -> int:
  """Validated key block size, shrunk for small caches.

  TPU: a multiple of `unit` (128 lanes; more for per-channel scales) or the whole slot
  axis. GPU: a power of two >= 16 (the Triton `dot` minimum). `default` (None: the dense
  decode's DEFAULT_BLOCK_K) is used when block_k is None.
  """
  default = DEFAULT_BLOCK_K[platform] if default is None else default
  if platform == "tpu":
    bk = C.round_up(default, unit) if block_k is None else block_k
    if not isinstance(bk, int) or bk < 1:
      raise ValueError(f"block_k={block_k!r}; must be a positive int")
    if bk % unit and bk != num_slots:
      raise ValueError(f"block_k={bk}; the TPU kernel needs a multiple of {unit} or the "
                       f"slot count {num_slots}")
    return min(bk, num_slots)
  bk = default if block_k is None else block_k
  if not isinstance(bk, int) or bk < 16 or bk & (bk - 1):
    raise ValueError(f"block_k={block_k!r}; the GPU kernel needs a power of two >= 16")
  return min(bk, max(16, C.next_pow2(num_slots)))


def mask_spec(head_dim: int, *, scale, causal, window, n_sink, softcap) -> C.MaskSpec:
  """Validated static masking options (scale None = head_dim ** -0.5)."""
  C.check_static(window=window, n_sink=n_sink, softcap=softcap, scale=scale)
  return C.MaskSpec(scale=head_dim ** -0.5 if scale is None else float(scale),
                    causal=causal, window=window, n_sink=n_sink, softcap=softcap)


def check_queries(q, k_lengths, q_positions, k_positions, sink_logits, hkv: int, slots: int):
  """Validation of what every decode entry point takes besides K/V (ValueError)."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B, Hq, T, D]; got shape {q.shape}")
  b, hq, t, d = q.shape
  if hkv < 1 or hq % hkv:
    raise ValueError(f"num query heads {hq} must be a multiple of num kv heads {hkv}")
  if t < 1 or slots < 1:
    raise ValueError(f"need at least one query and one slot; got T={t}, S={slots}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"q dtype {q.dtype}; must be floating")
  if k_lengths.shape != (b, hkv):
    raise ValueError(f"k_lengths shape {k_lengths.shape}; expected {(b, hkv)}")
  if q_positions.shape != (b, t):
    raise ValueError(f"q_positions shape {q_positions.shape}; expected {(b, t)}")
  if k_positions is not None and k_positions.shape != (b, hkv, slots):
    raise ValueError(f"k_positions shape {k_positions.shape}; expected {(b, hkv, slots)}")
  if sink_logits is not None and sink_logits.shape != (hq,):
    raise ValueError(f"sink_logits shape {sink_logits.shape}; expected {(hq,)}")
  for name, x in (("k_lengths", k_lengths), ("q_positions", q_positions),
                  ("k_positions", k_positions)):
    if x is not None and not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} dtype {x.dtype}; must be an integer type (int32)")
  C.check_head_dim("head_dim", d)


def check_inputs(q, k, v, k_lengths, q_positions, k_positions, sink_logits=None):
  """Shape/dtype validation of dense attention inputs (ValueError with values)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be rank 4; got q{q.shape}, k{k.shape}, v{v.shape}")
  b, _, _, d = q.shape
  bk_, hkv, s, dk = k.shape
  if bk_ != b or v.shape[:3] != (b, hkv, s) or dk != d:
    raise ValueError(f"shape mismatch: q{q.shape} k{k.shape} v{v.shape}; need "
                     "k [B, Hkv, S, D] and v [B, Hkv, S, Dv]")
  check_queries(q, k_lengths, q_positions, k_positions, sink_logits, hkv, s)
  for name, x in (("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} dtype {x.dtype}; must be floating")
  C.check_head_dim("value head_dim", v.shape[-1])


def decode(source, arrays, q, k_lengths, q_positions, *, k_positions=None, prefetch=(),
           exact=None, sink_logits=None, spec: C.MaskSpec, block_k: int, num_splits: int,
           platform: str, interpret: Any = False, num_warps: int = 4, num_stages: int = 2):
  """`decode_with_source`, plus exact slots and sink logits: what every entry point runs.

  Args:
    exact: optional (k [B, Hkv, R, D], v [B, Hkv, R, Dv], positions [B, Hkv, R], lengths
      [B, Hkv]): slots attended exactly beside the source (a residual window, a current
      chunk), by the dense source, merged by an exact log-sum-exp combine.
    sink_logits: optional [Hq] learned sink logits (denominator only).
    Others: as for `decode_with_source`.

  Returns:
    out [B, Hq, T, Dv] in q.dtype, lse [B, Hq, T] float32.
  """
  kw = dict(spec=spec, platform=platform, interpret=interpret, num_warps=num_warps,
            num_stages=num_stages)
  out, lse = decode_with_source(source, arrays, q, k_lengths, q_positions,
                                k_positions=k_positions, prefetch=prefetch, block_k=block_k,
                                num_splits=num_splits, **kw)
  if exact is not None:
    ek, ev, epos, elen = exact
    b, hkv, r, d = ek.shape
    bk = resolve_block_k(platform, None, r)
    nkb = C.cdiv(r, bk)
    epos = epos.astype(jnp.int32)
    dense_source = S.ContiguousKV(S.KVFormat("float"), S.KVFormat("float"), d, ev.shape[-1],
                                  r)
    o2, l2 = decode_with_source(
        dense_source, (epos, ek, ev), q, jnp.clip(elen.astype(jnp.int32), 0, r), q_positions,
        k_positions=epos, block_k=bk, num_splits=resolve_splits(platform, None, b, hkv, nkb),
        **kw)
    out, lse = C.combine_splits(jnp.stack([out, o2], axis=2), jnp.stack([lse, l2], axis=2))
  if sink_logits is not None:
    out, lse = C.apply_sink_logits(out, lse, sink_logits)
  return out.astype(q.dtype), lse


@functools.partial(
    jax.jit,
    static_argnames=("scale", "causal", "window", "n_sink", "softcap",
                     "return_colsum", "colsum_window", "block_k", "num_splits",
                     "platform", "interpret", "num_warps", "num_stages"))
def decode_attention(q, k, v, k_lengths, *, q_positions, k_positions, sink_logits=None,
                     scale: float | None = None, causal: bool = True,
                     window: int | None = None, n_sink: int = 0,
                     softcap: float | None = None, return_colsum: bool = False,
                     colsum_window: int | None = None, block_k: int | None = None,
                     num_splits: int | None = None, platform: str = "gpu",
                     interpret: Any = False, num_warps: int = 4, num_stages: int = 2):
  """Ragged decode attention (flash-decoding) over a head-wise ragged cache.

  Args:
    q: [B, Hq, T, D] queries, T small (1..16 is the intended range).
    k: [B, Hkv, S, D]; v: [B, Hkv, S, Dv] cache (any S).
    k_lengths: [B, Hkv] int32, 0 <= k_lengths <= S.
    q_positions: [B, T] int32 (-1 = padding query).
    k_positions: [B, Hkv, S] int32 (-1 = empty slot).
    sink_logits: optional [Hq] learned sink logits (join the denominator only).
    scale, causal, window, n_sink, softcap: docs/CONVENTIONS.md.
    return_colsum: also return colsum [B, Hkv, S] (second pass over K).
    colsum_window: only queries with q_pos > max(q_pos) - colsum_window count in colsum.
    block_k: slots per key block (TPU: multiple of 128, default 512; GPU: power of two
      >= 16, default 128). Shrunk automatically when S is smaller.
    num_splits: split-K parts (default: 1 on TPU, enough programs to fill a GPU).
    platform: "tpu" (Mosaic kernel) or "gpu" (Triton kernel).
    interpret: run in interpret mode (CPU tests); True picks TPU interpret mode for the
      TPU variant.
    num_warps, num_stages: Triton options (GPU only).

  Returns:
    out [B, Hq, T, Dv] (q.dtype), lse [B, Hq, T] float32, colsum [B, Hkv, S] float32 or
    None.
  """
  check_inputs(q, k, v, k_lengths, q_positions, k_positions, sink_logits)
  C.check_platform(platform)
  if colsum_window is not None and (not isinstance(colsum_window, int) or colsum_window < 1):
    raise ValueError(f"colsum_window={colsum_window!r}; must be a positive int or None")
  b, _, _, d = q.shape
  _, hkv, s, dv = v.shape
  spec = mask_spec(d, scale=scale, causal=causal, window=window, n_sink=n_sink,
                   softcap=softcap)
  bk = resolve_block_k(platform, block_k, s)
  splits = resolve_splits(platform, num_splits, b, hkv, C.cdiv(s, bk))
  q_positions = q_positions.astype(jnp.int32)
  k_positions = k_positions.astype(jnp.int32)
  k_lengths = jnp.clip(k_lengths.astype(jnp.int32), 0, s)
  source = S.ContiguousKV(S.KVFormat("float"), S.KVFormat("float"), d, dv, s)
  out, lse = decode(source, (k_positions, k, v), q, k_lengths, q_positions,
                    k_positions=k_positions, sink_logits=sink_logits, spec=spec, block_k=bk,
                    num_splits=splits, platform=platform, interpret=interpret,
                    num_warps=num_warps, num_stages=num_stages)
  colsum = None
  if return_colsum:
    colsum = colsum_lib.attention_colsum(
        q, k, lse, k_lengths, q_positions=C.colsum_query_positions(q_positions, colsum_window),
        k_positions=k_positions, scale=spec.scale, causal=causal, window=window,
        n_sink=n_sink, softcap=softcap, block_k=bk, platform=platform,
        interpret=interpret)
  return out, lse, colsum
