r"""Benchmark of the attention kernels: time, achieved HBM bandwidth, ratios vs baselines.

  python -m pallas_kernels.bench                          # defaults that fit the device
  python -m pallas_kernels.bench --kernels=decode --batch=1,8,32 --context=1024,131072
  python -m pallas_kernels.bench --interpret --platform=cpu   # CPU smoke run, tiny shapes
  python -m pallas_kernels.bench --help

Per kernel and shape it prints the median time, the achieved bandwidth (bytes of K+V the
kernel must read, i.e. the valid slots of every (batch, kv head), divided by the time), its
fraction of the device's peak HBM bandwidth, the achieved TFLOP/s, and the speed-up over
baselines measured in the same run: the XLA reference (`reference.py`, jitted) and jax's
own kernels where importable (`pallas.ops.gpu.decode_attention.gqa` on GPU,
`pallas.ops.tpu.paged_attention` on TPU for decode; `pallas.ops.gpu.attention.mha` /
`pallas.ops.tpu.flash_attention` for prefill). Baselines that do not fit in memory, or
that cannot run (jax's TPU paged attention has no interpret mode), print n/a.

Baselines do less work than our kernels (no positions, per-batch rather than per-head
lengths, no window/sinks), so a ratio < 1 is not necessarily a loss; it is the price of
the extra generality.

`--kernels=quantized` times the fused quantized decode (`quantized_decode.py`) per
`--quant_formats` entry (int8, fp8_e4m3, fp8_e5m2, int4, int2, kivi4, kivi2): bytes are
what it must read (codes + scales + zeros of the valid slots, plus the exact residual
window), and it is compared with the bf16 full-cache decode kernel on a cache of the same
length, timed in the same run (`x bf16`; the target for INT4 KIVI at 32K is >= 3), and
with the XLA path that dequantizes the whole cache first (`x xla`). `--kernels=paged`
times the paged decode (`paged_decode.py`) on a shuffled page pool against our dense
decode on the same tokens laid out contiguously (`x dense`) and jax's own paged attention
(`pallas.ops.gpu.paged_attention` / `pallas.ops.tpu.paged_attention`, `x jax`).
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from typing import Any, Sequence

from absl import flags
import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import paged_decode as paged_lib
from pallas_kernels import quantized_decode as quant_lib
from pallas_kernels.reference import attention_reference

# Peak HBM bandwidth (bytes/s) by device kind; matched by substring, first match wins.
PEAK_HBM_BYTES_PER_S = (
    ("h200", 4.8e12),
    ("h100", 3.35e12),
    ("v5 lite", 8.2e11),
    ("v5e", 8.2e11),
    ("v5p", 2.76e12),
    ("v5", 2.76e12),
    ("v4", 1.2e12),
)

_FLAGS = flags.FlagValues()  # private: importing this module never clashes with launchers
flags.DEFINE_list("kernels", ["decode", "prefill"], "Kernels to time: decode, prefill, "
                  "quantized, paged.", flag_values=_FLAGS)
flags.DEFINE_string("platform", None, "Kernel variant: tpu | gpu | cpu (cpu needs "
                    "--interpret). Default: jax.default_backend().", flag_values=_FLAGS)
flags.DEFINE_bool("interpret", False, "Run the kernels in interpret mode (CPU).",
                  flag_values=_FLAGS)
flags.DEFINE_list("batch", [], "Decode batch sizes. Default: 1,8,32 on an accelerator, 1 "
                  "in interpret mode.", flag_values=_FLAGS)
flags.DEFINE_list("context", [], "Decode cache sizes S. Default: 1024,8192,32768,131072 "
                  "on an accelerator (those that fit in memory), 256 in interpret mode.",
                  flag_values=_FLAGS)
flags.DEFINE_list("prefill_batch", [], "Prefill batch sizes. Default: 1.",
                  flag_values=_FLAGS)
flags.DEFINE_list("prefill_context", [], "Prefill lengths (T = S). Default: 4096,16384 on "
                  "an accelerator, 128 in interpret mode.", flag_values=_FLAGS)
flags.DEFINE_integer("q_heads", None, "Query heads. Default: 32 (4 in interpret mode).",
                     flag_values=_FLAGS)
flags.DEFINE_integer("kv_heads", None, "KV heads. Default: 8 (1 in interpret mode).",
                     flag_values=_FLAGS)
flags.DEFINE_integer("head_dim", None, "Head dim. Default: 128 (64 in interpret mode).",
                     flag_values=_FLAGS)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "K/V/q dtype.",
                  flag_values=_FLAGS)
flags.DEFINE_integer("decode_queries", 1, "Queries per decode step (T).",
                     flag_values=_FLAGS)
flags.DEFINE_bool("ragged", False, "Draw each (batch, kv head) length uniformly in "
                  "[1, S] instead of S (bandwidth counts only valid slots).",
                  flag_values=_FLAGS)
flags.DEFINE_integer("window", None, "Sliding window for both kernels (None = full).",
                     flag_values=_FLAGS)
flags.DEFINE_integer("block_k", None, "Key block override.", flag_values=_FLAGS)
flags.DEFINE_integer("block_q", None, "Prefill query block override.", flag_values=_FLAGS)
flags.DEFINE_integer("num_splits", None, "Decode split-K override.", flag_values=_FLAGS)
flags.DEFINE_integer("iters", 20, "Timed iterations (median reported).",
                     flag_values=_FLAGS)
flags.DEFINE_integer("warmup", 3, "Untimed iterations after compilation.",
                     flag_values=_FLAGS)
flags.DEFINE_bool("baselines", True, "Also time the XLA reference and jax's kernels.",
                  flag_values=_FLAGS)
flags.DEFINE_float("memory_fraction", 0.4, "Skip shapes whose K+V exceed this fraction of "
                   "device memory (when the device reports it).", flag_values=_FLAGS)
flags.DEFINE_string("json_out", None, "Also write the rows as JSON to this path.",
                    flag_values=_FLAGS)
flags.DEFINE_list("quant_formats", ["int8", "kivi4"], "Formats for --kernels=quantized: "
                  "int8, fp8_e4m3, fp8_e5m2, int4, int2 (per-token, asymmetric), kivi4, "
                  "kivi2 (per-channel keys, grouped values, residual window).",
                  flag_values=_FLAGS)
flags.DEFINE_integer("quant_group", None, "KIVI group size (tokens per key scale, channels "
                     "per value scale). Default: 32 (8 in interpret mode).",
                     flag_values=_FLAGS)
flags.DEFINE_integer("residual", None, "KIVI residual window (exact tokens). Default: 128 "
                     "(16 in interpret mode).", flag_values=_FLAGS)
flags.DEFINE_integer("page_size", None, "Page size for --kernels=paged. Default: 64 (16 in "
                     "interpret mode).", flag_values=_FLAGS)


def peak_bandwidth(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for key, peak in PEAK_HBM_BYTES_PER_S:
    if key in kind:
      return peak
  return None


def _median_time(fn, args, *, iters: int, warmup: int) -> float:
  jax.block_until_ready(fn(*args))             # compile
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(max(1, iters)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _try_time(fn, args, **kw):
  try:
    return _median_time(fn, args, **kw), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


@functools.partial(jax.jit, static_argnames=("batch", "q_heads", "kv_heads", "queries",
                                             "slots", "head_dim", "dtype", "ragged",
                                             "prefill"))
def make_inputs(batch, q_heads, kv_heads, queries, slots, head_dim, dtype, *, ragged,
                prefill=False, seed=0):
  """Random inputs in kvjax layout (docs/CONVENTIONS.md), made on device in one program."""
  key = jax.random.PRNGKey(seed)
  kq, kk, kv, kl = jax.random.split(key, 4)
  q = jax.random.normal(kq, (batch, q_heads, queries, head_dim), dtype)
  k = jax.random.normal(kk, (batch, kv_heads, slots, head_dim), dtype)
  v = jax.random.normal(kv, (batch, kv_heads, slots, head_dim), dtype)
  if ragged:
    lengths = jax.random.randint(kl, (batch, kv_heads), 1, slots + 1, jnp.int32)
  else:
    lengths = jnp.full((batch, kv_heads), slots, jnp.int32)
  k_positions = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (batch, kv_heads, slots))
  if prefill:
    q_positions = jnp.broadcast_to(jnp.arange(queries, dtype=jnp.int32) + slots - queries,
                                   (batch, queries))
  else:
    last = jnp.max(lengths, axis=1, keepdims=True) - queries
    q_positions = jnp.maximum(last, 0) + jnp.arange(queries, dtype=jnp.int32)[None]
  return dict(q=q, k=k, v=v, k_lengths=lengths, q_positions=q_positions,
              k_positions=k_positions)


def _ours(inputs, *, platform, interpret, window, block_k, block_q, num_splits):
  fn = jax.jit(functools.partial(
      pallas_kernels.attention, platform=platform, interpret=interpret, window=window,
      block_k=block_k, block_q=block_q, num_splits=num_splits))
  def run(q, k, v, lengths, qpos, kpos):
    return fn(q, k, v, lengths, q_positions=qpos, k_positions=kpos)[0]
  return run


def _xla_reference(window):
  @jax.jit
  def run(q, k, v, lengths, qpos, kpos):
    return attention_reference(q, k, v, lengths, q_positions=qpos, k_positions=kpos,
                               window=window)[0]
  return run


def _jax_decode_baseline(inputs, kind, interpret):
  """jax's own decode kernel on the same cache, in its layout (converted before timing)."""
  q, k, v, lengths = inputs["q"], inputs["k"], inputs["v"], inputs["k_lengths"]
  b, hq, t, d = q.shape
  if t != 1:
    return None, "needs T=1"
  s = k.shape[2]
  if kind == "gpu":
    from jax.experimental.pallas.ops.gpu import decode_attention as jd  # pylint: disable=g-import-not-at-top
    splits = 16 if s % 256 == 0 else 1
    block_k = min(128, s // splits)
    fn = jax.jit(functools.partial(jd.gqa, k_splits=splits, block_k=block_k,
                                   interpret=bool(interpret)))
    # [B, S, Hkv, D] layout and per-batch-row lengths, converted once before timing.
    args = jax.jit(lambda q_, k_, v_, n_: (q_[:, :, 0], jnp.swapaxes(k_, 1, 2),
                                           jnp.swapaxes(v_, 1, 2), jnp.max(n_, axis=1)))(
                                               q, k, v, lengths)
    return (lambda *a: fn(a[0], a[1], a[2], kv_seq_len=a[3])), args
  if interpret:
    return None, "no interpret mode"
  from jax.experimental.pallas.ops.tpu import paged_attention as jp  # pylint: disable=g-import-not-at-top
  page = 64
  if s % (page * 8):
    return None, f"S % {page * 8} != 0"
  hkv = k.shape[1]
  pages = lambda x: x.reshape(b, hkv, s // page, page, d).transpose(1, 0, 2, 3, 4).reshape(
      hkv, b * (s // page), page, d)
  page_indices = jnp.arange(b * (s // page), dtype=jnp.int32).reshape(b, s // page)
  fn = jax.jit(functools.partial(jp.paged_attention, pages_per_compute_block=8))
  args = jax.jit(lambda q_, k_, v_, n_: (q_[:, :, 0], pages(k_), pages(v_),
                                         jnp.max(n_, axis=1)))(q, k, v, lengths)
  args = (*args, page_indices)
  return fn, args


def _jax_prefill_baseline(inputs, kind, interpret):
  q, k, v = inputs["q"], inputs["k"], inputs["v"]
  b, hq, t, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  if t != s:
    return None, "needs T=S"
  g = hq // hkv
  if kind == "gpu":
    from jax.experimental.pallas.ops.gpu import attention as ja  # pylint: disable=g-import-not-at-top
    fn = jax.jit(lambda q_, k_, v_: ja.mha(q_, k_, v_, None, sm_scale=d ** -0.5, causal=True,
                                           interpret=bool(interpret)))
    # jax's kernel wants [B, T, H, D] and one kv head per query head (repeated).
    rep = lambda x: jnp.repeat(jnp.swapaxes(x, 1, 2), g, axis=2)
    return fn, jax.jit(lambda q_, k_, v_: (jnp.swapaxes(q_, 1, 2), rep(k_), rep(v_)))(q, k, v)
  if interpret:
    return None, "no interpret mode"
  from jax.experimental.pallas.ops.tpu import flash_attention as jf  # pylint: disable=g-import-not-at-top
  fn = jax.jit(functools.partial(jf.flash_attention, causal=True, sm_scale=d ** -0.5))
  return fn, jax.jit(lambda q_, k_, v_: (q_, jnp.repeat(k_, g, axis=1),
                                         jnp.repeat(v_, g, axis=1)))(q, k, v)


def bench_case(kernel, *, batch, slots, queries, q_heads, kv_heads, head_dim, dtype,
               platform, interpret, ragged, window, block_k, block_q, num_splits, iters,
               warmup, baselines, device_kind, memory_bytes=None,
               memory_fraction=0.4) -> dict[str, Any]:
  """Times one (kernel, shape); returns a row of results."""
  kind = pallas_kernels.resolve_platform(platform, interpret)
  itemsize = jnp.dtype(dtype).itemsize
  row = dict(kernel=kernel, variant=kind + (" (interpret)" if interpret else ""),
             batch=batch, slots=slots, queries=queries, q_heads=q_heads, kv_heads=kv_heads,
             head_dim=head_dim, dtype=jnp.dtype(dtype).name, device=device_kind)
  kv_total = 2 * batch * kv_heads * slots * head_dim * itemsize
  if memory_bytes and kv_total > memory_fraction * memory_bytes:
    row["skipped"] = f"K+V {kv_total / 2**30:.1f} GiB > {memory_fraction:.0%} of memory"
    return row
  inputs = make_inputs(batch, q_heads, kv_heads, queries, slots, head_dim, jnp.dtype(dtype),
                       ragged=ragged, prefill=kernel == "prefill")
  args = (inputs["q"], inputs["k"], inputs["v"], inputs["k_lengths"],
          inputs["q_positions"], inputs["k_positions"])
  ours = _ours(inputs, platform=platform, interpret=interpret, window=window,
               block_k=block_k, block_q=block_q, num_splits=num_splits)
  t_ours = _median_time(ours, args, iters=iters, warmup=warmup)
  valid_slots = int(jnp.sum(inputs["k_lengths"]))
  kv_bytes = 2 * valid_slots * head_dim * itemsize
  peak = peak_bandwidth(device_kind)
  if kernel == "decode":
    visible_pairs = valid_slots * queries
  else:   # causal prefill: ~half of the T x S pairs
    visible_pairs = batch * kv_heads * queries * (slots + 1) / 2
  flops = 4 * visible_pairs * (q_heads // kv_heads) * head_dim
  row.update(time_ms=t_ours * 1e3, kv_bytes=kv_bytes, gb_per_s=kv_bytes / t_ours / 1e9,
             frac_peak=(kv_bytes / t_ours / peak) if peak else None,
             tflops=flops / t_ours / 1e12)
  if baselines:
    score_bytes = 4 * batch * q_heads * queries * slots
    if memory_bytes and 3 * score_bytes > memory_fraction * memory_bytes:
      row["xla_ms"], row["xla_note"] = None, "scores too big"
    else:
      t_xla, err = _try_time(_xla_reference(window), args, iters=iters, warmup=warmup)
      row["xla_ms"], row["xla_note"] = (t_xla * 1e3 if t_xla else None), err
    try:
      make = _jax_decode_baseline if kernel == "decode" else _jax_prefill_baseline
      fn, jargs = make(inputs, kind, interpret)
    except ImportError as e:
      fn, jargs = None, f"ImportError: {e}"
    if fn is None:
      row["jax_ms"], row["jax_note"] = None, jargs
    else:
      t_jax, err = _try_time(fn, jargs, iters=iters, warmup=warmup)
      row["jax_ms"], row["jax_note"] = (t_jax * 1e3 if t_jax else None), err
    for key in ("xla", "jax"):
      base = row.get(f"{key}_ms")
      row[f"speedup_vs_{key}"] = base / row["time_ms"] if base else None
  return row


# ----------------------------------------------------------------------------------------
# Quantized and paged decode
# ----------------------------------------------------------------------------------------

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


def bench_quantized_case(name, *, batch, slots, queries, q_heads, kv_heads, head_dim, dtype,
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
  t = _median_time(ours, args, iters=iters, warmup=warmup)
  nbytes = quant_bytes(arrays)
  peak = peak_bandwidth(device_kind)
  row.update(time_ms=t * 1e3, bytes=nbytes, gb_per_s=nbytes / t / 1e9,
             frac_peak=(nbytes / t / peak) if peak else None)
  if baselines:
    bf16 = _ours(dense, platform=platform, interpret=interpret, window=window,
                 block_k=None, block_q=None, num_splits=None)
    dargs = (dense["q"], dense["k"], dense["v"], dense["k_lengths"], dense["q_positions"],
             dense["k_positions"])
    t_bf16, err = _try_time(bf16, dargs, iters=iters, warmup=warmup)
    row["bf16_ms"], row["bf16_note"] = (t_bf16 * 1e3 if t_bf16 else None), err
    deq_bytes = 2 * 4 * batch * kv_heads * slots * head_dim
    if memory_bytes and 2 * deq_bytes > memory_fraction * memory_bytes:
      row["xla_ms"], row["xla_note"] = None, "dequantized copy too big"
    else:
      ref = jax.jit(functools.partial(quant_lib.quantized_decode_reference, window=window,
                                      **lay["static"]))
      def xla(q, kc, ks, vc, vs, n, qpos, kpos, *rest):
        return ref(q, kc, ks, vc, vs, n, q_positions=qpos, k_positions=kpos,
                   **dict(zip(names, rest)))[0]
      t_xla, err = _try_time(xla, args, iters=iters, warmup=warmup)
      row["xla_ms"], row["xla_note"] = (t_xla * 1e3 if t_xla else None), err
    for key in ("bf16", "xla"):
      base = row.get(f"{key}_ms")
      row[f"speedup_vs_{key}"] = base / row["time_ms"] if base else None
  return row


@functools.partial(jax.jit, static_argnames=("batch", "q_heads", "kv_heads", "queries",
                                             "slots", "head_dim", "dtype", "page_size",
                                             "ragged"))
def make_paged_inputs(batch, q_heads, kv_heads, queries, slots, head_dim, dtype, page_size,
                      *, ragged, seed=0):
  """A shuffled page pool holding `slots` tokens per row, and the same tokens dense."""
  dense = make_inputs(batch, q_heads, kv_heads, queries, slots, head_dim, dtype,
                      ragged=ragged, seed=seed)
  m = -(-slots // page_size)
  n = batch * m
  perm = jax.random.permutation(jax.random.PRNGKey(seed + 1), n).astype(jnp.int32)
  table = perm.reshape(batch, m)
  pad = m * page_size - slots
  def pool(x):   # [B, H, S, D] -> pages [N, H, P, D] placed by the table
    x = jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
    x = x.reshape(batch, kv_heads, m, page_size, head_dim).transpose(0, 2, 1, 3, 4)
    x = x.reshape(n, kv_heads, page_size, head_dim)
    return jnp.zeros_like(x).at[table.reshape(-1)].set(x)
  return dict(q=dense["q"], k_pages=pool(dense["k"]), v_pages=pool(dense["v"]),
              page_table=table, lengths=dense["k_lengths"],
              q_positions=dense["q_positions"]), dense


def _jax_paged_baseline(p, kind, interpret):
  """jax's paged attention on the same pool ([Hkv, N, P, D] layout, converted once)."""
  q, lengths = p["q"], p["lengths"]
  if q.shape[2] != 1:
    return None, "needs T=1"
  kp = jnp.swapaxes(p["k_pages"], 0, 1)
  vp = jnp.swapaxes(p["v_pages"], 0, 1)
  m = p["page_table"].shape[1]
  ppcb = next(c for c in (8, 4, 2, 1) if m % c == 0)
  if kind == "gpu":
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa  # pylint: disable=g-import-not-at-top
    splits = next(c for c in (16, 8, 4, 2, 1) if m % c == 0 and (m // c) % ppcb == 0)
    fn = jax.jit(functools.partial(jpa.paged_attention, pages_per_compute_block=ppcb,
                                   k_splits=splits, interpret=bool(interpret)))
    args = (q[:, :, 0], kp, vp, p["page_table"], jnp.max(lengths, axis=1))
    return fn, args
  if interpret:
    return None, "no interpret mode"
  from jax.experimental.pallas.ops.tpu import paged_attention as jpt  # pylint: disable=g-import-not-at-top
  fn = jax.jit(functools.partial(jpt.paged_attention, pages_per_compute_block=ppcb))
  return fn, (q[:, :, 0], kp, vp, jnp.max(lengths, axis=1), p["page_table"])


def bench_paged_case(*, batch, slots, queries, q_heads, kv_heads, head_dim, dtype, platform,
                     interpret, ragged, window, block_k, num_splits, iters, warmup,
                     baselines, device_kind, page_size, memory_bytes=None,
                     memory_fraction=0.4) -> dict[str, Any]:
  """Times the paged decode on a shuffled bf16 pool; returns a row."""
  kind = pallas_kernels.resolve_platform(platform, interpret)
  itemsize = jnp.dtype(dtype).itemsize
  row = dict(kernel="paged", format=f"P={page_size}",
             variant=kind + (" (interpret)" if interpret else ""), batch=batch, slots=slots,
             queries=queries, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
             dtype=jnp.dtype(dtype).name, device=device_kind)
  kv_total = 2 * batch * kv_heads * slots * head_dim * itemsize
  if memory_bytes and 3 * kv_total > memory_fraction * memory_bytes:
    row["skipped"] = f"K+V {kv_total / 2**30:.1f} GiB (x3 with baselines) too big"
    return row
  p, dense = make_paged_inputs(batch, q_heads, kv_heads, queries, slots, head_dim,
                               jnp.dtype(dtype), page_size, ragged=ragged)
  fused = jax.jit(functools.partial(
      paged_lib.paged_decode_attention, platform=kind, interpret=interpret, window=window,
      block_k=block_k if kind == "gpu" else None, num_splits=num_splits))
  def ours(q, kp, vp, table, lengths, qpos):
    return fused(q, kp, vp, table, lengths, q_positions=qpos)[0]
  args = (p["q"], p["k_pages"], p["v_pages"], p["page_table"], p["lengths"],
          p["q_positions"])
  t = _median_time(ours, args, iters=iters, warmup=warmup)
  nbytes = 2 * int(jnp.sum(p["lengths"])) * head_dim * itemsize
  peak = peak_bandwidth(device_kind)
  row.update(time_ms=t * 1e3, bytes=nbytes, gb_per_s=nbytes / t / 1e9,
             frac_peak=(nbytes / t / peak) if peak else None)
  if baselines:
    base = _ours(dense, platform=platform, interpret=interpret, window=window, block_k=None,
                 block_q=None, num_splits=None)
    dargs = (dense["q"], dense["k"], dense["v"], dense["k_lengths"], dense["q_positions"],
             dense["k_positions"])
    t_dense, err = _try_time(base, dargs, iters=iters, warmup=warmup)
    row["dense_ms"], row["dense_note"] = (t_dense * 1e3 if t_dense else None), err
    try:
      fn, jargs = _jax_paged_baseline(p, kind, interpret)
    except (ImportError, StopIteration) as e:
      fn, jargs = None, f"{type(e).__name__}: {e}"
    if fn is None:
      row["jax_ms"], row["jax_note"] = None, jargs
    else:
      t_jax, err = _try_time(fn, jargs, iters=iters, warmup=warmup)
      row["jax_ms"], row["jax_note"] = (t_jax * 1e3 if t_jax else None), err
    for key in ("dense", "jax"):
      b_ms = row.get(f"{key}_ms")
      row[f"speedup_vs_{key}"] = b_ms / row["time_ms"] if b_ms else None
  return row


def format_extra_table(rows: Sequence[dict[str, Any]]) -> str:
  """Table of quantized / paged rows (baselines: bf16 or dense decode, xla or jax)."""
  def f(x, spec):
    return "n/a" if x is None else format(x, spec)
  head = (f"{'kernel':9} {'format':9} {'variant':18} {'B':>3} {'S':>7} {'T':>3} "
          f"{'Hq/Hkv':>7} {'D':>4} {'ms':>9} {'GB/s':>8} {'%peak':>6} {'base':>6} "
          f"{'base ms':>9} {'x base':>6} {'base2':>5} {'base2 ms':>9} {'x base2':>7}")
  lines = [head, "-" * len(head)]
  for r in rows:
    prefix = (f"{r['kernel']:9} {r['format']:9} {r['variant']:18} {r['batch']:>3} "
              f"{r['slots']:>7} {r['queries']:>3} {r['q_heads']:>3}/{r['kv_heads']:<3} "
              f"{r['head_dim']:>4}")
    if "skipped" in r:
      lines.append(f"{prefix} skipped: {r['skipped']}")
      continue
    b1, b2 = ("bf16", "xla") if r["kernel"] == "quantized" else ("dense", "jax")
    frac = None if r["frac_peak"] is None else 100 * r["frac_peak"]
    lines.append(
        f"{prefix} {r['time_ms']:9.3f} {r['gb_per_s']:8.1f} {f(frac, '6.1f')} {b1:>6} "
        f"{f(r.get(b1 + '_ms'), '9.3f')} {f(r.get('speedup_vs_' + b1), '6.2f')} {b2:>5} "
        f"{f(r.get(b2 + '_ms'), '9.3f')} {f(r.get('speedup_vs_' + b2), '7.2f')}")
  notes = sorted({f"{k}: {r[k]}" for r in rows
                  for k in ("bf16_note", "xla_note", "dense_note", "jax_note") if r.get(k)})
  if notes:
    lines.append("notes: " + "; ".join(notes))
  lines.append("bytes = what the kernel must read (quantized: codes + scales + zeros + "
               "residual); x = baseline time / our time (> 1: ours is faster)")
  return "\n".join(lines)


def _ints(values: Sequence[str], default: Sequence[int]) -> list[int]:
  return [int(x) for x in values] if values else list(default)


def run_benchmarks(argv: Sequence[str]) -> list[dict[str, Any]]:
  """Parses `argv` (flags of this module) and returns one row per (kernel, shape)."""
  fl = _FLAGS
  fl.unparse_flags()
  fl(list(argv))
  interpret = fl.interpret
  on_cpu = (fl.platform or jax.default_backend()) == "cpu"
  if on_cpu and not interpret:
    raise ValueError("no accelerator: pass --interpret (kernels run in interpret mode on "
                     "CPU; use tiny shapes)")
  small = interpret
  dev = jax.devices()[0]
  device_kind = getattr(dev, "device_kind", str(dev))
  memory = None
  try:
    memory = (dev.memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except
    memory = None
  common = dict(
      q_heads=fl.q_heads or (4 if small else 32), kv_heads=fl.kv_heads or (1 if small else 8),
      head_dim=fl.head_dim or (64 if small else 128), dtype=jnp.dtype(fl.dtype),
      platform=fl.platform, interpret=interpret, ragged=fl.ragged, window=fl.window,
      block_k=fl.block_k, block_q=fl.block_q, num_splits=fl.num_splits, iters=fl.iters,
      warmup=fl.warmup, baselines=fl.baselines, device_kind=device_kind,
      memory_bytes=memory, memory_fraction=fl.memory_fraction)
  rows = []
  for kernel in fl.kernels:
    if kernel == "decode":
      for b in _ints(fl.batch, [1] if small else [1, 8, 32]):
        for s in _ints(fl.context, [256] if small else [1024, 8192, 32768, 131072]):
          rows.append(bench_case("decode", batch=b, slots=s, queries=fl.decode_queries,
                                 **common))
    elif kernel == "prefill":
      for b in _ints(fl.prefill_batch, [1]):
        for s in _ints(fl.prefill_context, [128] if small else [4096, 16384]):
          rows.append(bench_case("prefill", batch=b, slots=s, queries=s, **common))
    elif kernel in ("quantized", "paged"):
      extra = {k: v for k, v in common.items() if k != "block_q"}
      for b in _ints(fl.batch, [1] if small else [1, 8, 32]):
        for s in _ints(fl.context, [256] if small else [1024, 8192, 32768, 131072]):
          if kernel == "paged":
            rows.append(bench_paged_case(batch=b, slots=s, queries=fl.decode_queries,
                                         page_size=fl.page_size or (16 if small else 64),
                                         **extra))
            continue
          for name in fl.quant_formats:
            rows.append(bench_quantized_case(
                name, batch=b, slots=s, queries=fl.decode_queries,
                group=fl.quant_group or (8 if small else 32),
                residual=fl.residual or (16 if small else 128), **extra))
    else:
      raise ValueError(f"--kernels entry {kernel!r}; must be 'decode', 'prefill', "
                       "'quantized' or 'paged'")
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  def f(x, spec):
    return "n/a" if x is None else format(x, spec)
  head = (f"{'kernel':8} {'variant':18} {'B':>3} {'S':>7} {'T':>6} {'Hq/Hkv':>7} {'D':>4} "
          f"{'dtype':9} {'ms':>9} {'GB/s':>8} {'%peak':>6} {'TFLOP/s':>8} {'xla ms':>9} "
          f"{'x xla':>6} {'jax ms':>9} {'x jax':>6}")
  lines = [head, "-" * len(head)]
  extra_rows = [r for r in rows if r["kernel"] in ("quantized", "paged")]
  rows = [r for r in rows if r["kernel"] not in ("quantized", "paged")]
  if not rows:
    lines = []
  for r in rows:
    prefix = (f"{r['kernel']:8} {r['variant']:18} {r['batch']:>3} {r['slots']:>7} "
              f"{r['queries']:>6} {r['q_heads']:>3}/{r['kv_heads']:<3} {r['head_dim']:>4} "
              f"{r['dtype']:9}")
    if "skipped" in r:
      lines.append(f"{prefix} skipped: {r['skipped']}")
      continue
    frac = None if r["frac_peak"] is None else 100 * r["frac_peak"]
    lines.append(
        f"{prefix} {r['time_ms']:9.3f} {r['gb_per_s']:8.1f} {f(frac, '6.1f')} "
        f"{r['tflops']:8.2f} {f(r.get('xla_ms'), '9.3f')} "
        f"{f(r.get('speedup_vs_xla'), '6.2f')} {f(r.get('jax_ms'), '9.3f')} "
        f"{f(r.get('speedup_vs_jax'), '6.2f')}")
  notes = sorted({f"{k}: {r[k]}" for r in rows for k in ("xla_note", "jax_note")
                  if r.get(k)})
  if notes:
    lines.append("notes: " + "; ".join(notes))
  if extra_rows:
    lines.append(format_extra_table(extra_rows))
  rows = rows or extra_rows
  if rows:
    lines.append(f"device: {rows[0]['device']}; peak HBM "
                 f"{f(peak_bandwidth(rows[0]['device']), '.3g')} B/s; x = baseline time / "
                 "our time (> 1: ours is faster)")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> list[dict[str, Any]]:
  """Entry point: `python -m pallas_kernels.bench [--flags]`."""
  argv = list(argv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(__doc__)
    print(_FLAGS.get_help())
    return []
  rows = run_benchmarks(argv)
  print(format_table(rows))
  if _FLAGS.json_out:
    with open(_FLAGS.json_out, "w", encoding="utf-8") as fh:
      json.dump(rows, fh, indent=1, default=float)
  return rows


if __name__ == "__main__":
  main(sys.argv)
