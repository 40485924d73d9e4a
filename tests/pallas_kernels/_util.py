"""Shared test helpers: random ragged problems and dtype-aware comparisons."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.reference import attention_reference

# Tolerances chosen from the input dtype. bf16: the kernels round the probabilities to
# bf16 before the PV matmul (as every flash kernel does) and return bf16 outputs, so
# outputs carry ~2^-8 relative error; lse/colsum are float32 from the same logits.
TOLS = {
    jnp.dtype(jnp.float32): dict(out=(1e-4, 1e-4), lse=(1e-4, 1e-4), colsum=(1e-4, 1e-4)),
    jnp.dtype(jnp.bfloat16): dict(out=(3e-2, 3e-2), lse=(2e-2, 1e-2), colsum=(2e-2, 2e-2)),
}


def problem(*, batch=2, q_heads=4, kv_heads=2, queries=1, slots=100, head_dim=64,
            head_dim_v=None, dtype=jnp.float32, lengths=None, seed=0, gaps=False,
            nan_garbage=True, pad_queries=0, q_start=None):
  """A random ragged attention problem following docs/CONVENTIONS.md.

  Slots hold positions 0..S-1 (with `gaps`, some slots inside the length are evicted:
  position -1). Queries sit right after the longest valid prefix (decode) unless
  `q_start` is given; the last `pad_queries` queries of batch row 1 are padding (-1).
  With `nan_garbage`, K/V slots past k_lengths hold NaN: kernels must never read them
  into the result.
  """
  dv = head_dim if head_dim_v is None else head_dim_v
  # numpy, not jax.random: eager jax ops would compile once per new shape.
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, q_heads, queries, head_dim), np.float32)
  k = rng.standard_normal((batch, kv_heads, slots, head_dim), np.float32)
  v = rng.standard_normal((batch, kv_heads, slots, dv), np.float32)
  if lengths is None:
    lengths = rng.integers(0, slots + 1, (batch, kv_heads))
  lengths = np.asarray(lengths, np.int32).reshape(batch, kv_heads)
  kpos = np.broadcast_to(np.arange(slots, dtype=np.int32), (batch, kv_heads, slots)).copy()
  if gaps:
    kpos[rng.random(kpos.shape) < 0.2] = -1
  start = int(lengths.max()) - queries if q_start is None else q_start
  qpos = np.broadcast_to(max(start, 0) + np.arange(queries, dtype=np.int32),
                         (batch, queries)).copy()
  if pad_queries and batch > 1:
    qpos[1, queries - pad_queries:] = -1
  if nan_garbage:
    bad = np.arange(slots)[None, None, :] >= lengths[:, :, None]
    k[bad] = np.nan
    v[bad] = np.nan
  return dict(q=jnp.asarray(q, dtype), k=jnp.asarray(k, dtype), v=jnp.asarray(v, dtype),
              k_lengths=jnp.asarray(lengths), q_positions=jnp.asarray(qpos),
              k_positions=jnp.asarray(kpos))


def reference(p, **kw):
  return attention_reference(p["q"], p["k"], p["v"], p["k_lengths"],
                             q_positions=p["q_positions"], k_positions=p["k_positions"], **kw)


def assert_close(name, got, want, dtype, scale=1.0):
  atol, rtol = TOLS[jnp.dtype(dtype)][name]
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert np.all(np.isfinite(got)), f"{name}: non-finite values"
  np.testing.assert_allclose(got, want, atol=atol * scale, rtol=rtol, err_msg=name)


def check_against_reference(result, p, *, dtype, colsum=True, **ref_kw):
  out, lse, cs = result
  r_out, r_lse, r_cs = reference(p, **ref_kw)
  assert out.dtype == p["q"].dtype and out.shape == r_out.shape
  assert_close("out", out, r_out, dtype)
  if lse is not None:
    assert lse.dtype == jnp.float32
    assert_close("lse", lse, r_lse, dtype)
  if colsum:
    assert cs is not None and cs.dtype == jnp.float32 and cs.shape == r_cs.shape
    # colsum sums up to G * T probabilities per slot: scale the absolute tolerance.
    assert_close("colsum", cs, r_cs, dtype, scale=max(1.0, float(jnp.max(r_cs))))


def require_backend(name):
  if jax.default_backend() != name:
    pytest.skip(f"needs a {name.upper()} (default backend is {jax.default_backend()})")


# Interpret-mode kernels are big while-loops; XLA's backend optimisations only slow their
# compile down on CPU, and the tests' wall time is mostly compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def call_fast(fn, *arrays, static=None, **array_kwargs):
  """fn(*arrays, **array_kwargs, **static) under one jit (fast-compile options on CPU)."""
  options = FAST_COMPILE if jax.default_backend() == "cpu" else None
  jitted = jax.jit(functools.partial(fn, **(static or {})), compiler_options=options)
  return jitted(*arrays, **array_kwargs)


_NO_DEVICE_INFO = ("No supported GPU devices", "Unsupported GPU device kind",
                   "Unsupported TPU device kind")


def lower_for(fn, args, kwargs, platform):
  """fn lowered for `platform` ("cuda" / "tpu") without that device, as MLIR text.

  jax 0.10 lowers Pallas kernels for another platform from CPU; newer releases may need
  the target's device description, in which case the test is skipped (not failed).
  """
  try:
    return fn.trace(*args, **kwargs).lower(lowering_platforms=(platform,)).as_text()
  except (RuntimeError, ValueError) as e:
    if any(msg in str(e) for msg in _NO_DEVICE_INFO):
      pytest.skip(f"cannot lower for {platform} without its device here: {e}")
    raise
