"""Ragged decode kernel (both variants, interpret mode on CPU) against the reference."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common as C
from pallas_kernels import decode_attention as decode_mod
from pallas_kernels import kv_source as S
from pallas_kernels.decode_attention import decode_attention
from tests.pallas_kernels._util import (FAST_COMPILE, check_against_reference,
                                        check_native_cases, lower_for, mask_kwargs, problem,
                                        run_on_problem)

BF16, F32 = jnp.bfloat16, jnp.float32

# Each case covers several axes at once (interpret mode is slow): lengths always include
# 0, 1 and S, S is never a multiple of the block, K/V past the lengths hold NaN.
CASES = {
    # name: (platform, problem kwargs, kernel kwargs)
    "gpu-g4-d64-f32-splits3": (
        "gpu", dict(batch=3, q_heads=8, kv_heads=2, queries=1, slots=300, head_dim=64,
                    lengths=[[0, 1], [300, 217], [64, 65]]),
        dict(block_k=64, num_splits=3)),
    "gpu-g8-d128-bf16-window": (
        "gpu", dict(batch=2, q_heads=8, kv_heads=1, queries=4, slots=70, head_dim=128,
                    dtype=BF16, lengths=[[70], [33]], pad_queries=1),
        dict(block_k=16, num_splits=2, window=9, n_sink=3, softcap=15.0,
             colsum_window=2)),
    "gpu-g1-d64-f32-gaps-dv": (
        "gpu", dict(batch=2, q_heads=2, kv_heads=2, queries=2, slots=129, head_dim=64,
                    head_dim_v=32, gaps=True, lengths=[[1, 129], [100, 0]]),
        dict(block_k=32, num_splits=1)),
    "tpu-g4-d128-f32-splits2": (
        "tpu", dict(batch=2, q_heads=8, kv_heads=2, queries=1, slots=300, head_dim=128,
                    lengths=[[0, 300], [1, 129]]),
        dict(block_k=128, num_splits=2)),
    "tpu-g8-d64-bf16-window": (
        "tpu", dict(batch=2, q_heads=8, kv_heads=1, queries=3, slots=200, head_dim=64,
                    dtype=BF16, lengths=[[200], [131]], pad_queries=1),
        dict(block_k=128, window=40, n_sink=4, softcap=20.0, colsum_window=2)),
    "tpu-g1-d64-f32-smallS-gaps": (
        "tpu", dict(batch=2, q_heads=2, kv_heads=2, queries=2, slots=40, head_dim=64,
                    gaps=True, lengths=[[40, 1], [0, 17]]),
        dict(causal=False)),
}

_run = functools.partial(run_on_problem, decode_attention)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_interpret(name):
  platform, pkw, kkw = CASES[name]
  p = problem(**pkw)
  sink_logits = None
  if "gaps" in name:  # also exercise learned sink logits
    sink_logits = jnp.linspace(-1.0, 1.0, pkw["q_heads"])
  with_colsum = "gaps" not in name  # keeps the compile count down; colsum is tested above
  result = _run(p, platform, interpret=True, return_colsum=with_colsum,
                sink_logits=sink_logits, **kkw)
  check_against_reference(result, p, dtype=pkw.get("dtype", F32), sink_logits=sink_logits,
                          colsum=with_colsum, **mask_kwargs(kkw))


@functools.lru_cache(maxsize=None)
def _jitted_gpu_decode(window):
  return jax.jit(functools.partial(decode_attention, platform="gpu", interpret=True,
                                   block_k=16, num_splits=3, window=window, n_sink=2,
                                   return_colsum=True),
                 compiler_options=FAST_COMPILE if jax.default_backend() == "cpu" else None)


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(lengths=st.lists(st.integers(0, 50), min_size=4, max_size=4),
                  seed=st.integers(0, 2 ** 16), gaps=st.booleans(),
                  q_start=st.integers(0, 60))
def test_ragged_property(lengths, seed, gaps, q_start):
  # Fixed shapes (one compile), random ragged data: lengths, evictions, query positions.
  p = problem(batch=2, q_heads=4, kv_heads=2, queries=2, slots=50, head_dim=16,
              lengths=np.reshape(lengths, (2, 2)), seed=seed, gaps=gaps, q_start=q_start)
  result = _jitted_gpu_decode(12)(p["q"], p["k"], p["v"], p["k_lengths"],
                                  q_positions=p["q_positions"], k_positions=p["k_positions"])
  check_against_reference(result, p, dtype=F32, window=12, n_sink=2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(platform="tpu", block_k=100), "block_k=100"),
    (dict(platform="gpu", block_k=48), "block_k=48"),
    (dict(platform="gpu", num_splits=0), "num_splits=0"),
    (dict(platform="metal"), "platform='metal'"),
    (dict(platform="gpu", window=0), "window=0"),
    (dict(platform="gpu", softcap=-1.0), "softcap=-1.0"),
    (dict(platform="gpu", colsum_window=0, return_colsum=True), "colsum_window=0"),
])
def test_invalid_static_args_raise(kwargs, match):
  p = problem(batch=1, q_heads=2, kv_heads=1, slots=8, head_dim=16)
  with pytest.raises(ValueError, match=match):
    _run(p, interpret=True, **kwargs)


def test_invalid_shapes_raise():
  p = problem(batch=1, q_heads=3, kv_heads=2, slots=8, head_dim=16)
  with pytest.raises(ValueError, match="multiple of num kv heads 2"):
    _run(p, "gpu", interpret=True)
  p = problem(batch=1, q_heads=2, kv_heads=1, slots=8, head_dim=12)
  with pytest.raises(ValueError, match="head_dim=12"):
    _run(p, "gpu", interpret=True)
  p = problem(batch=1, q_heads=2, kv_heads=1, slots=8, head_dim=16)
  p["k_positions"] = p["k_positions"][:, :, :4]
  with pytest.raises(ValueError, match=r"k_positions shape \(1, 1, 4\)"):
    _run(p, "gpu", interpret=True)


@pytest.mark.parametrize("platform,lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_native_lowering_on_cpu(platform, lowering):
  # Lowers the real (non-interpret) kernel to Triton / Mosaic MLIR without a device:
  # catches unsupported primitives and block-shape violations early.
  b, hq, hkv, t, s, d = 2, 16, 2, 2, 1000, 128
  q = jax.ShapeDtypeStruct((b, hq, t, d), BF16)
  k = jax.ShapeDtypeStruct((b, hkv, s, d), BF16)
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  fn = jax.jit(functools.partial(decode_attention, platform=platform, window=256,
                                 n_sink=4, softcap=30.0, return_colsum=True))
  text = lower_for(fn, (q, k, k, i32(b, hkv)),
                   dict(q_positions=i32(b, t), k_positions=i32(b, hkv, s)), lowering)
  assert "ragged_decode_attention" in text


def test_native(native_platform):
  check_native_cases(decode_attention, CASES, native_platform, return_colsum=True)


def test_quantized_source_reuses_the_pipeline():
  # Given int8 K/V with one scale per slot (symmetric codes stored with a +128 offset,
  # kvjax.quant's layout), described as a KV source
  p = problem(batch=1, q_heads=4, kv_heads=2, queries=1, slots=40, head_dim=32,
              lengths=[[40, 13]], nan_garbage=False)
  def quantize(x):
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    return (jnp.round(x / scale) + 128).astype(jnp.uint8), scale.astype(jnp.float16)
  kq, ks = quantize(p["k"])
  vq, vs = quantize(p["v"])
  fmt = S.KVFormat("int", 8)
  source = S.ContiguousKV(fmt, fmt, head_dim=32, head_dim_v=32, num_slots=40)
  spec = C.MaskSpec(scale=32 ** -0.5)
  # When the generic pipeline runs with that source
  out, lse = jax.jit(functools.partial(
      decode_mod.decode_with_source, source, spec=spec, block_k=16, num_splits=2,
      platform="gpu", interpret=True))((p["k_positions"], kq, ks, vq, vs), p["q"],
                                       p["k_lengths"], p["q_positions"])
  # Then it matches the reference on the dequantized cache
  deq = lambda c, s_: (c.astype(jnp.float32) - 128) * s_.astype(jnp.float32)
  check_against_reference((out, lse, None), dict(p, k=deq(kq, ks), v=deq(vq, vs)),
                          dtype=F32, colsum=False)
