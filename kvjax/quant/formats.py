"""Quantization formats: integer (symmetric / asymmetric, any group), FP8, outliers.

Pure functions over arrays whose last two axes are [tokens S, channels D]; the cache kinds in
`kvjax.quant.cache` store their outputs. Two grouping axes (KIVI, Liu et al., 2024):

  * per-token ("token" axis): one scale per token and per group of `group` channels,
    scale shape [..., S, D // group];
  * per-channel ("channel" axis): one scale per channel and per group of `group` tokens,
    scale shape [..., S // group, D].

Integer codes are unsigned, `0 <= q < 2**bits` (uint8, unpacked here; see `packing`):
  asymmetric: x ~= q * scale + zero                  (zero = group minimum, rounded down)
  symmetric:  x ~= (q - 2**(bits-1)) * scale         (q in [1, 2**bits - 1])
FP8 (Micikevicius et al., 2022; e4m3fn / e5m2): x ~= float(code) * scale, with
scale = absmax / finfo.max per group, so no code overflows.

Scales and zeros are stored in `scale_dtype` (float16 by default, as KIVI does) and are
rounded *outwards* (zero down, scale up) before the codes are computed, so the stored numbers
cover the group's range and the analytic bounds hold for what is stored:
  int:  |x - dequant(x)| <= scale / 2        (stored scale; plus float32 rounding)
  fp8:  |x - dequant(x)| <= max(2**-(m+1) * |x|, 2**(emin - m - 1) * scale), m mantissa bits.

Dense-and-sparse outliers (KVQuant, Hooper et al., 2024): `split_outliers` marks the
`n` largest-magnitude entries of each token vector; they are left out of the range
statistics and stored exactly beside the codes ([..., S, n] values + uint8/int32 indices).
KVQuant chooses outliers by a calibrated threshold (a variable count held in CSR); a fixed
count per token keeps shapes static here.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

INT_BITS = (2, 4, 8)
FP8_FORMATS = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
SCALE_DTYPES = ("float16", "bfloat16", "float32")


class Quantized(NamedTuple):
  codes: jax.Array            # uint8 integer codes (unpacked) or float8 codes, shape of x
  scale: jax.Array            # scale_dtype, grouped shape (see module docstring)
  zero: Optional[jax.Array]   # scale_dtype, same shape as scale (asymmetric int only)


def _round_out(x, dtype, up: bool):
  """Rounds float32 x to `dtype`, never inwards (up: result >= x; else result <= x)."""
  r = x.astype(dtype)
  if jnp.dtype(dtype) == jnp.float32:
    return r
  target = jnp.asarray(jnp.inf if up else -jnp.inf, dtype)
  bad = (r.astype(jnp.float32) < x) if up else (r.astype(jnp.float32) > x)
  return jnp.where(bad, jnp.nextafter(r, target), r)


def _group(x, axis: str, group: int):
  """[..., S, D] -> grouped view with the reduction axis at -1 (token) or -2 (channel)."""
  *lead, s, d = x.shape
  if axis == "token":
    return x.reshape(*lead, s, d // group, group), -1
  return x.reshape(*lead, s // group, group, d), -2


def _ungroup_scale(scale, axis):
  return scale[..., 0] if axis == "token" else scale[..., 0, :]


def _expand_scale(scale, axis, shape, group):
  """Broadcasts a grouped scale back to x's [..., S, D] shape."""
  if axis == "token":
    return jnp.repeat(scale, group, axis=-1)
  return jnp.repeat(scale, group, axis=-2)


def check_group(n: int, group: int, what: str):
  if group < 1 or n % group:
    raise ValueError(f"group_size={group} must divide {what}={n}")


def quantize_int(x, *, bits: int, axis: str = "token", group: Optional[int] = None,
                 symmetric: bool = False, scale_dtype="float16",
                 exclude: Optional[jax.Array] = None) -> Quantized:
  """Integer quantization of x [..., S, D] with per-group scales (and zeros).

  Args:
    x: values, float.
    bits: 2, 4 or 8.
    axis: "token" (groups of channels within a token) or "channel" (groups of tokens).
    group: group size along the grouped axis (default: all of D for "token").
    symmetric: absmax scaling without a zero point.
    scale_dtype: dtype of stored scales and zeros.
    exclude: optional bool mask (shape of x) of entries left out of the range statistics
      (outliers stored elsewhere).
  """
  if bits not in INT_BITS:
    raise ValueError(f"bits={bits!r}; allowed: {INT_BITS}")
  sdt = jnp.dtype(scale_dtype)
  d = x.shape[-1]
  group = d if group is None else group
  check_group(d if axis == "token" else x.shape[-2], group,
              "head_dim" if axis == "token" else "tokens")
  xf = x.astype(jnp.float32)
  xg, red = _group(xf, axis, group)
  eg = None if exclude is None else _group(exclude, axis, group)[0]
  tiny = jnp.finfo(sdt).tiny
  if symmetric:
    qmax = 2 ** (bits - 1) - 1
    a = jnp.abs(xg) if eg is None else jnp.where(eg, 0.0, jnp.abs(xg))
    amax = jnp.max(a, axis=red, keepdims=True)
    scale = _round_out(jnp.maximum(amax / qmax, tiny), sdt, up=True)
    sf = scale.astype(jnp.float32)
    q = jnp.clip(jnp.round(xg / sf), -qmax, qmax) + 2 ** (bits - 1)
    return Quantized(q.astype(jnp.uint8).reshape(x.shape), _ungroup_scale(scale, axis), None)
  qmax = 2 ** bits - 1
  if eg is None:
    lo = jnp.min(xg, axis=red, keepdims=True)
    hi = jnp.max(xg, axis=red, keepdims=True)
  else:
    lo = jnp.min(jnp.where(eg, jnp.inf, xg), axis=red, keepdims=True)
    hi = jnp.max(jnp.where(eg, -jnp.inf, xg), axis=red, keepdims=True)
    lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
    hi = jnp.where(jnp.isfinite(hi), hi, 0.0)
  zero = _round_out(lo, sdt, up=False)
  zf = zero.astype(jnp.float32)
  scale = _round_out(jnp.maximum((hi - zf) / qmax, tiny), sdt, up=True)
  sf = scale.astype(jnp.float32)
  q = jnp.clip(jnp.round((xg - zf) / sf), 0, qmax)
  return Quantized(q.astype(jnp.uint8).reshape(x.shape), _ungroup_scale(scale, axis),
                   _ungroup_scale(zero, axis))


def dequantize_int(codes, scale, zero, *, bits: int, axis: str = "token",
                   group: Optional[int] = None, dtype=jnp.float32) -> jax.Array:
  """Inverse of `quantize_int` (zero None means symmetric)."""
  d = codes.shape[-1]
  group = d if group is None else group
  s = _expand_scale(scale.astype(jnp.float32), axis, codes.shape, group)
  q = codes.astype(jnp.float32)
  if zero is None:
    out = (q - 2 ** (bits - 1)) * s
  else:
    out = q * s + _expand_scale(zero.astype(jnp.float32), axis, codes.shape, group)
  return out.astype(dtype)


def fp8_dtype(fmt: str):
  if fmt not in FP8_FORMATS:
    raise ValueError(f"fmt={fmt!r}; allowed: {tuple(FP8_FORMATS)}")
  return FP8_FORMATS[fmt]


def quantize_fp8(x, *, fmt: str = "fp8_e4m3", group: Optional[int] = None,
                 scale_dtype="float16", exclude=None) -> Quantized:
  """Per-token FP8 with a scale per group of channels.

  x [..., S, D] -> codes [..., S, D] float8, scale [..., S, D // group].
  """
  dt = fp8_dtype(fmt)
  sdt = jnp.dtype(scale_dtype)
  d = x.shape[-1]
  group = d if group is None else group
  check_group(d, group, "head_dim")
  fmax = float(jnp.finfo(dt).max)
  xg, red = _group(x.astype(jnp.float32), "token", group)
  a = jnp.abs(xg) if exclude is None else jnp.where(_group(exclude, "token", group)[0], 0.0,
                                                    jnp.abs(xg))
  amax = jnp.max(a, axis=red, keepdims=True)
  scale = _round_out(jnp.maximum(amax / fmax, jnp.finfo(sdt).tiny), sdt, up=True)
  y = jnp.clip(xg / scale.astype(jnp.float32), -fmax, fmax)
  return Quantized(y.astype(dt).reshape(x.shape), scale[..., 0], None)


def _fmt_of(dtype) -> Optional[str]:
  for name, dt in FP8_FORMATS.items():
    if jnp.dtype(dtype) == jnp.dtype(dt):
      return name
  return None


def fp8_to_float(codes, fmt: Optional[str] = None):
  """FP8 codes -> float32. Codes are float8 arrays, or uint8 bit patterns of `fmt`.

  On CPU through a 256-entry table: XLA's CPU float8_e4m3fn conversion is several times
  slower than a gather; elsewhere the native conversion.
  """
  own = _fmt_of(codes.dtype)
  if own is not None:
    fmt = own
    codes = jax.lax.bitcast_convert_type(codes, jnp.uint8)
  elif codes.dtype != jnp.uint8 or fmt is None:
    raise ValueError(f"fp8 codes must be float8, or uint8 with fmt=...; got dtype "
                     f"{codes.dtype} and fmt={fmt!r} (allowed: {tuple(FP8_FORMATS)})")
  dt = fp8_dtype(fmt)
  if jax.default_backend() == "cpu":
    table = np.arange(256, dtype=np.uint8).view(np.dtype(dt)).astype(np.float32)
    return jnp.asarray(table)[codes.astype(jnp.int32)]
  return jax.lax.bitcast_convert_type(codes, dt).astype(jnp.float32)


def dequantize_fp8(codes, scale, *, fmt: Optional[str] = None, group: Optional[int] = None,
                   dtype=jnp.float32):
  """Inverse of `quantize_fp8` (codes: float8, or their uint8 bit patterns with `fmt`)."""
  d = codes.shape[-1]
  group = d if group is None else group
  s = _expand_scale(scale.astype(jnp.float32), "token", codes.shape, group)
  return (fp8_to_float(codes, fmt) * s).astype(dtype)


def fp8_error_bound(x, scale, fmt: str, group: Optional[int] = None):
  """Analytic per-entry bound on |x - dequant(x)| for FP8 with stored `scale`."""
  fi = jnp.finfo(fp8_dtype(fmt))
  m, emin = int(fi.nmant), int(fi.minexp)
  d = x.shape[-1]
  s = _expand_scale(scale.astype(jnp.float32), "token", x.shape, d if group is None else group)
  return jnp.maximum(2.0 ** -(m + 1) * jnp.abs(x), 2.0 ** (emin - m - 1) * s)


# -- dense-and-sparse outliers ---------------------------------------------------------------
def outlier_count(d: int, frac: float) -> int:
  """Outliers kept per token vector of d channels (0 when frac == 0)."""
  import math  # pylint: disable=import-outside-toplevel
  return 0 if frac <= 0 else min(d, max(1, math.ceil(frac * d)))


def index_dtype(d: int):
  return jnp.uint8 if d <= 256 else jnp.int32


def split_outliers(x, n: int, value_dtype):
  """Top-n |x| entries per token vector: (exclude mask [..., D], values [..., n], idx [..., n])."""
  d = x.shape[-1]
  _, idx = jax.lax.top_k(jnp.abs(x.astype(jnp.float32)), n)
  vals = jnp.take_along_axis(x, idx, axis=-1).astype(value_dtype)
  mask = jnp.any(idx[..., None] == jnp.arange(d), axis=-2)
  return mask, vals, idx.astype(index_dtype(d))


def merge_outliers(x, values, idx):
  """Writes exact outlier values back into x [..., D] at idx [..., n]."""
  d = x.shape[-1]
  onehot = idx.astype(jnp.int32)[..., None] == jnp.arange(d)          # [..., n, D]
  hit = jnp.any(onehot, axis=-2)
  vals = jnp.sum(jnp.where(onehot, values.astype(x.dtype)[..., None], 0), axis=-2)
  return jnp.where(hit, vals, x)
