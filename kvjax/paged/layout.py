"""Paged-pool layout: the field groups of a `PagedKVCache`, the out-of-pages error, and the
page codecs (how a token vector is stored in a page: as is, or quantized).

The array layout itself is listed in the `kvjax.paged` package docstring.
"""

from __future__ import annotations

from typing import Optional


POOL_FIELDS = ("k_pages", "k_scale", "k_zero", "v_pages", "v_scale", "v_zero", "pos_pages")
META_FIELDS = ("page_table", "lengths", "refcount", "free_stack", "num_free", "overflow",
               "part_free", "res_lengths")
ROW_FIELDS = ("k_res", "v_res", "res_positions")   # the full-precision residual window (KIVI)


class OutOfPages(ValueError):
  """The pool has too few free pages for this append right now (queue or preempt).

  Attributes:
    needed: pages the append needs (summed over rows, worst layer).
    free: free pages in the pool.
  """

  def __init__(self, needed: int, free: int, what: str = "PagedKVCache",
               partition: Optional[int] = None):
    self.needed, self.free, self.partition = int(needed), int(free), partition
    where = "" if partition is None else f" in pool partition {partition}"
    super().__init__(f"{what}: out of pages{where}: this append needs {self.needed} new pages "
                     f"but only {self.free} are free; release finished rows, swap rows out "
                     "(kvjax.offload), compress with a press, or enlarge num_pages")


# -- page codecs: how a token vector is stored in a page ---------------------------------------
def _check_quant(quant, head_dim, v_head_dim, page_size):
  if quant is None:
    return
  from kvjax.quant import spec as spec_lib  # pylint: disable=import-outside-toplevel
  if not isinstance(quant, spec_lib.QuantSpec):
    raise ValueError(f"quant must be a kvjax.quant.QuantSpec or None; got {type(quant).__name__}")
  bad = []
  if quant.pre_rope:
    bad.append("pre_rope=True (allowed: False)")
  if quant.outlier_frac:
    bad.append(f"outlier_frac={quant.outlier_frac} (allowed: 0)")
  if bad:
    raise ValueError(f"paged pools do not support {', '.join(bad)}; supported: per-token "
                     "formats (int8, fp8, per_token) and KIVI (per-channel keys, residual)")
  if quant.has_channel_axis and page_size % quant.group_size:
    raise ValueError(f"quant.group_size={quant.group_size} must divide page_size={page_size}: "
                     "a per-channel ('channel' axis, KIVI) token group lives inside one page")
  quant.check_dims(head_dim, v_head_dim)
  spec_lib.check_backend(quant)


def _encode(x, quant, bits, dtype, axis="token"):
  """x [..., S, D] -> (codes, scale | None, zero | None).

  axis="token": a scale per token (and channel group), scale [..., S, D/g];
  axis="channel": a scale per channel and group of G tokens (KIVI keys), scale [..., S/G, D].
  """
  if quant is None:
    return x.astype(dtype), None, None
  from kvjax.quant import formats, packing  # pylint: disable=import-outside-toplevel
  g = quant.channel_group(axis, x.shape[-1])
  if quant.fmt == "int":
    q = formats.quantize_int(x, bits=bits, axis=axis, group=g, symmetric=quant.symmetric,
                             scale_dtype=quant.scale_dtype)
    return packing.pack(q.codes, bits), q.scale, q.zero
  q = formats.quantize_fp8(x, fmt=quant.fmt, group=g, scale_dtype=quant.scale_dtype)
  return q.codes, q.scale, None


def _decode(codes, scale, zero, quant, bits, d, dtype, axis="token"):
  if quant is None:
    return codes
  from kvjax.quant import formats, packing  # pylint: disable=import-outside-toplevel
  g = quant.channel_group(axis, d)
  if quant.fmt == "int":
    x = formats.dequantize_int(packing.unpack(codes, bits, d), scale, zero, bits=bits,
                               axis=axis, group=g)
  else:
    x = formats.dequantize_fp8(codes, scale, group=g)
  return x.astype(dtype)
