"""`QuantizedKVCache`: INT8/INT4/INT2 (packed), FP8, KIVI, KVQuant-style caches.

One cache kind covers every `QuantSpec` (kvjax.quant.spec): per-token or per-channel
grouping, symmetric or asymmetric integer codes, FP8, a full-precision residual window,
pre-RoPE keys and dense-and-sparse outliers. References: KIVI (Liu et al., 2024), KVQuant
(Hooper et al., 2024), FP8 formats (Micikevicius et al., 2022).

Layout (what a fused kernel reads; Sq = quantized slots, R = spec.residual, Dp = D*bits/8):

  k_codes   [B, Hkv, Sq, Dp] uint8   integer codes packed along D (kvjax.quant.packing:
                                     code j*per+i in bits [i*bits, (i+1)*bits) of byte j),
            [B, Hkv, Sq, D] uint8    for FP8: float8 bit patterns (bitcast to read; uint8
                                     storage keeps scatters cheap: XLA CPU converted whole
                                     float8_e4m3fn buffers on every scatter)
  k_scale   [B, Hkv, Sq, D // g]     k_axis="token": a scale per token and channel group g
            [B, Hkv, Sq // G, D]     k_axis="channel": a scale per channel and token group G
  k_zero    same as k_scale          asymmetric int only (the group minimum), else None
  k_out_val [B, Hkv, Sq, n] dtype    exact outliers (outlier_frac > 0), else None
  k_out_idx [B, Hkv, Sq, n] uint8    their channel indices (int32 if D > 256)
  v_*       the same for values with v_axis / v_bits
  positions [B, Hkv, Sq] int32       original token position (-1 = empty)
  k_res     [B, Hkv, R, D] dtype     residual window: the most recent tokens, exact,
  v_res     [B, Hkv, R, Dv] dtype    post-RoPE (None when R == 0)
  res_positions [B, Hkv, R] int32
  res_lengths   [B, Hkv] int32       tokens in the residual window
  lengths   [B, Hkv] int32           all tokens held: quantized + residual

Dequantization: int asymmetric x = q * scale + zero, symmetric x = (q - 2**(bits-1)) * scale,
fp8 x = float(code) * scale; outliers then overwrite their channels; with pre_rope the
keys are rotated to `positions` (kvjax.rope.rerotate from 0).

Quantized slots [0, lengths - res_lengths) are valid and never rewritten. On append, the
residual window and the new tokens form one buffer; when it holds more than R tokens, the
oldest whole groups of G tokens (G = group_size with a channel axis, else 1) are quantized
into the next slots, so the window keeps between R - G + 1 and R tokens (KIVI's streaming
rule; KIVI keeps separate key and value windows, here they share one). Capacity is
Sq + R with Sq a multiple of G, and any sequence of appends that fits it succeeds.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import flax.struct
import jax
import jax.numpy as jnp

from kvjax import cache as cache_lib
from kvjax import rope as rope_lib
from kvjax.quant import formats, packing
from kvjax.quant import spec as spec_lib
from kvjax.quant.base import CompressedCache, KVView, chunk_destinations, gather_slots, round_up
from kvjax.quant.spec import QuantSpec

_static = lambda: flax.struct.field(pytree_node=False)  # noqa: E731


def _encode(x, spec: QuantSpec, axis: str, bits: int, out_dtype):
  """x [B,H,P,D] -> (codes, scale, zero, out_val, out_idx) in storage layout."""
  d = x.shape[-1]
  n_out = formats.outlier_count(d, spec.outlier_frac)
  exclude = ov = oi = None
  if n_out:
    exclude, ov, oi = formats.split_outliers(x, n_out, out_dtype)
  g = spec.channel_group(axis, d)
  if spec.fmt == "int":
    q = formats.quantize_int(x, bits=bits, axis=axis, group=g, symmetric=spec.symmetric,
                             scale_dtype=spec.scale_dtype, exclude=exclude)
    codes = packing.pack(q.codes, bits)
  else:
    q = formats.quantize_fp8(x, fmt=spec.fmt, group=g, scale_dtype=spec.scale_dtype,
                             exclude=exclude)
    # stored as uint8 bit patterns: XLA would convert a whole float8 buffer on each scatter
    codes = jax.lax.bitcast_convert_type(q.codes, jnp.uint8)
  return codes, q.scale, q.zero, ov, oi


def _decode(codes, scale, zero, ov, oi, spec: QuantSpec, axis: str, bits: int, d: int):
  g = spec.channel_group(axis, d)
  if spec.fmt == "int":
    x = formats.dequantize_int(packing.unpack(codes, bits, d), scale, zero, bits=bits,
                               axis=axis, group=g)
  else:
    x = formats.dequantize_fp8(codes, scale, fmt=spec.fmt, group=g)
  if ov is not None:
    x = formats.merge_outliers(x, ov, oi)
  return x


@flax.struct.dataclass
class QuantizedKVCache(CompressedCache):
  """A quantized KV cache (layout in the module docstring). Build with `init`/`quantize`."""

  k_codes: jax.Array
  k_scale: jax.Array
  k_zero: Optional[jax.Array]
  k_out_val: Optional[jax.Array]
  k_out_idx: Optional[jax.Array]
  v_codes: jax.Array
  v_scale: jax.Array
  v_zero: Optional[jax.Array]
  v_out_val: Optional[jax.Array]
  v_out_idx: Optional[jax.Array]
  positions: jax.Array
  lengths: jax.Array
  k_res: Optional[jax.Array]
  v_res: Optional[jax.Array]
  res_positions: Optional[jax.Array]
  res_lengths: Optional[jax.Array]
  spec: QuantSpec = _static()
  head_dim: int = _static()
  v_head_dim: int = _static()
  dtype: str = _static()

  CAPS: ClassVar[cache_lib.Capabilities] = cache_lib.Capabilities(
      colsum=True, quantized=True, convertible=True)

  # Component of each field in memory reports (kvjax.memory).
  BYTE_CATEGORIES = {
      "k_codes": "codes", "v_codes": "codes", "k_scale": "scales", "v_scale": "scales",
      "k_zero": "zeros", "v_zero": "zeros", "k_out_val": "outliers", "k_out_idx": "outliers",
      "v_out_val": "outliers", "v_out_idx": "outliers", "k_res": "residual",
      "v_res": "residual", "res_positions": "residual", "res_lengths": "index",
      "positions": "index", "lengths": "index"}

  @classmethod
  def init(cls, batch: int, kv_heads: int, capacity: int, head_dim: int, spec: QuantSpec,
           dtype=jnp.float32, v_head_dim: Optional[int] = None,
           backend: Optional[str] = None) -> "QuantizedKVCache":
    """An empty cache holding at least `capacity` tokens (see `capacity` for the exact count).

    Args:
      batch, kv_heads, head_dim, v_head_dim: shapes.
      capacity: tokens to hold; the quantized region is rounded up to whole token groups.
      spec: the format.
      dtype: dtype of the residual window, outliers and decompressed output.
      backend: backend whose FP8 support is checked (default: jax.default_backend()).
    """
    if not isinstance(spec, QuantSpec):
      raise ValueError(f"spec must be a kvjax.quant.QuantSpec; got {type(spec).__name__}")
    if capacity < 1:
      raise ValueError(f"capacity={capacity}; must be >= 1")
    dv = head_dim if v_head_dim is None else v_head_dim
    spec.check_dims(head_dim, dv)
    spec_lib.check_backend(spec, backend)
    dt = jnp.dtype(dtype)
    r, g = spec.residual, spec.token_group
    sq = round_up(max(capacity - r, 0), g)
    b, h = batch, kv_heads
    # Shapes come from encoding one dummy group (so the layout has one definition).
    def empty(d, axis, bits):
      probe = jax.eval_shape(lambda x: _encode(x, spec, axis, bits, dt),
                             jax.ShapeDtypeStruct((b, h, g, d), dt))
      out = []
      for i, a in enumerate(probe):  # (codes, scale, zero, out_val, out_idx)
        if a is None:
          out.append(None)
          continue
        n_tok = sq // g if (axis == "channel" and i in (1, 2)) else sq
        out.append(jnp.zeros((b, h, n_tok) + a.shape[3:], a.dtype))
      return out
    kc, ks, kz, kov, koi = empty(head_dim, spec.k_axis, spec.k_bits)
    vc, vs, vz, vov, voi = empty(dv, spec.v_axis, spec.v_bits)
    res = (jnp.zeros((b, h, r, head_dim), dt), jnp.zeros((b, h, r, dv), dt),
           jnp.full((b, h, r), -1, jnp.int32), jnp.zeros((b, h), jnp.int32)) if r else (None,) * 4
    return cls(k_codes=kc, k_scale=ks, k_zero=kz, k_out_val=kov, k_out_idx=koi,
               v_codes=vc, v_scale=vs, v_zero=vz, v_out_val=vov, v_out_idx=voi,
               positions=jnp.full((b, h, sq), -1, jnp.int32), lengths=jnp.zeros((b, h), jnp.int32),
               k_res=res[0], v_res=res[1], res_positions=res[2], res_lengths=res[3],
               spec=spec, head_dim=head_dim, v_head_dim=dv, dtype=dt.name)

  @property
  def kind_label(self) -> str:
    return self.spec.label

  @property
  def head_dims(self) -> tuple:
    return self.head_dim, self.v_head_dim

  # -- protocol --------------------------------------------------------------------------
  @property
  def quantized_capacity(self) -> int:
    return self.positions.shape[-1]

  @property
  def capacity(self) -> int:
    return self.quantized_capacity + self.spec.residual

  def _res_len(self):
    return self.res_lengths if self.spec.residual else jnp.zeros_like(self.lengths)

  def _write(self, k_new, v_new, pos):
    spec = self.spec
    r_cap, g = spec.residual, spec.token_group
    b, h, t, _ = k_new.shape
    sq = self.quantized_capacity
    dt = jnp.dtype(self.dtype)
    p = round_up(r_cap + t, g)
    r = self._res_len()
    n = jnp.sum(pos >= 0, axis=-1).astype(jnp.int32)
    dest = chunk_destinations(r, pos, p)

    def buffer(res, new, fill, dtype):
      buf = jnp.full((b, h, p) + new.shape[3:], fill, dtype)
      if r_cap:
        buf = buf.at[:, :, :r_cap].set(res.astype(dtype))
      return cache_lib.scatter_slots(buf, dest, new)

    ck = buffer(self.k_res, k_new, 0, dt)
    cv = buffer(self.v_res, v_new, 0, dt)
    cpos = buffer(self.res_positions, pos, -1, jnp.int32)
    s_old = sq + r_cap
    res_src = jnp.broadcast_to(sq + jnp.arange(r_cap, dtype=jnp.int32), (b, h, r_cap))
    csrc = buffer(res_src, jnp.broadcast_to(s_old + jnp.arange(t, dtype=jnp.int32), pos.shape),
                  -1, jnp.int32)
    c = r + n                                                  # tokens in the buffer
    f = c if r_cap == 0 else jnp.maximum(0, -(-(c - r_cap) // g)) * g  # tokens to quantize
    q_len = self.lengths - r

    kq = ck
    if spec.pre_rope:
      kq = rope_lib.rerotate(ck, cpos, jnp.zeros_like(cpos), spec.rope)
    k_enc = _encode(kq, spec, spec.k_axis, spec.k_bits, dt)
    v_enc = _encode(cv, spec, spec.v_axis, spec.v_bits, dt)

    idx = jnp.arange(p, dtype=jnp.int32)
    tok_dest = jnp.where(idx < f[..., None], q_len[..., None] + idx, sq)
    gidx = jnp.arange(p // g, dtype=jnp.int32)
    grp_dest = jnp.where(gidx < (f // g)[..., None], (q_len // g)[..., None] + gidx, sq // g)

    def put(old, new, axis, is_scale):
      if old is None:
        return None
      grouped = is_scale and axis == "channel"
      return cache_lib.scatter_slots(old, grp_dest if grouped else tok_dest, new)

    def store(prefix, enc, axis):
      names = ("codes", "scale", "zero", "out_val", "out_idx")
      return {f"{prefix}_{nm}": put(getattr(self, f"{prefix}_{nm}"), val, axis,
                                    nm in ("scale", "zero"))
              for nm, val in zip(names, enc)}

    upd = {**store("k", k_enc, spec.k_axis), **store("v", v_enc, spec.v_axis)}
    upd["positions"] = cache_lib.scatter_slots(self.positions, tok_dest, cpos)
    kept = jnp.where(self.positions >= 0, jnp.arange(sq, dtype=jnp.int32), -1)
    src = cache_lib.scatter_slots(kept, tok_dest, csrc)
    flushed = jnp.minimum(q_len + f, sq)
    if r_cap:
      ridx = f[..., None] + jnp.arange(r_cap, dtype=jnp.int32)
      keep = ridx < c[..., None]
      upd["k_res"] = jnp.where(keep[..., None], gather_slots(ck, ridx), 0).astype(dt)
      upd["v_res"] = jnp.where(keep[..., None], gather_slots(cv, ridx), 0).astype(dt)
      upd["res_positions"] = jnp.where(keep, gather_slots(cpos, ridx), -1)
      upd["res_lengths"] = (c - f).astype(jnp.int32)
      src = jnp.concatenate([src, jnp.where(keep, gather_slots(csrc, ridx), -1)], axis=-1)
      upd["lengths"] = (flushed + c - f).astype(jnp.int32)
    else:
      upd["lengths"] = flushed.astype(jnp.int32)
    return self.replace(**upd), src

  def dequantize(self):
    """Decompressed quantized region: (k [B,H,Sq,D] float32, v [B,H,Sq,Dv] float32)."""
    spec = self.spec
    k = _decode(self.k_codes, self.k_scale, self.k_zero, self.k_out_val, self.k_out_idx, spec,
                spec.k_axis, spec.k_bits, self.head_dim)
    if spec.pre_rope:
      k = rope_lib.rerotate(k, jnp.zeros_like(self.positions), self.positions, spec.rope)
    v = _decode(self.v_codes, self.v_scale, self.v_zero, self.v_out_val, self.v_out_idx, spec,
                spec.v_axis, spec.v_bits, self.v_head_dim)
    return k, v

  def materialize(self) -> KVView:
    dt = jnp.dtype(self.dtype)
    k, v = self.dequantize()
    k, v = k.astype(dt), v.astype(dt)
    pos = self.positions
    final = pos >= 0
    if self.spec.residual:
      k = jnp.concatenate([k, self.k_res.astype(dt)], axis=2)
      v = jnp.concatenate([v, self.v_res.astype(dt)], axis=2)
      pos = jnp.concatenate([pos, self.res_positions], axis=-1)
      final = jnp.concatenate([final, jnp.zeros_like(self.res_positions, bool)], axis=-1)
    return KVView(k, v, pos, final)

  def _attend(self, q, k_new, v_new, q_positions, spec, *, sink_logits=None,
              return_colsum=False, colsum_window=None, return_lse=False):
    """CompressedCache._attend, or the fused quantized decode kernel when
    `kvjax.attention.kernel_backend` (the dispatch rule of every cache kind) picks it: it
    attends straight from the codes (the quantized region, plus the residual window and
    the exact chunk merged by log-sum-exp), with the same semantics.
    """
    from kvjax import attention as attn_lib  # pylint: disable=import-outside-toplevel
    from kvjax.quant.base import headwise_positions  # pylint: disable=import-outside-toplevel
    s = self.spec
    mode = attn_lib.kernel_backend(spec, q, layout="quantized", quant=s,
                                   num_kv_heads=self.lengths.shape[1],
                                   head_dim_v=self.v_head_dim, return_colsum=return_colsum,
                                   colsum_window=colsum_window)
    if mode == "xla":
      return super()._attend(q, k_new, v_new, q_positions, spec, sink_logits=sink_logits,
                             return_colsum=return_colsum, colsum_window=colsum_window,
                             return_lse=return_lse)
    self.check_room(q_positions)
    pos_new = headwise_positions(q_positions, k_new.shape[1])
    new, _ = self._write(k_new, v_new, pos_new)
    dt = jnp.dtype(self.dtype)
    ex_k, ex_v, ex_pos = k_new.astype(dt), v_new.astype(dt), pos_new
    if s.residual:
      ex_k = jnp.concatenate([self.k_res.astype(dt), ex_k], axis=2)
      ex_v = jnp.concatenate([self.v_res.astype(dt), ex_v], axis=2)
      ex_pos = jnp.concatenate([self.res_positions, ex_pos], axis=-1)
    out, lse = attn_lib.quantized_decode(
        q, (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero,
            self.positions, self.lengths - self._res_len()), (ex_k, ex_v, ex_pos),
        q_positions=q_positions, quant=s, spec=spec, sink_logits=sink_logits,
        interpret=mode == "interpret")
    return attn_lib.AttentionOutput(out, lse if return_lse else None, None), new


def quantize(layer_cache, spec: QuantSpec, *, capacity: Optional[int] = None,
             dtype=None) -> QuantizedKVCache:
  """Converts a layer cache (any kind with `CAPS.convertible`) to `spec`.

  The valid tokens (head-wise lengths and positions allowed, e.g. after eviction) are
  written in slot order, exactly as if they had been appended to an empty cache.

  Args:
    layer_cache: an unstacked layer cache.
    spec: target format.
    capacity: token capacity of the result (default: the source's capacity).
    dtype: residual/output dtype (default: the source's key dtype).
  """
  if not cache_lib.caps(layer_cache).convertible:
    raise ValueError(f"cannot quantize a {type(layer_cache).__name__}: its kind is not "
                     "convertible (CAPS.convertible: dense and compressed KV kinds)")
  src = layer_cache.to_dense()
  if src.k.ndim != 4:
    raise ValueError(f"quantize expects one layer's cache (k of rank 4); got k {src.k.shape} "
                     "(use kvjax.quant.quantize_model for a ModelCache)")
  b, h, s, d = src.k.shape
  cap = src.capacity if capacity is None else capacity
  out = QuantizedKVCache.init(b, h, cap, d, spec, dtype=dtype or src.k.dtype,
                              v_head_dim=src.v.shape[-1])
  valid = src.valid_mask()
  need = jnp.sum(valid, axis=-1)
  if not isinstance(need, jax.core.Tracer) and int(jnp.max(need)) > out.capacity:
    raise ValueError(f"capacity={cap} is smaller than the {int(jnp.max(need))} tokens held")
  pos = jnp.where(valid, src.positions, -1)
  return out._write(src.k, src.v, pos)[0]  # pylint: disable=protected-access
