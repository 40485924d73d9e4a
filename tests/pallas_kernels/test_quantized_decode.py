"""Quantized decode kernel (TPU + GPU variants, interpret mode on CPU) against the reference.

Caches are built by kvjax.quant itself (so the kernel reads the real layout), then the
slots past each length are filled with garbage (random codes, NaN scales): the kernel
must never let them reach the result.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import cache as cache_lib
from kvjax.quant import cache as quant_cache
from kvjax.quant import spec as quant_spec
from pallas_kernels import kv_source as S
from pallas_kernels import quantized_decode as qd
from pallas_kernels.reference import attention_reference
from tests.pallas_kernels._util import (FAST_COMPILE, assert_close, call_fast,
                                        check_backends_agree, lower_for, mask_kwargs, queries)

F32, BF16 = jnp.float32, jnp.bfloat16


def _cache(spec, *, batch, kv_heads, slots, head_dim, lengths, seed=0):
  rng = np.random.default_rng(seed)
  shape = (batch, kv_heads, slots, head_dim)
  lengths = np.asarray(lengths, np.int32).reshape(batch, kv_heads)
  pos = np.broadcast_to(np.arange(slots, dtype=np.int32), (batch, kv_heads, slots)).copy()
  pos[np.arange(slots)[None, None] >= lengths[..., None]] = -1
  dense = cache_lib.DenseKVCache(k=jnp.asarray(rng.standard_normal(shape), F32),
                                 v=jnp.asarray(rng.standard_normal(shape), F32),
                                 positions=jnp.asarray(pos), lengths=jnp.asarray(lengths))
  return _quantize(dense, spec)


# One compile per spec (the eager op-by-op path is ~5x slower on CPU).
_quantize = jax.jit(quant_cache.quantize, static_argnames=("spec", "capacity", "dtype"),
                    compiler_options=FAST_COMPILE if jax.default_backend() == "cpu" else None)


def _spec_kwargs(spec):
  return dict(fmt=spec.fmt, k_bits=spec.k_bits, v_bits=spec.v_bits, k_axis=spec.k_axis,
              v_axis=spec.v_axis, group_size=spec.group_size)


def _kernel_args(c, *, garbage=True, seed=1):
  """(positional arrays, keyword arrays) of quantized_decode_attention for cache c."""
  res = c.res_lengths if c.spec.residual else jnp.zeros_like(c.lengths)
  q_len = c.lengths - res
  arrays = dict(k_codes=c.k_codes, k_scale=c.k_scale, k_zero=c.k_zero, v_codes=c.v_codes,
                v_scale=c.v_scale, v_zero=c.v_zero)
  if garbage:  # past the quantized length: random codes, NaN scales/zeros
    rng = np.random.default_rng(seed)
    sq = c.k_codes.shape[2]
    bad = np.arange(sq)[None, None, :] >= np.asarray(q_len)[..., None]      # [B, H, Sq]
    for name, x in list(arrays.items()):
      if x is None:
        continue
      x = np.asarray(x).copy()
      if name.startswith("k_") and c.spec.k_axis == "channel" and name != "k_codes":
        rows = bad[:, :, ::c.spec.group_size]          # a scale row per token group
      else:
        rows = bad
      if x.dtype == np.uint8:
        x[rows] = rng.integers(0, 256, x[rows].shape, dtype=np.uint8)
      else:
        x[rows] = np.nan
      arrays[name] = jnp.asarray(x)
  pos = (arrays["k_codes"], arrays["k_scale"], arrays["v_codes"], arrays["v_scale"], q_len)
  kw = dict(k_positions=c.positions, k_zero=arrays["k_zero"], v_zero=arrays["v_zero"])
  if c.spec.residual:
    kw.update(k_res=c.k_res, v_res=c.v_res, res_positions=c.res_positions,
              res_lengths=c.res_lengths)
  return pos, kw


# name: (platform, spec, cache kwargs, (q heads, queries), q dtype, kernel kwargs). Each
# case covers several axes (interpret mode is slow): lengths include 0 and 1 and
# non-multiples of the block, batch 2, GQA 1/4/8, head_dim 64/128, float32/bfloat16,
# INT8/FP8/KIVI-4/KIVI-2. The GPU KIVI kernel runs in the kvjax dispatch test below.
CASES = {
    "gpu-int8-g8-d128-bf16-window": (
        "gpu", quant_spec.int8(),
        dict(batch=2, kv_heads=1, slots=70, head_dim=128, lengths=[[70], [33]]),
        (8, 1), BF16, dict(block_k=16, num_splits=3, window=20, n_sink=2,
                           softcap=30.0)),
    "tpu-kivi-k2v4-g1-d64-f32-residual": (
        "tpu", quant_spec.kivi(bits=4, group_size=8, residual=8).replace(k_bits=2),
        dict(batch=2, kv_heads=2, slots=200, head_dim=64, lengths=[[1, 200], [0, 150]]),
        (2, 2), F32, dict(block_k=128, num_splits=2)),
    "tpu-fp8-g4-d128-bf16-window": (
        "tpu", quant_spec.fp8("fp8_e5m2"),
        dict(batch=2, kv_heads=2, slots=200, head_dim=128, lengths=[[200, 0], [1, 131]]),
        (8, 1), BF16, dict(block_k=128, window=50, n_sink=4)),
}

@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_interpret(name):
  platform, spec, ckw, (q_heads, t), dtype, kkw = CASES[name]
  # Given a kvjax quantized cache with garbage past every length
  c = _cache(spec, **ckw)
  q, qpos = queries(ckw["batch"], q_heads, t, ckw["head_dim"], dtype, ckw["slots"] - 1)
  pos, kw = _kernel_args(c)
  sink_logits = jnp.linspace(-1.0, 1.0, q_heads) if "residual" in name else None
  # When the fused kernel runs in interpret mode
  out, lse = call_fast(qd.quantized_decode_attention, q, *pos, q_positions=qpos,
                       sink_logits=sink_logits, **kw,
                       static=dict(platform=platform, interpret=True, **_spec_kwargs(spec),
                                   **kkw))
  # Then it matches dequantize + reference attention (float32 math on the same inputs)
  mask_kw = mask_kwargs(kkw)
  ref_out, ref_lse = qd.quantized_decode_reference(
      q.astype(F32), *pos, q_positions=qpos, sink_logits=sink_logits, **kw,
      **_spec_kwargs(spec), **mask_kw)
  assert out.dtype == dtype and out.shape == ref_out.shape and lse.dtype == F32
  assert_close("out", out, ref_out, dtype)
  assert_close("lse", lse, ref_lse, dtype)
  # And the reference reads the layout as kvjax does: it equals attention over
  # QuantizedKVCache.materialize() (which holds no garbage).
  view = c.materialize()
  n = view.k.shape[2]
  want, want_lse, _ = attention_reference(
      q.astype(F32), view.k, view.v, jnp.full(c.lengths.shape, n, jnp.int32),
      q_positions=qpos, k_positions=view.positions, sink_logits=sink_logits, **mask_kw)
  np.testing.assert_allclose(ref_out, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(ref_lse, want_lse, atol=1e-5, rtol=1e-5)


def test_fp8_bit_decoding_is_exact():
  codes = jnp.arange(256, dtype=jnp.uint8)
  for fmt, dt in (("fp8_e4m3", jnp.float8_e4m3fn), ("fp8_e5m2", jnp.float8_e5m2)):
    want = np.arange(256, dtype=np.uint8).view(np.dtype(dt)).astype(np.float32)
    got = np.asarray(S.fp8_bits_to_float(codes, fmt))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[finite], want[finite], err_msg=fmt)


def test_plane_split_roundtrip():
  x = jnp.arange(2 * 3 * 16, dtype=F32).reshape(2, 3, 16)
  planes = S.split_query_planes(x, 4)                  # [2, 4, 3, 4]
  assert planes.shape == (2, 4, 3, 4)
  np.testing.assert_array_equal(planes[:, 1], x[..., 1::4])
  np.testing.assert_array_equal(S.merge_value_planes(planes, 16), x)


def _small(slots=16, d=16):
  """Raw arrays of a tiny per-token asymmetric INT4 cache (validation tests only)."""
  codes = jnp.zeros((1, 1, slots, d // 2), jnp.uint8)
  scale = jnp.ones((1, 1, slots, 1), jnp.float16)
  q, qpos = queries(1, 2, 1, d, F32, slots)
  kw = dict(q_positions=qpos, k_positions=jnp.zeros((1, 1, slots), jnp.int32),
            k_zero=scale, v_zero=scale)
  pos = (codes, scale, codes, scale, jnp.full((1, 1), slots, jnp.int32))
  return q, pos, kw, dict(fmt="int", k_bits=4, v_bits=4)


@pytest.mark.parametrize("static,match", [
    (dict(platform="gpu", block_k=48), "block_k=48"),
    (dict(platform="gpu", num_splits=0), "num_splits=0"),
    (dict(platform="gpu", fmt="int3"), "fmt='int3'"),
    (dict(platform="gpu", k_bits=3), "bits=3"),
    (dict(platform="gpu", k_axis="channel", group_size=5), "multiple of the token group 5"),
    (dict(platform="metal"), "platform='metal'"),
])
def test_invalid_static_args_raise(static, match):
  q, pos, kw, skw = _small()
  with pytest.raises(ValueError, match=match):
    qd.quantized_decode_attention(q, *pos, **kw, **{**skw, "interpret": True, **static})


def test_invalid_tpu_block_raises():
  q, pos, kw, skw = _small(slots=256)
  with pytest.raises(ValueError, match="block_k=100"):
    qd.quantized_decode_attention(q, *pos, **kw, **skw, platform="tpu", interpret=True,
                                  block_k=100)


def test_invalid_arrays_raise():
  q, pos, kw, skw = _small()
  bad = (pos[0][..., :4],) + pos[1:]
  with pytest.raises(ValueError, match=r"k codes shape \(1, 1, 16, 4\)"):
    qd.quantized_decode_attention(q, *bad, **kw, **skw, platform="gpu", interpret=True)
  bad = (pos[0], pos[1][..., :8, :]) + pos[2:]
  with pytest.raises(ValueError, match=r"k scale shape \(1, 1, 8, 1\)"):
    qd.quantized_decode_attention(q, *bad, **kw, **skw, platform="gpu", interpret=True)
  with pytest.raises(ValueError, match="go together"):
    qd.quantized_decode_attention(q, *pos, **kw, k_res=q, **skw, platform="gpu",
                                  interpret=True)


@pytest.mark.parametrize("platform,lowering", [("gpu", "cuda"), ("tpu", "tpu")])
def test_native_lowering_on_cpu(platform, lowering):
  # The real kernels lowered to Triton / Mosaic IR without a device: KIVI (per-channel
  # key scales, grouped value scales, INT4 / INT2 planes, residual) at production sizes.
  b, hq, hkv, t, sq, d, g = 2, 16, 2, 1, 1024, 128, 32
  sds = jax.ShapeDtypeStruct
  i32 = lambda *shape: sds(shape, jnp.int32)
  ks, vs = sds((b, hkv, sq // g, d), jnp.float16), sds((b, hkv, sq, d // g), jnp.float16)
  fn = jax.jit(functools.partial(qd.quantized_decode_attention, platform=platform, fmt="int",
                                 k_bits=2, v_bits=4, k_axis="channel", v_axis="token",
                                 group_size=g, window=512, n_sink=4, softcap=30.0))
  args = (sds((b, hq, t, d), BF16), sds((b, hkv, sq, d // 4), jnp.uint8), ks,
          sds((b, hkv, sq, d // 2), jnp.uint8), vs, i32(b, hkv))
  kwargs = dict(q_positions=i32(b, t), k_positions=i32(b, hkv, sq), k_zero=ks, v_zero=vs,
                k_res=sds((b, hkv, 128, d), BF16), v_res=sds((b, hkv, 128, d), BF16),
                res_positions=i32(b, hkv, 128), res_lengths=i32(b, hkv))
  text = lower_for(fn, args, kwargs, lowering)
  assert "quantized_decode_attention" in text


def test_native(native_platform):
  for plat, spec, ckw, (q_heads, t), dtype, kkw in CASES.values():
    if plat != native_platform:
      continue
    c = _cache(spec, **ckw)
    q, qpos = queries(ckw["batch"], q_heads, t, ckw["head_dim"], dtype, ckw["slots"] - 1)
    pos, kw = _kernel_args(c)
    out, lse = qd.quantized_decode_attention(q, *pos, q_positions=qpos, **kw,
                                             platform=native_platform, **_spec_kwargs(spec),
                                             **kkw)
    ref_out, ref_lse = qd.quantized_decode_reference(
        q, *pos, q_positions=qpos, **kw, **_spec_kwargs(spec),
        **mask_kwargs(kkw))
    # Native float32 matmuls may run at reduced precision: bf16 tolerances.
    assert_close("out", out, ref_out, BF16)
    assert_close("lse", lse, ref_lse, BF16)

def test_support_of_quantized_requests():
  import pallas_kernels  # pylint: disable=import-outside-toplevel
  kivi = pallas_kernels.KernelRequest(
      layout="quantized", fmt="int", k_bits=4, v_bits=2, k_axis="channel", v_axis="token",
      group_size=32, residual=True, head_dim=128, head_dim_v=128, dtype="bfloat16",
      num_q_heads=32, num_kv_heads=8, num_queries=1, window=4096, n_sink=4,
      softcap=30.0)
  assert pallas_kernels.support(kivi)
  assert pallas_kernels.support(pallas_kernels.KernelRequest(layout="quantized",
                                                             fmt="fp8_e5m2", head_dim=64))
  for bad, says in ((dict(return_colsum=True), "return_colsum"),
                    (dict(colsum_window=8), "return_colsum"),
                    (dict(num_queries=17), "num_queries=17"), (dict(pre_rope=True), "pre_rope"),
                    (dict(outliers=True), "outliers"), (dict(fmt="float"), "fmt='float'"),
                    (dict(k_bits=3), "bits=3"), (dict(head_dim=100), "head_dim=100"),
                    (dict(group_size=None), "axis='channel' needs")):
    verdict = pallas_kernels.support(dataclasses.replace(kivi, **bad))
    assert not verdict and says in verdict.reason, (bad, verdict)


def test_entry_point_resolves_platform(monkeypatch):
  import pallas_kernels  # pylint: disable=import-outside-toplevel
  seen = {}
  monkeypatch.setattr(qd, "quantized_decode_attention",
                      lambda *a, **kw: seen.update(kw) or "ran")
  q, pos, kw, skw = _small()
  assert pallas_kernels.quantized_attention(q, *pos, **kw, **skw, platform="cpu",
                                            interpret=True) == "ran"
  assert seen["platform"] == "gpu" and seen["interpret"] and seen["k_bits"] == 4
  with pytest.raises(ValueError, match="interpret=True"):
    pallas_kernels.quantized_attention(q, *pos, **kw, **skw, platform="cpu")


def test_kvjax_attend_dispatches_to_the_fused_kernel():
  # Given a KIVI cache (K 4-bit per channel, V 2-bit per token in groups of 8, residual
  # window) with ragged lengths 0 / 1 / 57 / 90 and a two-token step (one padding query)
  spec = quant_spec.kivi(bits=4, group_size=8, residual=16).replace(v_bits=2)
  c = _cache(spec, batch=2, kv_heads=2, slots=92, head_dim=64, lengths=[[0, 1], [90, 57]])
  # When attend runs with backend="interpret" (the fused kernel in Pallas interpret mode)
  # and with "xla"
  # Then outputs and the updated cache agree
  check_backends_agree(c, jnp.asarray([[90, 91], [90, -1]], jnp.int32), q_heads=8,
                       head_dim=64)
