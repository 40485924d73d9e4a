"""WindowKVCache (ring buffer of `sink + window` slots) against a dense cache of the whole
history: the same attention (out, lse, colsum by position) for chunks shorter and longer
than the window, ragged rows, left/right padding, sinks, stacked in-place variants, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention as A
from kvjax.cache import DenseKVCache, stack
from kvjax.window import WindowKVCache

B, H, HQ, D = 2, 2, 4, 8


def chunk(rng, t, valid, offset, left):
  k = rng.normal(size=(B, H, t, D)).astype(np.float32)
  v = rng.normal(size=(B, H, t, D)).astype(np.float32)
  q = rng.normal(size=(B, HQ, t, D)).astype(np.float32)
  pos = np.full((B, t), -1, np.int32)
  for b in range(B):
    sl = slice(t - valid[b], t) if left else slice(0, valid[b])
    pos[b, sl] = offset[b] + np.arange(valid[b])
  return [jnp.asarray(x) for x in (q, k, v, pos)]


# (chunk length, valid tokens per row, left padding): rows drift apart, chunks longer than
# the window wrap the ring inside one step; two chunk lengths keep compiles few.
STEPS = [(6, (6, 4), True), (1, (1, 1), False), (6, (3, 6), False), (1, (1, 0), True),
         (1, (1, 1), False), (6, (6, 5), True)]


@pytest.mark.parametrize("window,sink", [(4, 0), (5, 2)])
def test_ring_equals_dense_history(window, sink):
  rng = np.random.default_rng(window)
  spec = A.AttentionSpec(window=window, sink_tokens=sink, backend="xla")
  ring = WindowKVCache.init(B, H, window, D, sink=sink)
  dense = DenseKVCache.init(B, H, 40, D)
  offset = np.zeros(B, np.int32)
  assert ring.capacity == window + sink and ring.window == window
  attend = jax.jit(lambda c, q, k, v, p: c.attend(q, k, v, p, spec, return_lse=True,
                                                   return_colsum=True))
  for t, valid, left in STEPS:
    q, k, v, pos = chunk(rng, t, valid, offset, left)
    res, ring = attend(ring, q, k, v, pos)
    ref, dense = attend(dense, q, k, v, pos)
    np.testing.assert_allclose(res.out, ref.out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(res.lse, ref.lse, atol=1e-5, rtol=1e-5)
    offset += np.array(valid)
    # the ring holds the sinks and the last `window` tokens of each row, nothing else
    r, d = jax.tree.map(np.asarray, (ring, dense))
    cs, ref_cs = np.asarray(res.colsum), np.asarray(ref.colsum)
    for b in range(B):
      n = offset[b]
      want = sorted(set(range(min(sink, n))) | set(range(max(n - window, 0), n)))
      for h in range(H):
        held = r.positions[b, h][r.positions[b, h] >= 0]
        assert sorted(held.tolist()) == want
        assert r.lengths[b, h] == len(want) == min(n, ring.capacity) and r.total[b, h] == n
        # colsum is aligned with the ring's slots: compare by token position
        for s in np.nonzero(r.positions[b, h] >= 0)[0]:
          j = np.nonzero(d.positions[b, h] == r.positions[b, h, s])[0][0]
          np.testing.assert_allclose(cs[b, h, s], ref_cs[b, h, j], atol=1e-5)
          np.testing.assert_array_equal(r.k[b, h, s], d.k[b, h, j])
          np.testing.assert_array_equal(r.v[b, h, s], d.v[b, h, j])


def test_stacked_in_place_variants_equal_unstacked_and_jit():
  rng = np.random.default_rng(7)
  spec = A.AttentionSpec(window=3, backend="xla")
  layers = [WindowKVCache.init(B, H, 3, D), WindowKVCache.init(B, H, 3, D)]
  offset = np.zeros(B, np.int32)
  kw = dict(return_colsum=True, return_lse=True)
  attend = jax.jit(lambda c, q, k, v, p: c.attend(q, k, v, p, spec, **kw))
  attend_stacked = jax.jit(lambda c, i, q, k, v, p: c.attend_stacked(i, q, k, v, p, spec, **kw))
  st = stack(layers)
  for t, valid, left in STEPS[:5]:
    q, k, v, pos = chunk(rng, t, valid, offset, left)
    res, layers[1] = attend(layers[1], q, k, v, pos)
    res_s, st = attend_stacked(st, 1, q, k, v, pos)
    offset += np.array(valid)
    for a, b in zip(res, res_s):
      np.testing.assert_allclose(a, b, atol=1e-6)
  for a, b, c in zip(jax.tree.leaves(st), jax.tree.leaves(layers[1]), jax.tree.leaves(layers[0])):
    np.testing.assert_array_equal(a[1], b)
    np.testing.assert_array_equal(a[0], c)  # the other layer is untouched


def test_never_overflows_and_nbytes_is_fixed():
  rng = np.random.default_rng(3)
  ring = WindowKVCache.init(B, H, 4, D, dtype=jnp.bfloat16)
  nb = ring.nbytes
  assert nb == 2 * B * H * 4 * D * 2 + B * H * 4 * 4 + 2 * B * H * 4
  offset = np.zeros(B, np.int32)
  for _ in range(3):
    _, k, v, pos = chunk(rng, 7, (7, 7), offset, False)
    ring.check_room(pos)
    ring = ring.append(k, v, pos)
    offset += 7
  assert ring.nbytes == nb
  np.testing.assert_array_equal(ring.length, np.full((B, H), 4))
  np.testing.assert_array_equal(np.sort(np.asarray(ring.positions[0, 0])), [17, 18, 19, 20])


def test_spec_that_needs_more_than_the_ring_raises():
  ring = WindowKVCache.init(1, 1, 4, D)
  q = jnp.zeros((1, 1, 1, D))
  k = jnp.zeros((1, 1, 1, D))
  pos = jnp.zeros((1, 1), jnp.int32)
  with pytest.raises(ValueError, match="window=None"):
    ring.attend(q, k, k, pos, A.AttentionSpec())
  with pytest.raises(ValueError, match="window=5"):
    ring.attend(q, k, k, pos, A.AttentionSpec(window=5))
  with pytest.raises(ValueError, match="sink_tokens=2"):
    ring.attend(q, k, k, pos, A.AttentionSpec(window=4, sink_tokens=2))
  with pytest.raises(ValueError, match="window=0"):
    WindowKVCache.init(1, 1, 0, D)
