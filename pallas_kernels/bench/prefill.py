"""Benchmark of the flash prefill kernel (`flash_prefill.py`).

Baselines timed in the same run: the jitted XLA reference and jax's own flash attention
(`pallas.ops.gpu.attention.mha` on GPU, `pallas.ops.tpu.flash_attention` on TPU).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.bench import harness

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




def case(**kw) -> dict[str, Any]:
  """Times the prefill kernel on one shape (`harness.dense_row` arguments)."""
  return harness.dense_row("prefill", jax_baseline=_jax_prefill_baseline, **kw)
