"""WindowKVCache (ring buffer of `n_sink + window` slots) against a dense cache of the whole
history: the same attention (out, lse, colsum by position) for chunks shorter and longer
than the window, ragged rows, left/right padding, sinks, the in-place layer path, jit;
dilated rings against a brute-force mask; legacy ring files."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvjax import attention as A
from kvjax import window as window_lib
from kvjax.cache import DenseKVCache, stack
from kvjax.window import WindowKVCache
from tests.kvjax.helpers import ragged_chunk

B, H, HQ, D = 2, 2, 4, 8


def randn(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def chunk(rng, t, valid, offset, left):
  k, v, pos = ragged_chunk(rng, t, valid, offset, left, heads=H, head_dim=D)
  q = rng.normal(size=(B, HQ, t, D)).astype(np.float32)
  return [jnp.asarray(x) for x in (q, k, v, pos)]


# (chunk length, valid tokens per row, left padding): rows drift apart, chunks longer than
# the window wrap the ring inside one step; two chunk lengths keep compiles few.
STEPS = [(6, (6, 4), True), (1, (1, 1), False), (6, (3, 6), False), (1, (1, 0), True),
         (1, (1, 1), False), (6, (6, 5), True)]


@pytest.mark.parametrize("window,sink", [(4, 0), (5, 2)])
def test_ring_equals_dense_history(window, sink):
  rng = np.random.default_rng(window)
  spec = A.AttentionSpec(window=window, n_sink=sink, backend="xla")
  ring = WindowKVCache.init(B, H, window, D, n_sink=sink)
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
  attend_stacked = jax.jit(lambda c, i, q, k, v, p: c.attend(q, k, v, p, spec, layer=i, **kw))
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
  with pytest.raises(ValueError, match="n_sink=2"):
    ring.attend(q, k, k, pos, A.AttentionSpec(window=4, n_sink=2))
  with pytest.raises(ValueError, match="window=0"):
    WindowKVCache.init(1, 1, 0, D)


# --- dilated rings ----------------------------------------------------------------------------
def naive_window_attention(q, k, v, q_pos, k_pos, *, window, sinks, dilation):
  """Loops over queries: softmax over keys with k <= q, in window or sink, on the stride."""
  out = np.zeros(q.shape[:-1] + (v.shape[-1],), np.float32)
  for t, qp in enumerate(q_pos):
    vis = [i for i, kp in enumerate(k_pos)
           if kp <= qp and (qp - kp < window * dilation or kp < sinks)
           and (kp % dilation == 0 or kp < sinks)]
    s = np.array([q[t] @ k[i] for i in vis]) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max())
    out[t] = (p / p.sum()) @ v[vis]
  return out


@functools.partial(jax.jit, static_argnames=("window", "sinks", "dilation", "chunks"))
def ring_run(q, k, v, *, window, sinks, dilation, chunks):
  """Feeds [1, 1, N, D] tokens through a ring cache in the given chunk sizes."""
  cache = WindowKVCache.init(1, 1, window, q.shape[-1], n_sink=sinks, dilation=dilation)
  outs, start = [], 0
  for n in chunks:
    pos = jnp.arange(start, start + n, dtype=jnp.int32)[None]
    sl = slice(start, start + n)
    res, cache = cache.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], pos, cache.spec())
    outs.append(res.out)
    start += n
  return jnp.concatenate(outs, axis=2), cache


@pytest.mark.parametrize("window, sinks, dilation, chunks", [
    (4, 0, 1, (7, 1, 1, 1)),            # prompt longer than the window
    (3, 2, 1, (2, 5, 1, 1, 3)),         # sinks, a chunk longer than the window
    (3, 1, 2, (5, 1, 1, 1, 4)),         # dilated with a sink
])
def test_ring_attention_equals_brute_force_mask(window, sinks, dilation, chunks):
  n, d = sum(chunks), 8
  q, k, v = (randn(i, 1, 1, n, d) for i in range(3))
  out, cache = ring_run(q, k, v, window=window, sinks=sinks, dilation=dilation, chunks=chunks)
  ref = naive_window_attention(np.asarray(q[0, 0]), np.asarray(k[0, 0]), np.asarray(v[0, 0]),
                               np.arange(n), np.arange(n), window=window, sinks=sinks,
                               dilation=dilation)
  np.testing.assert_allclose(out[0, 0], ref, atol=1e-5)
  # the ring holds exactly the sinks and the last `window` keys on the stride
  keep = [p for p in range(n) if p < sinks]
  keep += [p for p in range(n) if p >= sinks and p % dilation == 0][-window:]
  assert sorted(int(p) for p in cache.positions[0, 0] if p >= 0) == keep
  assert cache.capacity == window + sinks


@jax.jit
def _ring_write(cache, pos):
  kept = window_lib.dilated_positions(pos, cache.dilation, cache.n_sink)
  dest, _ = window_lib._ring_destinations(  # pylint: disable=protected-access
      cache.total, kept, cache.n_sink, cache.window)
  zeros = jnp.zeros(pos.shape + (1,))[:, None]
  return dest[:, 0], cache.append(zeros, zeros, pos)


RING_SHAPES = [(3, 0, 1), (2, 2, 1), (3, 1, 2)]  # (window, sinks, dilation)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(RING_SHAPES), st.lists(st.integers(0, 7), min_size=1, max_size=4),
       st.integers(0, 3))
def test_ring_destinations_never_collide_and_keep_the_newest(shape, sizes, lead_pad):
  """Property: each chunk (padded to 10 tokens, padding in front and behind) writes every
  kept token to a distinct slot and sinks to their own slots; the ring then holds exactly
  the sinks and the newest `window` tokens on the stride."""
  window, sinks, dilation = shape
  cache = WindowKVCache.init(1, 1, window, 1, n_sink=sinks, dilation=dilation)
  start = 0
  for n in sizes:
    pos = np.full((1, 10), -1, np.int32)
    pos[0, lead_pad:lead_pad + n] = np.arange(start, start + n)
    dest, cache = _ring_write(cache, jnp.asarray(pos))
    dest = np.asarray(dest)[0]
    kept = dest[dest < cache.capacity]
    assert len(set(kept.tolist())) == len(kept)
    for i in range(n):
      if start + i < sinks:
        assert dest[lead_pad + i] == start + i
    assert (dest[pos[0] < 0] == cache.capacity).all()
    start += n
  strided = [p for p in range(start) if p >= sinks and p % dilation == 0][-window:]
  want = sorted(list(range(min(start, sinks))) + strided)
  assert sorted(int(p) for p in np.asarray(cache.positions)[0, 0] if p >= 0) == want


def test_dilated_ring_accepts_its_span_and_refuses_more():
  ring = WindowKVCache.init(1, 1, 4, D, dilation=2)
  assert ring.spec() == A.AttentionSpec(window=8) and ring.span == 8
  x = jnp.zeros((1, 1, 1, D))
  ring.attend(x, x, x, jnp.zeros((1, 1), jnp.int32), A.AttentionSpec(window=8))
  with pytest.raises(ValueError, match="window=9"):
    ring.attend(x, x, x, jnp.zeros((1, 1), jnp.int32), A.AttentionSpec(window=9))
  with pytest.raises(ValueError, match="dilation=0"):
    WindowKVCache.init(1, 1, 4, D, dilation=0)


def test_a_file_of_the_former_ring_kind_loads_as_an_equivalent_window_cache(tmp_path):
  """Rings of the retrained families were once their own kind (slot chosen by position:
  sinks at slot p, the rest at n_sink + (p // d) mod window). Such a file loads as a
  WindowKVCache that holds the same tokens and keeps ringing exactly like a ring fed the
  whole sequence."""
  import flax.struct  # pylint: disable=import-outside-toplevel
  from kvjax import persist  # pylint: disable=import-outside-toplevel

  window, n_sink, dil, d = 3, 1, 2, 2

  @flax.struct.dataclass
  class RingKVCache:  # the former kind's fields, as its files name them
    k: jax.Array
    v: jax.Array
    positions: jax.Array
    window: int = flax.struct.field(pytree_node=False, default=1)
    sink_tokens: int = flax.struct.field(pytree_node=False, default=0)
    dilation: int = flax.struct.field(pytree_node=False, default=1)
    capacity = property(lambda self: self.sink_tokens + self.window)
    length = property(lambda self: jnp.sum(self.positions >= 0, -1).astype(jnp.int32))
    nbytes = property(lambda self: sum(x.nbytes for x in jax.tree.leaves(self)))

  RingKVCache.__module__, RingKVCache.__qualname__ = "kvjax.recurrent", "RingKVCache"
  seen = (11, 4)  # tokens 0 .. n-1 seen by each row
  s = n_sink + window
  k = np.zeros((2, 1, s, d), np.float32)
  pos = np.full((2, 1, s), -1, np.int32)
  for b, n in enumerate(seen):
    for p in range(n):
      if p < n_sink or p % dil == 0:
        slot = p if p < n_sink else n_sink + (p // dil) % window
        pos[b, 0, slot], k[b, 0, slot] = p, p + 0.5
  path = str(tmp_path / "ring.safetensors")
  persist.save(path, RingKVCache(jnp.asarray(k), jnp.asarray(-k), jnp.asarray(pos), window,
                                 n_sink, dil), fingerprint="fp")
  back, _ = persist.load(path)
  assert type(back) is WindowKVCache and (back.n_sink, back.dilation) == (n_sink, dil)

  fresh = WindowKVCache.init(2, 1, window, d, n_sink=n_sink, dilation=dil)
  step = jax.jit(lambda c, x, p: c.append(x, -x, p))
  for t in range(max(seen)):  # the same tokens, one at a time (row 1 pads after 4)
    p = np.array([[t], [t if t < seen[1] else -1]], np.int32)
    fresh = step(fresh, jnp.full((2, 1, 1, d), t + 0.5), p)
  back = jax.tree.map(jnp.asarray, back)
  for t in range(11, 17):  # both keep ringing in step
    p = np.array([[t], [t - 7]], np.int32)
    x = jnp.asarray(np.broadcast_to(p[:, None, :, None] + 0.5, (2, 1, 1, d)), jnp.float32)
    back, fresh = step(back, x, p), step(fresh, x, p)
    for c in (back, fresh):
      np.testing.assert_array_equal(c.lengths, np.minimum(c.total, s))
    for b in range(2):
      held = lambda c: sorted((int(q), float(c.k[b, 0, i, 0]))  # noqa: E731
                              for i, q in enumerate(np.asarray(c.positions[b, 0])) if q >= 0)
      assert held(back) == held(fresh)
