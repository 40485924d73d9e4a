"""The cache protocol, checked for every cache kind (dense, quantized, pruned, low-rank, ...).

To put a new kind under this suite, add one entry to `KINDS`: a factory
`make(batch, kv_heads, capacity, head_dim) -> empty layer cache`, `tol`, the largest
|read back - expected| a token may show for N(0, 1) data (0 for exact kinds), and, for kinds
that drop information by design (pruned channels, low rank), `expect(cache, b, h, k, v)`
giving what a token should read back as.
A kind is read back through `materialize()` (kvjax.quant.base.KVView) when it has one, or
as a DenseKVCache otherwise.

Properties (Given a kind / When tokens are appended or attended / Then ...):
  * empty at init, capacity >= requested, nbytes == bytes of the arrays actually held;
  * appends keep every valid token once, in order, lengths == tokens held <= capacity,
    overflow raises a ValueError naming the overflow, *final* slots are never rewritten,
    every token reads back within `tol`;
  * attend == reference attention over the decompressed past + the exact current chunk,
    colsum aligned with the returned cache's slots;
  * rows that see nothing give finite zeros (lse = -1e30);
  * jit == eager, pytree round trip, stacking into a ModelCache.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvjax import attention as A
from kvjax import lowrank, mixed, quant
from kvjax.cache import DenseKVCache, ModelCache, tree_nbytes
from kvjax.rope import RopeConfig

B, H, D, HQ = 2, 2, 16, 4
CAP, T_APPEND, T_ATTEND = 12, 5, 3  # one shape per jitted function: compiles are shared


@dataclasses.dataclass(frozen=True)
class Kind:
  make: Callable  # (batch, kv_heads, capacity, head_dim) -> cache
  tol: float      # max |read back - expected| for N(0,1) tokens
  expect: Callable = lambda cache, b, h, k, v: (k, v)


def _think(b, h, cap, d):
  rng = np.random.default_rng(7)
  ch = np.sort(np.stack([np.stack([rng.choice(d, 10, replace=False) for _ in range(h)])
                         for _ in range(b)]), axis=-1)
  return lowrank.PrunedKeyCache.init(b, h, cap, d, 10, channels=jnp.asarray(ch, jnp.int32))


def _think_expect(cache, b, h, k, v):
  keep = np.zeros_like(k, bool)
  keep[np.asarray(cache.channels)[b, h]] = True
  return np.where(keep, k, 0.0), v


def _lowrank(b, h, cap, d):
  rng = np.random.default_rng(8)
  basis = lambda r: np.linalg.qr(rng.normal(size=(h, d, d)))[0][..., :r]  # noqa: E731
  return lowrank.LowRankKVCache.init(b, cap, jnp.asarray(basis(10), jnp.float32),
                                     jnp.asarray(basis(12), jnp.float32))


def _lowrank_expect(cache, b, h, k, v):
  pk, pv = np.asarray(cache.k_proj)[b, h], np.asarray(cache.v_proj)[b, h]
  return pk @ (pk.T @ k), pv @ (pv.T @ v)


def _q(spec):
  return lambda b, h, cap, d: quant.QuantizedKVCache.init(b, h, cap, d, spec)


KINDS = {
    "dense": Kind(lambda b, h, cap, d: DenseKVCache.init(b, h, cap, d), 0.0),
    "int8": Kind(_q(quant.int8()), 0.03),
    "fp8_e4m3": Kind(_q(quant.fp8("fp8_e4m3")), 0.3),
    "int2_g8_r4": Kind(_q(quant.per_token(2, group_size=8, residual=4)), 2.5),
    "kivi4": Kind(_q(quant.kivi(4, group_size=4, residual=4)), 0.6),
    "kvquant4": Kind(_q(quant.kvquant(4, group_size=4, residual=4, outlier_frac=0.1,
                                      rope=RopeConfig(head_dim=D))), 0.6),
    "think": Kind(_think, 1e-6, _think_expect),
    "headsplit": Kind(lambda b, h, cap, d: mixed.HeadSplitCache.from_parts([
        quant.QuantizedKVCache.init(b, 1, cap, d, quant.int8()),
        quant.QuantizedKVCache.init(b, h - 1, cap, d, quant.kivi(4, group_size=4, residual=4))]),
                      0.6),
    "lowrank": Kind(_lowrank, 1e-5, _lowrank_expect),
}





NAMES = sorted(KINDS)


@jax.jit
def _view(cache):
  if hasattr(cache, "materialize"):
    return tuple(cache.materialize())
  valid = cache.valid_mask()
  return cache.k, cache.v, jnp.where(valid, cache.positions, -1), valid


def view(cache):
  """(k, v, positions, final) as numpy; positions -1 on empty slots."""
  return tuple(np.asarray(x) for x in _view(cache))


# jit everything with fixed shapes: eager dispatch would compile every op per shape.
_append = jax.jit(lambda c, k, v, p: c.append(k, v, p))


def append(cache, k, v, pos):
  cache.check_room(jnp.asarray(pos))   # concrete check (raises on overflow)
  return _append(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos))


_attend = jax.jit(lambda cache, q, k, v, pos, sink, spec: cache.attend(
    q, k, v, pos, spec, sink_logits=sink, return_lse=True, return_colsum=True),
                  static_argnames=("spec",))


def chunk(rng, t, valid, offset, left=True):
  """k, v [B,H,t,D] and positions [B,t] with valid[b] tokens continuing from offset[b]."""
  k = rng.normal(size=(B, H, t, D)).astype(np.float32)
  v = rng.normal(size=(B, H, t, D)).astype(np.float32)
  pos = np.full((B, t), -1, np.int32)
  for b in range(B):
    sl = slice(t - valid[b], t) if left else slice(0, valid[b])
    pos[b, sl] = offset[b] + np.arange(valid[b])
  return k, v, pos


def truth_table(k, v, pos, table):
  """Records exact (k, v) per (b, h, position)."""
  for b in range(B):
    for t in np.nonzero(pos[b] >= 0)[0]:
      for h in range(H):
        table[(b, h, int(pos[b, t]))] = (k[b, h, t], v[b, h, t])


@pytest.mark.parametrize("name", NAMES)
def test_init_is_empty_and_nbytes_exact(name):
  cache = KINDS[name].make(B, H, 10, D)
  assert cache.capacity >= 10
  np.testing.assert_array_equal(np.asarray(cache.length), np.zeros((B, H)))
  _, _, pos, final = view(cache)
  assert (pos == -1).all() and not final.any()
  held = sum(np.asarray(x).nbytes for x in jax.tree.leaves(cache))
  assert cache.nbytes == held == tree_nbytes(cache)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=5, deadline=None, derandomize=True)
@given(steps=st.lists(st.tuples(st.just(T_APPEND), st.integers(0, 5), st.integers(0, 5),
                                st.booleans()), min_size=1, max_size=4),
       seed=st.integers(0, 2 ** 16))
def test_appends_keep_tokens_in_order_and_final_slots(name, steps, seed):
  kind = KINDS[name]
  rng = np.random.default_rng(seed)
  cache = kind.make(B, H, CAP, D)
  cap = cache.capacity
  offset = np.zeros(B, np.int32)
  table = {}
  for t, v0, v1, left in steps:
    valid = [min(v0, t), min(v1, t)]
    k, v, pos = chunk(rng, t, valid, offset, left)
    if (offset + np.array(valid) > cap).any():
      with pytest.raises(ValueError, match="overflow"):   # raised before any array work
        cache.append(jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos))
      with pytest.raises(ValueError, match="overflow"):
        cache.attend(jnp.zeros((B, HQ, T_APPEND, D)), jnp.asarray(k), jnp.asarray(v),
                     jnp.asarray(pos), SPEC)
      return
    before = view(cache)
    cache = append(cache, k, v, pos)
    truth_table(k, v, pos, table)
    offset += np.array(valid)
    after = view(cache)
    lengths = np.asarray(cache.length)
    np.testing.assert_array_equal(lengths, np.repeat(offset[:, None], H, 1))
    assert (lengths <= cap).all()
    # final slots are never rewritten
    fb = before[3]
    for i in range(3):
      np.testing.assert_array_equal(after[i][fb], before[i][fb])
    assert after[3][fb].all()
    # every token once, in slot order, and close to its exact value
    kv_k, kv_v, kv_pos, _ = after
    for b in range(B):
      for h in range(H):
        p = kv_pos[b, h]
        np.testing.assert_array_equal(p[p >= 0], np.arange(offset[b]))
        for s in np.nonzero(p >= 0)[0]:
          ek, ev = kind.expect(cache, b, h, *table[(b, h, int(p[s]))])
          np.testing.assert_allclose(kv_k[b, h, s], ek, atol=kind.tol + 1e-6)
          np.testing.assert_allclose(kv_v[b, h, s], ev, atol=kind.tol + 1e-6)


def _reference(q, past, k2, v2, pos2, spec, sink=None):
  """Reference attention over the decompressed past plus the exact chunk."""
  pk, pv, ppos, _ = past
  k = np.concatenate([pk, k2], axis=2)
  v = np.concatenate([pv, v2], axis=2)
  kpos = np.concatenate([ppos, np.broadcast_to(pos2[:, None], (B, H, pos2.shape[1]))], axis=-1)
  lengths = jnp.full((B, H), k.shape[2], jnp.int32)
  res = _ref_attention(q, jnp.asarray(k), jnp.asarray(v), lengths, jnp.asarray(pos2),
                       jnp.asarray(kpos), sink, spec)
  return res, kpos


SPEC = A.AttentionSpec(window=4, backend="xla")  # a window: masks by position matter
SINK = jnp.asarray(np.linspace(-1, 1, HQ).astype(np.float32))

_ref_attention = jax.jit(lambda q, k, v, lengths, qpos, kpos, sink, spec: A.attention(
    q, k, v, lengths, q_positions=qpos, k_positions=kpos, spec=spec, sink_logits=sink,
    return_lse=True, return_colsum=True), static_argnames=("spec",))


@pytest.mark.parametrize("name", NAMES)
def test_attend_matches_reference_on_decompressed_past(name):
  rng = np.random.default_rng(1)
  cache = KINDS[name].make(B, H, CAP, D)
  k1, v1, p1 = chunk(rng, T_APPEND, [5, 3], np.zeros(B, np.int32))
  cache = append(cache, k1, v1, p1)
  k2, v2, p2 = chunk(rng, T_ATTEND, [3, 2], np.array([5, 3]), left=False)
  q = jnp.asarray(rng.normal(size=(B, HQ, T_ATTEND, D)).astype(np.float32))
  spec, sink = SPEC, SINK
  past = view(cache)
  res, new = _attend(cache, q, jnp.asarray(k2), jnp.asarray(v2), jnp.asarray(p2), sink, spec)
  ref, ref_pos = _reference(q, past, k2, v2, p2, spec, sink)
  np.testing.assert_allclose(np.asarray(res.out), np.asarray(ref.out), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(res.lse), np.asarray(ref.lse), atol=2e-5, rtol=2e-5)
  # colsum is aligned with the returned cache's slots: match slots by token position
  new_pos = view(new)[2]
  cs, ref_cs = np.asarray(res.colsum), np.asarray(ref.colsum)
  for b in range(B):
    for h in range(H):
      for s in np.nonzero(new_pos[b, h] >= 0)[0]:
        j = np.nonzero(ref_pos[b, h] == new_pos[b, h, s])[0]
        assert len(j) == 1
        np.testing.assert_allclose(cs[b, h, s], ref_cs[b, h, j[0]], atol=2e-5)
  np.testing.assert_array_equal(np.asarray(new.length), [[8, 8], [5, 5]])


@pytest.mark.parametrize("name", NAMES)
def test_rows_that_see_nothing_are_finite_zeros(name):
  rng = np.random.default_rng(2)
  cache = KINDS[name].make(B, H, CAP, D)
  k, v, _ = chunk(rng, T_ATTEND, [3, 3], np.zeros(B, np.int32))
  pos = np.array([[-1, -1, -1], [0, 1, -1]], np.int32)   # row 0: all padding
  q = jnp.asarray(rng.normal(size=(B, HQ, T_ATTEND, D)).astype(np.float32))
  res, new = _attend(cache, q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos), SINK, SPEC)
  out, lse = np.asarray(res.out), np.asarray(res.lse)
  assert np.isfinite(out).all() and np.isfinite(lse).all()
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(lse[0], np.float32(A.NEG_INF))
  np.testing.assert_array_equal(out[1, :, 2], 0.0)
  np.testing.assert_array_equal(np.asarray(new.length), [[0, 0], [2, 2]])


@pytest.mark.parametrize("name", NAMES)
def test_jit_pytree_and_model_cache_stacking(name):
  rng = np.random.default_rng(3)
  cache = KINDS[name].make(B, H, CAP, D)
  compiled = _append._cache_size()  # pylint: disable=protected-access
  for valid in ([5, 4], [2, 0]):   # new data, same shapes: no retrace
    k, v, pos = chunk(rng, T_APPEND, valid, np.asarray(cache.length)[:, 0])
    cache = append(cache, k, v, pos)
  assert _append._cache_size() <= compiled + 1  # pylint: disable=protected-access
  eager = cache
  np.testing.assert_array_equal(np.asarray(eager.length), [[7, 7], [4, 4]])
  leaves, treedef = jax.tree.flatten(eager)
  assert jax.tree.unflatten(treedef, leaves) == eager
  mc = ModelCache.from_layers([eager, eager, eager], jnp.array([7, 4], jnp.int32))
  assert mc.segment_sizes == (3,) and mc.nbytes == 3 * eager.nbytes + 8
  assert mc.capacity == (eager.capacity,) * 3
  np.testing.assert_array_equal(np.asarray(mc.layers()[1].length), np.asarray(eager.length))
  # the stacked segment checks room for the whole run of layers (what models.decode calls)
  too_many = jnp.zeros((B, eager.capacity), jnp.int32)
  with pytest.raises(ValueError, match="overflow"):
    mc.segments[0].check_room(too_many)
