"""Ragged decode attention: few queries against a head-wise ragged KV cache.

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
[block_k, D] arrive by BlockSpec pipelining (double-buffered DMA) and the running max,
denominator and accumulator live in VMEM scratch. GPU (Triton lowering): (B, Hkv,
num_splits); each program loops over its blocks with masked loads, keeping the state in
registers.

K/V loading is a pluggable KV source (see `PlainKV`): a quantized cache reuses the kernel
bodies and the whole pipeline (`decode_with_source`) by supplying its own arrays, block
specs and dequantizing loads.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as C
from pallas_kernels import colsum as colsum_lib

DEFAULT_BLOCK_K = {"tpu": 512, "gpu": 128}
_SQ = None  # squeezed block dimension


# ----------------------------------------------------------------------------------------
# K/V sources
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PlainKV:
  """Dense K/V: k [B, Hkv, S, D], v [B, Hkv, S, Dv] in any float dtype.

  A KV source tells the kernels how many arrays it has, their BlockSpecs and how to turn
  the loaded block refs into a K block [bk, D] and V block [bk, Dv]. V rows of slots
  >= length come back as exact zeros (they may hold garbage, or be out of bounds in a
  partial last block), so 0 * NaN never reaches the accumulator. A quantized source
  would hold (k_q, k_scale, v_q, v_scale) and dequantize in its `*_load`.
  """
  head_dim: int
  head_dim_v: int
  num_slots: int

  num_arrays = 2

  # TPU: one [block_k, D] block per grid step, chosen by `index(*grid, *prefetch)`
  # -> (b, h, block).
  def tpu_in_specs(self, block_k: int, index) -> list[pl.BlockSpec]:
    def imap(*args):
      b, h, blk = index(*args)
      return (b, h, blk, 0)
    return [pl.BlockSpec((_SQ, _SQ, block_k, self.head_dim), imap),
            pl.BlockSpec((_SQ, _SQ, block_k, self.head_dim_v), imap)]

  def tpu_load(self, refs, first_slot, length):
    k_ref, v_ref = refs
    k = k_ref[...]
    v = v_ref[...]
    slot = first_slot + lax.broadcasted_iota(jnp.int32, v.shape, 0)
    v = jnp.where(slot < length, v.astype(jnp.float32), 0.0).astype(v.dtype)
    return k, v

  # GPU: the whole slot axis of one (b, h) is the block; loads are masked slices.
  def gpu_in_specs(self, d_pad: int, dv_pad: int, index) -> list[pl.BlockSpec]:
    def imap(*args):
      b, h = index(*args)
      return (b, h, 0, 0)
    return [pl.BlockSpec((_SQ, _SQ, self.num_slots, d_pad), imap),
            pl.BlockSpec((_SQ, _SQ, self.num_slots, dv_pad), imap)]

  def gpu_load(self, refs, first_slot, length, block_k: int):
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    k_ref, v_ref = refs
    d_pad, dv_pad = k_ref.shape[-1], v_ref.shape[-1]
    rows = (first_slot + jnp.arange(block_k) < length)[:, None]
    k_mask = rows & (jnp.arange(d_pad) < self.head_dim)[None, :]
    v_mask = rows & (jnp.arange(dv_pad) < self.head_dim_v)[None, :]
    sl = pl.ds(first_slot, block_k)
    k = plgpu.load(k_ref.at[sl, :], mask=k_mask, other=0.0)
    v = plgpu.load(v_ref.at[sl, :], mask=v_mask, other=0.0)
    return k, v


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


# ----------------------------------------------------------------------------------------
# TPU (Mosaic) kernel
# ----------------------------------------------------------------------------------------

def _decode_kernel_tpu(lengths_ref, ranges_ref,            # scalar prefetch (SMEM)
                       qpos_ref, q_ref, kpos_ref, *refs,
                       kv: Any, spec: C.MaskSpec, block_k: int, num_splits: int,
                       num_kv_heads: int):
  """One (b, h, split, step) grid point.

  Refs: qpos [R, 128] int32 (lane-replicated), q [R, D], kpos [1, bk], kv blocks,
  outputs o [R, Dv] float32 and lse [R, 128] float32, scratch m/l [R, 128], acc [R, Dv].
  """
  kv_refs = refs[:kv.num_arrays]
  o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[kv.num_arrays:]
  b, h, split, i = (pl.program_id(0), pl.program_id(1), pl.program_id(2),
                    pl.program_id(3))
  bh = b * num_kv_heads + h
  length = lengths_ref[bh]
  a1, n1, a2, n2 = (ranges_ref[4 * bh], ranges_ref[4 * bh + 1], ranges_ref[4 * bh + 2],
                    ranges_ref[4 * bh + 3])
  start, end = _split_bounds(a1, n1, a2, n2, split, num_splits)

  @pl.when(i == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, C.NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  step = start + i

  @pl.when(step < end)
  def _compute():
    blk = C.step_to_block(step, a1, n1, a2)
    first = blk * block_k
    k, v = kv.tpu_load(kv_refs, first, length)
    s = C.logits(q_ref[...], k, spec)
    slot = first + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    vis = C.visible(qpos_ref[...][:, :1], kpos_ref[...], slot, length, spec)
    m, l, acc = C.online_softmax_step(s, vis, v, m_scr[...][:, :1], l_scr[...][:, :1],
                                      acc_scr[...])
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
    acc_scr[...] = acc

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    out, lse = C.finalize(m_scr[...][:, :1], l_scr[...][:, :1], acc_scr[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _decode_tpu(kv, kv_arrays, q_rows, row_pos, k_positions, k_lengths, ranges, *, spec,
                block_k, num_splits, interpret):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  b, hkv, r, d = q_rows.shape
  s = k_positions.shape[-1]
  dv = kv.head_dim_v
  steps = C.cdiv(C.cdiv(s, block_k), num_splits)
  lengths_flat = k_lengths.reshape(-1).astype(jnp.int32)
  ranges_flat = ranges.reshape(-1).astype(jnp.int32)          # [B * Hkv * 4]
  qpos_lanes = jnp.broadcast_to(row_pos[:, :, None], (b, r, C.LANES)).astype(jnp.int32)
  kpos4 = k_positions.reshape(b, hkv, 1, s).astype(jnp.int32)

  def kv_index(bi, hi, split, i, lengths_ref, ranges_ref):
    del lengths_ref
    base = 4 * (bi * hkv + hi)
    blk = _resident_block(ranges_ref[base], ranges_ref[base + 1], ranges_ref[base + 2],
                          ranges_ref[base + 3], split, i, num_splits)
    return bi, hi, blk

  def kpos_map(*args):
    bi, hi, blk = kv_index(*args)
    return (bi, hi, 0, blk)

  in_specs = [
      pl.BlockSpec((_SQ, r, C.LANES), lambda bi, hi, sp, i, *_: (bi, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, r, d), lambda bi, hi, sp, i, *_: (bi, hi, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, 1, block_k), kpos_map),
      *kv.tpu_in_specs(block_k, kv_index),
  ]
  out_specs = [
      pl.BlockSpec((_SQ, _SQ, _SQ, r, dv), lambda bi, hi, sp, i, *_: (bi, hi, sp, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, _SQ, r, C.LANES),
                   lambda bi, hi, sp, i, *_: (bi, hi, sp, 0, 0)),
  ]
  kernel = functools.partial(_decode_kernel_tpu, kv=kv, spec=spec, block_k=block_k,
                             num_splits=num_splits, num_kv_heads=hkv)
  o_parts, lse_parts = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, hkv, num_splits, steps),
          in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((r, C.LANES), jnp.float32),
                          pltpu.VMEM((r, C.LANES), jnp.float32),
                          pltpu.VMEM((r, dv), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, r, dv), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, num_splits, r, C.LANES), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=C.resolve_interpret("tpu", interpret),
      name="ragged_decode_attention_tpu",
  )(lengths_flat, ranges_flat, qpos_lanes, q_rows, kpos4, *kv_arrays)
  return o_parts, lse_parts[..., 0]


# ----------------------------------------------------------------------------------------
# GPU (Triton) kernel
# ----------------------------------------------------------------------------------------

def _decode_kernel_gpu(lengths_ref, ranges_ref, qpos_ref, q_ref, kpos_ref, *refs,
                       kv: Any, spec: C.MaskSpec, block_k: int, num_splits: int):
  """One (b, h, split) program: loops over its key blocks with masked loads.

  Refs: lengths [] int32, ranges [4] int32, qpos [R] int32, q [R, Dp], kpos [S] int32,
  kv refs (whole slot axis), outputs o [R, Dvp] float32, lse [R] float32.
  """
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  kv_refs = refs[:kv.num_arrays]
  o_ref, lse_ref = refs[kv.num_arrays:]
  split = pl.program_id(2)
  length = lengths_ref[...]
  a1, n1, a2, n2 = ranges_ref[0], ranges_ref[1], ranges_ref[2], ranges_ref[3]
  start, end = _split_bounds(a1, n1, a2, n2, split, num_splits)
  q = q_ref[...]
  qpos = qpos_ref[...][:, None]
  r = q.shape[0]
  dv_pad = o_ref.shape[-1]

  def body(step, carry):
    m, l, acc = carry
    blk = C.step_to_block(step, a1, n1, a2)
    first = pl.multiple_of(blk * block_k, block_k)
    slot = first + jnp.arange(block_k)
    kpos = plgpu.load(kpos_ref.at[pl.ds(first, block_k)], mask=slot < length, other=-1)
    k, v = kv.gpu_load(kv_refs, first, length, block_k)
    s = C.logits(q, k, spec)
    vis = C.visible(qpos, kpos[None, :], slot[None, :], length, spec)
    return C.online_softmax_step(s, vis, v, m, l, acc)

  init = (jnp.full((r, 1), C.NEG_INF, jnp.float32), jnp.zeros((r, 1), jnp.float32),
          jnp.zeros((r, dv_pad), jnp.float32))
  m, l, acc = lax.fori_loop(start, end, body, init)
  out, lse = C.finalize(m, l, acc)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(r)


def _decode_gpu(kv, kv_arrays, q_rows, row_pos, k_positions, k_lengths, ranges, *, spec,
                block_k, num_splits, interpret, num_warps, num_stages):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  b, hkv, r, d_pad = q_rows.shape
  s = k_positions.shape[-1]
  dv_pad = max(16, C.next_pow2(kv.head_dim_v))
  in_specs = [
      pl.BlockSpec((_SQ, _SQ), lambda bi, hi, sp: (bi, hi)),
      pl.BlockSpec((_SQ, _SQ, 4), lambda bi, hi, sp: (bi, hi, 0)),
      pl.BlockSpec((_SQ, r), lambda bi, hi, sp: (bi, 0)),
      pl.BlockSpec((_SQ, _SQ, r, d_pad), lambda bi, hi, sp: (bi, hi, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, s), lambda bi, hi, sp: (bi, hi, 0)),
      *kv.gpu_in_specs(d_pad, dv_pad, lambda bi, hi, sp: (bi, hi)),
  ]
  out_specs = [
      pl.BlockSpec((_SQ, _SQ, _SQ, r, dv_pad), lambda bi, hi, sp: (bi, hi, sp, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, _SQ, r), lambda bi, hi, sp: (bi, hi, sp, 0)),
  ]
  kernel = functools.partial(_decode_kernel_gpu, kv=kv, spec=spec, block_k=block_k,
                             num_splits=num_splits)
  o_parts, lse_parts = pl.pallas_call(
      kernel,
      grid=(b, hkv, num_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, r, dv_pad), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, num_splits, r), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=C.resolve_interpret("gpu", interpret),
      name="ragged_decode_attention_gpu",
  )(k_lengths.astype(jnp.int32), ranges.reshape(b, hkv, 4), row_pos, q_rows,
    k_positions.astype(jnp.int32), *kv_arrays)
  return o_parts[..., :kv.head_dim_v], lse_parts


# ----------------------------------------------------------------------------------------
# Public wrapper
# ----------------------------------------------------------------------------------------

def default_num_splits(platform: str, batch: int, kv_heads: int, num_blocks: int) -> int:
  """Split-K heuristic: fill ~2 waves of a large GPU; TPU grids run in order, so 1."""
  if platform == "tpu":
    return 1
  return max(1, min(num_blocks, 32, 264 // max(1, batch * kv_heads)))


def resolve_block_k(platform: str, block_k: int | None, num_slots: int) -> int:
  """Validated key block size, shrunk for small caches."""
  bk = DEFAULT_BLOCK_K[platform] if block_k is None else block_k
  if not isinstance(bk, int) or bk < 1:
    raise ValueError(f"block_k={block_k!r}; must be a positive int")
  if platform == "tpu":
    if bk % C.LANES and bk != num_slots:
      raise ValueError(f"block_k={bk}; the TPU kernel needs a multiple of {C.LANES} (or S)")
    return num_slots if num_slots <= bk else bk
  if bk < 16 or bk & (bk - 1):
    raise ValueError(f"block_k={bk}; the GPU kernel needs a power of two >= 16")
  return min(bk, max(16, C.next_pow2(num_slots)))


def check_inputs(q, k, v, k_lengths, q_positions, k_positions, sink_logits=None):
  """Shape/dtype validation shared by the attention kernels (ValueError with values)."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be rank 4; got q{q.shape}, k{k.shape}, v{v.shape}")
  b, hq, t, d = q.shape
  bk_, hkv, s, dk = k.shape
  if bk_ != b or v.shape[:3] != (b, hkv, s) or dk != d:
    raise ValueError(f"shape mismatch: q{q.shape} k{k.shape} v{v.shape}; need "
                     "k [B, Hkv, S, D] and v [B, Hkv, S, Dv]")
  if hkv == 0 or hq % hkv:
    raise ValueError(f"num query heads {hq} must be a multiple of num kv heads {hkv}")
  if t < 1 or s < 1:
    raise ValueError(f"need at least one query and one slot; got T={t}, S={s}")
  if k_lengths.shape != (b, hkv):
    raise ValueError(f"k_lengths shape {k_lengths.shape}; expected {(b, hkv)}")
  if q_positions.shape != (b, t):
    raise ValueError(f"q_positions shape {q_positions.shape}; expected {(b, t)}")
  if k_positions.shape != (b, hkv, s):
    raise ValueError(f"k_positions shape {k_positions.shape}; expected {(b, hkv, s)}")
  for name, x in (("k_lengths", k_lengths), ("q_positions", q_positions),
                  ("k_positions", k_positions)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} dtype {x.dtype}; must be an integer type (int32)")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} dtype {x.dtype}; must be floating")
  if sink_logits is not None and sink_logits.shape != (hq,):
    raise ValueError(f"sink_logits shape {sink_logits.shape}; expected {(hq,)}")
  C.check_head_dim("head_dim", d)
  C.check_head_dim("value head_dim", v.shape[-1])


def decode_with_source(kv, kv_arrays, q, k_lengths, q_positions, k_positions, *,
                       spec: C.MaskSpec, block_k: int, num_splits: int, platform: str,
                       interpret: Any = False, num_warps: int = 4, num_stages: int = 2):
  """The decode pipeline for any KV source (the extension point for quantized caches).

  Arranges the rows, computes the block ranges, runs the TPU or GPU kernel with `kv`
  loading `kv_arrays`, and merges the splits. Inputs must already be validated:
  int32 positions/lengths (lengths clipped to [0, S]), `block_k` resolved for the
  platform, 1 <= num_splits <= number of key blocks.

  Returns:
    out [B, Hq, T, Dv] float32, lse [B, Hq, T] float32 (no sink logits applied).
  """
  b, hq, t, d = q.shape
  hkv = k_positions.shape[1]
  g = hq // hkv
  dv = kv.head_dim_v
  # Rows r = t * G + g: all queries and all heads of a kv group in one program.
  r = t * g
  q_rows = q.reshape(b, hkv, g, t, d).transpose(0, 1, 3, 2, 4).reshape(b, hkv, r, d)
  row_pos = jnp.repeat(q_positions, g, axis=1)
  r_pad = C.round_up(r, C.SUBLANES) if platform == "tpu" else max(16, C.next_pow2(r))
  d_pad = d if platform == "tpu" else max(16, C.next_pow2(d))
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, r_pad - r), (0, d_pad - d)))
  row_pos = jnp.pad(row_pos, ((0, 0), (0, r_pad - r)), constant_values=-1)

  if spec.window is None:
    ranges = C.length_ranges(k_lengths, block_k)
  else:
    ranges = C.key_ranges(q_positions, k_positions, k_lengths, block_q=t, block_k=block_k,
                          spec=spec)
  ranges = ranges.packed()[:, :, 0]                          # [B, Hkv, 4]

  if platform == "tpu":
    o_parts, lse_parts = _decode_tpu(kv, kv_arrays, q_rows, row_pos, k_positions,
                                     k_lengths, ranges, spec=spec, block_k=block_k,
                                     num_splits=num_splits, interpret=interpret)
  else:
    o_parts, lse_parts = _decode_gpu(kv, kv_arrays, q_rows, row_pos, k_positions,
                                     k_lengths, ranges, spec=spec, block_k=block_k,
                                     num_splits=num_splits, interpret=interpret,
                                     num_warps=num_warps, num_stages=num_stages)
  if num_splits == 1:
    o_rows, lse_rows = o_parts[:, :, 0], lse_parts[:, :, 0]
  else:
    o_rows, lse_rows = C.combine_splits(o_parts, lse_parts)
  out = o_rows[:, :, :r].reshape(b, hkv, t, g, dv).transpose(0, 1, 3, 2, 4)
  out = out.reshape(b, hq, t, dv)
  lse = lse_rows[:, :, :r].reshape(b, hkv, t, g).transpose(0, 1, 3, 2).reshape(b, hq, t)
  return out, lse


@functools.partial(
    jax.jit,
    static_argnames=("scale", "causal", "window", "sink_tokens", "softcap",
                     "return_colsum", "colsum_window", "block_k", "num_splits",
                     "platform", "interpret", "num_warps", "num_stages"))
def decode_attention(q, k, v, k_lengths, *, q_positions, k_positions, sink_logits=None,
                     scale: float | None = None, causal: bool = True,
                     window: int | None = None, sink_tokens: int = 0,
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
    scale, causal, window, sink_tokens, softcap: docs/CONVENTIONS.md.
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
  C.check_static(window=window, sink_tokens=sink_tokens, softcap=softcap, scale=scale)
  if colsum_window is not None and (not isinstance(colsum_window, int) or colsum_window < 1):
    raise ValueError(f"colsum_window={colsum_window!r}; must be a positive int or None")
  b, hq, t, d = q.shape
  _, hkv, s, dv = v.shape
  bk = resolve_block_k(platform, block_k, s)
  nkb = C.cdiv(s, bk)
  splits = default_num_splits(platform, b, hkv, nkb) if num_splits is None else num_splits
  if not isinstance(splits, int) or splits < 1:
    raise ValueError(f"num_splits={num_splits!r}; must be a positive int")
  splits = min(splits, nkb)
  spec = C.MaskSpec(scale=d ** -0.5 if scale is None else float(scale), causal=causal,
                    window=window, sink_tokens=sink_tokens, softcap=softcap)
  q_positions = q_positions.astype(jnp.int32)
  k_positions = k_positions.astype(jnp.int32)
  k_lengths = jnp.clip(k_lengths.astype(jnp.int32), 0, s)
  kv = PlainKV(head_dim=d, head_dim_v=dv, num_slots=s)
  out, lse = decode_with_source(kv, (k, v), q, k_lengths, q_positions, k_positions,
                                spec=spec, block_k=bk, num_splits=splits, platform=platform,
                                interpret=interpret, num_warps=num_warps,
                                num_stages=num_stages)
  if sink_logits is not None:
    out, lse = C.apply_sink_logits(out, lse, sink_logits)
  colsum = None
  if return_colsum:
    colsum = colsum_lib.attention_colsum(
        q, k, lse, k_lengths, q_positions=C.colsum_query_positions(q_positions, colsum_window),
        k_positions=k_positions, scale=spec.scale, causal=causal, window=window,
        sink_tokens=sink_tokens, softcap=softcap, block_k=bk, platform=platform,
        interpret=interpret)
  return out.astype(q.dtype), lse, colsum
