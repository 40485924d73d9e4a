"""Prefill flash attention over long query blocks, with optional per-slot colsum.

FlashAttention-2 forward (Dao, 2023): each program owns a block of `block_q` queries of one
query head and streams the key blocks of its kv head (h // G, never repeated in memory)
with an online softmax. Differences from jax's `pallas.ops.{gpu,tpu}` flash attention:

* Masks come from data, not indices: `q_positions`, `k_positions` and head-wise
  `k_lengths` (docs/CONVENTIONS.md), so a compressed cache (evicted slots, gaps, ragged
  heads), padding queries and chunked prefill against an existing cache all work.
* Block skipping from positions: before the kernel, a cheap jnp pass over the int32
  positions computes, per (batch, kv head, query block), the key blocks that can hold a
  visible slot: the causal hull, the sliding-window band and, with sink tokens, the sink
  blocks as a second range. Blocks outside are neither loaded nor computed.
* Sliding window, sink tokens, logit soft-capping, learned sink logits.
* `colsum` (H2O / SnapKV observations) over all queries or over the last `colsum_window`
  queries, from a second pass over K with the saved lse (`pallas_kernels.colsum`); no
  [T, S] matrix is ever formed.

Layout: q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], k_lengths [B, Hkv],
q_positions [B, T], k_positions [B, Hkv, S].

Grid. TPU (Mosaic): (B, Hq, query blocks, key steps), last axis "arbitrary"; the index map
turns a step into the key block of that query block's ranges (repeating the last one when
the ranges are exhausted, so no DMA is issued) and m/l/acc live in VMEM scratch. Per-row
vectors (query positions, lse) are lane-replicated [rows, 128] as in jax's splash
attention. GPU (Triton): (B, Hq, query blocks); each program loops over its key steps with
masked loads.
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
from pallas_kernels import decode_attention as dec

DEFAULT_BLOCK_Q = {"tpu": 256, "gpu": 64}
DEFAULT_BLOCK_K = {"tpu": 512, "gpu": 64}
_SQ = None


@dataclasses.dataclass(frozen=True)
class DenseKV:
  """Dense K/V of the prefill kernels: k [B, Hkv, S, D], v [B, Hkv, S, Dv], any float.

  Supplies the BlockSpecs and turns the loaded block refs into a K block [bk, D] and V
  block [bk, Dv]. V rows of slots >= length come back as exact zeros (they may hold
  garbage, or be out of bounds in a partial last block), so 0 * NaN never reaches the
  accumulator.
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
# TPU (Mosaic) kernel
# ----------------------------------------------------------------------------------------

def _prefill_kernel_tpu(lengths_ref, ranges_ref, qpos_ref, q_ref, kpos_ref, *refs, kv: Any,
                        spec: C.MaskSpec, block_k: int, num_kv_heads: int, group: int,
                        num_q_blocks: int, with_lse: bool):
  kv_refs = refs[:kv.num_arrays]
  rest = refs[kv.num_arrays:]
  if with_lse:
    o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
  else:
    (o_ref, m_scr, l_scr, acc_scr), lse_ref = rest, None
  b, h, qb, i = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  bh = b * num_kv_heads + lax.div(h, group)
  length = lengths_ref[bh]
  base = 4 * (bh * num_q_blocks + qb)
  a1, n1, a2, n2 = (ranges_ref[base], ranges_ref[base + 1], ranges_ref[base + 2],
                    ranges_ref[base + 3])

  @pl.when(i == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, C.NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(i < n1 + n2)
  def _compute():
    blk = C.step_to_block(i, a1, n1, a2)
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
    if lse_ref is not None:
      lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _prefill_tpu(kv, kv_arrays, q, q_positions, k_positions, k_lengths, ranges, *, spec,
                 block_q, block_k, out_dtype, with_lse, interpret):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  b, hq, t, d = q.shape
  hkv, s = k_positions.shape[1:]
  g = hq // hkv
  dv = kv.head_dim_v
  nqb = C.cdiv(t, block_q)
  nkb = C.cdiv(s, block_k)
  t_pad = nqb * block_q
  # Rows past T in a partial last query block hold garbage; position -1 masks them.
  qpos = jnp.pad(q_positions, ((0, 0), (0, t_pad - t)), constant_values=-1)
  qpos_lanes = jnp.broadcast_to(qpos[:, :, None], (b, t_pad, C.LANES))
  kpos4 = k_positions.reshape(b, hkv, 1, s)

  def kv_index(bi, hi, qb, i, lengths_ref, ranges_ref):
    del lengths_ref
    hk = lax.div(hi, g)
    base = 4 * ((bi * hkv + hk) * nqb + qb)
    a1, n1, a2, n2 = (ranges_ref[base], ranges_ref[base + 1], ranges_ref[base + 2],
                      ranges_ref[base + 3])
    step = jnp.maximum(jnp.minimum(i, n1 + n2 - 1), 0)
    return bi, hk, C.step_to_block(step, a1, n1, a2)

  def kpos_map(*args):
    bi, hk, blk = kv_index(*args)
    return bi, hk, 0, blk

  row_map = lambda bi, hi, qb, i, *_: (bi, hi, qb, 0)
  in_specs = [
      pl.BlockSpec((_SQ, block_q, C.LANES), lambda bi, hi, qb, i, *_: (bi, qb, 0)),
      pl.BlockSpec((_SQ, _SQ, block_q, d), row_map),
      pl.BlockSpec((_SQ, _SQ, 1, block_k), kpos_map),
      *kv.tpu_in_specs(block_k, kv_index),
  ]
  out_specs = [pl.BlockSpec((_SQ, _SQ, block_q, dv), row_map)]
  out_shape = [jax.ShapeDtypeStruct((b, hq, t, dv), out_dtype)]
  if with_lse:
    out_specs.append(pl.BlockSpec((_SQ, _SQ, block_q, C.LANES), row_map))
    out_shape.append(jax.ShapeDtypeStruct((b, hq, t, C.LANES), jnp.float32))
  kernel = functools.partial(_prefill_kernel_tpu, kv=kv, spec=spec, block_k=block_k,
                             num_kv_heads=hkv, group=g, num_q_blocks=nqb,
                             with_lse=with_lse)
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, hq, nqb, nkb),
          in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((block_q, C.LANES), jnp.float32),
                          pltpu.VMEM((block_q, C.LANES), jnp.float32),
                          pltpu.VMEM((block_q, dv), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=C.resolve_interpret("tpu", interpret),
      name="flash_prefill_tpu",
  )(k_lengths.reshape(-1), ranges.reshape(-1), qpos_lanes, q, kpos4, *kv_arrays)
  return outs[0], (outs[1][..., 0] if with_lse else None)


# ----------------------------------------------------------------------------------------
# GPU (Triton) kernel
# ----------------------------------------------------------------------------------------

def _prefill_kernel_gpu(lengths_ref, ranges_ref, qpos_ref, q_ref, kpos_ref, *refs, kv: Any,
                        spec: C.MaskSpec, block_q: int, block_k: int, num_queries: int):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  kv_refs = refs[:kv.num_arrays]
  o_ref, lse_ref = refs[kv.num_arrays:]
  qb = pl.program_id(2)
  length = lengths_ref[...]
  a1, n1, a2, n2 = ranges_ref[0], ranges_ref[1], ranges_ref[2], ranges_ref[3]
  d_pad, dv_pad = q_ref.shape[-1], o_ref.shape[-1]
  rows = qb * block_q + jnp.arange(block_q) < num_queries
  d_mask = (jnp.arange(d_pad) < kv.head_dim)[None, :]
  q = plgpu.load(q_ref, mask=rows[:, None] & d_mask, other=0.0)
  qpos = plgpu.load(qpos_ref, mask=rows, other=-1)[:, None]

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

  init = (jnp.full((block_q, 1), C.NEG_INF, jnp.float32),
          jnp.zeros((block_q, 1), jnp.float32), jnp.zeros((block_q, dv_pad), jnp.float32))
  m, l, acc = lax.fori_loop(0, n1 + n2, body, init)
  out, lse = C.finalize(m, l, acc)
  dv_mask = (jnp.arange(dv_pad) < kv.head_dim_v)[None, :]
  plgpu.store(o_ref, out.astype(o_ref.dtype), mask=rows[:, None] & dv_mask)
  plgpu.store(lse_ref, lse.reshape(block_q), mask=rows)


def _prefill_gpu(kv, kv_arrays, q, q_positions, k_positions, k_lengths, ranges, *, spec,
                 block_q, block_k, out_dtype, interpret, num_warps, num_stages):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  b, hq, t, d = q.shape
  hkv, s = k_positions.shape[1:]
  g = hq // hkv
  dv = kv.head_dim_v
  nqb = C.cdiv(t, block_q)
  d_pad = max(16, C.next_pow2(d))
  dv_pad = max(16, C.next_pow2(dv))
  hk = lambda hi: lax.div(hi, g)
  in_specs = [
      pl.BlockSpec((_SQ, _SQ), lambda bi, hi, qb: (bi, hk(hi))),
      pl.BlockSpec((_SQ, _SQ, _SQ, 4), lambda bi, hi, qb: (bi, hk(hi), qb, 0)),
      pl.BlockSpec((_SQ, block_q), lambda bi, hi, qb: (bi, qb)),
      pl.BlockSpec((_SQ, _SQ, block_q, d_pad), lambda bi, hi, qb: (bi, hi, qb, 0)),
      pl.BlockSpec((_SQ, _SQ, s), lambda bi, hi, qb: (bi, hk(hi), 0)),
      *kv.gpu_in_specs(d_pad, dv_pad, lambda bi, hi, qb: (bi, hk(hi))),
  ]
  out_specs = [
      pl.BlockSpec((_SQ, _SQ, block_q, dv_pad), lambda bi, hi, qb: (bi, hi, qb, 0)),
      pl.BlockSpec((_SQ, _SQ, block_q), lambda bi, hi, qb: (bi, hi, qb)),
  ]
  kernel = functools.partial(_prefill_kernel_gpu, kv=kv, spec=spec, block_q=block_q,
                             block_k=block_k, num_queries=t)
  out, lse = pl.pallas_call(
      kernel,
      grid=(b, hq, nqb),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct((b, hq, t, dv), out_dtype),
                 jax.ShapeDtypeStruct((b, hq, t), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=C.resolve_interpret("gpu", interpret),
      name="flash_prefill_gpu",
  )(k_lengths, ranges, q_positions, q, k_positions, *kv_arrays)
  return out, lse


# ----------------------------------------------------------------------------------------
# Public wrapper
# ----------------------------------------------------------------------------------------

def resolve_block_q(platform: str, block_q: int | None, num_queries: int) -> int:
  bq = DEFAULT_BLOCK_Q[platform] if block_q is None else block_q
  if not isinstance(bq, int) or bq < 1:
    raise ValueError(f"block_q={block_q!r}; must be a positive int")
  if platform == "tpu":
    if bq % C.SUBLANES:
      raise ValueError(f"block_q={bq}; the TPU kernel needs a multiple of {C.SUBLANES}")
    return num_queries if num_queries <= bq else bq
  if bq < 16 or bq & (bq - 1):
    raise ValueError(f"block_q={bq}; the GPU kernel needs a power of two >= 16")
  return min(bq, max(16, C.next_pow2(num_queries)))


@functools.partial(
    jax.jit,
    static_argnames=("scale", "causal", "window", "n_sink", "softcap", "return_lse",
                     "return_colsum", "colsum_window", "block_q", "block_k", "platform",
                     "interpret", "num_warps", "num_stages"))
def flash_prefill(q, k, v, k_lengths, *, q_positions, k_positions, sink_logits=None,
                  scale: float | None = None, causal: bool = True, window: int | None = None,
                  n_sink: int = 0, softcap: float | None = None,
                  return_lse: bool = False, return_colsum: bool = False,
                  colsum_window: int | None = None, block_q: int | None = None,
                  block_k: int | None = None, platform: str = "gpu",
                  interpret: Any = False, num_warps: int | None = None,
                  num_stages: int = 2):
  """Flash attention for long query blocks (prefill / chunked prefill).

  Args:
    q: [B, Hq, T, D]; k: [B, Hkv, S, D]; v: [B, Hkv, S, Dv] (the cache, new tokens
      included); k_lengths: [B, Hkv] int32.
    q_positions: [B, T] int32 (-1 = padding); k_positions: [B, Hkv, S] int32 (-1 = empty).
    sink_logits: optional [Hq] learned sink logits.
    scale, causal, window, n_sink, softcap: docs/CONVENTIONS.md.
    return_lse: also return lse [B, Hq, T] float32.
    return_colsum: also return colsum [B, Hkv, S] float32 (second pass over K).
    colsum_window: count only queries with q_pos > max(q_pos) - colsum_window (needs
      distinct positions per row, which token positions are).
    block_q / block_k: TPU multiples of 8 / 128 (defaults 256 / 512); GPU powers of two
      >= 16 (defaults 64 / 64). Shrunk automatically for short inputs.
    platform: "tpu" or "gpu"; interpret: interpret mode (CPU tests).
    num_warps (default 4 for D <= 64 else 8), num_stages: Triton options.

  Returns:
    out [B, Hq, T, Dv] (q.dtype), lse or None, colsum or None.
  """
  dec.check_inputs(q, k, v, k_lengths, q_positions, k_positions, sink_logits)
  C.check_platform(platform)
  C.check_static(window=window, n_sink=n_sink, softcap=softcap, scale=scale)
  if colsum_window is not None and (not isinstance(colsum_window, int) or colsum_window < 1):
    raise ValueError(f"colsum_window={colsum_window!r}; must be a positive int or None")
  b, hq, t, d = q.shape
  _, hkv, s, dv = v.shape
  bq = resolve_block_q(platform, block_q, t)
  bk_default = DEFAULT_BLOCK_K[platform] if block_k is None else block_k
  bk = dec.resolve_block_k(platform, bk_default, s)
  spec = C.MaskSpec(scale=d ** -0.5 if scale is None else float(scale), causal=causal,
                    window=window, n_sink=n_sink, softcap=softcap)
  q_positions = q_positions.astype(jnp.int32)
  k_positions = k_positions.astype(jnp.int32)
  k_lengths = jnp.clip(k_lengths.astype(jnp.int32), 0, s)
  ranges = C.key_ranges(q_positions, k_positions, k_lengths, block_q=bq, block_k=bk,
                        spec=spec).packed()                     # [B, Hkv, nqb, 4]
  need_lse = return_lse or return_colsum or sink_logits is not None
  out_dtype = jnp.float32 if sink_logits is not None else q.dtype
  kv = DenseKV(head_dim=d, head_dim_v=dv, num_slots=s)
  if platform == "tpu":
    out, lse = _prefill_tpu(kv, (k, v), q, q_positions, k_positions, k_lengths, ranges,
                            spec=spec, block_q=bq, block_k=bk, out_dtype=out_dtype,
                            with_lse=need_lse, interpret=interpret)
  else:
    warps = (4 if d <= 64 else 8) if num_warps is None else num_warps
    out, lse = _prefill_gpu(kv, (k, v), q, q_positions, k_positions, k_lengths, ranges,
                            spec=spec, block_q=bq, block_k=bk, out_dtype=out_dtype,
                            interpret=interpret, num_warps=warps, num_stages=num_stages)
  if sink_logits is not None:
    out, lse = C.apply_sink_logits(out, lse, sink_logits)
  colsum = None
  if return_colsum:
    cq, clse, cpos = q, lse, q_positions
    if colsum_window is not None:
      cq, clse, cpos = colsum_lib.select_last_queries(q, lse, q_positions, colsum_window)
    colsum = colsum_lib.attention_colsum(
        cq, k, clse, k_lengths, q_positions=cpos, k_positions=k_positions,
        scale=spec.scale, causal=causal, window=window, n_sink=n_sink,
        softcap=softcap, block_k=bk, platform=platform, interpret=interpret)
  return out.astype(q.dtype), (lse if return_lse else None), colsum
