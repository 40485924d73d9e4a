"""Benchmark of the ragged decode kernel (`decode_attention.py`).

Baselines timed in the same run: the jitted XLA reference and jax's own decode kernel
(`pallas.ops.gpu.decode_attention.gqa` on GPU, `pallas.ops.tpu.paged_attention` on TPU).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.bench import harness

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




def case(**kw) -> dict[str, Any]:
  """Times the decode kernel on one shape (`harness.dense_row` arguments)."""
  return harness.dense_row("decode", jax_baseline=_jax_decode_baseline, **kw)
