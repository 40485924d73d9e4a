"""What every kernel benchmark shares: peak bandwidth table, timing, inputs, dense rows.

Times are medians over `iters` runs after compilation and `warmup` runs; a benchmark
prints ratios against baselines timed in the same run, never absolute claims alone.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

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

def peak_bandwidth(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for key, peak in PEAK_HBM_BYTES_PER_S:
    if key in kind:
      return peak
  return None


def median_time(fn, args, *, iters: int, warmup: int) -> float:
  jax.block_until_ready(fn(*args))             # compile
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(max(1, iters)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_baseline(row, key: str, fn, args, *, iters: int, warmup: int) -> None:
  """Times baseline `key` into row[key + "_ms"] / row[key + "_note"] (fn None: `args`
  says why it cannot run)."""
  if fn is None:
    row[f"{key}_ms"], row[f"{key}_note"] = None, args
    return
  t, err = try_time(fn, args, iters=iters, warmup=warmup)
  row[f"{key}_ms"], row[f"{key}_note"] = (t * 1e3 if t else None), err


def add_speedups(row, keys) -> None:
  """row["speedup_vs_" + key] = baseline time / our time (None without a baseline)."""
  for key in keys:
    base = row.get(f"{key}_ms")
    row[f"speedup_vs_{key}"] = base / row["time_ms"] if base else None


def fmt(x, spec: str) -> str:
  """A table cell: `x` formatted, or n/a."""
  return "n/a" if x is None else format(x, spec)


def try_time(fn, args, **kw):
  try:
    return median_time(fn, args, **kw), None
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


def ours(inputs, *, platform, interpret, window, block_k, block_q, num_splits):
  fn = jax.jit(functools.partial(
      pallas_kernels.attention, platform=platform, interpret=interpret, window=window,
      block_k=block_k, block_q=block_q, num_splits=num_splits))
  def run(q, k, v, lengths, qpos, kpos):
    return fn(q, k, v, lengths, q_positions=qpos, k_positions=kpos)[0]
  return run


def xla_reference(window):
  @jax.jit
  def run(q, k, v, lengths, qpos, kpos):
    return attention_reference(q, k, v, lengths, q_positions=qpos, k_positions=kpos,
                               window=window)[0]
  return run


def dense_row(kernel, *, jax_baseline, batch, slots, queries, q_heads, kv_heads, head_dim, dtype,
               platform, interpret, ragged, window, block_k, block_q, num_splits, iters,
               warmup, baselines, device_kind, memory_bytes=None,
               memory_fraction=0.4) -> dict[str, Any]:
  """Times the dense `kernel` ("decode" | "prefill") on one shape; returns a row.

  `jax_baseline(inputs, kind, interpret)` gives jax's own kernel and its arguments, or
  (None, why not).
  """
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
  fn = ours(inputs, platform=platform, interpret=interpret, window=window, block_k=block_k,
            block_q=block_q, num_splits=num_splits)
  t_ours = median_time(fn, args, iters=iters, warmup=warmup)
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
      time_baseline(row, "xla", xla_reference(window), args, iters=iters, warmup=warmup)
    try:
      fn, jargs = jax_baseline(inputs, kind, interpret)
    except ImportError as e:
      fn, jargs = None, f"ImportError: {e}"
    time_baseline(row, "jax", fn, jargs, iters=iters, warmup=warmup)
    add_speedups(row, ("xla", "jax"))
  return row
