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

import json
from typing import Any, Sequence

from absl import flags
import jax
import jax.numpy as jnp

from pallas_kernels.bench import decode
from pallas_kernels.bench import harness
from pallas_kernels.bench import paged
from pallas_kernels.bench import prefill
from pallas_kernels.bench import quantized

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



def format_extra_table(rows: Sequence[dict[str, Any]]) -> str:
  """Table of quantized / paged rows (baselines: bf16 or dense decode, xla or jax)."""
  f = harness.fmt
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
          rows.append(decode.case(batch=b, slots=s, queries=fl.decode_queries,
                                 **common))
    elif kernel == "prefill":
      for b in _ints(fl.prefill_batch, [1]):
        for s in _ints(fl.prefill_context, [128] if small else [4096, 16384]):
          rows.append(prefill.case(batch=b, slots=s, queries=s, **common))
    elif kernel in ("quantized", "paged"):
      extra = {k: v for k, v in common.items() if k != "block_q"}
      for b in _ints(fl.batch, [1] if small else [1, 8, 32]):
        for s in _ints(fl.context, [256] if small else [1024, 8192, 32768, 131072]):
          if kernel == "paged":
            rows.append(paged.case(batch=b, slots=s, queries=fl.decode_queries,
                                         page_size=fl.page_size or (16 if small else 64),
                                         **extra))
            continue
          for name in fl.quant_formats:
            rows.append(quantized.case(
                name, batch=b, slots=s, queries=fl.decode_queries,
                group=fl.quant_group or (8 if small else 32),
                residual=fl.residual or (16 if small else 128), **extra))
    else:
      raise ValueError(f"--kernels entry {kernel!r}; must be 'decode', 'prefill', "
                       "'quantized' or 'paged'")
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  f = harness.fmt
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
                 f"{f(harness.peak_bandwidth(rows[0]['device']), '.3g')} B/s; x = baseline time / "
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
