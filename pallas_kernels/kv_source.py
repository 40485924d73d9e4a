"""KV sources: how the one decode pipeline (`decode_attention.decode_with_source`) reads K/V.

A KV source is a static (frozen, hashable) description of where a cache's keys and values
live and how they are stored; the pipeline's kernels never touch K/V refs themselves. It
supplies the BlockSpecs of its arrays and turns the loaded refs into `Block`s that the
shared attention math consumes (`block_logits`, `softmax_update`, `block_pv`):

* `ContiguousKV` (here): a `[B, Hkv, S, ...]` cache, plain float (the dense decode) or
  quantized codes with scales / zero points (`quantized_decode.py`);
* `paged_decode.PagedKV`: a page pool `[N, Hkv, P, ...]` addressed by page tables.

Storage formats (`KVFormat`): "float" (values as stored), "int" (2 / 4 / 8-bit codes
packed along the head dim, low bits first), "fp8_e4m3" / "fp8_e5m2" (float8 codes or
their uint8 bit patterns), with scales per token (channel groups of g) or per channel
(token groups of G, KIVI keys: "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache", arXiv:2402.02750). Dequantization: int asymmetric x = q * scale + zero, symmetric
x = (q - 2**(bits-1)) * scale; fp8 x = float(code) * scale.

Code planes instead of unpacking: byte j of a row holds channels j*per .. j*per + per - 1,
so a block of codes splits into `per` planes (plane i = bits [i*bits, (i+1)*bits) of every
byte = channels i, per + i, ...) and the queries are split the same way
(`split_query_planes`), so q . k = sum_i q_i . plane_i with no lane shuffles; values
accumulate into `per` plane accumulators that `merge_value_planes` re-interleaves. A float
cache is the case per = 1 with no scale. Scales are applied where they are cheapest: one
scale (and zero) per token is folded into the logits and the probabilities; per-token
channel groups and per-channel scales are expanded per plane in the kernel (TPU: selects /
exact one-hot matmuls; GPU: the load index).

One file on purpose (about 600 lines): every storage format the one decode pipeline reads
(dense, quantized planes, pages) is defined beside the others so their loads stay alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as C

FORMATS = ("float", "int", "fp8_e4m3", "fp8_e5m2")
INT_BITS = (2, 4, 8)
_FP8 = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
_SQ = None


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
    if fmt.fmt != "int":   # float32 select: no bf16 VPU on older TPUs
      x = jnp.where(valid_col, x.astype(jnp.float32), 0.0)
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

def gpu_plane_pad(dim: int, per: int) -> int:
  return max(16, C.next_pow2(dim // per))


def _whole(shape):
  """GPU BlockSpec: the whole (b, h) slice of a [B, H, ...] array."""
  return pl.BlockSpec((_SQ, _SQ) + tuple(shape[2:]),
                      lambda bi, hi, sp: (bi, hi) + (0,) * (len(shape) - 2))


def make_formats(fmt: str, k_bits: int, v_bits: int, k_axis: str, v_axis: str,
                 group_size: Optional[int], k_zero, v_zero) -> tuple[KVFormat, KVFormat]:
  """K and V formats from kvjax QuantSpec-style options (zeros None = symmetric)."""
  if fmt == "float":
    return KVFormat("float"), KVFormat("float")
  def one(bits, axis, zero):
    if fmt == "int":
      return KVFormat("int", bits, axis, group_size, symmetric=zero is None)
    return KVFormat(fmt, 8, axis, group_size, symmetric=True)
  return one(k_bits, k_axis, k_zero), one(v_bits, v_axis, v_zero)


# ----------------------------------------------------------------------------------------
# Contiguous caches: [B, Hkv, S, ...] (dense float or quantized)
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ContiguousKV:
  """K/V of each (batch, kv head) along one slot axis.

  Arrays, in order: k_positions [B, Hkv, S] int32, K's (codes, [scale, [zero]]), V's.
  A "float" format holds k [B, Hkv, S, D] / v [B, Hkv, S, Dv] themselves (the dense
  decode); quantized formats the layout of `quantized_decode.py`.
  """
  k_format: KVFormat
  v_format: KVFormat
  head_dim: int
  head_dim_v: int
  num_slots: int

  num_prefetch = 0   # scalar-prefetch (TPU) / leading (GPU) index arrays of the source

  @property
  def name(self) -> str:
    quantized = self.k_format.fmt != "float" or self.v_format.fmt != "float"
    return "quantized_decode_attention" if quantized else "ragged_decode_attention"

  def _split(self, arrays):
    nk = self.k_format.num_arrays()
    return arrays[0], list(arrays[1:1 + nk]), list(arrays[1 + nk:])

  # TPU: one [block_k, ...] block of every array per grid step; `index(*grid, *prefetch)`
  # -> (b, h, block).
  def tpu_inputs(self, arrays):
    kpos, k_arrays, v_arrays = self._split(arrays)
    b, h, s = kpos.shape
    return [kpos.reshape(b, h, 1, s), *tpu_array_views(k_arrays, self.k_format, self.head_dim),
            *tpu_array_views(v_arrays, self.v_format, self.head_dim_v)]

  def tpu_in_specs(self, block_k: int, index):
    def kpos_map(*args):
      bi, hi, blk = index(*args)
      return (bi, hi, 0, blk)
    return [pl.BlockSpec((_SQ, _SQ, 1, block_k), kpos_map),
            *tpu_array_specs(self.k_format, self.head_dim, block_k, index),
            *tpu_array_specs(self.v_format, self.head_dim_v, block_k, index)]

  def tpu_blocks(self, refs, block_k: int):
    """[(slot offset, n, K Block, V Block, positions [1, n] or None)] of one grid step."""
    kpos_ref, k_refs, v_refs = self._split(refs)
    kb = tpu_block(k_refs, self.k_format, self.k_format.scale_mode(self.head_dim), block_k,
                   self.head_dim)
    vb = tpu_block(v_refs, self.v_format, self.v_format.scale_mode(self.head_dim_v), block_k,
                   self.head_dim_v)
    return [(0, block_k, kb, vb, kpos_ref[...])]

  # GPU: the whole slot axis of one (b, h) is the block; loads are masked.
  def gpu_prefetch_specs(self):
    return []

  def gpu_in_specs(self, arrays, dpk_pad: int, dpv_pad: int):
    kpos, k_arrays, v_arrays = self._split(arrays)
    specs = [_whole(kpos.shape)]
    for fmt, group, pad in ((self.k_format, k_arrays, dpk_pad),
                            (self.v_format, v_arrays, dpv_pad)):
      if fmt.fmt == "float":   # [S, D] padded to a power of two, read by masked slices
        specs.append(pl.BlockSpec((_SQ, _SQ, self.num_slots, pad),
                                  lambda bi, hi, sp: (bi, hi, 0, 0)))
      else:
        specs += [_whole(a.shape) for a in group]
    return specs

  def gpu_block(self, refs, prefetch_refs, head, first, slot, valid, dpk_pad: int,
                dpv_pad: int):
    """(K Block, V Block, positions [n]) of the slots `slot` (first = slot[0]) of kv head
    `head` (the refs are already that (b, h)'s)."""
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    del prefetch_refs, head
    kpos_ref, k_refs, v_refs = self._split(refs)
    n = slot.shape[0]
    kpos = plgpu.load(kpos_ref.at[pl.ds(first, n)], mask=valid, other=-1)

    def one(fmt_refs, fmt, dim, pad):
      if fmt.fmt != "float":
        return gpu_block(fmt_refs, fmt, fmt.scale_mode(dim), dim, slot, valid, pad)
      mask = valid[:, None] & (jnp.arange(pad) < dim)[None, :]
      return Block((plgpu.load(fmt_refs[0].at[pl.ds(first, n), :], mask=mask, other=0.0),))

    return (one(k_refs, self.k_format, self.head_dim, dpk_pad),
            one(v_refs, self.v_format, self.head_dim_v, dpv_pad), kpos)

