"""RoPE variants against their closed-form definitions."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import rope as R


def np_rope(x, pos, inv):
  """HF rotate_half RoPE in numpy for x [T, D] with rotary dim 2 * len(inv)."""
  rd = 2 * len(inv)
  ang = np.outer(pos, inv)
  cos = np.cos(np.concatenate([ang, ang], -1))
  sin = np.sin(np.concatenate([ang, ang], -1))
  rot = x[:, :rd]
  half = rd // 2
  rh = np.concatenate([-rot[:, half:], rot[:, :half]], -1)
  return np.concatenate([rot * cos + rh * sin, x[:, rd:]], -1)


def test_default_matches_numpy():
  cfg = R.RopeConfig(head_dim=8, theta=100.0)
  x = np.random.default_rng(0).normal(size=(1, 1, 6, 8)).astype(np.float32)
  pos = np.arange(6, dtype=np.int32)[None] + 3
  inv = 1.0 / 100.0 ** (np.arange(0, 8, 2) / 8)
  got = R.apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg)
  np.testing.assert_allclose(got[0, 0], np_rope(x[0, 0], pos[0], inv), atol=1e-5)


def test_partial_rotary_leaves_tail():
  cfg = R.RopeConfig(head_dim=8, partial_rotary_factor=0.5)
  x = np.random.default_rng(1).normal(size=(1, 2, 5, 8)).astype(np.float32)
  pos = np.arange(5, dtype=np.int32)[None]
  got = np.asarray(R.apply_rope(jnp.asarray(x), jnp.asarray(pos), cfg))
  np.testing.assert_array_equal(got[..., 4:], x[..., 4:])
  inv = 1.0 / 10000.0 ** (np.arange(0, 4, 2) / 4)
  np.testing.assert_allclose(got[0, 1], np_rope(x[0, 1], pos[0], inv), atol=1e-5)


def test_linear_divides_positions():
  cfg = R.RopeConfig(head_dim=8, rope_type="linear", factor=4.0)
  base = R.RopeConfig(head_dim=8)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 1, 4, 8)), jnp.float32)
  got = R.apply_rope(x, jnp.array([[0, 4, 8, 12]]), cfg)
  want = R.apply_rope(x, jnp.array([[0, 1, 2, 3]]), base)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_llama3_frequencies():
  cfg = R.RopeConfig(head_dim=64, theta=500000.0, rope_type="llama3", factor=8.0,
                     low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
  inv = np.asarray(R.inv_frequencies(cfg))
  base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
  for got, f in zip(inv, base):
    wl = 2 * math.pi / f
    if wl < 8192 / 4:
      want = f
    elif wl > 8192 / 1:
      want = f / 8
    else:
      sm = (8192 / wl - 1) / (4 - 1)
      want = (1 - sm) * f / 8 + sm * f
    assert got == pytest.approx(want, rel=1e-5)


def test_dynamic_ntk_grows_base_past_max():
  cfg = R.RopeConfig(head_dim=8, rope_type="dynamic", factor=2.0, max_position_embeddings=16)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 1, 1, 8)), jnp.float32)
  short = R.apply_rope(x, jnp.array([[10]]), cfg)
  np.testing.assert_allclose(short, R.apply_rope(x, jnp.array([[10]]), R.RopeConfig(head_dim=8)),
                             atol=1e-6)
  seq = 32
  base = 10000.0 * ((2.0 * seq / 16) - 1) ** (8 / 6)
  inv = 1.0 / base ** (np.arange(0, 8, 2) / 8)
  got = R.apply_rope(x, jnp.array([[seq - 1]]), cfg)
  np.testing.assert_allclose(got[0, 0], np_rope(np.asarray(x[0, 0]), [seq - 1], inv), atol=1e-5)


def test_relative_property_and_rerotate():
  cfg = R.RopeConfig(head_dim=16, rope_type="llama3", factor=4.0,
                     original_max_position_embeddings=32)
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
  dot = lambda a, b: float(jnp.sum(R.apply_rope(q, jnp.array([[a]]), cfg) *
                                   R.apply_rope(k, jnp.array([[b]]), cfg)))
  assert dot(10, 7) == pytest.approx(dot(53, 50), rel=1e-4)
  k_at_5 = R.apply_rope(k, jnp.array([[5]]), cfg)
  moved = R.rerotate(k_at_5, jnp.array([[[5]]]), jnp.array([[[2]]]), cfg)
  np.testing.assert_allclose(moved, R.apply_rope(k, jnp.array([[2]]), cfg), atol=1e-5)


def test_bad_config():
  with pytest.raises(ValueError, match="rope_type"):
    R.RopeConfig(head_dim=8, rope_type="yarnish")
  with pytest.raises(ValueError, match="partial_rotary_factor"):
    R.RopeConfig(head_dim=8, partial_rotary_factor=0.0)
  with pytest.raises(ValueError, match="rope_type"):
    R.RopeConfig.from_hf(8, 1e4, {"rope_type": "longrope"}, 128)
