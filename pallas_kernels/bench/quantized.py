"""Benchmark of the quantized decode kernel (`quantized_decode.py`).

Per format (int8, fp8_e4m3, fp8_e5m2, int4, int2, kivi4, kivi2): bytes are what the
kernel must read (codes + scales + zeros of the valid slots, plus the exact residual
window); baselines timed in the same run are the bf16 full-cache decode kernel on a cache
of the same length (`x bf16`; the target for INT4 KIVI at 32K is >= 3) and the XLA path
that dequantizes the whole cache first (`x xla`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import quantized_decode as quant_lib
from pallas_kernels.bench import harness

QUANT_FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2", "int4", "int2", "kivi4", "kivi2")


def quant_layout(name: str, group: int, residual: int) -> dict[str, Any]:
  """Static kernel kwargs and storage facts of a named format (kvjax.quant presets)."""
  if name == "int8":
    st = dict(fmt="int", k_bits=8, v_bits=8)
    return dict(static=st, zeros=False, residual=0, group=None)
  if name in ("fp8_e4m3", "fp8_e5m2"):
    return dict(static=dict(fmt=name), zeros=False, residual=0, group=None)
  if name in ("int4", "int2"):
    bits = int(name[3:])
    return dict(static=dict(fmt="int", k_bits=bits, v_bits=bits), zeros=True, residual=0,
                group=None)
  if name in ("kivi4", "kivi2"):
    bits = int(name[4:])
    return dict(static=dict(fmt="int", k_bits=bits, v_bits=bits, k_axis="channel",
                            v_axis="token", group_size=group),
                zeros=True, residual=residual, group=group)
  raise ValueError(f"--quant_formats entry {name!r}; allowed: {QUANT_FORMATS}")


@functools.partial(jax.jit, static_argnames=("batch", "q_heads", "kv_heads", "queries",
                                             "slots", "head_dim", "name", "group",
                                             "residual", "ragged", "dtype"))
def make_quant_inputs(batch, q_heads, kv_heads, queries, slots, head_dim, *, name, group,
                      residual, ragged, dtype, seed=0):
  """A random quantized cache of `slots` tokens in kvjax.quant layout (codes, scales,
  zeros, residual), plus the same tokens as a dense bf16 cache for the baseline."""
  lay = quant_layout(name, group, residual)
  st = lay["static"]
  r = lay["residual"]
  g = lay["group"] or 1
  sq = -(-(slots - r) // g) * g
  b, h, d = batch, kv_heads, head_dim
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(keys[0], (b, q_heads, queries, d), dtype)
  f16 = jnp.float16
  if st["fmt"] == "int":
    def codes(key, bits):
      return jax.random.randint(key, (b, h, sq, d * bits // 8), 0, 256, jnp.int32).astype(
          jnp.uint8)
    kc, vc = codes(keys[1], st["k_bits"]), codes(keys[2], st["v_bits"])
  else:
    fp8 = jnp.float8_e4m3fn if name == "fp8_e4m3" else jnp.float8_e5m2
    enc = lambda key: jax.lax.bitcast_convert_type(
        jax.random.normal(key, (b, h, sq, d)).astype(fp8), jnp.uint8)
    kc, vc = enc(keys[1]), enc(keys[2])
  if st.get("k_axis") == "channel":
    ks = jax.random.uniform(keys[3], (b, h, sq // g, d), f16, 0.01, 0.1)
    vs = jax.random.uniform(keys[4], (b, h, sq, d // g), f16, 0.01, 0.1)
  else:
    ks = jax.random.uniform(keys[3], (b, h, sq, 1), f16, 0.01, 0.1)
    vs = jax.random.uniform(keys[4], (b, h, sq, 1), f16, 0.01, 0.1)
  if ragged:
    total = jax.random.randint(keys[5], (b, h), 1, slots + 1, jnp.int32)
  else:
    total = jnp.full((b, h), slots, jnp.int32)
  # kvjax's streaming rule: the newest R - G + 1 .. R tokens stay exact in the residual.
  q_len = jnp.minimum((jnp.maximum(total - r, 0) + g - 1) // g * g, sq)
  kpos = jnp.broadcast_to(jnp.arange(sq, dtype=jnp.int32), (b, h, sq))
  arrays = dict(q=q, k_codes=kc, k_scale=ks, v_codes=vc, v_scale=vs, k_lengths=q_len,
                k_positions=kpos, k_zero=-ks if lay["zeros"] else None,
                v_zero=-vs if lay["zeros"] else None)
  if r:
    arrays.update(k_res=jax.random.normal(keys[6], (b, h, r, d), dtype),
                  v_res=jax.random.normal(keys[7], (b, h, r, d), dtype),
                  res_positions=sq + jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32),
                                                      (b, h, r)),
                  res_lengths=jnp.clip(total - q_len, 0, r))
  n_total = q_len + (arrays["res_lengths"] if r else 0)
  last = jnp.max(n_total, axis=1, keepdims=True) - queries
  q_positions = jnp.maximum(last, 0) + jnp.arange(queries, dtype=jnp.int32)[None]
  arrays["q_positions"] = q_positions
  dense = dict(q=q, k=jax.random.normal(keys[1], (b, h, slots, d), dtype),
               v=jax.random.normal(keys[2], (b, h, slots, d), dtype), k_lengths=n_total,
               q_positions=q_positions,
               k_positions=jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, h, slots)))
  return arrays, dense


def quant_bytes(arrays) -> int:
  """Bytes the fused kernel must read: codes + scales + zeros of the valid quantized slots
  (a channel scale row counts when its token group holds a valid slot), plus the valid
  residual K/V."""
  b, h, sq, _ = arrays["k_codes"].shape
  n = int(jnp.sum(arrays["k_lengths"]))
  total = 0
  for name in ("k_codes", "v_codes", "k_scale", "v_scale", "k_zero", "v_zero"):
    a = arrays.get(name)
    if a is None:
      continue
    per_row = a.size // (b * h * a.shape[2]) * a.dtype.itemsize
    rows_per_slot = a.shape[2] / sq
    total += int(round(n * rows_per_slot)) * per_row
  if arrays.get("k_res") is not None:
    nr = int(jnp.sum(arrays["res_lengths"]))
    total += nr * (arrays["k_res"].shape[-1] + arrays["v_res"].shape[-1]) * (
        arrays["k_res"].dtype.itemsize)
  return total


_QUANT_ARRAYS = ("k_zero", "v_zero", "k_res", "v_res", "res_positions", "res_lengths")


def case(name, *, batch, slots, queries, q_heads, kv_heads, head_dim, dtype,
                         platform, interpret, ragged, window, block_k, num_splits, iters,
                         warmup, baselines, device_kind, group, residual, memory_bytes=None,
                         memory_fraction=0.4) -> dict[str, Any]:
  """Times the fused quantized decode for one format and shape; returns a row."""
  kind = pallas_kernels.resolve_platform(platform, interpret)
  lay = quant_layout(name, group, residual)
  row = dict(kernel="quantized", format=name,
             variant=kind + (" (interpret)" if interpret else ""), batch=batch, slots=slots,
             queries=queries, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
             dtype=jnp.dtype(dtype).name, device=device_kind)
  dense_bytes = 2 * batch * kv_heads * slots * head_dim * jnp.dtype(dtype).itemsize
  if memory_bytes and 2 * dense_bytes > memory_fraction * memory_bytes:
    row["skipped"] = f"bf16 K+V {dense_bytes / 2**30:.1f} GiB too big for the baseline"
    return row
  arrays, dense = make_quant_inputs(batch, q_heads, kv_heads, queries, slots, head_dim,
                                    name=name, group=lay["group"] or 1,
                                    residual=lay["residual"], ragged=ragged,
                                    dtype=jnp.dtype(dtype))
  extra = {k: arrays[k] for k in _QUANT_ARRAYS if arrays.get(k) is not None}
  names = sorted(extra)
  fused = jax.jit(functools.partial(
      quant_lib.quantized_decode_attention, platform=kind, interpret=interpret,
      window=window, block_k=block_k, num_splits=num_splits, **lay["static"]))
  def ours(q, kc, ks, vc, vs, n, qpos, kpos, *rest):
    return fused(q, kc, ks, vc, vs, n, q_positions=qpos, k_positions=kpos,
                 **dict(zip(names, rest)))[0]
  args = (arrays["q"], arrays["k_codes"], arrays["k_scale"], arrays["v_codes"],
          arrays["v_scale"], arrays["k_lengths"], arrays["q_positions"],
          arrays["k_positions"], *[extra[k] for k in names])
  t = harness.median_time(ours, args, iters=iters, warmup=warmup)
  nbytes = quant_bytes(arrays)
  peak = harness.peak_bandwidth(device_kind)
  row.update(time_ms=t * 1e3, bytes=nbytes, gb_per_s=nbytes / t / 1e9,
             frac_peak=(nbytes / t / peak) if peak else None)
  if baselines:
    bf16 = harness.ours(dense, platform=platform, interpret=interpret, window=window,
                 block_k=None, block_q=None, num_splits=None)
    dargs = (dense["q"], dense["k"], dense["v"], dense["k_lengths"], dense["q_positions"],
             dense["k_positions"])
    harness.time_baseline(row, "bf16", bf16, dargs, iters=iters, warmup=warmup)
    deq_bytes = 2 * 4 * batch * kv_heads * slots * head_dim
    if memory_bytes and 2 * deq_bytes > memory_fraction * memory_bytes:
      row["xla_ms"], row["xla_note"] = None, "dequantized copy too big"
    else:
      ref = jax.jit(functools.partial(quant_lib.quantized_decode_reference, window=window,
                                      **lay["static"]))
      def xla(q, kc, ks, vc, vs, n, qpos, kpos, *rest):
        return ref(q, kc, ks, vc, vs, n, q_positions=qpos, k_positions=kpos,
                   **dict(zip(names, rest)))[0]
      harness.time_baseline(row, "xla", xla, args, iters=iters, warmup=warmup)
    harness.add_speedups(row, ("bf16", "xla"))
  return row
