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

How the kernel avoids re-interleaving packed codes: byte j of a row holds channels
j*per .. j*per + per - 1, so the kernel splits a block of codes into `per` *planes*
(plane i = bits [i*bits, (i+1)*bits) of every byte = channels i, per + i, 2 per + i, ...)
and the wrapper splits the queries the same way (q_i = q[:, i::per]), so
q . k = sum_i q_i . plane_i with no lane shuffles; value planes accumulate into `per`
separate [R, Dp] accumulators that the wrapper re-interleaves (a [B, Hq, T, Dv] epilogue).
Scales are applied where they are cheapest:

* one scale (and zero) per token (INT8 / FP8 / per-token INT4 without channel groups):
  folded into the logits, `s = (q . codes) * scale + sum(q) * zero`, and into the
  probabilities, `p @ v = (p * scale) @ codes + (p . zero)`: no per-element work;
* per-token channel groups (KIVI values): expanded per plane inside the kernel
  (a select per group on TPU, an indexed load on GPU), then `codes * scale + zero`;
* per-channel scales over token groups (KIVI keys): on TPU the [bk / G, D] scale block is
  de-interleaved into planes with exact one-hot matmuls (the scale split into two bf16
  halves) and broadcast over the G tokens of each group; on GPU one indexed load
  `scale[slot // G, j * per + i]` does both.

The residual window (and any other exact slots) is attended by the dense decode kernel
(`decode_attention.decode_with_source` with `PlainKV`) and merged with the quantized part
by an exact log-sum-exp combine, like two split-K parts.

Everything else is the ragged decode pipeline of `decode_attention.py`: rows = queries x
group (each block read once per kv head), split-K over the valid blocks with an exact
merge, blocks past `k_lengths` never loaded (TPU: the index map repeats the last valid
block, so no DMA; GPU: the loop stops), windows / sinks / soft-cap / positions as data,
and the TPU grid (B, Hkv, splits, steps) / GPU grid (B, Hkv, splits).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as C
from pallas_kernels import decode_attention as dense
from pallas_kernels.reference import attention_reference

FORMATS = ("float", "int", "fp8_e4m3", "fp8_e5m2")
INT_BITS = (2, 4, 8)
_FP8 = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
_SQ = None
DEFAULT_BLOCK_K = {"tpu": 512, "gpu": 64}


# ----------------------------------------------------------------------------------------
# Static description of a stored K or V tensor
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KVFormat:
  """How one of K / V is stored (static, hashable).

  Attributes:
    fmt: "float" (plain values, no scales), "int" (codes, packed below 8 bits),
      "fp8_e4m3" | "fp8_e5m2".
    bits: 2, 4 or 8 for "int" (8 for FP8; ignored for "float").
    axis: "token" (scale per token and channel group) or "channel" (scale per channel
      and token group; KIVI keys).
    group: channels per scale for "token" (None = all of the head dim), tokens per scale
      for "channel" (required).
    symmetric: "int" codes without zero point (x = (q - 2**(bits-1)) * scale).
  """
  fmt: str = "float"
  bits: int = 8
  axis: str = "token"
  group: Optional[int] = None
  symmetric: bool = True

  def __post_init__(self):
    if self.fmt not in FORMATS:
      raise ValueError(f"fmt={self.fmt!r}; allowed: {FORMATS}")
    if self.fmt == "int" and self.bits not in INT_BITS:
      raise ValueError(f"bits={self.bits!r}; allowed for fmt='int': {INT_BITS}")
    if self.fmt.startswith("fp8") and self.bits != 8:
      raise ValueError(f"bits={self.bits!r}; FP8 codes have 8 bits")
    if self.axis not in ("token", "channel"):
      raise ValueError(f"axis={self.axis!r}; allowed: ('token', 'channel')")
    if self.axis == "channel" and (self.fmt != "int" or not self.group):
      raise ValueError(f"axis='channel' needs fmt='int' and a token group; got "
                       f"fmt={self.fmt!r}, group={self.group!r}")
    if self.group is not None and (not isinstance(self.group, int) or self.group < 1):
      raise ValueError(f"group={self.group!r}; must be a positive int or None")

  @property
  def per(self) -> int:
    """Codes per stored element of the last axis (packing factor)."""
    return 8 // self.bits if self.fmt == "int" else 1

  @property
  def has_scale(self) -> bool:
    return self.fmt != "float"

  @property
  def has_zero(self) -> bool:
    return self.fmt == "int" and not self.symmetric

  def num_arrays(self) -> int:
    return 1 + self.has_scale + self.has_zero

  def channel_group(self, dim: int) -> int:
    return dim if self.group is None else self.group

  def scale_mode(self, dim: int) -> Optional[str]:
    """None (no scale), "token1" (one scale per token), "tokens" (channel groups) or
    "channel" (per channel over token groups)."""
    if not self.has_scale:
      return None
    if self.axis == "channel":
      return "channel"
    return "token1" if self.channel_group(dim) == dim else "tokens"

  def check(self, codes, scale, zero, *, dim: int, slots: int, what: str):
    """ValueError (naming `what` and the values) unless the arrays fit this format."""
    lead = codes.shape[:3]
    want_codes = lead + (dim // self.per,)
    if dim % self.per:
      raise ValueError(f"{what}: head dim {dim} is not a multiple of {self.per} "
                       f"({self.bits}-bit codes pack {self.per} per byte)")
    if codes.shape != want_codes:
      raise ValueError(f"{what} codes shape {codes.shape}; expected {want_codes}")
    if self.fmt == "int" and codes.dtype != jnp.uint8:
      raise ValueError(f"{what} codes dtype {codes.dtype}; fmt='int' stores uint8")
    if self.fmt in _FP8 and codes.dtype not in (jnp.dtype(_FP8[self.fmt]),
                                                 jnp.dtype(jnp.uint8)):
      raise ValueError(f"{what} codes dtype {codes.dtype}; fmt={self.fmt!r} stores "
                       f"{jnp.dtype(_FP8[self.fmt]).name} or its uint8 bit patterns")
    if self.fmt == "float" and not jnp.issubdtype(codes.dtype, jnp.floating):
      raise ValueError(f"{what} dtype {codes.dtype}; fmt='float' needs a float dtype")
    if not self.has_scale:
      if scale is not None or zero is not None:
        raise ValueError(f"{what}: fmt='float' takes no scale/zero")
      return
    if scale is None:
      raise ValueError(f"{what}: fmt={self.fmt!r} needs a scale array")
    if self.axis == "token":
      g = self.channel_group(dim)
      if dim % g:
        raise ValueError(f"{what}: group_size={g} must divide head dim {dim}")
      want = lead + (dim // g,)
    else:
      if slots % self.group:
        raise ValueError(f"{what}: quantized slots {slots} must be a multiple of the token "
                         f"group {self.group}")
      want = lead[:2] + (slots // self.group, dim)
    if scale.shape != want:
      raise ValueError(f"{what} scale shape {scale.shape}; expected {want}")
    if self.has_zero != (zero is not None):
      raise ValueError(f"{what}: zero is {'missing' if zero is None else 'given'} but the "
                       f"format is {'asymmetric' if self.has_zero else 'symmetric'}")
    if zero is not None and zero.shape != want:
      raise ValueError(f"{what} zero shape {zero.shape}; expected {want}")


def unpack_codes(codes, bits: int, dim: int):
  """uint8 [..., dim * bits / 8] -> int32 codes [..., dim] (kvjax.quant.packing order)."""
  c = codes.astype(jnp.int32)
  if bits == 8:
    return c
  per = 8 // bits
  shifts = jnp.arange(per, dtype=jnp.int32) * bits
  x = (c[..., None] >> shifts) & ((1 << bits) - 1)
  return x.reshape(*codes.shape[:-1], dim)


def dequantize(codes, scale, zero, fmt: KVFormat, dim: int):
  """Reference dequantization (jnp, float32): codes [..., S, *] -> [..., S, dim]."""
  if fmt.fmt == "float":
    return codes.astype(jnp.float32)
  if fmt.fmt == "int":
    x = unpack_codes(codes, fmt.bits, dim).astype(jnp.float32)
    if fmt.symmetric:
      x = x - 2 ** (fmt.bits - 1)
  elif codes.dtype == jnp.uint8:   # FP8 bit patterns (kvjax.quant stores them so)
    x = lax.bitcast_convert_type(codes, _FP8[fmt.fmt]).astype(jnp.float32)
  else:
    x = codes.astype(jnp.float32)
  def expand(a):
    a = a.astype(jnp.float32)
    if fmt.axis == "token":
      return jnp.repeat(a, fmt.channel_group(dim), axis=-1)
    return jnp.repeat(a, fmt.group, axis=-2)
  x = x * expand(scale)
  if zero is not None:
    x = x + expand(zero)
  return x


# ----------------------------------------------------------------------------------------
# In-kernel math shared by the TPU and GPU kernels (contiguous and paged)
# ----------------------------------------------------------------------------------------

class Block(NamedTuple):
  """A loaded K or V block of n slots, ready for the attention math.

  planes: per-plane [n, Dp] values: the stored block itself ("float"), or float32 codes
    with the symmetric offset removed. s_row / z_row: [1, n] float32 per-token scale and
    zero (folded into logits / probabilities). s_full / z_full: per-plane [n, Dp] float32
    expanded scales and zeros. At most one of the two scale forms is set.
  """
  planes: tuple
  s_row: Any = None
  z_row: Any = None
  s_full: Any = None
  z_full: Any = None


def fp8_bits_to_float(codes, fmt: str):
  """uint8 FP8 bit patterns -> float32 with integer ops and one 32-bit bitcast.

  Portable across Mosaic, Triton and interpret mode (no float8 vector types needed).
  e4m3fn: 4 exponent bits (bias 7), 3 mantissa bits; e5m2: 5 (bias 15), 2. Subnormals
  are exact; NaN/inf patterns (never produced by the quantizer) decode to finite values.
  """
  ebits, mbits, bias = (4, 3, 7) if fmt == "fp8_e4m3" else (5, 2, 15)
  c = codes.astype(jnp.int32)
  sign = (c >> 7) & 1
  e = (c >> mbits) & ((1 << ebits) - 1)
  m = c & ((1 << mbits) - 1)
  normal = lax.bitcast_convert_type(
      (sign << 31) | ((e + (127 - bias)) << 23) | (m << (23 - mbits)), jnp.float32)
  sub = m.astype(jnp.float32) * float(2.0 ** (1 - bias - mbits))
  sub = jnp.where(sign == 1, -sub, sub)
  return jnp.where(e == 0, sub, normal)


def code_planes(codes, fmt: KVFormat):
  """Stored block [n, Dp] -> tuple of `per` planes [n, Dp] (float32 except 'float')."""
  if fmt.fmt == "float":
    return (codes,)
  if fmt.fmt != "int":
    if codes.dtype == jnp.uint8:
      return (fp8_bits_to_float(codes, fmt.fmt),)
    return (codes.astype(jnp.float32),)
  c = codes.astype(jnp.int32)
  mask = (1 << fmt.bits) - 1
  offset = float(2 ** (fmt.bits - 1)) if fmt.symmetric else 0.0
  planes = []
  for i in range(fmt.per):
    x = c if fmt.bits == 8 else (c >> (i * fmt.bits)) & mask
    x = x.astype(jnp.float32)
    planes.append(x - offset if offset else x)
  return tuple(planes)


def _dot_nt(a, b):
  return lax.dot_general(a, b, C._NT, preferred_element_type=jnp.float32)  # pylint: disable=protected-access


def _dot_nn(a, b):
  return lax.dot_general(a, b, C._NN, preferred_element_type=jnp.float32)  # pylint: disable=protected-access


def block_logits(q_planes, kb: Block, spec: C.MaskSpec, mm_dtype):
  """Scaled, soft-capped float32 logits [R, n] of q (split in planes) against a K block."""
  s = None
  for i, x in enumerate(kb.planes):
    if kb.s_full is not None:
      x = x * kb.s_full[i]
      if kb.z_full is not None:
        x = x + kb.z_full[i]
    part = _dot_nt(q_planes[i].astype(mm_dtype), x.astype(mm_dtype))
    s = part if s is None else s + part
  if kb.s_row is not None:
    s = s * kb.s_row
    if kb.z_row is not None:
      qsum = None
      for qi in q_planes:
        t = jnp.sum(qi.astype(jnp.float32), axis=1, keepdims=True)
        qsum = t if qsum is None else qsum + t
      s = s + qsum * kb.z_row
  s = s * spec.scale
  if spec.softcap is not None:
    s = spec.softcap * jnp.tanh(s / spec.softcap)
  return s


def softmax_update(s, vis, m_prev, l_prev):
  """Online-softmax bookkeeping (Dao et al., 2022): returns (p, alpha, m_new, l_new).

  Masked probabilities are exact zeros, so rows with nothing visible keep m = -1e30, l = 0.
  """
  s = jnp.where(vis, s, C.NEG_INF)
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp(m_prev - m_new)
  p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
  l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  return p, alpha, m_new, l_new


def block_pv(p, vb: Block, valid_col, valid_row, mm_dtype, fmt: KVFormat):
  """Per-plane contributions p @ V_i: list of [R, Dp] float32.

  Slots outside the length may hold garbage (even NaN, or be past the array in a partial
  block): their scales/zeros/values are zeroed before they meet p, so 0 * NaN never
  happens. Integer codes are always finite.
  """
  out = []
  for i, x in enumerate(vb.planes):
    if fmt.fmt != "int":
      x = jnp.where(valid_col, x, 0)
    if vb.s_row is not None:
      ps = p * jnp.where(valid_row, vb.s_row, 0.0)
      c = _dot_nn(ps.astype(mm_dtype), x.astype(mm_dtype))
      if vb.z_row is not None:
        c = c + jnp.sum(p * jnp.where(valid_row, vb.z_row, 0.0), axis=1, keepdims=True)
    else:
      if vb.s_full is not None:
        x = x * vb.s_full[i]
        if vb.z_full is not None:
          x = x + vb.z_full[i]
        x = jnp.where(valid_col, x, 0.0)
      c = _dot_nn(p.astype(mm_dtype), x.astype(mm_dtype))
    out.append(c)
  return out


def split_query_planes(q_rows, per: int):
  """[..., R, D] -> [..., per, R, D // per] with plane i = channels i, per + i, ..."""
  *lead, r, d = q_rows.shape
  x = q_rows.reshape(*lead, r, d // per, per)
  return jnp.moveaxis(x, -1, -3)


def merge_value_planes(o, dv: int):
  """[..., per, R, Dp_pad] -> [..., R, Dv] (inverse of the plane split on the value side)."""
  per = o.shape[-3]
  dp = dv // per
  o = o[..., :dp]
  o = jnp.moveaxis(o, -3, -1)                      # [..., R, Dp, per]
  return o.reshape(*o.shape[:-2], dv)


# ----------------------------------------------------------------------------------------
# TPU loads: blocks arrive in VMEM by BlockSpec; scales are expanded here
# ----------------------------------------------------------------------------------------

def _deinterleave_exact(s, per: int, i: int):
  """Columns i, per + i, ... of s [n, D] float32 via one-hot MXU matmuls, exactly.

  s is split into a bf16 high part and a bf16 remainder (exact for float16 / bfloat16
  scales, ~2^-17 relative for float32), each multiplied by a 0/1 matrix with float32
  accumulation, so every output is a single exact product.
  """
  d = s.shape[-1]
  dp = d // per
  rows = lax.broadcasted_iota(jnp.int32, (d, dp), 0)
  cols = lax.broadcasted_iota(jnp.int32, (d, dp), 1)
  onehot = (rows == cols * per + i).astype(jnp.bfloat16)
  hi = s.astype(jnp.bfloat16)
  lo = (s - hi.astype(jnp.float32)).astype(jnp.bfloat16)
  return _dot_nn(hi, onehot) + _dot_nn(lo, onehot)


def tpu_expand_scale(ref, fmt: KVFormat, mode: str, n: int, dim: int, col_layout=False):
  """Per-plane [n, Dp] float32 scales (or zeros) from a VMEM block ref.

  mode "tokens" (or "token1" with `col_layout`): ref is [n, D // g]; "channel": ref is
  [n // G, D].
  """
  per = fmt.per
  dp = dim // per
  if mode == "channel":
    s = ref[...].astype(jnp.float32)                     # [n // G, D]
    g = fmt.group
    out = []
    for i in range(per):
      si = s if per == 1 else _deinterleave_exact(s, per, i)   # [n // G, Dp]
      si = jnp.broadcast_to(si[:, None, :], (n // g, g, dp)).reshape(n, dp)
      out.append(si)
    return tuple(out)
  g = fmt.channel_group(dim)
  ng = dim // g
  lane = lax.broadcasted_iota(jnp.int32, (1, dp), 1)
  out = []
  for i in range(per):
    if ng == 1:
      out.append(jnp.broadcast_to(ref[...].astype(jnp.float32), (n, dp)))
      continue
    grp = lax.div(lane * per + i, g)       # lax.div: jnp's // adds sign fix-ups
    si = jnp.zeros((n, dp), jnp.float32)
    for gr in range(ng):
      col = ref[:, pl.ds(gr, 1)].astype(jnp.float32)      # [n, 1]
      si = jnp.where(grp == gr, col, si)
    out.append(si)
  return tuple(out)


def tpu_block(refs, fmt: KVFormat, mode: Optional[str], n: int, dim: int,
              col_layout: bool = False) -> Block:
  """A Block from VMEM refs (codes, [scale, [zero]]).

  mode "token1" with row layout: scale/zero refs are [1, n] rows (folded). With
  `col_layout` (paged pools), "token1" scale refs are [n, 1] columns, expanded.
  """
  planes = code_planes(refs[0][...], fmt)
  if mode is None:
    return Block(planes)
  zref = refs[2] if fmt.has_zero else None
  if mode == "token1" and not col_layout:
    return Block(planes, s_row=refs[1][...].astype(jnp.float32),
                 z_row=None if zref is None else zref[...].astype(jnp.float32))
  s = tpu_expand_scale(refs[1], fmt, mode, n, dim, col_layout)
  z = None if zref is None else tpu_expand_scale(zref, fmt, mode, n, dim, col_layout)
  return Block(planes, s_full=s, z_full=z)


# ----------------------------------------------------------------------------------------
# GPU loads: indexed (gather) loads straight from HBM, masked
# ----------------------------------------------------------------------------------------

def gpu_block(refs, fmt: KVFormat, mode: Optional[str], dim: int, rows, valid, dp_pad: int,
              row_index=None) -> Block:
  """A Block from whole-array refs with indexed loads.

  Args:
    refs: (codes, [scale, [zero]]) refs whose leading index is built by `row_index`.
    rows: [n] int32 slot of each block row in the (b, h) slot axis (contiguous layout).
    valid: [n] bool rows to load (others read as 0).
    dp_pad: padded plane width (power of two >= 16); columns >= Dp read as 0.
    row_index: fn(rows_2d) -> tuple of leading indices (default: (rows_2d,)); the paged
      kernel maps slots to (page, head, offset) here.
  """
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  index = row_index or (lambda r: (r,))
  n = rows.shape[0]
  per = fmt.per
  dp = dim // per
  col = lax.broadcasted_iota(jnp.int32, (n, dp_pad), 1)
  row2 = jnp.broadcast_to(rows[:, None], (n, dp_pad))
  m2 = valid[:, None] & (col < dp)

  def load(ref, cols, mask, row_ix=None, other=0):
    r = row2 if row_ix is None else row_ix
    return plgpu.load(ref.at[(*index(r), jnp.minimum(cols, ref.shape[-1] - 1))], mask=mask,
                      other=other)

  codes = load(refs[0], col, m2)
  planes = code_planes(codes, fmt)
  if fmt.fmt == "int" and fmt.symmetric:
    # Padded columns hold code 0, i.e. -offset after the shift: zero them.
    planes = tuple(jnp.where(col < dp, x, 0.0) for x in planes)
  if mode is None:
    return Block(planes)
  zref = refs[2] if fmt.has_zero else None
  if mode == "token1":
    def row_vec(ref):
      v = plgpu.load(ref.at[(*index(rows), jnp.zeros_like(rows))], mask=valid, other=0.0)
      return v.astype(jnp.float32)[None, :]
    return Block(planes, s_row=row_vec(refs[1]),
                 z_row=None if zref is None else row_vec(zref))
  out_s, out_z = [], []
  for i in range(per):
    if mode == "tokens":
      cols = lax.div(col * per + i, fmt.channel_group(dim))
      row_ix = None
    else:  # "channel": scale row = slot // G, column = channel j * per + i
      cols = col * per + i
      row_ix = lax.div(row2, fmt.group)
    out_s.append(load(refs[1], cols, m2, row_ix, 0.0).astype(jnp.float32))
    if zref is not None:
      out_z.append(load(zref, cols, m2, row_ix, 0.0).astype(jnp.float32))
  return Block(planes, s_full=tuple(out_s), z_full=tuple(out_z) if zref is not None else None)


# ----------------------------------------------------------------------------------------
# Kernels (contiguous quantized cache)
# ----------------------------------------------------------------------------------------

class _Static(NamedTuple):
  kf: KVFormat
  vf: KVFormat
  d: int
  dv: int
  spec: C.MaskSpec
  block_k: int
  num_splits: int
  mm_dtype: Any


def _kernel_tpu(lengths_ref, ranges_ref, qpos_ref, q_ref, kpos_ref, *refs, st: _Static,
                num_kv_heads: int):
  nk, nv = st.kf.num_arrays(), st.vf.num_arrays()
  k_refs, v_refs = refs[:nk], refs[nk:nk + nv]
  o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[nk + nv:]
  b, h, split, i = (pl.program_id(0), pl.program_id(1), pl.program_id(2),
                    pl.program_id(3))
  bh = b * num_kv_heads + h
  length = lengths_ref[bh]
  a1, n1, a2, n2 = (ranges_ref[4 * bh], ranges_ref[4 * bh + 1], ranges_ref[4 * bh + 2],
                    ranges_ref[4 * bh + 3])
  start, end = dense._split_bounds(a1, n1, a2, n2, split, st.num_splits)  # pylint: disable=protected-access
  bk = st.block_k

  @pl.when(i == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, C.NEG_INF, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  step = start + i

  @pl.when(step < end)
  def _compute():
    first = C.step_to_block(step, a1, n1, a2) * bk
    slot_row = first + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    slot_col = first + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    kb = tpu_block(k_refs, st.kf, st.kf.scale_mode(st.d), bk, st.d)
    vb = tpu_block(v_refs, st.vf, st.vf.scale_mode(st.dv), bk, st.dv)
    q_planes = [q_ref[j] for j in range(st.kf.per)]
    s = block_logits(q_planes, kb, st.spec, st.mm_dtype)
    vis = C.visible(qpos_ref[...][:, :1], kpos_ref[...], slot_row, length, st.spec)
    m_prev, l_prev = m_scr[...][:, :1], l_scr[...][:, :1]
    p, alpha, m, l = softmax_update(s, vis, m_prev, l_prev)
    pv = block_pv(p, vb, slot_col < length, slot_row < length, st.mm_dtype, st.vf)
    for j, c in enumerate(pv):
      acc_scr[j] = alpha * acc_scr[j] + c
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    m, l = m_scr[...][:, :1], l_scr[...][:, :1]
    for j in range(st.vf.per):
      out, lse = C.finalize(m, l, acc_scr[j])
      o_ref[j] = out
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def tpu_array_specs(fmt: KVFormat, dim: int, block_k: int, index):
  """BlockSpecs of (codes, [scale, [zero]]) for the contiguous TPU kernel."""
  def imap_rows(*args):
    bi, hi, blk = index(*args)
    return (bi, hi, blk, 0)

  def imap_lanes(*args):
    bi, hi, blk = index(*args)
    return (bi, hi, 0, blk)

  specs = [pl.BlockSpec((_SQ, _SQ, block_k, dim // fmt.per), imap_rows)]
  mode = fmt.scale_mode(dim)
  if mode is None:
    return specs
  if mode == "token1":
    s = pl.BlockSpec((_SQ, _SQ, 1, block_k), imap_lanes)
  elif mode == "tokens":
    s = pl.BlockSpec((_SQ, _SQ, block_k, dim // fmt.channel_group(dim)), imap_rows)
  else:
    s = pl.BlockSpec((_SQ, _SQ, block_k // fmt.group, dim), imap_rows)
  return specs + [s] * (1 + fmt.has_zero)


def tpu_array_views(arrays, fmt: KVFormat, dim: int):
  """Free reshapes the TPU kernel reads: per-token single scales as [B, H, 1, Sq] rows."""
  if fmt.scale_mode(dim) != "token1":
    return list(arrays)
  codes, *rest = arrays
  return [codes] + [a.reshape(a.shape[0], a.shape[1], 1, a.shape[2]) for a in rest]


def _run_tpu(k_arrays, v_arrays, q_rows, row_pos, k_positions, k_lengths, ranges, *,
             st: _Static, interpret):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  b, hkv, r, _ = q_rows.shape
  s = k_positions.shape[-1]
  per_k, per_v = st.kf.per, st.vf.per
  dpv = st.dv // per_v
  steps = C.cdiv(C.cdiv(s, st.block_k), st.num_splits)
  q_planes = split_query_planes(q_rows, per_k)
  qpos_lanes = jnp.broadcast_to(row_pos[:, :, None], (b, r, C.LANES)).astype(jnp.int32)
  kpos4 = k_positions.reshape(b, hkv, 1, s)

  def kv_index(bi, hi, split, i, lengths_ref, ranges_ref):
    del lengths_ref
    base = 4 * (bi * hkv + hi)
    blk = dense._resident_block(ranges_ref[base], ranges_ref[base + 1],  # pylint: disable=protected-access
                                ranges_ref[base + 2], ranges_ref[base + 3], split, i,
                                st.num_splits)
    return bi, hi, blk

  def kpos_map(*args):
    bi, hi, blk = kv_index(*args)
    return (bi, hi, 0, blk)

  in_specs = [
      pl.BlockSpec((_SQ, r, C.LANES), lambda bi, hi, sp, i, *_: (bi, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, per_k, r, st.d // per_k),
                   lambda bi, hi, sp, i, *_: (bi, hi, 0, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, 1, st.block_k), kpos_map),
      *tpu_array_specs(st.kf, st.d, st.block_k, kv_index),
      *tpu_array_specs(st.vf, st.dv, st.block_k, kv_index),
  ]
  out_map = lambda bi, hi, sp, i, *_: (bi, hi, sp, 0, 0, 0)
  out_specs = [
      pl.BlockSpec((_SQ, _SQ, _SQ, per_v, r, dpv), out_map),
      pl.BlockSpec((_SQ, _SQ, _SQ, r, C.LANES), lambda bi, hi, sp, i, *_: (bi, hi, sp, 0, 0)),
  ]
  kernel = functools.partial(_kernel_tpu, st=st, num_kv_heads=hkv)
  o_parts, lse_parts = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
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
      name="quantized_decode_attention_tpu",
  )(k_lengths.reshape(-1), ranges.reshape(-1), qpos_lanes, q_planes, kpos4,
    *tpu_array_views(k_arrays, st.kf, st.d), *tpu_array_views(v_arrays, st.vf, st.dv))
  return o_parts, lse_parts[..., 0]


def _kernel_gpu(lengths_ref, ranges_ref, qpos_ref, q_ref, kpos_ref, *refs, st: _Static):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  nk, nv = st.kf.num_arrays(), st.vf.num_arrays()
  k_refs, v_refs = refs[:nk], refs[nk:nk + nv]
  o_ref, lse_ref = refs[nk + nv:]
  split = pl.program_id(2)
  length = lengths_ref[...]
  a1, n1, a2, n2 = ranges_ref[0], ranges_ref[1], ranges_ref[2], ranges_ref[3]
  start, end = dense._split_bounds(a1, n1, a2, n2, split, st.num_splits)  # pylint: disable=protected-access
  per_k, per_v = st.kf.per, st.vf.per
  q_planes = [q_ref[j] for j in range(per_k)]
  qpos = qpos_ref[...][:, None]
  r = qpos.shape[0]
  dpk_pad, dpv_pad = q_planes[0].shape[-1], o_ref.shape[-1]
  bk = st.block_k

  def body(step, carry):
    m, l, accs = carry
    first = pl.multiple_of(C.step_to_block(step, a1, n1, a2) * bk, bk)
    slot = first + jnp.arange(bk, dtype=jnp.int32)
    valid = slot < length
    kpos = plgpu.load(kpos_ref.at[pl.ds(first, bk)], mask=valid, other=-1)
    kb = gpu_block(k_refs, st.kf, st.kf.scale_mode(st.d), st.d, slot, valid, dpk_pad)
    vb = gpu_block(v_refs, st.vf, st.vf.scale_mode(st.dv), st.dv, slot, valid, dpv_pad)
    s = block_logits(q_planes, kb, st.spec, st.mm_dtype)
    vis = C.visible(qpos, kpos[None, :], slot[None, :], length, st.spec)
    p, alpha, m, l = softmax_update(s, vis, m, l)
    pv = block_pv(p, vb, valid[:, None], valid[None, :], st.mm_dtype, st.vf)
    accs = tuple(alpha * a + c for a, c in zip(accs, pv))
    return m, l, accs

  init = (jnp.full((r, 1), C.NEG_INF, jnp.float32), jnp.zeros((r, 1), jnp.float32),
          tuple(jnp.zeros((r, dpv_pad), jnp.float32) for _ in range(per_v)))
  m, l, accs = lax.fori_loop(start, end, body, init)
  for j, acc in enumerate(accs):
    out, lse = C.finalize(m, l, acc)
    o_ref[j] = out
  lse_ref[...] = lse.reshape(r)


def gpu_plane_pad(dim: int, per: int) -> int:
  return max(16, C.next_pow2(dim // per))


def _whole(shape):
  """GPU BlockSpec: the whole (b, h) slice of a [B, H, ...] array."""
  return pl.BlockSpec((_SQ, _SQ) + tuple(shape[2:]),
                      lambda bi, hi, sp: (bi, hi) + (0,) * (len(shape) - 2))


def _run_gpu(k_arrays, v_arrays, q_rows, row_pos, k_positions, k_lengths, ranges, *,
             st: _Static, interpret, num_warps, num_stages):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  b, hkv, r, d = q_rows.shape
  s = k_positions.shape[-1]
  per_k, per_v = st.kf.per, st.vf.per
  dpk_pad, dpv_pad = gpu_plane_pad(st.d, per_k), gpu_plane_pad(st.dv, per_v)
  q_planes = split_query_planes(q_rows, per_k)
  q_planes = jnp.pad(q_planes, ((0, 0),) * 4 + ((0, dpk_pad - d // per_k),))
  arrays = list(k_arrays) + list(v_arrays)
  in_specs = [
      pl.BlockSpec((_SQ, _SQ), lambda bi, hi, sp: (bi, hi)),
      pl.BlockSpec((_SQ, _SQ, 4), lambda bi, hi, sp: (bi, hi, 0)),
      pl.BlockSpec((_SQ, r), lambda bi, hi, sp: (bi, 0)),
      pl.BlockSpec((_SQ, _SQ, per_k, r, dpk_pad), lambda bi, hi, sp: (bi, hi, 0, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, s), lambda bi, hi, sp: (bi, hi, 0)),
      *[_whole(a.shape) for a in arrays],
  ]
  out_specs = [
      pl.BlockSpec((_SQ, _SQ, _SQ, per_v, r, dpv_pad),
                   lambda bi, hi, sp: (bi, hi, sp, 0, 0, 0)),
      pl.BlockSpec((_SQ, _SQ, _SQ, r), lambda bi, hi, sp: (bi, hi, sp, 0)),
  ]
  o_parts, lse_parts = pl.pallas_call(
      functools.partial(_kernel_gpu, st=st),
      grid=(b, hkv, st.num_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct((b, hkv, st.num_splits, per_v, r, dpv_pad),
                                      jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, st.num_splits, r), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=C.resolve_interpret("gpu", interpret),
      name="quantized_decode_attention_gpu",
  )(k_lengths, ranges, row_pos, q_planes, k_positions, *arrays)
  return o_parts, lse_parts


# ----------------------------------------------------------------------------------------
# Wrapper pieces shared with paged_decode
# ----------------------------------------------------------------------------------------

def arrange_rows(q, hkv: int, platform: str):
  """q [B, Hq, T, D] -> rows [B, Hkv, Rp, D] (row r = t * G + g), Rp padded per platform."""
  b, hq, t, d = q.shape
  g = hq // hkv
  r = t * g
  q_rows = q.reshape(b, hkv, g, t, d).transpose(0, 1, 3, 2, 4).reshape(b, hkv, r, d)
  r_pad = C.round_up(r, C.SUBLANES) if platform == "tpu" else max(16, C.next_pow2(r))
  return jnp.pad(q_rows, ((0, 0), (0, 0), (0, r_pad - r), (0, 0))), r


def row_positions(q_positions, g: int, r_pad: int):
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
  o = merge_value_planes(o_parts, dv)
  if o.shape[2] == 1:
    return o[:, :, 0], lse_parts[:, :, 0]
  return C.combine_splits(o, lse_parts)


def merge_exact(parts):
  """Exact merge of attention over disjoint slot sets: [(out [B,Hq,T,Dv], lse)] -> one."""
  if len(parts) == 1:
    return parts[0]
  o = jnp.stack([p[0].astype(jnp.float32) for p in parts], axis=2)    # [B, Hq, P, T, Dv]
  l = jnp.stack([p[1] for p in parts], axis=2)                         # [B, Hq, P, T]
  return C.combine_splits(o, l)


def resolve_block_k(platform: str, block_k, num_slots: int, formats=()) -> int:
  """Validated key block: TPU multiple of 128 (and of 16 token groups for channel scales)
  or the whole slot axis; GPU power of two >= 16."""
  if platform == "gpu":
    bk = DEFAULT_BLOCK_K["gpu"] if block_k is None else block_k
    if not isinstance(bk, int) or bk < 16 or bk & (bk - 1):
      raise ValueError(f"block_k={block_k!r}; the GPU kernel needs a power of two >= 16")
    return min(bk, max(16, C.next_pow2(num_slots)))
  unit = C.LANES
  for f in formats:
    if f.axis == "channel":
      unit = max(unit, 16 * f.group)
  bk = C.round_up(DEFAULT_BLOCK_K["tpu"], unit) if block_k is None else block_k
  if not isinstance(bk, int) or bk < 1:
    raise ValueError(f"block_k={block_k!r}; must be a positive int")
  if bk >= num_slots:
    return num_slots
  if bk % unit:
    raise ValueError(f"block_k={bk}; the TPU kernel needs a multiple of {unit} (128, and "
                     "16 token groups of a per-channel scale) or >= the slot count "
                     f"{num_slots}")
  return bk


def check_common(q, k_lengths, q_positions, k_positions, sink_logits, hkv, slots):
  if q.ndim != 4:
    raise ValueError(f"q must be [B, Hq, T, D]; got shape {q.shape}")
  b, hq, t, d = q.shape
  if hkv < 1 or hq % hkv:
    raise ValueError(f"num query heads {hq} must be a multiple of num kv heads {hkv}")
  if t < 1:
    raise ValueError(f"need at least one query; got T={t}")
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


def make_formats(fmt, k_bits, v_bits, k_axis, v_axis, group_size, k_zero, v_zero):
  def one(bits, axis, zero):
    if fmt == "int":
      return KVFormat("int", bits, axis, group_size, symmetric=zero is None)
    return KVFormat(fmt, 8, axis, group_size, symmetric=True)
  return one(k_bits, k_axis, k_zero), one(v_bits, v_axis, v_zero)


def residual_part(q, k_res, v_res, res_lengths, q_positions, res_positions, *, spec,
                  platform, interpret, num_warps, num_stages):
  """Dense decode kernel over an exact slot set (the residual window): (out, lse)."""
  r = k_res.shape[2]
  bk = dense.resolve_block_k(platform, None, r)
  nkb = C.cdiv(r, bk)
  splits = dense.default_num_splits(platform, q.shape[0], k_res.shape[1], nkb)
  kv = dense.PlainKV(head_dim=k_res.shape[-1], head_dim_v=v_res.shape[-1], num_slots=r)
  return dense.decode_with_source(
      kv, (k_res, v_res), q, jnp.clip(res_lengths.astype(jnp.int32), 0, r),
      q_positions.astype(jnp.int32), res_positions.astype(jnp.int32), spec=spec, block_k=bk,
      num_splits=min(splits, nkb), platform=platform, interpret=interpret,
      num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------

_STATIC = ("fmt", "k_bits", "v_bits", "k_axis", "v_axis", "group_size", "scale", "causal",
           "window", "sink_tokens", "softcap", "block_k", "num_splits", "platform",
           "interpret", "num_warps", "num_stages")


@functools.partial(jax.jit, static_argnames=_STATIC)
def quantized_decode_attention(
    q, k_codes, k_scale, v_codes, v_scale, k_lengths, *, q_positions, k_positions,
    k_zero=None, v_zero=None, k_res=None, v_res=None, res_positions=None, res_lengths=None,
    sink_logits=None, fmt: str = "int", k_bits: int = 8, v_bits: int = 8,
    k_axis: str = "token", v_axis: str = "token", group_size: Optional[int] = None,
    scale: Optional[float] = None, causal: bool = True, window: Optional[int] = None,
    sink_tokens: int = 0, softcap: Optional[float] = None, block_k: Optional[int] = None,
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
    scale, causal, window, sink_tokens, softcap: docs/CONVENTIONS.md.
    block_k: slots per block (TPU: multiple of 128 and of 16 token groups for channel
      scales, default 512; GPU: power of two >= 16, default 64).
    num_splits: split-K parts (default 1 on TPU, enough programs to fill a GPU).
    platform: "tpu" | "gpu"; interpret: interpret mode (CPU tests).
    num_warps, num_stages: Triton options.

  Returns:
    out [B, Hq, T, Dv] (q.dtype), lse [B, Hq, T] float32.
  """
  C.check_platform(platform)
  C.check_static(window=window, sink_tokens=sink_tokens, softcap=softcap, scale=scale)
  if fmt not in FORMATS[1:]:
    raise ValueError(f"fmt={fmt!r}; allowed: {FORMATS[1:]}")
  if k_codes.ndim != 4 or v_codes.ndim != 4:
    raise ValueError(f"codes must be rank 4; got k_codes{k_codes.shape}, "
                     f"v_codes{v_codes.shape}")
  b, hq, t, d = q.shape
  _, hkv, sq, _ = k_codes.shape
  check_common(q, k_lengths, q_positions, k_positions, sink_logits, hkv, sq)
  kf, vf = make_formats(fmt, k_bits, v_bits, k_axis, v_axis, group_size, k_zero, v_zero)
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
  bk = resolve_block_k(platform, block_k, sq, (kf, vf))
  nkb = C.cdiv(sq, bk)
  splits = (dense.default_num_splits(platform, b, hkv, nkb) if num_splits is None
            else num_splits)
  if not isinstance(splits, int) or splits < 1:
    raise ValueError(f"num_splits={num_splits!r}; must be a positive int")
  splits = min(splits, nkb)
  spec = C.MaskSpec(scale=d ** -0.5 if scale is None else float(scale), causal=causal,
                    window=window, sink_tokens=sink_tokens, softcap=softcap)
  q_positions = q_positions.astype(jnp.int32)
  k_positions = k_positions.astype(jnp.int32)
  k_lengths = jnp.clip(k_lengths.astype(jnp.int32), 0, sq)
  st = _Static(kf, vf, d, dv, spec, bk, splits, q.dtype)

  q_rows, r = arrange_rows(q, hkv, platform)
  row_pos = row_positions(q_positions, hq // hkv, q_rows.shape[2])
  if window is None:
    ranges = C.length_ranges(k_lengths, bk)
  else:
    ranges = C.key_ranges(q_positions, k_positions, k_lengths, block_q=t, block_k=bk,
                          spec=spec)
  ranges = ranges.packed()[:, :, 0]
  k_arrays = [a for a in (k_codes, k_scale, k_zero) if a is not None]
  v_arrays = [a for a in (v_codes, v_scale, v_zero) if a is not None]
  if platform == "tpu":
    o_parts, lse_parts = _run_tpu(k_arrays, v_arrays, q_rows, row_pos, k_positions,
                                  k_lengths, ranges, st=st, interpret=interpret)
  else:
    o_parts, lse_parts = _run_gpu(k_arrays, v_arrays, q_rows, row_pos, k_positions,
                                  k_lengths, ranges, st=st, interpret=interpret,
                                  num_warps=num_warps, num_stages=num_stages)
  o_rows, lse_rows = combine_parts(o_parts, lse_parts, dv)
  parts = [unarrange_rows(o_rows, lse_rows, hq=hq, t=t)]
  if k_res is not None:
    parts.append(residual_part(q, k_res, v_res, res_lengths, q_positions, res_positions,
                               spec=spec, platform=platform, interpret=interpret,
                               num_warps=num_warps, num_stages=num_stages))
  out, lse = merge_exact(parts)
  if sink_logits is not None:
    out, lse = C.apply_sink_logits(out, lse, sink_logits)
  return out.astype(q.dtype), lse


@functools.partial(jax.jit, static_argnames=("fmt", "k_bits", "v_bits", "k_axis", "v_axis",
                                             "group_size", "scale", "causal", "window",
                                             "sink_tokens", "softcap"))
def quantized_decode_reference(
    q, k_codes, k_scale, v_codes, v_scale, k_lengths, *, q_positions, k_positions,
    k_zero=None, v_zero=None, k_res=None, v_res=None, res_positions=None, res_lengths=None,
    sink_logits=None, fmt="int", k_bits=8, v_bits=8, k_axis="token", v_axis="token",
    group_size=None, scale=None, causal=True, window=None, sink_tokens=0, softcap=None):
  """Pure-jnp reference: dequantize the whole cache, append the residual, attend.

  Same arguments as `quantized_decode_attention`; returns (out, lse).
  """
  kf, vf = make_formats(fmt, k_bits, v_bits, k_axis, v_axis, group_size, k_zero, v_zero)
  d = q.shape[-1]
  dv = v_codes.shape[-1] * vf.per
  sq = k_codes.shape[2]
  k = dequantize(k_codes, k_scale, k_zero, kf, d)
  v = dequantize(v_codes, v_scale, v_zero, vf, dv)
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
                                    window=window, sink_tokens=sink_tokens, softcap=softcap,
                                    sink_logits=sink_logits)
  return out, lse
