"""Ragged decode attention that reads a quantized KV cache directly (INT8/4/2, FP8, KIVI).

The kernel streams the cache as stored -- integer codes packed along the head dim, FP8
codes, their scales and zero points -- and dequantizes each block in VMEM (TPU) or
registers (GPU); no dequantized copy of the cache is ever written to HBM, so a decode step
reads `bits / 16` of the bytes of a bf16 cache plus the scales. KIVI (Liu et al., 2024):
keys quantized per channel over groups of G tokens, values per token over groups of
channels, the most recent tokens kept exactly in a residual window; the per-token INT8 and
FP8 (Micikevicius et al., 2022) formats are the same kernel with other scale layouts.

Layout (docs/CONVENTIONS.md legend; Sq quantized slots, per = 8 // bits codes per byte,
Dp = D // per; exactly `kvjax.quant.QuantizedKVCache`'s quantized region):

  k_codes   [B, Hkv, Sq, Dp] uint8     integer codes, code `j*per + i` in bits
                                       [i*bits, (i+1)*bits) of byte j (low bits first)
            [B, Hkv, Sq, D] float8     FP8 codes (fmt "fp8_e4m3" | "fp8_e5m2")
  k_scale   [B, Hkv, Sq, D // g]       k_axis="token": per token, channel groups of g
            [B, Hkv, Sq // G, D]       k_axis="channel": per channel, token groups of G
  k_zero    like k_scale, or None      None = symmetric codes
  v_*       the same for values (v_axis, v_bits)
  k_positions [B, Hkv, Sq] int32, k_lengths [B, Hkv] int32 (valid quantized slots)
  optional residual window, exact: k_res [B, Hkv, R, D], v_res [B, Hkv, R, Dv],
  res_positions [B, Hkv, R], res_lengths [B, Hkv]

Dequantization: int asymmetric x = q * scale + zero, symmetric x = (q - 2**(bits-1)) *
scale; fp8 x = float(code) * scale (kvjax.quant.formats).

The cache is a KV source (`kv_source.ContiguousKV` with quantized `KVFormat`s) of the
one decode pipeline (`decode_attention.decode_with_source`): rows = queries x group,
split-K over the valid blocks with an exact merge, blocks past `k_lengths` never loaded,
windows / sinks / soft-cap / positions as data. What is particular to quantized storage --
code planes instead of unpacking, scales folded or expanded where they are cheapest -- is
in `kv_source.py`. The residual window (and any other exact slots) is attended by the
dense source and merged with the quantized part by an exact log-sum-exp combine, like two
split-K parts.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from pallas_kernels import _common as C
from pallas_kernels import decode_attention as dense
from pallas_kernels import kv_source as S
from pallas_kernels.reference import attention_reference

DEFAULT_BLOCK_K = {"tpu": 512, "gpu": 64}


def block_unit(formats) -> int:
  """TPU key-block multiple: 128 lanes, and 16 token groups of a per-channel scale."""
  unit = C.LANES
  for f in formats:
    if f.axis == "channel":
      unit = max(unit, 16 * f.group)
  return unit


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------

_STATIC = ("fmt", "k_bits", "v_bits", "k_axis", "v_axis", "group_size", "scale", "causal",
           "window", "n_sink", "softcap", "block_k", "num_splits", "platform",
           "interpret", "num_warps", "num_stages")


@functools.partial(jax.jit, static_argnames=_STATIC)
def quantized_decode_attention(
    q, k_codes, k_scale, v_codes, v_scale, k_lengths, *, q_positions, k_positions,
    k_zero=None, v_zero=None, k_res=None, v_res=None, res_positions=None, res_lengths=None,
    sink_logits=None, fmt: str = "int", k_bits: int = 8, v_bits: int = 8,
    k_axis: str = "token", v_axis: str = "token", group_size: Optional[int] = None,
    scale: Optional[float] = None, causal: bool = True, window: Optional[int] = None,
    n_sink: int = 0, softcap: Optional[float] = None, block_k: Optional[int] = None,
    num_splits: Optional[int] = None, platform: str = "gpu", interpret: Any = False,
    num_warps: int = 4, num_stages: int = 2):
  """Ragged decode attention over a quantized cache (+ optional exact residual window).

  Args:
    q: [B, Hq, T, D] queries (float32 / bfloat16), T small.
    k_codes, k_scale, v_codes, v_scale, k_zero, v_zero: the quantized region in
      `kvjax.quant` layout (module docstring); zeros None = symmetric codes.
    k_lengths: [B, Hkv] valid quantized slots (slots >= length are never read).
    q_positions: [B, T] int32 (-1 = padding query); k_positions: [B, Hkv, Sq] int32.
    k_res, v_res, res_positions, res_lengths: optional exact residual window
      ([B, Hkv, R, D], [B, Hkv, R, Dv], [B, Hkv, R], [B, Hkv]).
    sink_logits: optional [Hq] learned sink logits (denominator only).
    fmt: "int" | "fp8_e4m3" | "fp8_e5m2". k_bits / v_bits: 2, 4, 8 for "int".
    k_axis / v_axis: "token" | "channel"; group_size: channels per scale on a token axis
      (None = the whole head), tokens per scale on a channel axis (kvjax QuantSpec).
    scale, causal, window, n_sink, softcap: docs/CONVENTIONS.md.
    block_k: slots per block (TPU: multiple of 128 and of 16 token groups for channel
      scales, default 512; GPU: power of two >= 16, default 64).
    num_splits: split-K parts (default 1 on TPU, enough programs to fill a GPU).
    platform: "tpu" | "gpu"; interpret: interpret mode (CPU tests).
    num_warps, num_stages: Triton options.

  Returns:
    out [B, Hq, T, Dv] (q.dtype), lse [B, Hq, T] float32.
  """
  C.check_platform(platform)
  if fmt not in S.FORMATS[1:]:
    raise ValueError(f"fmt={fmt!r}; allowed: {S.FORMATS[1:]}")
  if k_codes.ndim != 4 or v_codes.ndim != 4:
    raise ValueError(f"codes must be rank 4; got k_codes{k_codes.shape}, "
                     f"v_codes{v_codes.shape}")
  b, hq, t, d = q.shape
  _, hkv, sq, _ = k_codes.shape
  dense.check_queries(q, k_lengths, q_positions, k_positions, sink_logits, hkv, sq)
  kf, vf = S.make_formats(fmt, k_bits, v_bits, k_axis, v_axis, group_size, k_zero, v_zero)
  dv = v_codes.shape[-1] * vf.per
  C.check_head_dim("value head_dim", dv)
  kf.check(k_codes, k_scale, k_zero, dim=d, slots=sq, what="k")
  vf.check(v_codes, v_scale, v_zero, dim=dv, slots=sq, what="v")
  if v_codes.shape[:3] != (b, hkv, sq):
    raise ValueError(f"v_codes shape {v_codes.shape}; expected leading dims {(b, hkv, sq)}")
  res = (k_res, v_res, res_positions, res_lengths)
  if any(x is not None for x in res) and not all(x is not None for x in res):
    raise ValueError("k_res, v_res, res_positions and res_lengths go together")
  if k_res is not None:
    nr = k_res.shape[2]
    if (k_res.shape != (b, hkv, nr, d) or v_res.shape != (b, hkv, nr, dv)
        or res_positions.shape != (b, hkv, nr) or res_lengths.shape != (b, hkv)):
      raise ValueError(f"residual shapes k_res{k_res.shape} v_res{v_res.shape} "
                       f"res_positions{res_positions.shape} res_lengths{res_lengths.shape}; "
                       f"expected {(b, hkv, 'R', d)}, {(b, hkv, 'R', dv)}, "
                       f"{(b, hkv, 'R')}, {(b, hkv)}")
  spec = dense.mask_spec(d, scale=scale, causal=causal, window=window,
                         n_sink=n_sink, softcap=softcap)
  bk = dense.resolve_block_k(platform, block_k, sq, default=DEFAULT_BLOCK_K[platform],
                             unit=block_unit((kf, vf)))
  splits = dense.resolve_splits(platform, num_splits, b, hkv, C.cdiv(sq, bk))
  q_positions = q_positions.astype(jnp.int32)
  k_positions = k_positions.astype(jnp.int32)
  k_lengths = jnp.clip(k_lengths.astype(jnp.int32), 0, sq)
  source = S.ContiguousKV(kf, vf, d, dv, sq)
  arrays = [k_positions] + [a for a in (k_codes, k_scale, k_zero, v_codes, v_scale, v_zero)
                            if a is not None]
  exact = None if k_res is None else (k_res, v_res, res_positions, res_lengths)
  return dense.decode(source, arrays, q, k_lengths, q_positions, k_positions=k_positions,
                      exact=exact, sink_logits=sink_logits, spec=spec, block_k=bk,
                      num_splits=splits, platform=platform, interpret=interpret,
                      num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("fmt", "k_bits", "v_bits", "k_axis", "v_axis",
                                             "group_size", "scale", "causal", "window",
                                             "n_sink", "softcap"))
def quantized_decode_reference(
    q, k_codes, k_scale, v_codes, v_scale, k_lengths, *, q_positions, k_positions,
    k_zero=None, v_zero=None, k_res=None, v_res=None, res_positions=None, res_lengths=None,
    sink_logits=None, fmt="int", k_bits=8, v_bits=8, k_axis="token", v_axis="token",
    group_size=None, scale=None, causal=True, window=None, n_sink=0, softcap=None):
  """Pure-jnp reference: dequantize the whole cache, append the residual, attend.

  Same arguments as `quantized_decode_attention`; returns (out, lse).
  """
  kf, vf = S.make_formats(fmt, k_bits, v_bits, k_axis, v_axis, group_size, k_zero, v_zero)
  d = q.shape[-1]
  dv = v_codes.shape[-1] * vf.per
  sq = k_codes.shape[2]
  k = S.dequantize(k_codes, k_scale, k_zero, kf, d)
  v = S.dequantize(v_codes, v_scale, v_zero, vf, dv)
  slot = jnp.arange(sq, dtype=jnp.int32)
  pos = jnp.where(slot < k_lengths[..., None], k_positions, -1)
  if k_res is not None:
    nr = k_res.shape[2]
    rslot = jnp.arange(nr, dtype=jnp.int32)
    k = jnp.concatenate([k, k_res.astype(jnp.float32)], axis=2)
    v = jnp.concatenate([v, v_res.astype(jnp.float32)], axis=2)
    pos = jnp.concatenate([pos, jnp.where(rslot < res_lengths[..., None], res_positions, -1)],
                          axis=-1)
  lengths = jnp.full(k_lengths.shape, k.shape[2], jnp.int32)
  out, lse, _ = attention_reference(q, k, v, lengths, q_positions=q_positions,
                                    k_positions=pos, scale=scale, causal=causal,
                                    window=window, n_sink=n_sink, softcap=softcap,
                                    sink_logits=sink_logits)
  return out, lse
