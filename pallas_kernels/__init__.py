"""Pallas attention kernels for kvjax: entry points and what they support.

`attention` picks the kernel by the number of queries T (ragged decode for
T <= DECODE_MAX_QUERIES, flash prefill otherwise) and the variant by platform (Mosaic on
TPU, Triton on GPU). Both follow docs/CONVENTIONS.md exactly; `reference.py` is the
pure-jnp definition they are tested against.

Files: decode_attention.py (the ragged split-K decode pipeline, and dense decode),
kv_source.py (how the pipeline reads K/V: storage formats, dequantizing loads),
flash_prefill.py (long-T flash attention), colsum.py (per-slot attention mass from saved
lse), quantized_decode.py (decode straight from INT8 / FP8 / KIVI INT4 / INT2 caches +
residual window), paged_decode.py (decode over a page pool + page tables), reference.py,
and one benchmark per kernel in bench/.

`quantized_attention` / `paged_attention` are the entry points of the last two (decode
only: T <= DECODE_MAX_QUERIES). Whether a kernel serves a call is one typed question:
`support(KernelRequest(...))` returns a `Support` that is falsy with the reason when not.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels import decode_attention as _decode
from pallas_kernels import flash_prefill as _prefill
from pallas_kernels import kv_source as _source
from pallas_kernels import paged_decode as _paged
from pallas_kernels import quantized_decode as _quantized
from pallas_kernels.colsum import attention_colsum
from pallas_kernels.reference import attention_reference

# The kernel functions live in their modules (`pallas_kernels.decode_attention.
# decode_attention`, `pallas_kernels.flash_prefill.flash_prefill`); they are not re-exported
# here so that the module names are never shadowed by functions.
__all__ = ["attention", "attention_colsum", "attention_reference", "DECODE_MAX_QUERIES",
           "resolve_platform", "quantized_attention", "paged_attention", "KernelRequest",
           "Support", "support", "LAYOUTS"]

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
              n_sink=0, softcap=None, return_lse=False, return_colsum=False,
              colsum_window=None, platform=None, interpret=False, causal=True,
              sink_logits=None, block_q=None, block_k=None, num_splits=None):
  """Attention of q over a ragged KV set, with a Pallas kernel.

  Args:
    q: [B, Hq, T, D]; k: [B, Hkv, S, D]; v: [B, Hkv, S, Dv].
    k_lengths: [B, Hkv] int32; q_positions: [B, T] int32; k_positions: [B, Hkv, S] int32.
    scale, window, n_sink, softcap, causal: docs/CONVENTIONS.md.
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
                scale=scale, causal=causal, window=window, n_sink=n_sink,
                softcap=softcap, return_colsum=return_colsum, colsum_window=colsum_window,
                block_k=block_k, platform=kind, interpret=interpret)
  if t <= DECODE_MAX_QUERIES:
    out, lse, colsum = _decode.decode_attention(q, k, v, k_lengths, num_splits=num_splits,
                                                **common)
  else:
    out, lse, colsum = _prefill.flash_prefill(q, k, v, k_lengths, return_lse=return_lse,
                                              block_q=block_q, **common)
  return out, (lse if return_lse else None), (colsum if return_colsum else None)


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


LAYOUTS = ("dense", "quantized", "paged")


@dataclasses.dataclass(frozen=True)
class KernelRequest:
  """The static side of one attention call, as a kernel must know it (hashable).

  Attributes:
    layout: "dense" (`attention`), "quantized" (`quantized_attention`) or "paged"
      (`paged_attention`).
    fmt, k_bits, v_bits, k_axis, v_axis, group_size: how K/V are stored (kvjax QuantSpec
      names; `kv_source.KVFormat`); "float" for plain values.
    pre_rope: keys stored before RoPE. outliers: dense-and-sparse outliers beside the
      codes ("KVQuant", arXiv:2401.18079). residual: exact recent tokens beside the
      codes (KIVI). partitions: a page pool split over devices. None of these is read
      by a kernel.
    head_dim, head_dim_v, dtype, num_q_heads, num_kv_heads, num_queries: the call's
      shapes (None = not checked).
    scale, causal, window, n_sink, softcap, return_colsum, colsum_window:
      docs/CONVENTIONS.md.
  """
  layout: str = "dense"
  fmt: str = "float"
  k_bits: int = 8
  v_bits: int = 8
  k_axis: str = "token"
  v_axis: str = "token"
  group_size: Optional[int] = None
  pre_rope: bool = False
  outliers: bool = False
  residual: bool = False
  partitions: int = 1
  head_dim: Optional[int] = None
  head_dim_v: Optional[int] = None
  dtype: Optional[str] = None
  num_q_heads: Optional[int] = None
  num_kv_heads: Optional[int] = None
  num_queries: Optional[int] = None
  scale: Optional[float] = None
  causal: bool = True
  window: Optional[int] = None
  n_sink: int = 0
  softcap: Optional[float] = None
  return_colsum: bool = False
  colsum_window: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Support:
  """Whether a kernel serves a `KernelRequest`; `reason` names what it does not support."""
  ok: bool
  reason: str = ""

  def __bool__(self) -> bool:
    return self.ok


def _unsupported(r: KernelRequest) -> str:
  """What the kernels cannot do of `r` ("" when they can do all of it)."""
  if r.layout not in LAYOUTS:
    return f"layout={r.layout!r} (allowed: {LAYOUTS})"
  for name in ("head_dim", "head_dim_v"):
    d = getattr(r, name)
    if d is not None and (d % 8 or not 8 <= d <= 256):
      return f"{name}={d} (the kernels need a multiple of 8 in [8, 256])"
  if r.dtype is not None and jnp.dtype(r.dtype) not in [jnp.dtype(x) for x in _FLOAT_DTYPES]:
    return f"dtype={jnp.dtype(r.dtype).name} (allowed: float32, bfloat16, float16)"
  hq, hkv = r.num_q_heads, r.num_kv_heads
  if hq is not None and hkv is not None and (hkv < 1 or hq % hkv):
    return f"num_q_heads={hq} with num_kv_heads={hkv} (need a multiple)"
  if r.num_queries is not None and r.num_queries < 1:
    return f"num_queries={r.num_queries} (need at least one)"
  try:
    _common.check_static(window=r.window, n_sink=r.n_sink, softcap=r.softcap,
                         scale=r.scale)
  except ValueError as e:
    return str(e)
  cw = r.colsum_window
  if cw is not None and (not isinstance(cw, int) or cw < 1):
    return f"colsum_window={cw!r} (a positive int or None)"
  if r.layout == "dense":
    return "" if r.fmt == "float" else f"fmt={r.fmt!r} (dense K/V are plain floats)"
  kernel = f"the {r.layout} decode kernel"
  if r.return_colsum or cw is not None:
    return f"return_colsum ({kernel} returns out and lse only)"
  if r.num_queries is not None and r.num_queries > DECODE_MAX_QUERIES:
    return f"num_queries={r.num_queries} ({kernel} takes at most {DECODE_MAX_QUERIES})"
  for flag in ("pre_rope", "outliers"):
    if getattr(r, flag):
      return f"{flag}=True"
  if r.layout == "quantized" and r.fmt == "float":
    return f"fmt='float' ({kernel} reads codes)"
  if r.layout == "paged":
    if (r.k_axis, r.v_axis) != ("token", "token"):
      return (f"k_axis={r.k_axis!r}, v_axis={r.v_axis!r} ({kernel} reads per-token "
              "scales only)")
    if r.residual:
      return f"residual=True ({kernel} reads no residual window)"
    if r.partitions != 1:
      return f"partitions={r.partitions} ({kernel} reads one pool)"
  try:
    kf, vf = _source.make_formats(r.fmt, r.k_bits, r.v_bits, r.k_axis, r.v_axis,
                                  r.group_size, None, None)
  except (ValueError, TypeError) as e:
    return str(e)
  for name, f in (("head_dim", kf), ("head_dim_v", vf)):
    d = getattr(r, name)
    if d is not None and (d % f.per or (f.has_scale and f.axis == "token"
                                        and d % f.channel_group(d))):
      return f"{name}={d} with {f.bits}-bit codes and group_size={r.group_size}"
  return ""


def support(request: KernelRequest) -> Support:
  """Whether the kernel of `request.layout` serves `request` (else the caller uses XLA)."""
  reason = _unsupported(request)
  return Support(not reason, reason)
