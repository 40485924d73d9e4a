"""ThinK channel pruning and calibrated low-rank caches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention as A
from kvjax import lowrank
from kvjax.cache import DenseKVCache

_attend = jax.jit(lambda c, q, k, v, p: c.attend(q, k, v, p, A.AttentionSpec(backend="xla"))[0].out)


def _dense(k, v):
  b, h, s, d = k.shape
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  return _append(DenseKVCache.init(b, h, s + 1, d), jnp.asarray(k), jnp.asarray(v), pos)


_append = jax.jit(lambda c, k, v, p: c.append(k, v, p))


def test_think_keeps_channels_where_queries_and_keys_are_large():
  rng = np.random.default_rng(0)
  b, h, s, d = 1, 2, 24, 16
  scale = np.ones(d, np.float32)
  scale[[2, 5, 11]] = 6.0                     # large in keys and queries
  k = rng.normal(size=(b, h, s, d)).astype(np.float32) * scale
  k[..., 7] *= 8.0                             # large key channel that queries ignore
  q = rng.normal(size=(b, 4, 4, d)).astype(np.float32) * scale
  q[..., 7] = 0.0
  dense = _dense(k, rng.normal(size=(b, h, s, d)).astype(np.float32))
  ch = np.asarray(lowrank.think_channels(dense.k, dense.valid_mask(), jnp.asarray(q), 4))
  for hh in range(h):
    assert {2, 5, 11} <= set(ch[0, hh].tolist()) and 7 not in ch[0, hh]
  with pytest.raises(ValueError, match=r"keep=17; must be in \[1, head_dim=16\]"):
    lowrank.think_channels(dense.k, dense.valid_mask(), jnp.asarray(q), 17)


def test_think_beats_random_channels_at_the_same_bytes():
  rng = np.random.default_rng(1)
  b, h, s, d, keep = 1, 2, 32, 16, 8
  energy = np.exp(rng.normal(size=d)).astype(np.float32)     # uneven channel energy
  k = rng.normal(size=(b, h, s, d)).astype(np.float32) * energy
  v = rng.normal(size=(b, h, s, d)).astype(np.float32)
  q_obs = rng.normal(size=(b, 4, 8, d)).astype(np.float32) * energy
  q = jnp.asarray(rng.normal(size=(b, 4, 1, d)).astype(np.float32) * energy * 0.3)
  dense = _dense(k, v)
  think = lowrank._think_prune_jit(dense, jnp.asarray(q_obs), keep)  # pylint: disable=protected-access
  rand_ch = jnp.asarray(np.sort(np.stack([[rng.choice(d, keep, replace=False)
                                           for _ in range(h)]]), -1), jnp.int32)
  rand = lowrank.PrunedKeyCache.init(b, h, s + 1, d, keep, channels=rand_ch)
  rand = _append(rand, dense.k, dense.v, dense.positions[:, 0])
  assert think.nbytes == rand.nbytes < dense.nbytes
  z = jnp.zeros((b, h, 1, d))
  qp = jnp.full((b, 1), s, jnp.int32)
  ref = np.asarray(_attend(dense, q, z, z, qp))
  e_think = np.linalg.norm(np.asarray(_attend(think, q, z, z, qp)) - ref)
  e_rand = np.linalg.norm(np.asarray(_attend(rand, q, z, z, qp)) - ref)
  assert e_think < 0.7 * e_rand, (e_think, e_rand)


def test_lowrank_calibration_recovers_a_low_rank_subspace():
  rng = np.random.default_rng(2)
  b, h, s, d, r = 2, 2, 40, 16, 6
  basis = np.linalg.qr(rng.normal(size=(h, d, d)))[0][..., :r]
  k = np.einsum("bhsr,hdr->bhsd", rng.normal(size=(b, h, s, r)) * 3, basis).astype(np.float32)
  k += 0.01 * rng.normal(size=k.shape).astype(np.float32)
  v = rng.normal(size=(b, h, s, d)).astype(np.float32)
  dense = _dense(k, v)
  lr = jax.jit(lowrank.lowrank_from_dense, static_argnums=1)(dense, r)
  assert lr.k.shape[-1] == r and lr.v_proj is None and lr.nbytes < dense.nbytes
  back = jax.jit(lambda c: c.to_dense())(lr)
  np.testing.assert_array_equal(np.asarray(back.positions), np.asarray(dense.positions))
  err = np.abs(np.asarray(back.k) - np.asarray(dense.k))[np.asarray(dense.valid_mask())]
  assert err.max() < 0.1
  np.testing.assert_array_equal(np.asarray(back.v), np.asarray(dense.v))
  p = np.asarray(lr.k_proj)
  assert p.shape == (b, h, d, r)   # batch-leading, like every cache leaf
  np.testing.assert_allclose(np.einsum("bhdr,bhds->bhrs", p, p),
                             np.broadcast_to(np.eye(r), (b, h, r, r)), atol=1e-5)
  with pytest.raises(ValueError, match=r"rank=17; must be in \[1, head_dim=16\]"):
    lowrank.lowrank_from_dense(dense, 17)
