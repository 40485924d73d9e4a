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
flags.DEFINE_list("kernels", ["decode", "prefill"], "Kernels to time: decode, prefill.",
                  flag_values=_FLAGS)
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
    else:
      raise ValueError(f"--kernels entry {kernel!r}; must be 'decode' or 'prefill'")
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  def f(x, spec):
    return "n/a" if x is None else format(x, spec)
  head = (f"{'kernel':8} {'variant':18} {'B':>3} {'S':>7} {'T':>6} {'Hq/Hkv':>7} {'D':>4} "
          f"{'dtype':9} {'ms':>9} {'GB/s':>8} {'%peak':>6} {'TFLOP/s':>8} {'xla ms':>9} "
          f"{'x xla':>6} {'jax ms':>9} {'x jax':>6}")
  lines = [head, "-" * len(head)]
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
