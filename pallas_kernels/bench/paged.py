"""Benchmark of the paged decode kernel (`paged_decode.py`).

Times the kernel on a shuffled page pool against our dense decode on the same tokens laid
out contiguously (`x dense`) and jax's own paged attention (`pallas.ops.gpu.
paged_attention` / `pallas.ops.tpu.paged_attention`, `x jax`), timed in the same run.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import paged_decode as paged_lib
from pallas_kernels.bench import harness

@functools.partial(jax.jit, static_argnames=("batch", "q_heads", "kv_heads", "queries",
                                             "slots", "head_dim", "dtype", "page_size",
                                             "ragged"))
def make_paged_inputs(batch, q_heads, kv_heads, queries, slots, head_dim, dtype, page_size,
                      *, ragged, seed=0):
  """A shuffled page pool holding `slots` tokens per row, and the same tokens dense."""
  dense = harness.make_inputs(batch, q_heads, kv_heads, queries, slots, head_dim, dtype,
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


def case(*, batch, slots, queries, q_heads, kv_heads, head_dim, dtype, platform,
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
  t = harness.median_time(ours, args, iters=iters, warmup=warmup)
  nbytes = 2 * int(jnp.sum(p["lengths"])) * head_dim * itemsize
  peak = harness.peak_bandwidth(device_kind)
  row.update(time_ms=t * 1e3, bytes=nbytes, gb_per_s=nbytes / t / 1e9,
             frac_peak=(nbytes / t / peak) if peak else None)
  if baselines:
    base = harness.ours(dense, platform=platform, interpret=interpret, window=window, block_k=None,
                 block_q=None, num_splits=None)
    dargs = (dense["q"], dense["k"], dense["v"], dense["k_lengths"], dense["q_positions"],
             dense["k_positions"])
    harness.time_baseline(row, "dense", base, dargs, iters=iters, warmup=warmup)
    try:
      fn, jargs = _jax_paged_baseline(p, kind, interpret)
    except (ImportError, StopIteration) as e:
      fn, jargs = None, f"{type(e).__name__}: {e}"
    harness.time_baseline(row, "jax", fn, jargs, iters=iters, warmup=warmup)
    harness.add_speedups(row, ("dense", "jax"))
  return row
