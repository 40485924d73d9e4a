"""Quantization formats: packing properties, analytic round-trip bounds, input validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvjax import quant
from kvjax.quant import formats, packing
from kvjax.quant import spec as spec_lib
from kvjax.rope import RopeConfig

F32_EPS = 1e-6

# Fixed shapes + jit: one compile per case instead of one per eager op and shape.
_pack = jax.jit(packing.pack, static_argnums=1)
_unpack = jax.jit(packing.unpack, static_argnums=(1, 2))


# -- packing --------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2 ** 16))
def test_pack_unpack_round_trip(bits, seed):
  n = 16
  codes = np.random.default_rng(seed).integers(0, 2 ** bits, size=(3, n), dtype=np.uint8)
  packed = _pack(jnp.asarray(codes), bits)
  assert packed.dtype == jnp.uint8 and packed.shape == (3, n * bits // 8)
  np.testing.assert_array_equal(np.asarray(_unpack(packed, bits, n)), codes)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4]), data=st.binary(min_size=8, max_size=8))
def test_every_byte_pattern_unpacks_and_repacks(bits, data):
  packed = np.frombuffer(data, np.uint8)[None]
  n = packed.shape[-1] * (8 // bits)
  codes = _unpack(jnp.asarray(packed), bits, n)
  assert int(jnp.max(codes)) < 2 ** bits
  np.testing.assert_array_equal(np.asarray(_pack(codes, bits)), packed)


def test_packing_layout_is_little_endian_within_a_byte():
  assert int(packing.pack(jnp.array([1, 2], jnp.uint8), 4)[0]) == 0x21
  assert int(packing.pack(jnp.array([1, 2, 3, 0], jnp.uint8), 2)[0]) == 0b00111001


def test_packing_rejects_bad_widths():
  with pytest.raises(ValueError, match="bits=3"):
    packing.pack(jnp.zeros((4,), jnp.uint8), 3)
  with pytest.raises(ValueError, match="multiple of 4"):
    packing.pack(jnp.zeros((6,), jnp.uint8), 2)


# -- integer formats ------------------------------------------------------------------------
def _heavy(seed, shape):
  """Gaussian data with a few large channels and a per-token offset (like real keys)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape).astype(np.float32)
  x[..., 3] *= 12.0
  x[..., 7] += 5.0
  return jnp.asarray(x)


@jax.jit(static_argnames=("bits", "axis", "group", "symmetric", "scale_dtype"))
def _int_round_trip(x, *, bits, axis, group, symmetric, scale_dtype):
  q = formats.quantize_int(x, bits=bits, axis=axis, group=group, symmetric=symmetric,
                           scale_dtype=scale_dtype)
  y = formats.dequantize_int(q.codes, q.scale, q.zero, bits=bits, axis=axis, group=group)
  s = formats._expand_scale(q.scale.astype(jnp.float32), axis, x.shape, group)  # pylint: disable=protected-access
  return q, y, s


@pytest.mark.parametrize("bits,axis,group,symmetric,scale_dtype", [
    (8, "token", 16, True, "float16"), (8, "token", 8, False, "bfloat16"),
    (4, "token", 16, False, "float16"), (4, "token", 4, True, "float32"),
    (2, "token", 8, False, "float16"), (4, "channel", 4, False, "float16"),
    (2, "channel", 8, False, "bfloat16"), (8, "channel", 2, True, "float16")])
def test_int_round_trip_within_half_a_step(bits, axis, group, symmetric, scale_dtype):
  x = _heavy(0, (2, 3, 16, 16))
  q, y, s = _int_round_trip(x, bits=bits, axis=axis, group=group, symmetric=symmetric,
                            scale_dtype=scale_dtype)
  assert int(q.codes.max()) < 2 ** bits and q.codes.dtype == jnp.uint8
  assert q.scale.dtype == jnp.dtype(scale_dtype) and (q.zero is None) == symmetric
  err = np.abs(np.asarray(y - x))
  bound = np.asarray(s) / 2 + F32_EPS * (1 + np.abs(np.asarray(x)))
  assert (err <= bound).all(), float((err - bound).max())
  if bits == 8 and symmetric and axis == "token":
    # INT8 per-token absmax: scale = max|x| / 127 (rounded up once to the scale dtype)
    amax = np.abs(np.asarray(x)).max(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(q.scale.astype(jnp.float32))[..., :1], amax / 127,
                               rtol=2 ** -7)


@jax.jit
def _outlier_round_trip(x):
  mask, vals, idx = formats.split_outliers(x, 2, jnp.float32)
  plain = formats.quantize_int(x, bits=4, axis="token")
  sparse = formats.quantize_int(x, bits=4, axis="token", exclude=mask)
  y = formats.dequantize_int(sparse.codes, sparse.scale, sparse.zero, bits=4, axis="token")
  return mask, idx, plain, sparse, formats.merge_outliers(y, vals, idx)


def test_outliers_are_exact_and_shrink_the_step():
  x = _heavy(1, (1, 2, 8, 32))
  mask, idx, plain, sparse, y = _outlier_round_trip(x)
  assert idx.dtype == jnp.uint8 and int(mask.sum(-1).min()) == 2
  np.testing.assert_array_equal(np.asarray(y)[np.asarray(mask)], np.asarray(x)[np.asarray(mask)])
  s = np.asarray(sparse.scale.astype(jnp.float32))
  err = np.abs(np.asarray(y - x))
  assert (err <= s / 2 + F32_EPS * (1 + np.abs(np.asarray(x)))).all()
  assert s.mean() < 0.5 * np.asarray(plain.scale.astype(jnp.float32)).mean()


@jax.jit(static_argnames=("fmt", "group"))
def _fp8_round_trip(x, *, fmt, group):
  q = formats.quantize_fp8(x, fmt=fmt, group=group)
  y = formats.dequantize_fp8(q.codes, q.scale, fmt=fmt, group=group)
  return q, y, formats.fp8_error_bound(x, q.scale, fmt, group)


@pytest.mark.parametrize("fmt,group", [("fp8_e4m3", None), ("fp8_e4m3", 4), ("fp8_e5m2", 8)])
def test_fp8_round_trip_within_half_an_ulp(fmt, group):
  x = _heavy(2, (2, 2, 16, 16)) * jnp.asarray(np.logspace(-3, 2, 16, dtype=np.float32))
  q, y, bound = _fp8_round_trip(x, fmt=fmt, group=group)
  assert q.codes.dtype == formats.fp8_dtype(fmt)
  bits = jax.lax.bitcast_convert_type(q.codes, jnp.uint8)   # how caches store them
  np.testing.assert_array_equal(np.asarray(formats.fp8_to_float(bits, fmt)),
                                np.asarray(q.codes.astype(jnp.float32)))
  with pytest.raises(ValueError, match="uint8 with fmt"):
    formats.fp8_to_float(bits)
  bound = bound * (1 + 1e-6) + 1e-30
  assert (np.abs(np.asarray(y - x)) <= np.asarray(bound)).all()
  assert np.isfinite(np.asarray(y)).all()


def test_all_zero_tokens_round_trip_to_zero():
  x = jnp.zeros((2, 3, 16, 16))
  for bits, sym in ((4, False), (8, True)):
    _, y, _ = _int_round_trip(x, bits=bits, axis="token", group=16, symmetric=sym,
                              scale_dtype="float16")
    np.testing.assert_array_equal(np.asarray(y), 0.0)
  _, y, _ = _fp8_round_trip(x, fmt="fp8_e4m3", group=None)
  np.testing.assert_array_equal(np.asarray(y), 0.0)


# -- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(k_bits=3), r"k_bits=3 is not a supported bit width; allowed: \(2, 4, 8\)"),
    (dict(v_bits=16), r"v_bits=16 .*allowed: \(2, 4, 8\)"),
    (dict(fmt="int3"), r"fmt='int3'; allowed: \('int', 'fp8_e4m3', 'fp8_e5m2'\)"),
    (dict(fmt="fp8_e4m3", k_bits=4), r"k_bits=4.*allowed: 8"),
    (dict(fmt="fp8_e5m2", k_axis="channel", group_size=4, residual=4), r"'token' only"),
    (dict(k_axis="rows"), r"k_axis='rows'; allowed: \('token', 'channel'\)"),
    (dict(k_axis="channel"), r"needs group_size"),
    (dict(k_axis="channel", group_size=8, residual=12), r"residual=12 must be a positive "
                                                        r"multiple of group_size=8"),
    (dict(outlier_frac=1.5), r"outlier_frac=1.5"),
    (dict(scale_dtype="int8"), r"scale_dtype='int8'; allowed"),
    (dict(residual=-1), r"residual=-1"),
    (dict(group_size=0), r"group_size=0"),
    (dict(pre_rope=True, rope=RopeConfig(head_dim=16, rope_type="dynamic", factor=2.0)),
     r"rope_type='dynamic'"),
])
def test_bad_specs_raise_naming_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    quant.QuantSpec(**kwargs)


@pytest.mark.parametrize("spec,head_dim,match", [
    (quant.per_token(4, group_size=6), 16, r"group_size=6 must divide head_dim=16"),
    (quant.kivi(4, group_size=6, residual=12), 16, r"group_size=6 must divide v_head_dim=16"),
    (quant.per_token(4), 7, r"head_dim=7 cannot be packed at 4 bits"),
    (quant.kvquant(4, group_size=4, residual=4), 16, r"pre_rope=True needs spec.rope"),
])
def test_bad_shapes_raise_at_init(spec, head_dim, match):
  with pytest.raises(ValueError, match=match):
    quant.QuantizedKVCache.init(1, 1, 8, head_dim, spec)


def test_fp8_on_a_backend_without_it_raises(monkeypatch):
  monkeypatch.setattr(spec_lib, "_fp8_probe", lambda backend, fmt: False)
  with pytest.raises(ValueError, match=r"fmt='fp8_e4m3' is not supported on backend 'cpu'; "
                                       r"allowed here: \('int',\)"):
    quant.QuantizedKVCache.init(1, 1, 8, 16, quant.fp8("fp8_e4m3"))


def test_fp8_probe_runs_on_this_backend():
  # the probe compiles a real conversion; CPU XLA supports both formats
  assert quant.fp8_supported("fp8_e4m3") and quant.fp8_supported("fp8_e5m2")


def test_from_name_presets_and_errors():
  assert quant.from_name("kivi2").k_axis == "channel"
  assert quant.from_name("int4").k_bits == 4
  assert quant.from_name("fp8_e5m2").fmt == "fp8_e5m2"
  with pytest.raises(ValueError, match=r"unknown quantizer name 'int3'; allowed: \('int8'"):
    quant.from_name("int3")
