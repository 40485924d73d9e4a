"""Per-slot attention mass (H2O's accumulated attention; Zhang et al., 2023) from saved lse.

colsum[b, h, s] = sum over the G query heads of group h and the counted queries t of
softmax probability p[b, h*G+g, t, s] = exp(logit - lse[b, h*G+g, t]).

This is the second pass the attention kernels run when `return_colsum=True`: the forward
kernel saves the final lse (sinks included), then this kernel reads each K block once,
recomputes the logits of the counted queries and sums the probabilities over rows. No
[T, S] matrix ever exists. Queries that must not count (padding, or outside
`colsum_window`) are passed with position -1.

Grid. TPU (Mosaic): (B, Hkv, key blocks, query steps); a query block holds the G heads of
the group ([G, bq, D]) and the colsum block of a key block stays resident across the
"arbitrary" query axis. GPU (Triton): (B, Hkv, key blocks);
each program loads its K block once and loops over the G heads and query blocks.
Both visit only the query blocks whose positions can see the key block (causal/window
hull), and skip key blocks past k_lengths.

Layout: q [B, Hq, Tq, D], lse [B, Hq, Tq], q_positions [B, Tq], k [B, Hkv, S, D],
k_positions [B, Hkv, S], k_lengths [B, Hkv] -> colsum [B, Hkv, S] float32.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as C

DEFAULT_BLOCK_Q = {"tpu": 256, "gpu": 64}
_SQ = None


def _colsum_kernel_tpu(lengths_ref, qranges_ref, qpos_ref, q_ref, lse_ref, kpos_ref, k_ref,
                       o_ref, *, spec: C.MaskSpec, block_k: int, num_kv_heads: int,
                       num_k_blocks: int):
  """Grid point (b, h, key block, query step). q [G, bq, D], lse [G, bq, 128]."""
  b, h, kb, i = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
  bh = b * num_kv_heads + h
  length = lengths_ref[bh]
  n = qranges_ref[2 * (bh * num_k_blocks + kb) + 1]

  @pl.when(i == 0)
  def _init():
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

  @pl.when(i < n)
  def _compute():
    k = k_ref[...]
    slot = kb * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    vis = C.visible(qpos_ref[...][:, :1], kpos_ref[...], slot, length, spec)

    def head(gi, col):
      s = C.logits(q_ref[gi], k, spec)
      return col + C.column_mass(s, vis, lse_ref[gi][:, :1])

    o_ref[...] += lax.fori_loop(0, q_ref.shape[0], head,
                                jnp.zeros((1, block_k), jnp.float32))


def _colsum_tpu(q, k, lse, qpos, k_positions, k_lengths, qa, qn, *, spec, block_q,
                block_k, interpret):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  b, hq, tq, d = q.shape
  _, hkv, s, _ = k.shape
  g = hq // hkv
  nqb = C.cdiv(tq, block_q)
  nkb = C.cdiv(s, block_k)
  tq_pad = nqb * block_q
  # Rows past Tq in a partial last block hold garbage q/lse; position -1 masks them.
  qpos_lanes = jnp.broadcast_to(
      jnp.pad(qpos, ((0, 0), (0, tq_pad - tq)), constant_values=-1)[:, :, None],
      (b, tq_pad, C.LANES))
  lse_lanes = jnp.broadcast_to(lse[..., None], (b, hq, tq, C.LANES))
  kpos4 = k_positions.reshape(b, hkv, 1, s)
  qranges = jnp.stack([qa, qn], axis=-1).reshape(-1).astype(jnp.int32)

  def q_block(bi, hi, kb, i, qranges_ref):
    base = 2 * ((bi * hkv + hi) * nkb + kb)
    a, n = qranges_ref[base], qranges_ref[base + 1]
    return a + jnp.maximum(jnp.minimum(i, n - 1), 0)

  def k_block(bi, hi, kb, lengths_ref):
    last = lax.div(lengths_ref[bi * hkv + hi] + (block_k - 1), block_k) - 1
    return jnp.maximum(jnp.minimum(kb, last), 0)

  def qpos_map(bi, hi, kb, i, lengths_ref, qranges_ref):
    return bi, q_block(bi, hi, kb, i, qranges_ref), 0

  def q_map(bi, hi, kb, i, lengths_ref, qranges_ref):
    return bi, hi, q_block(bi, hi, kb, i, qranges_ref), 0   # block of G heads

  def kpos_map(bi, hi, kb, i, lengths_ref, qranges_ref):
    return bi, hi, 0, k_block(bi, hi, kb, lengths_ref)

  def k_map(bi, hi, kb, i, lengths_ref, qranges_ref):
    return bi, hi, k_block(bi, hi, kb, lengths_ref), 0

  kernel = functools.partial(_colsum_kernel_tpu, spec=spec, block_k=block_k,
                             num_kv_heads=hkv, num_k_blocks=nkb)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, hkv, nkb, nqb),
          in_specs=[
              pl.BlockSpec((_SQ, block_q, C.LANES), qpos_map),
              pl.BlockSpec((_SQ, g, block_q, d), q_map),
              pl.BlockSpec((_SQ, g, block_q, C.LANES), q_map),
              pl.BlockSpec((_SQ, _SQ, 1, block_k), kpos_map),
              pl.BlockSpec((_SQ, _SQ, block_k, d), k_map),
          ],
          out_specs=pl.BlockSpec((_SQ, _SQ, 1, block_k),
                                 lambda bi, hi, kb, i, *_: (bi, hi, 0, kb))),
      out_shape=jax.ShapeDtypeStruct((b, hkv, 1, s), jnp.float32),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=C.resolve_interpret("tpu", interpret),
      name="attention_colsum_tpu",
  )(k_lengths.reshape(-1), qranges, qpos_lanes, q, lse_lanes, kpos4, k)
  return out[:, :, 0]


def _colsum_kernel_gpu(lengths_ref, qranges_ref, qpos_ref, q_ref, lse_ref, kpos_ref, k_ref,
                       o_ref, *, spec: C.MaskSpec, block_q: int, block_k: int,
                       num_queries: int, head_dim: int):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  kb = pl.program_id(2)
  g = q_ref.shape[0]
  d_pad = q_ref.shape[-1]
  length = lengths_ref[...]
  a, n = qranges_ref[0], qranges_ref[1]
  first = pl.multiple_of(kb * block_k, block_k)
  slot = first + jnp.arange(block_k)
  valid = slot < length
  kpos = plgpu.load(kpos_ref.at[pl.ds(first, block_k)], mask=valid, other=-1)
  k_mask = valid[:, None] & (jnp.arange(d_pad) < head_dim)[None, :]
  k = plgpu.load(k_ref.at[pl.ds(first, block_k), :], mask=k_mask, other=0.0)

  def body(it, col):
    gi = lax.div(it, n)
    qb = a + lax.rem(it, n)
    q0 = pl.multiple_of(qb * block_q, block_q)
    rows = q0 + jnp.arange(block_q) < num_queries
    q_mask = rows[:, None] & (jnp.arange(d_pad) < head_dim)[None, :]
    q = plgpu.load(q_ref.at[gi, pl.ds(q0, block_q), :], mask=q_mask, other=0.0)
    qpos = plgpu.load(qpos_ref.at[pl.ds(q0, block_q)], mask=rows, other=-1)
    lse = plgpu.load(lse_ref.at[gi, pl.ds(q0, block_q)], mask=rows, other=0.0)
    s = C.logits(q, k, spec)
    vis = C.visible(qpos[:, None], kpos[None, :], slot[None, :], length, spec)
    return col + C.column_mass(s, vis, lse[:, None])

  col = lax.fori_loop(0, g * n, body, jnp.zeros((1, block_k), jnp.float32))
  o_ref[...] = col.reshape(block_k)


def _colsum_gpu(q, k, lse, qpos, k_positions, k_lengths, qa, qn, *, spec, block_q, block_k,
                interpret, num_warps, num_stages):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  b, hq, tq, d = q.shape
  _, hkv, s, _ = k.shape
  g = hq // hkv
  nkb = C.cdiv(s, block_k)
  d_pad = max(16, C.next_pow2(d))
  qranges = jnp.stack([qa, qn], axis=-1).astype(jnp.int32)      # [B, Hkv, nkb, 2]
  kernel = functools.partial(_colsum_kernel_gpu, spec=spec, block_q=block_q,
                             block_k=block_k, num_queries=tq, head_dim=d)
  out = pl.pallas_call(
      kernel,
      grid=(b, hkv, nkb),
      in_specs=[
          pl.BlockSpec((_SQ, _SQ), lambda bi, hi, kb: (bi, hi)),
          pl.BlockSpec((_SQ, _SQ, _SQ, 2), lambda bi, hi, kb: (bi, hi, kb, 0)),
          pl.BlockSpec((_SQ, tq), lambda bi, hi, kb: (bi, 0)),
          pl.BlockSpec((_SQ, g, tq, d_pad), lambda bi, hi, kb: (bi, hi, 0, 0)),
          pl.BlockSpec((_SQ, g, tq), lambda bi, hi, kb: (bi, hi, 0)),
          pl.BlockSpec((_SQ, _SQ, s), lambda bi, hi, kb: (bi, hi, 0)),
          pl.BlockSpec((_SQ, _SQ, s, d_pad), lambda bi, hi, kb: (bi, hi, 0, 0)),
      ],
      out_specs=pl.BlockSpec((_SQ, _SQ, block_k), lambda bi, hi, kb: (bi, hi, kb)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, nkb * block_k), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=C.resolve_interpret("gpu", interpret),
      name="attention_colsum_gpu",
  )(k_lengths, qranges, qpos, q, lse, k_positions, k)
  return out[:, :, :s]


def resolve_block_q(platform: str, block_q: int | None, num_queries: int) -> tuple[int, int]:
  """(block_q, padded query count) for a query axis of `num_queries`."""
  bq = DEFAULT_BLOCK_Q[platform] if block_q is None else block_q
  if not isinstance(bq, int) or bq < 1:
    raise ValueError(f"block_q={block_q!r}; must be a positive int")
  if platform == "tpu":
    if bq % C.SUBLANES:
      raise ValueError(f"block_q={bq}; the TPU kernels need a multiple of {C.SUBLANES}")
    if num_queries <= bq:
      bq = C.round_up(num_queries, C.SUBLANES)
      return bq, bq
    return bq, num_queries
  if bq < 16 or bq & (bq - 1):
    raise ValueError(f"block_q={bq}; the GPU kernels need a power of two >= 16")
  return min(bq, max(16, C.next_pow2(num_queries))), num_queries


@functools.partial(
    jax.jit,
    static_argnames=("scale", "causal", "window", "n_sink", "softcap", "block_q",
                     "block_k", "platform", "interpret", "num_warps", "num_stages"))
def attention_colsum(q, k, lse, k_lengths, *, q_positions, k_positions, scale: float,
                     causal: bool = True, window: int | None = None, n_sink: int = 0,
                     softcap: float | None = None, block_q: int | None = None,
                     block_k: int | None = None, platform: str = "gpu",
                     interpret: Any = False, num_warps: int = 4, num_stages: int = 2):
  """colsum [B, Hkv, S] float32 from queries and their final lse.

  Args:
    q: [B, Hq, Tq, D]; k: [B, Hkv, S, D].
    lse: [B, Hq, Tq] float32, the final log-sum-exp of each query (sinks included).
    k_lengths: [B, Hkv] int32.
    q_positions: [B, Tq] int32; -1 for every query that must not count.
    k_positions: [B, Hkv, S] int32.
    scale, causal, window, n_sink, softcap: as in the forward pass.
    block_q / block_k: query / slot block sizes (TPU: multiples of 8 / 128; GPU: powers
      of two >= 16). block_k defaults to the decode kernel's.
    platform, interpret, num_warps, num_stages: see `decode_attention`.
  """
  from pallas_kernels import decode_attention as dec  # pylint: disable=g-import-not-at-top
  C.check_platform(platform)
  b, hq, tq, d = q.shape
  _, hkv, s, _ = k.shape
  if lse.shape != (b, hq, tq):
    raise ValueError(f"lse shape {lse.shape}; expected {(b, hq, tq)}")
  bk = dec.resolve_block_k(platform, block_k, s)
  bq, tq_pad = resolve_block_q(platform, block_q, tq)
  spec = C.MaskSpec(scale=scale, causal=causal, window=window, n_sink=n_sink,
                    softcap=softcap)
  q_positions = q_positions.astype(jnp.int32)
  k_positions = k_positions.astype(jnp.int32)
  k_lengths = jnp.clip(k_lengths.astype(jnp.int32), 0, s)
  lse = lse.astype(jnp.float32)
  if tq_pad != tq:  # small query axis (decode): pad to one aligned block
    q = jnp.pad(q, ((0, 0), (0, 0), (0, tq_pad - tq), (0, 0)))
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, tq_pad - tq)))
    q_positions = jnp.pad(q_positions, ((0, 0), (0, tq_pad - tq)), constant_values=-1)
  qa, qn = C.query_ranges(q_positions, k_positions, k_lengths, block_q=bq, block_k=bk,
                          spec=spec)
  if platform == "tpu":
    return _colsum_tpu(q, k, lse, q_positions, k_positions, k_lengths, qa, qn, spec=spec,
                       block_q=bq, block_k=bk, interpret=interpret)
  return _colsum_gpu(q, k, lse, q_positions, k_positions, k_lengths, qa, qn, spec=spec,
                     block_q=bq, block_k=bk, interpret=interpret, num_warps=num_warps,
                     num_stages=num_stages)


def select_last_queries(q, lse, q_positions, colsum_window: int):
  """Gathers the <= colsum_window queries of each row that count for a windowed colsum.

  With distinct positions per row (token positions), the queries with
  q_pos > max(q_pos) - W are among the W largest positions, so a static-size top-k picks
  a superset; the rest get position -1. Returns q [B, Hq, W', D], lse [B, Hq, W'],
  positions [B, W'] with W' = min(W, T).
  """
  t = q_positions.shape[-1]
  w = min(colsum_window, t)
  _, idx = lax.top_k(q_positions, w)                                # [B, W']
  pos = C.colsum_query_positions(q_positions, colsum_window)
  pos = jnp.take_along_axis(pos, idx, axis=1)
  q_sel = jnp.take_along_axis(q, idx[:, None, :, None], axis=2)
  lse_sel = jnp.take_along_axis(lse, idx[:, None, :], axis=2)
  return q_sel, lse_sel, pos
