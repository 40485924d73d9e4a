"""Dense cache invariants (hypothesis) and ModelCache grouping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvjax import attention as A
from kvjax.cache import DenseKVCache, ModelCache, tree_nbytes

B, H, D = 2, 2, 4


def chunk(rng, t, valid):
  """New tokens [B,H,t,D] and positions [B,t] with `valid[b]` valid tokens (left padded)."""
  k = rng.normal(size=(B, H, t, D)).astype(np.float32)
  v = rng.normal(size=(B, H, t, D)).astype(np.float32)
  pos = np.full((B, t), -1, np.int32)
  for b in range(B):
    pos[b, t - valid[b]:] = np.arange(valid[b])
  return jnp.asarray(k), jnp.asarray(v), pos


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(0, 4), st.integers(0, 4)),
                min_size=1, max_size=5), st.integers(0, 2 ** 16))
def test_appends_never_alter_existing_slots(steps, seed):
  rng = np.random.default_rng(seed)
  cap = 12
  cache = DenseKVCache.init(B, H, cap, D)
  offset = np.zeros(B, np.int32)
  for t, v0, v1 in steps:
    valid = [min(v0, t), min(v1, t)]
    k, v, pos = chunk(rng, t, valid)
    pos = np.where(pos >= 0, pos + offset[:, None], -1)
    before = jax.tree.map(np.asarray, cache)
    if (np.asarray(cache.lengths).max(-1) + np.array(valid) > cap).any():
      with pytest.raises(ValueError, match="overflow"):
        cache.append(k, v, jnp.asarray(pos))
      return
    cache = cache.append(k, v, jnp.asarray(pos))
    offset += np.array(valid)
    lengths = np.asarray(cache.lengths)
    assert (lengths <= cap).all()
    for b in range(B):
      n_old = before.lengths[b, 0]
      np.testing.assert_array_equal(np.asarray(cache.k)[b, :, :n_old], before.k[b, :, :n_old])
      np.testing.assert_array_equal(np.asarray(cache.positions)[b, :, :n_old],
                                    before.positions[b, :, :n_old])
      # new valid tokens land in order right after the old ones
      new_k = np.asarray(k)[b, :, t - valid[b]:]
      np.testing.assert_array_equal(np.asarray(cache.k)[b, :, n_old:n_old + valid[b]], new_k)
      assert lengths[b, 0] == n_old + valid[b]
    # positions of valid slots are increasing per row: no pad slot entered
    for b in range(B):
      p = np.asarray(cache.positions)[b, 0, :lengths[b, 0]]
      np.testing.assert_array_equal(p, np.arange(lengths[b, 0]))


def test_attend_equals_attention_over_appended():
  rng = np.random.default_rng(0)
  cache = DenseKVCache.init(B, H, 8, D)
  k, v, pos = chunk(rng, 5, [5, 3])
  q = jnp.asarray(rng.normal(size=(B, 4, 5, D)), jnp.float32)
  res, new = cache.attend(q, k, v, jnp.asarray(pos), A.AttentionSpec(backend="xla"))
  ref = A.attention(q, new.k, new.v, new.lengths, q_positions=jnp.asarray(pos),
                    k_positions=new.positions, spec=A.AttentionSpec(backend="xla"))
  np.testing.assert_allclose(res.out, ref.out)
  # padded query rows give zeros, valid rows finite
  assert bool(jnp.all(res.out[1, :, :2] == 0))
  assert bool(jnp.all(jnp.isfinite(res.out)))


def test_nbytes_is_exact():
  c = DenseKVCache.init(3, 2, 10, 8, dtype=jnp.bfloat16)
  want = 2 * 3 * 2 * 10 * 8 * 2 + 3 * 2 * 10 * 4 + 3 * 2 * 4
  assert c.nbytes == want == sum(x.nbytes for x in jax.tree.leaves(c))
  assert tree_nbytes(jax.eval_shape(lambda: c)) == want


def test_model_cache_groups_segments():
  layers = [DenseKVCache.init(1, 2, 8, 4), DenseKVCache.init(1, 2, 8, 4),
            DenseKVCache.init(1, 2, 4, 4), DenseKVCache.init(1, 2, 8, 4)]
  mc = ModelCache.from_layers(layers, jnp.zeros((1,), jnp.int32))
  assert mc.segment_sizes == (2, 1, 1)
  assert mc.capacity == (8, 8, 4, 8)
  assert mc.nbytes == sum(l.nbytes for l in layers) + 4
  back = mc.layers()
  for a, b in zip(layers, back):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_init_rejects_bad_capacity():
  with pytest.raises(ValueError, match="capacity"):
    DenseKVCache.init(1, 1, 0, 4)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("start,t", [(0, 5), (3, 5), (6, 5)])  # (6, 5): chunk overflows 10
def test_chunk_writes_match_a_slot_by_slot_reference(stacked, start, t):
  # Valid tokens of a padded chunk (padding in front, in the middle and, for row 1, none)
  # land packed after each row's length: checked against a numpy loop. When the chunk does
  # not fit behind the longest row, the token-by-token fallback writes what fits.
  cap = 10
  rng = np.random.default_rng(start + t)
  k_new = rng.normal(size=(B, H, t, D)).astype(np.float32)
  v_new = rng.normal(size=(B, H, t, D)).astype(np.float32)
  pos = np.array([[-1, 20, -1, 21, 22][:t], list(range(30, 30 + t))], np.int32)
  cache = DenseKVCache.init(B, H, cap, D)
  lengths = np.array([[start, max(start - 2, 0)], [start, start]], np.int32)
  old_k = rng.normal(size=(B, H, cap, D)).astype(np.float32)
  cache = cache.replace(k=jnp.asarray(old_k), lengths=jnp.asarray(lengths),
                        positions=jnp.asarray(np.where(np.arange(cap) < lengths[..., None],
                                                       np.arange(cap), -1).astype(np.int32)))
  want_k, want_pos = old_k.copy(), np.asarray(cache.positions).copy()
  for b in range(B):
    for h in range(H):
      slot = lengths[b, h]
      for i in range(t):
        if pos[b, i] >= 0 and slot < cap:
          want_k[b, h, slot] = k_new[b, h, i]
          want_pos[b, h, slot] = pos[b, i]
          slot += 1
  if stacked:
    st_cache = jax.tree.map(lambda x: jnp.stack([x, x]), cache)
    new = jax.jit(lambda c: c.append(k_new, v_new, pos, layer=1))(st_cache)
    new = jax.tree.map(lambda x: x[1], new)
  else:
    new = jax.jit(lambda c: c.append(k_new, v_new, jnp.asarray(pos)))(cache)
  n_valid = (pos >= 0).sum(-1)
  want_len = np.minimum(lengths + n_valid[:, None], cap)
  np.testing.assert_array_equal(new.lengths, want_len)
  for b in range(B):
    for h in range(H):
      n = want_len[b, h]  # slots past the length are free: only [0, length) is compared
      np.testing.assert_array_equal(np.asarray(new.k)[b, h, :n], want_k[b, h, :n])
      np.testing.assert_array_equal(np.asarray(new.positions)[b, h, :n], want_pos[b, h, :n])
      assert (np.asarray(new.positions)[b, h, n:] == -1).all()
