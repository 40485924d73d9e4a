"""Prefill flash kernel (both variants, interpret mode on CPU) against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common as C
from pallas_kernels.flash_prefill import flash_prefill
from tests.pallas_kernels._util import (check_against_reference, check_native_cases, lower_for,
                                        mask_kwargs, problem, run_on_problem)

BF16, F32 = jnp.bfloat16, jnp.float32

# Prefill problems: T queries are the last T tokens of the cache (chunked prefill when
# T < S), batch row 1 ends with padding queries, lengths include 0 and non-multiples of
# the blocks, K/V past the lengths hold NaN.
CASES = {
    "gpu-g4-d64-f32-colsum": (
        "gpu", dict(batch=2, q_heads=8, kv_heads=2, queries=100, slots=150, head_dim=64,
                    lengths=[[150, 120], [0, 77]], pad_queries=5, q_start=50),
        dict(block_q=32, block_k=32)),
    "gpu-g8-d128-bf16-window": (
        "gpu", dict(batch=2, q_heads=8, kv_heads=1, queries=70, slots=70, head_dim=128,
                    dtype=BF16, lengths=[[70], [45]], pad_queries=3, q_start=0),
        dict(block_q=16, block_k=16, window=13, n_sink=3, softcap=20.0,
             colsum_window=9)),
    "gpu-g1-d64-f32-gaps": (
        "gpu", dict(batch=2, q_heads=2, kv_heads=2, queries=40, slots=90, head_dim=64,
                    head_dim_v=32, gaps=True, lengths=[[90, 1], [63, 0]], q_start=50),
        dict(block_q=16, block_k=32, causal=False)),
    # TPU interpret mode costs ~tens of ms per grid point: small grids, GQA 2.
    "tpu-g2-d128-f32-colsum": (
        "tpu", dict(batch=2, q_heads=2, kv_heads=1, queries=100, slots=300, head_dim=128,
                    lengths=[[300], [131]], pad_queries=5, q_start=200),
        dict(block_q=64, block_k=128)),
    "tpu-g2-d64-bf16-window": (
        "tpu", dict(batch=1, q_heads=4, kv_heads=2, queries=150, slots=150, head_dim=64,
                    dtype=BF16, lengths=[[150, 97]], q_start=0),
        dict(block_q=64, block_k=128, window=40, n_sink=4, softcap=20.0,
             colsum_window=16)),
}

_run = functools.partial(run_on_problem, flash_prefill)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_interpret(name):
  platform, pkw, kkw = CASES[name]
  p = problem(**pkw)
  sink_logits = jnp.linspace(-1.0, 1.0, pkw["q_heads"]) if "gaps" in name else None
  with_colsum = "gaps" not in name
  result = _run(p, platform, interpret=True, return_lse=True, return_colsum=with_colsum,
                sink_logits=sink_logits, **kkw)
  check_against_reference(result, p, dtype=pkw.get("dtype", F32), colsum=with_colsum,
                          sink_logits=sink_logits, **mask_kwargs(kkw))


def test_lse_and_colsum_are_optional():
  p = problem(batch=1, q_heads=2, kv_heads=1, queries=20, slots=20, head_dim=16,
              lengths=[[20]], q_start=0)
  out, lse, colsum = _run(p, "gpu", interpret=True)
  assert lse is None and colsum is None and out.shape == (1, 2, 20, 16)


def test_block_ranges_skip_invisible_blocks():
  # Causal prefill of 8 blocks: query block i needs key blocks 0..i only.
  t = 128
  qpos = jnp.arange(t, dtype=jnp.int32)[None]
  kpos = jnp.arange(t, dtype=jnp.int32)[None, None]
  lengths = jnp.full((1, 1), t, jnp.int32)
  spec = C.MaskSpec(scale=1.0)
  r = C.key_ranges(qpos, kpos, lengths, block_q=16, block_k=16, spec=spec)
  np.testing.assert_array_equal(r.a2[0, 0], np.zeros(8))
  np.testing.assert_array_equal(r.n2[0, 0], np.arange(1, 9))
  # Window 20 + 2 sinks: block 0 (sinks) then the two blocks of the band.
  spec = C.MaskSpec(scale=1.0, window=20, n_sink=2)
  r = C.key_ranges(qpos, kpos, lengths, block_q=16, block_k=16, spec=spec)
  assert (int(r.a1[0, 0, 7]), int(r.n1[0, 0, 7])) == (0, 1)
  assert (int(r.a2[0, 0, 7]), int(r.n2[0, 0, 7])) == (5, 3)
  # Only 40 valid slots: nothing past block 2 is ever visited.
  r = C.key_ranges(qpos, kpos, jnp.full((1, 1), 40, jnp.int32), block_q=16, block_k=16,
                   spec=C.MaskSpec(scale=1.0))
  assert int(jnp.max(r.a2 + r.n2)) == 3


@pytest.mark.parametrize("platform,lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_native_lowering_on_cpu(platform, lowering):
  b, hq, hkv, t, d = 1, 8, 2, 1024, 128
  q = jax.ShapeDtypeStruct((b, hq, t, d), BF16)
  k = jax.ShapeDtypeStruct((b, hkv, t, d), BF16)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  fn = jax.jit(functools.partial(flash_prefill, platform=platform, window=256, n_sink=4,
                                 softcap=30.0, return_lse=True, return_colsum=True,
                                 colsum_window=64))
  text = lower_for(fn, (q, k, k, i32(b, hkv)),
                   dict(q_positions=i32(b, t), k_positions=i32(b, hkv, t)), lowering)
  assert "flash_prefill" in text and "attention_colsum" in text


def test_native(native_platform):
  check_native_cases(flash_prefill, CASES, native_platform, return_lse=True,
                     return_colsum=True)
