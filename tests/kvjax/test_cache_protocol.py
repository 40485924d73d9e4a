"""The cache protocol, checked for every cache kind (dense, quantized, pruned, low-rank, ...).

To put a new kind under this suite, add one entry to `KINDS`: a factory
`make(batch, kv_heads, capacity, head_dim) -> empty layer cache`, `tol`, the largest
|read back - expected| a token may show for N(0, 1) data (0 for exact kinds), and, for kinds
that drop information by design (pruned channels, low rank), `expect(cache, b, h, k, v)`
giving what a token should read back as.
A kind is read back through `materialize()` (kvjax.cache.KVView), which every kind has.

Properties (Given a kind / When tokens are appended or attended / Then ...):
  * empty at init, capacity >= requested, nbytes == bytes of the arrays actually held;
  * appends keep every valid token once, in order, lengths == tokens held <= capacity,
    overflow raises a ValueError naming the overflow, *final* slots are never rewritten,
    every token reads back within `tol`;
  * attend == reference attention over the decompressed past + the exact current chunk,
    colsum aligned with the returned cache's slots;
  * rows that see nothing give finite zeros (lse = -1e30);
  * jit == eager, pytree round trip, stacking into a ModelCache;
  * `attend(..., layer=i)` / `append(..., layer=i)` on a stacked cache == the unstacked call,
    other layers untouched;
  * capabilities: every kind (these, window rings, recurrent states, the latent cache)
    declares the `Capabilities` listed in `CAPS` below, and each flag holds (colsum comes
    back, presses accept or refuse it, quantize accepts or refuses it, fixed-size kinds never
    overflow).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvjax import attention as A
from kvjax import lowrank, mixed, quant, recurrent
from kvjax.paged import PagedKVCache
from kvjax.cache import Capabilities, DenseKVCache, ModelCache, caps, stack, tree_nbytes
from kvjax.presses.streaming_llm import StreamingLLMPress
from kvjax.rope import RopeConfig
from kvjax.window import WindowKVCache
from tests.kvjax.helpers import ragged_chunk

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
  return tuple(cache.materialize())


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


chunk = functools.partial(ragged_chunk, heads=H, head_dim=D)


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


_attend_layer = jax.jit(lambda cache, q, k, v, pos, sink, spec: cache.attend(
    q, k, v, pos, spec, sink_logits=sink, return_lse=True, return_colsum=True, layer=1),
                        static_argnames=("spec",))


@pytest.mark.parametrize("name", NAMES)
def test_layer_argument_equals_the_unstacked_call(name):
  # Given two different layers of one kind, stacked as a ModelCache segment
  rng = np.random.default_rng(4)
  make = KINDS[name].make
  layers = []
  for valid in ([5, 3], [2, 4]):
    k, v, pos = chunk(rng, T_APPEND, valid, np.zeros(B, np.int32))
    layers.append(append(make(B, H, CAP, D), k, v, pos))
  stacked = stack(layers)
  k2, v2, p2 = chunk(rng, T_ATTEND, [3, 1], np.array([2, 4]), left=False)
  q = jnp.asarray(rng.normal(size=(B, HQ, T_ATTEND, D)).astype(np.float32))
  args = (q, jnp.asarray(k2), jnp.asarray(v2), jnp.asarray(p2), SINK, SPEC)
  # When layer 1 attends in the stack, and alone
  res_s, new_s = _attend_layer(stacked, *args)
  res, new = _attend(layers[1], *args)
  # Then the outputs, lse and colsum agree, layer 1 holds what the unstacked call holds and
  # layer 0 is untouched
  for a, b in zip(res_s, res):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  for st_leaf, one, other in zip(jax.tree.leaves(new_s), jax.tree.leaves(new),
                                 jax.tree.leaves(layers[0])):
    np.testing.assert_array_equal(np.asarray(st_leaf[1]), np.asarray(one))
    np.testing.assert_array_equal(np.asarray(st_leaf[0]), np.asarray(other))
  # and append(layer=) likewise
  app_s = jax.jit(lambda c, k, v, p: c.append(k, v, p, layer=0))(stacked, *args[1:4])
  app = _append(layers[0], *args[1:4])
  for st_leaf, one in zip(jax.tree.leaves(app_s), jax.tree.leaves(app)):
    np.testing.assert_array_equal(np.asarray(st_leaf[0]), np.asarray(one))


# -- capabilities ------------------------------------------------------------------------
F = Capabilities
ALL_KINDS = dict(
    {name: KINDS[name].make for name in NAMES},
    window=lambda b, h, cap, d: WindowKVCache.init(b, h, cap, d, n_sink=1),
    latent=lambda b, h, cap, d: recurrent.LatentKVCache.init(b, cap, d - 4, 4),
    linear_state=lambda b, h, cap, d: recurrent.LinearAttentionState.init(b, h, d, d),
    diagonal_state=lambda b, h, cap, d: recurrent.DiagonalState.init(b, d),
    conv_state=lambda b, h, cap, d: recurrent.ConvState.init(b, 4, d),
    paged=lambda b, h, cap, d: PagedKVCache.init(b, h, d, num_pages=2 * b * cap // 4,
                                                 page_size=4, max_pages=cap // 4),
)
_KV = dict(colsum=True, convertible=True)
_Q = dict(colsum=True, convertible=True, quantized=True)
CAPS = {  # the capability table of docs/ARCHITECTURE.md
    "dense": F(pressable=True, colsum=True, inplace_layer=True, convertible=True),
    "window": F(fixed_size=True, colsum=True, inplace_layer=True),
    "int8": F(**_Q), "fp8_e4m3": F(**_Q), "int2_g8_r4": F(**_Q), "kivi4": F(**_Q),
    "kvquant4": F(**_Q),
    "think": F(**_KV), "lowrank": F(**_KV),
    "headsplit": F(colsum=True),
    "latent": F(colsum=True),
    "linear_state": F(fixed_size=True, recurrent=True),
    "diagonal_state": F(fixed_size=True, recurrent=True),
    "conv_state": F(fixed_size=True, recurrent=True),
    "paged": F(colsum=True, inplace_layer=True, paged=True),
}


def test_every_kind_has_a_row_in_the_capability_table():
  assert sorted(CAPS) == sorted(ALL_KINDS)


@pytest.mark.parametrize("name", sorted(CAPS))
def test_capabilities_are_declared_on_the_class_and_hold(name):
  cache = ALL_KINDS[name](B, H, CAP, D)
  want = CAPS[name]
  # declared once, on the class (not per instance, not probed)
  assert caps(cache) == type(cache).CAPS == want
  rng = np.random.default_rng(5)
  pos = jnp.asarray(np.tile(np.arange(CAP + 3, dtype=np.int32), (B, 1)))
  if want.fixed_size:   # never overflows, whatever the length
    cache.check_room(pos)
  else:
    with pytest.raises(ValueError, match="overflow"):
      cache.check_room(pos)
  if want.recurrent:
    assert cache.capacity == 0
    return
  # pressable: a press compresses it; otherwise a press refuses it by name
  if want.pressable:
    out = StreamingLLMPress(compression_ratio=0.5)(cache)
    assert out.capacity <= cache.capacity
  else:
    with pytest.raises(ValueError, match=type(cache).__name__):
      StreamingLLMPress(compression_ratio=0.5)(cache)
  # convertible: kvjax.quant.quantize accepts it; otherwise it says why
  if want.convertible:
    assert quant.quantize(cache, quant.int8()).capacity >= cache.capacity
  else:
    with pytest.raises(ValueError, match="not convertible"):
      quant.quantize(cache, quant.int8())
  # colsum comes back aligned with the new cache's slots
  hk = cache.length.shape[-1]
  d_k, d_v = cache.head_dims
  k = jnp.asarray(rng.normal(size=(B, hk, 2, d_k)).astype(np.float32))
  v = None if name == "latent" else jnp.asarray(rng.normal(size=(B, hk, 2, d_v)).astype(
      np.float32))
  q = jnp.asarray(rng.normal(size=(B, HQ, 2, d_k)).astype(np.float32))
  spec = cache.spec() if name == "window" else A.AttentionSpec(backend="xla")
  res, new = cache.attend(q, k, v, jnp.asarray([[0, 1], [0, -1]], jnp.int32), spec,
                          return_colsum=want.colsum)
  if want.colsum:
    assert res.colsum.shape[-1] == new.materialize().positions.shape[-1]
    # the probability mass of the valid queries lands on the slots that hold tokens
    np.testing.assert_allclose(np.asarray(res.colsum).sum(axis=-1),
                               np.broadcast_to(np.array([[2], [1]]) * (HQ // hk), (B, hk)),
                               rtol=1e-5)
  # quantized kinds hold fewer bytes per token than the same tokens dense
  if want.quantized:
    assert new.nbytes < new.to_dense().nbytes


def test_offloaded_model_caches_declare_how_a_step_runs():
  # Given a one-layer model cache holding 4 tokens, offloaded both ways
  from kvjax import offload  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(6)
  k, v, pos = chunk(rng, T_APPEND, [4, 4], np.zeros(B, np.int32), left=False)
  layer = append(DenseKVCache.init(B, H, 8, D), k, v, pos)
  mc = ModelCache.from_layers([layer], jnp.array([4, 4], jnp.int32))
  host = offload.HostCache.from_model_cache(mc)
  quest = offload.QuestCache.from_model_cache(mc, page_size=2, room=2, top_k=1)
  # Then they say so by capability and mode (models.decode reads these, not their types)
  assert not caps(mc).offloaded
  assert caps(host).offloaded and host.offload_mode == offload.STREAM
  assert caps(quest).offloaded and quest.offload_mode == offload.QUEST
  # and answer what the API asks of a ModelCache
  for c in (host, quest):
    assert (c.batch, c.num_layers) == (B, 1)
    np.testing.assert_array_equal(np.asarray(c.next_position), [4, 4])
    with pytest.raises(ValueError, match="overflow"):
      c.check_room(jnp.asarray(np.tile(np.arange(4, 14, dtype=np.int32), (B, 1))))
