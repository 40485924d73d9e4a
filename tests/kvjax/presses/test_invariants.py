"""Properties every press keeps, on random caches (hypothesis), under jit.

Each press is jitted once for a fixed shape; hypothesis varies the data: values, ragged
per-row / per-head lengths (rows shorter than the capacity, as left padding produces).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax import presses as P
from kvjax.presses import base
from kvjax.presses.pyramidkv import pyramid_keep
from tests.kvjax.presses import helpers

B, H, G, S, D, ROOM = 3, 2, 2, 16, 4, 2

PRESSES = {
    "streaming_llm": P.StreamingLLMPress(compression_ratio=0.5, n_sink=2),
    "h2o": P.H2OPress(compression_ratio=0.6, protect_recent=2),
    "snapkv": P.SnapKVPress(compression_ratio=0.5, window_size=3, kernel_size=3),
    "tova": P.TOVAPress(budget=5),
    "knorm": P.KnormPress(compression_ratio=0.75, n_sink=1, protect_recent=1),
    "keydiff": P.KeyDiffPress(compression_ratio=0.4),
    "expected_attention": P.ExpectedAttentionPress(compression_ratio=0.5, n_sink=1,
                                                   query_window=4, n_future_positions=4),
    "lagkv": P.LagKVPress(compression_ratio=0.5, n_sink=1, lag_size=3),
    "random": P.RandomPress(compression_ratio=0.5, seed=7),
    "chunkkv": P.ChunkKVPress(P.KnormPress(compression_ratio=0.5, n_sink=1),
                              chunk_length=3),
    "pyramidkv": P.PyramidKVPress(compression_ratio=0.5, window_size=2, beta=2),
    "adakv": P.AdaKVPress(P.H2OPress(compression_ratio=0.5, n_sink=1),
                          alpha_safeguard=0.2),
    "h2o_cam": P.H2OPress(compression_ratio=0.5, merge="cam"),
}
LAYER = dict(layer_idx=1, num_layers=3)


@functools.lru_cache(maxsize=None)
def jitted(name):
  press = PRESSES[name]
  return jax.jit(lambda c, o: press(c, o, rope=helpers.ROPE, room=ROOM, **LAYER))


def expected_keep(press, lengths):
  """Independent budget: kvpress n_kept = int(L * (1 - ratio)) or min(L, budget)."""
  if isinstance(press, P.PyramidKVPress):
    return np.vectorize(lambda l: min(l, pyramid_keep(int(l), press.compression_ratio,
                                                      press.window_size, press.beta,
                                                      LAYER["layer_idx"],
                                                      LAYER["num_layers"])))(lengths)
  inner = getattr(press, "press", press)
  if inner.budget is not None:
    return np.minimum(lengths, inner.budget)
  return np.vectorize(lambda l: int(l * (1 - inner.compression_ratio)))(lengths)


def protected_of(press):
  inner = getattr(press, "press", press)
  return inner.protected()


lengths_strategy = st.lists(st.lists(st.integers(0, S), min_size=H, max_size=H),
                            min_size=B, max_size=B)


@pytest.mark.parametrize("name", sorted(PRESSES))
@settings(deadline=None, max_examples=8, derandomize=True)
@given(lengths=lengths_strategy, per_head=st.booleans(), seed=st.integers(0, 2**16))
def test_press_invariants(name, lengths, per_head, seed):
  press = PRESSES[name]
  lengths = np.asarray(lengths)
  if not per_head:
    lengths = np.broadcast_to(lengths[:, :1], (B, H)).copy()
  cache = helpers.make_cache(b=B, h=H, s=S, d=D, lengths=lengths, seed=seed)
  obs = helpers.make_obs(cache, g=G, w=4, seed=seed + 1)
  out = jitted(name)(cache, obs)

  # Capacity is static: the press's budget at capacity S, plus room.
  ctx = base.LayerContext(rope=helpers.ROPE, room=ROOM, **LAYER)
  assert out.capacity == press.layer_capacity(S, ctx) + ROOM
  new_len = np.asarray(out.lengths)
  assert (new_len <= out.capacity - ROOM).all()

  # Budget honoured exactly (per head; AdaKV: per row, summed over heads).
  want = expected_keep(press, lengths)
  if isinstance(press, P.AdaKVPress):
    np.testing.assert_array_equal(new_len.sum(1), want.sum(1))
    assert (new_len <= lengths).all()
  else:
    np.testing.assert_array_equal(new_len, want)

  pos_old = np.asarray(cache.positions)
  pos_new = np.asarray(out.positions)
  k_old, v_old = np.asarray(cache.k), np.asarray(cache.v)
  k_new, v_new = np.asarray(out.k), np.asarray(out.v)
  n_sink, n_recent = protected_of(press)
  merged = getattr(press, "merge", None) is not None
  for b in range(B):
    for h in range(H):
      n, L = new_len[b, h], lengths[b, h]
      kept = pos_new[b, h, :n]
      # Only valid original slots, in order, each once; empty slots are marked -1.
      assert ((kept >= 0) & (kept < L)).all()
      assert (np.diff(kept) > 0).all()
      assert (pos_new[b, h, n:] == -1).all()
      # Kept slots are bit-identical copies (values may change only by merging).
      np.testing.assert_array_equal(k_new[b, h, :n], k_old[b, h, kept])
      if not merged:
        np.testing.assert_array_equal(v_new[b, h, :n], v_old[b, h, kept])
      # Protected slots are kept whenever the budget holds them.
      prot = set(range(min(n_sink, L))) | set(range(max(L - n_recent, 0), L))
      if n >= len(prot):
        assert prot <= set(kept.tolist()), (prot, kept)

  # Rows are independent: changing the other rows does not change row 0's result.
  other = helpers.make_cache(b=B, h=H, s=S, d=D, lengths=lengths[::-1].copy(), seed=seed + 7)
  mixed = jax.tree.map(lambda a, o: a.at[1:].set(o[1:]) if a.ndim else a, cache, other)
  obs2 = helpers.make_obs(other, g=G, w=4, seed=seed + 8)
  obs_mixed = {k: v.at[1:].set(obs2[k][1:]) for k, v in obs.items()}
  out2 = jitted(name)(mixed, obs_mixed)
  for a, c in zip(jax.tree.leaves(out), jax.tree.leaves(out2)):
    np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(c)[0])


def test_jit_traces_once_per_shape():
  traces = []
  press = P.SnapKVPress(compression_ratio=0.5, window_size=2)

  @jax.jit
  def f(c, o):
    traces.append(1)
    return press(c, o, room=1)

  for seed, lengths in [(0, [16, 5, 9]), (1, [3, 16, 12]), (2, [16, 16, 16])]:
    cache = helpers.make_cache(b=B, h=H, s=S, d=D, lengths=lengths, seed=seed)
    out = f(cache, helpers.make_obs(cache, seed=seed))
    assert out.capacity == 8 + 1
  assert len(traces) == 1


def test_compress_model_traces_once_per_shape():
  from kvjax import cache as cache_lib
  press = P.KnormPress(compression_ratio=0.5)
  base._compress_model_jit.clear_cache()
  for seed in range(3):
    layers = [helpers.make_cache(b=2, h=2, s=12, lengths=[12, 7], seed=seed + i)
              for i in range(2)]
    mc = cache_lib.ModelCache.from_layers(layers, jnp.asarray([12, 7]))
    out = press.compress_model(mc, room=1)
    assert out.capacity == (7, 7)
    np.testing.assert_array_equal(np.asarray(out.next_position), [12, 7])
  assert base._compress_model_jit._cache_size() == 1
