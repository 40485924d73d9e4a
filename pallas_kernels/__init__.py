"""Pallas attention kernels for kvjax: one entry point, `attention`, and `supports`.

`attention` picks the kernel by the number of queries T (ragged decode for
T <= DECODE_MAX_QUERIES, flash prefill otherwise) and the variant by platform (Mosaic on
TPU, Triton on GPU). Both follow docs/CONVENTIONS.md exactly; `reference.py` is the
pure-jnp definition they are tested against.

Files: decode_attention.py (ragged split-K decode), flash_prefill.py (long-T flash
attention), colsum.py (per-slot attention mass from saved lse), quantized_decode.py
(decode straight from INT8 / FP8 / KIVI INT4 / INT2 caches + residual window),
paged_decode.py (decode over a page pool + page tables), reference.py, bench.py.

`quantized_attention` / `paged_attention` are the entry points of the last two (decode
only: T <= DECODE_MAX_QUERIES), with `supports_quantized` / `supports_paged`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import decode_attention as _decode
from pallas_kernels import flash_prefill as _prefill
from pallas_kernels import paged_decode as _paged
from pallas_kernels import quantized_decode as _quantized
from pallas_kernels.colsum import attention_colsum
from pallas_kernels.reference import attention_reference

# The kernel functions live in their modules (`pallas_kernels.decode_attention.
# decode_attention`, `pallas_kernels.flash_prefill.flash_prefill`); they are not re-exported
# here so that the module names are never shadowed by functions.
__all__ = ["attention", "supports", "attention_colsum", "attention_reference",
           "DECODE_MAX_QUERIES", "resolve_platform", "quantized_attention",
           "supports_quantized", "paged_attention", "supports_paged"]

DECODE_MAX_QUERIES = 16  # T up to this uses the decode kernel (all T x G rows in a program)

_PLATFORM_ALIASES = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu", "cpu": "cpu"}
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def resolve_platform(platform: str | None, interpret: Any) -> str:
  """Kernel variant ("tpu" | "gpu") for a platform name (None = jax.default_backend()).

  On CPU the kernels only run in interpret mode; there the GPU variant is used (the
  generic interpreter is the faster one). Pass platform="tpu", interpret=True to run the
  TPU variant under TPU interpret mode.
  """
  name = jax.default_backend() if platform is None else platform
  kind = _PLATFORM_ALIASES.get(str(name).lower())
  if kind is None:
    raise ValueError(f"platform={name!r}; must be one of {sorted(_PLATFORM_ALIASES)}")
  if kind == "cpu":
    if not interpret:
      raise ValueError(f"platform={name!r}: Pallas kernels run on CPU only with "
                       "interpret=True")
    return "gpu"
  return kind


def attention(q, k, v, k_lengths, *, q_positions, k_positions, scale=None, window=None,
              sink_tokens=0, softcap=None, return_lse=False, return_colsum=False,
              colsum_window=None, platform=None, interpret=False, causal=True,
              sink_logits=None, block_q=None, block_k=None, num_splits=None):
  """Attention of q over a ragged KV set, with a Pallas kernel.

  Args:
    q: [B, Hq, T, D]; k: [B, Hkv, S, D]; v: [B, Hkv, S, Dv].
    k_lengths: [B, Hkv] int32; q_positions: [B, T] int32; k_positions: [B, Hkv, S] int32.
    scale, window, sink_tokens, softcap, causal: docs/CONVENTIONS.md.
    return_lse: return lse [B, Hq, T] float32 (else None).
    return_colsum: return colsum [B, Hkv, S] float32 (else None).
    colsum_window: count only the last `colsum_window` queries in colsum.
    platform: "tpu" | "gpu" | "cuda" | "rocm" | "cpu" | None (= jax.default_backend()).
    interpret: interpret mode; required on "cpu".
    sink_logits: optional [Hq] learned sink logits.
    block_q, block_k, num_splits: kernel tiling overrides (None = kernel defaults).

  Returns:
    (out [B, Hq, T, Dv] in q.dtype, lse or None, colsum or None).
  """
  kind = resolve_platform(platform, interpret)
  t = q.shape[2]
  common = dict(q_positions=q_positions, k_positions=k_positions, sink_logits=sink_logits,
                scale=scale, causal=causal, window=window, sink_tokens=sink_tokens,
                softcap=softcap, return_colsum=return_colsum, colsum_window=colsum_window,
                block_k=block_k, platform=kind, interpret=interpret)
  if t <= DECODE_MAX_QUERIES:
    out, lse, colsum = _decode.decode_attention(q, k, v, k_lengths, num_splits=num_splits,
                                                **common)
  else:
    out, lse, colsum = _prefill.flash_prefill(q, k, v, k_lengths, return_lse=return_lse,
                                              block_q=block_q, **common)
  return out, (lse if return_lse else None), (colsum if return_colsum else None)


def supports(**static_args) -> bool:
  """Whether `attention` handles these static options (else the caller uses XLA).

  Known keys: platform (checked only when given), interpret, head_dim, head_dim_v, dtype, num_q_heads, num_kv_heads,
  num_queries, num_slots, scale, causal, window, sink_tokens, softcap, sink_logits,
  return_lse, return_colsum, colsum_window. Unknown keys (say `quantized=True`,
  `paged=True`) are unsupported unless their value is None / False / 0.
  """
  a = dict(static_args)
  try:
    platform = a.pop("platform", None)
    interpret = a.pop("interpret", False)
    if platform is not None:  # None: options only; `attention` checks the device itself
      kind = _PLATFORM_ALIASES.get(str(platform).lower())
      if kind is None or (kind == "cpu" and not interpret):
        return False
    for key in ("head_dim", "head_dim_v"):
      d = a.pop(key, None)
      if d is not None and (d % 8 or not 8 <= d <= 256):
        return False
    dtype = a.pop("dtype", None)
    if dtype is not None and jnp.dtype(dtype) not in [jnp.dtype(x) for x in _FLOAT_DTYPES]:
      return False
    hq, hkv = a.pop("num_q_heads", None), a.pop("num_kv_heads", None)
    if hq is not None and hkv is not None and (hkv < 1 or hq % hkv):
      return False
    for key in ("num_queries", "num_slots"):
      n = a.pop(key, None)
      if n is not None and n < 1:
        return False
    _common.check_static(window=a.pop("window", None), sink_tokens=a.pop("sink_tokens", 0),
                         softcap=a.pop("softcap", None), scale=a.pop("scale", None))
    a.pop("causal", None)
    a.pop("sink_logits", None)
    a.pop("return_lse", None)
    a.pop("return_colsum", None)
    cw = a.pop("colsum_window", None)
    if cw is not None and (not isinstance(cw, int) or cw < 1):
      return False
  except (ValueError, TypeError):
    return False
  return all(v is None or (isinstance(v, (bool, int)) and not v) for v in a.values())


def quantized_attention(q, k_codes, k_scale, v_codes, v_scale, k_lengths, *, q_positions,
                        k_positions, platform=None, interpret=False, **kwargs):
  """Decode attention read straight from a quantized cache (`quantized_decode.py`).

  Args:
    q, k_codes, k_scale, v_codes, v_scale, k_lengths, q_positions, k_positions: see
      `quantized_decode.quantized_decode_attention` (kvjax.quant layout).
    platform, interpret: as for `attention`.
    **kwargs: k_zero, v_zero, residual arrays, sink_logits, format and mask options,
      block_k, num_splits.

  Returns:
    (out [B, Hq, T, Dv] in q.dtype, lse [B, Hq, T] float32).
  """
  kind = resolve_platform(platform, interpret)
  return _quantized.quantized_decode_attention(
      q, k_codes, k_scale, v_codes, v_scale, k_lengths, q_positions=q_positions,
      k_positions=k_positions, platform=kind, interpret=interpret, **kwargs)


def paged_attention(q, k_pages, v_pages, page_table, lengths, *, q_positions, platform=None,
                    interpret=False, **kwargs):
  """Decode attention over a page pool + page tables (`paged_decode.py`).

  Args:
    q, k_pages, v_pages, page_table, lengths, q_positions: see
      `paged_decode.paged_decode_attention` (kvjax.paged layout).
    platform, interpret: as for `attention`.
    **kwargs: pos_pages, scales / zeros of quantized pools, sink_logits, format and mask
      options, pages_per_block (TPU), block_k (GPU), num_splits.

  Returns:
    (out [B, Hq, T, Dv] in q.dtype, lse [B, Hq, T] float32).
  """
  kind = resolve_platform(platform, interpret)
  return _paged.paged_decode_attention(q, k_pages, v_pages, page_table, lengths,
                                       q_positions=q_positions, platform=kind,
                                       interpret=interpret, **kwargs)


def _supports_formats(a, axes: bool) -> bool:
  """Pops the storage-format keys from `a`; False if the kernels cannot read them."""
  fmt = a.pop("fmt", "float" if not axes else "int")
  k_bits, v_bits = a.pop("k_bits", 8), a.pop("v_bits", 8)
  k_axis, v_axis = a.pop("k_axis", "token"), a.pop("v_axis", "token")
  group = a.pop("group_size", None)
  a.pop("symmetric", None)
  if not axes and (k_axis, v_axis) != ("token", "token"):
    return False
  if axes and fmt == "float":
    return False
  try:
    def one(bits, axis):
      if fmt == "float":
        return _quantized.KVFormat("float")
      return _quantized.KVFormat(fmt, bits if fmt == "int" else 8, axis, group)
    kf, vf = one(k_bits, k_axis), one(v_bits, v_axis)
  except (ValueError, TypeError):
    return False
  for key, f in (("head_dim", kf), ("head_dim_v", vf)):
    d = a.get(key)
    if d is None:
      continue
    if d % f.per or (f.has_scale and f.axis == "token" and d % f.channel_group(d)):
      return False
  return True


def _supports_decode(a) -> bool:
  """Options of the decode-only quantized / paged kernels (no colsum, T <= 16)."""
  if a.pop("return_colsum", False) or a.pop("colsum_window", None) is not None:
    return False
  t = a.get("num_queries")
  if t is not None and t > DECODE_MAX_QUERIES:
    return False
  return supports(**a)


def supports_quantized(**static_args) -> bool:
  """Whether `quantized_attention` reads this cache format with these options.

  Format keys (kvjax QuantSpec names): fmt ("int" | "fp8_e4m3" | "fp8_e5m2"), k_bits,
  v_bits, k_axis, v_axis, group_size, symmetric; plus every key of `supports`. Unsupported:
  return_colsum / colsum_window (the fused kernels return out and lse only), more than
  DECODE_MAX_QUERIES queries, and any other truthy key (pre_rope=True, outlier_frac=0.01).
  """
  a = dict(static_args)
  a.pop("quantized", None)
  if a.pop("pre_rope", False) or a.pop("outlier_frac", 0.0):
    return False
  return _supports_formats(a, axes=True) and _supports_decode(a)


def supports_paged(**static_args) -> bool:
  """Whether `paged_attention` handles this pool format with these options.

  Format keys: fmt ("float" default, "int", "fp8_e4m3", "fp8_e5m2"), k_bits, v_bits,
  group_size (per-token scales only); plus every key of `supports`. Unsupported as for
  `supports_quantized`.
  """
  a = dict(static_args)
  a.pop("paged", None)
  a.pop("quantized", None)
  return _supports_formats(a, axes=False) and _supports_decode(a)
