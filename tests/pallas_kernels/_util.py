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


# The masking arguments a kernel shares with its reference (the rest are tiling choices).
MASK_KEYS = ("scale", "causal", "window", "n_sink", "softcap", "colsum_window")


def mask_kwargs(kernel_kwargs):
  """The entries of `kernel_kwargs` that the reference takes too (MASK_KEYS)."""
  return {k: v for k, v in kernel_kwargs.items() if k in MASK_KEYS}


def queries(batch, q_heads, t, head_dim, dtype, start, seed=2):
  """Random queries at positions start..start+t-1; with t > 1 the last row's last is padding."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((batch, q_heads, t, head_dim)), dtype)
  qpos = np.broadcast_to(start + np.arange(t, dtype=np.int32), (batch, t)).copy()
  if t > 1:
    qpos[-1, -1] = -1
  return q, jnp.asarray(qpos)


def reference(p, **kw):
  return attention_reference(p["q"], p["k"], p["v"], p["k_lengths"],
                             q_positions=p["q_positions"], k_positions=p["k_positions"], **kw)


def run_on_problem(kernel, p, platform, sink_logits=None, **static):
  """A dense-layout kernel (decode_attention, flash_prefill) on problem `p` under one jit."""
  return call_fast(kernel, p["q"], p["k"], p["v"], p["k_lengths"],
                   q_positions=p["q_positions"], k_positions=p["k_positions"],
                   sink_logits=sink_logits, static=dict(platform=platform, **static))


def check_native_cases(kernel, cases, platform, **static):
  """Every case of `cases` ({name: (platform, problem kwargs, kernel kwargs)}) meant for
  `platform`, compiled for the real device, against the reference."""
  for plat, pkw, kkw in cases.values():
    if plat != platform:
      continue
    p = problem(**pkw)
    result = run_on_problem(kernel, p, platform, **static, **kkw)
    # Native f32 matmuls may run at reduced precision (TPU default); compare f32 cases
    # with bf16 tolerances there.
    dtype = pkw.get("dtype", jnp.float32) if platform == "gpu" else jnp.bfloat16
    check_against_reference(result, p, dtype=dtype, **mask_kwargs(kkw))


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


def check_backends_agree(cache, qpos, *, q_heads, head_dim, **attend_kw):
  """kvjax's dispatch reads the real layout: a step attended with backend="interpret" (the
  Pallas kernel in interpret mode; a request it could not serve raises, never falls back)
  equals backend="xla" -- outputs, lse and the updated cache.

  The step: random queries at `qpos` [B, T] and as many new K/V tokens, learned sink
  logits, window 40 with 3 sinks and soft-cap 20; `attend_kw` goes to attend (layer=).
  """
  from kvjax import attention as attn_lib  # pylint: disable=import-outside-toplevel
  (b, t), kv_heads = qpos.shape, cache.lengths.shape[-1]
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.standard_normal((b, q_heads, t, head_dim)), jnp.float32)
  k_new = jnp.asarray(rng.standard_normal((b, kv_heads, t, head_dim)), jnp.float32)
  v_new = jnp.asarray(rng.standard_normal((b, kv_heads, t, head_dim)), jnp.float32)
  sink_logits = jnp.linspace(-1.0, 1.0, q_heads)
  opts = FAST_COMPILE if jax.default_backend() == "cpu" else None

  def run(backend):  # jitted: eager op-by-op dispatch is several times slower on CPU
    spec = attn_lib.AttentionSpec(backend=backend, window=40, n_sink=3, softcap=20.0)
    step = lambda c_, q_, k_, v_: c_.attend(q_, k_, v_, qpos, spec, sink_logits=sink_logits,
                                            return_lse=True, **attend_kw)
    return jax.jit(step, compiler_options=opts)(cache, q, k_new, v_new)
  (got, got_cache), (want, want_cache) = run("interpret"), run("xla")
  np.testing.assert_allclose(got.out, want.out, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got.lse, want.lse, atol=1e-4, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    np.testing.assert_array_equal(a, b)


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
