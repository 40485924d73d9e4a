"""Host offload: memory-kind round trips, int8 swapping, paged-row swapping, layer
streaming with prefetch, Quest page selection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax import attention as A
from kvjax import offload, paged
from kvjax.cache import DenseKVCache

HOST = offload.host_memory_kind()


def _dense(b=2, h=2, s=16, d=8, n=(11, 16), dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  c = DenseKVCache.init(b, h, s, d, dtype)
  k = jnp.asarray(rng.normal(size=(b, h, s, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, h, s, d)), dtype)
  pos = np.full((b, s), -1, np.int32)
  for i, m in enumerate(n):
    pos[i, :m] = np.arange(m)
  return c.append(k, v, jnp.asarray(pos))


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint8 if x.dtype.itemsize == 1 else f"u{x.dtype.itemsize}")


def test_memory_kinds_round_trip_bit_exact():
  """Given a bf16 cache, when it goes to host memory and back, every bit is unchanged."""
  assert HOST in ("pinned_host", "unpinned_host"), offload.memory_kinds()
  c = _dense(dtype=jnp.bfloat16)
  h = offload.to_host(c)
  assert {offload.memory_kind(x) for x in jax.tree.leaves(h)} == {HOST}
  back = offload.to_device(h)
  assert {offload.memory_kind(x) for x in jax.tree.leaves(back)} == {"device"}
  for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(back)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(_bits(a), _bits(b))
  exact = offload.swap_in(offload.swap_out(c))
  for a, b in zip(jax.tree.leaves(c), jax.tree.leaves(exact)):
    np.testing.assert_array_equal(_bits(a), _bits(b))


def test_int8_swap_is_smaller_and_bounded():
  """Compressed swapping quantizes on the way out: 4x fewer bytes for f32 k/v, bounded error."""
  c = _dense()
  hc = offload.swap_out(c, compress="int8")
  kv = c.k.size + c.v.size
  assert hc.nbytes == c.nbytes - 4 * kv + kv + 4 * (kv // c.k.shape[-1])   # codes + scales
  assert isinstance(hc.tree.k, offload.Int8Tensor)
  assert offload.memory_kind(hc.tree.k.codes) == HOST
  back = offload.swap_in(hc)
  np.testing.assert_array_equal(back.positions, c.positions)     # integers move exactly
  np.testing.assert_array_equal(back.lengths, c.lengths)
  amax = np.abs(np.asarray(c.k)).max(-1, keepdims=True)
  err = np.abs(np.asarray(back.k) - np.asarray(c.k))
  assert (err <= amax / 127 / 2 * (1 + 1e-5) + 1e-7).all()
  assert back.k.dtype == c.k.dtype
  with pytest.raises(ValueError, match="compress='int4'"):
    offload.swap_out(c, compress="int4")


def _paged_layer(quant=None):
  """Rows 0 and 1 share a 6-token prefix; row 2 has its own tokens."""
  rng = np.random.default_rng(1)
  c = paged.PagedKVCache.init(3, 2, 8, num_pages=12, page_size=4, quant=quant)
  k = jnp.asarray(rng.normal(size=(3, 2, 9, 8)), jnp.float32)
  pos = np.full((3, 9), -1, np.int32)
  pos[0, :6] = np.arange(6)
  pos[2, :9] = np.arange(9)
  c = _append(c, k, -k, jnp.asarray(pos))
  c = paged.fork(c, [0], [1])
  pos2 = np.full((3, 9), -1, np.int32)
  pos2[1, :3] = 6 + np.arange(3)
  return _append(c, k, 2 * k, jnp.asarray(pos2))


@jax.jit
def _append(c, k, v, pos):
  return c.append(k, v, pos)


def _raw_rows(c, rows):
  """Raw stored bytes of the rows' pages (codes, scales, positions) in logical order."""
  pt = np.asarray(c.page_table)
  out = []
  for r in rows:
    held = pt[r][pt[r] >= 0]
    out.append([_bits(np.asarray(getattr(c, f))[held]) for f in paged.POOL_FIELDS
                if getattr(c, f) is not None] + [np.asarray(c.lengths[r])])
  return out


@pytest.mark.parametrize("quantized", [False, True])
def test_swapped_paged_rows_round_trip_bit_exact(quantized):
  quant = None
  if quantized:
    quant = pytest.importorskip("kvjax.quant").int8()
  c = _paged_layer(quant)
  before = _raw_rows(c, [1, 2])
  used = int(c.pages_in_use)
  sw, c2 = offload.swap_out_rows(c, [1, 2])
  # row 1 held the shared full page 0 and its own 2 pages; row 2 held 3 pages
  assert int(c2.pages_in_use) == used - 5
  paged.check_invariants(c2)
  assert offload.memory_kind(sw.pages[0].tree["k_pages"]) == HOST
  # swap back into rows 2 and 1 (swapped places): bytes identical, row 0 untouched
  c3 = offload.swap_in_rows(c2, sw, [2, 1])
  after = _raw_rows(c3, [2, 1])
  for a, b in zip(before, after):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(_raw_rows(c3, [0])[0][0], _raw_rows(c, [0])[0][0])
  paged.check_invariants(c3)
  # not enough free pages -> clean error, nothing changed
  small = paged.PagedKVCache.init(3, 2, 8, num_pages=4, page_size=4, quant=quant)
  with pytest.raises(paged.OutOfPages):
    offload.swap_in_rows(small, sw, [0, 1])


# -- model: preempt a row by swapping, resume, same logits -----------------------------------
CFG = models.ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2)


@functools.lru_cache(maxsize=None)
def _model():
  return models.Transformer(CFG, rngs=nnx.Rngs(0))


def test_model_row_preempted_by_swapping_resumes_identically():
  """Swap a row out after prefill and back in: decoding continues with the same logits."""
  m = _model()
  tok = jax.random.randint(jax.random.key(1), (2, 9), 0, CFG.vocab_size, dtype=jnp.int32)
  fac = paged.layer_factory(2, CFG.num_kv_heads, CFG.head_dim, num_pages=7, page_size=4)
  runs = []
  for swap in (False, True):
    _, pc = models.prefill(m, tok[:, :5], logits="last",
                           cache=models.init_cache(CFG, 2, 16, layer_factory=fac))
    if swap:
      sw, pc = offload.swap_out_rows(pc, [1])
      assert paged.pages_in_use(pc).tolist() == [2, 2]
      pc = offload.swap_in_rows(pc, sw, [1])
    runs.append([])
    for i in range(5, 9):
      lg, pc = models.decode(m, tok[:, i:i + 1], pc, logits="last")
      runs[-1].append(np.asarray(lg))
  np.testing.assert_array_equal(np.stack(runs[0]), np.stack(runs[1]))


# -- layer streaming --------------------------------------------------------------------------
def test_stream_layers_prefetches_next_layer_and_matches_device_loop(monkeypatch):
  """A toy L-layer attention net: caches on host, streamed in with prefetch = on-device run."""
  L, b, hq, h, d = 3, 2, 4, 2, 8
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(L, 3, d * hq, d * hq)) * 0.2, jnp.float32)
  caches = [_dense(b, h, 16, d, n=(11, 16), seed=s) for s in range(L)]
  for i, c in enumerate(caches):   # room for the new token
    caches[i] = c.replace(lengths=jnp.minimum(c.lengths, 14))
  x0 = jnp.asarray(rng.normal(size=(b, 1, d * hq)), jnp.float32)
  pos = jnp.asarray([[14], [14]], jnp.int32)

  @jax.jit
  def layer(wl, x, c):
    q = (x @ wl[0]).reshape(b, 1, hq, d).transpose(0, 2, 1, 3)
    kv = (x @ wl[1])[..., :h * d].reshape(b, 1, h, d).transpose(0, 2, 1, 3)
    res, c = c.attend(q, kv, -kv, pos, A.AttentionSpec())
    return x + res.out.transpose(0, 2, 1, 3).reshape(b, 1, hq * d) @ wl[2], c

  x_ref, c_ref = x0, []
  for i in range(L):
    x_ref, c = layer(w[i], x_ref, caches[i])
    c_ref.append(c)

  log = []
  real = offload.to_device

  def spy(tree, device=None):
    log.append(("fetch", next(i for i, c in enumerate(host) if c is tree)))
    return real(tree, device)

  def step(i, x, c):
    assert offload.memory_kind(c.k) == "device"
    log.append(("step", i))
    return layer(w[i], x, c)

  host = [offload.to_host(c) for c in caches]
  monkeypatch.setattr(offload.stream, "to_device", spy)
  x, new = offload.stream_layers(step, x0, host, prefetch=1)
  assert log == [("fetch", 0), ("fetch", 1), ("step", 0), ("fetch", 2), ("step", 1),
                 ("step", 2)]
  np.testing.assert_allclose(x, x_ref, atol=1e-6)
  for a, r in zip(new, c_ref):
    assert offload.memory_kind(a.k) == HOST
    np.testing.assert_array_equal(np.asarray(a.k), np.asarray(r.k))


# -- Quest ----------------------------------------------------------------------------------------
def test_quest_bound_is_an_upper_bound():
  rng = np.random.default_rng(3)
  b, hq, h, s, d, p = 2, 4, 2, 24, 8, 4
  k = jnp.asarray(rng.normal(size=(b, h, s, d)), jnp.float32)
  lengths = jnp.asarray([[24, 17], [5, 24]], jnp.int32)
  q = jnp.asarray(rng.normal(size=(b, hq, 2, d)), jnp.float32)
  kmin, kmax, pv = offload.page_bounds(k, lengths, p)
  ub = np.asarray(offload.page_scores(q, kmin, kmax, pv))
  logits = np.einsum("bhgtd,bhsd->bhgts", np.asarray(q).reshape(b, h, 2, 2, d), np.asarray(k))
  for bi in range(b):
    for hi in range(h):
      n = int(lengths[bi, hi])
      for j in range(-(-n // p)):
        true = logits[bi, hi, :, :, j * p:min(n, (j + 1) * p)].max()
        assert ub[bi, hi, j] >= true - 1e-5
      assert (ub[bi, hi, -(-n // p):] <= -1e29).all()     # empty pages never win


def _recent(b, h, d, cap=4):
  return DenseKVCache.init(b, h, cap, d)


def test_quest_all_pages_equals_dense_and_topk_finds_the_needle():
  rng = np.random.default_rng(4)
  b, hq, h, s, d, p = 1, 2, 1, 32, 8, 4
  c = _dense(b, h, s, d, n=(30,), seed=5)
  store = offload.quest_offload(c, p)
  assert offload.memory_kind(store.k_pages) == HOST
  assert store.device_nbytes < store.host_nbytes
  q = jnp.asarray(rng.normal(size=(b, hq, 1, d)), jnp.float32)
  kn = jnp.asarray(rng.normal(size=(b, h, 1, d)), jnp.float32)
  qpos = jnp.asarray([[30]], jnp.int32)
  res, recent, idx = offload.quest_attend(q, kn, kn, qpos, store, _recent(b, h, d),
                                          top_k=store.num_pages)
  full, _ = c.attend(q, kn, kn, qpos, A.AttentionSpec())
  np.testing.assert_allclose(res.out, full.out, atol=1e-5)
  assert int(recent.lengths[0, 0]) == 1
  # a needle: page 2 holds a key aligned with q -> chosen with top_k=2 (plus the last page)
  needle = 4.0 * np.asarray(q[0, 0, 0]) / np.linalg.norm(q[0, 0, 0])
  k = np.asarray(c.k).copy()
  k[0, 0, 9] = needle * 3
  c2 = c.replace(k=jnp.asarray(k))
  store2 = offload.quest_offload(c2, p)
  res2, _, idx2 = offload.quest_attend(q, kn, kn, qpos, store2, _recent(b, h, d), top_k=2)
  assert sorted(np.asarray(idx2)[0, 0].tolist()) == [2, 7]     # needle page + last page
  full2, _ = c2.attend(q, kn, kn, qpos, A.AttentionSpec())
  # query head 0 (aligned with the needle) is dominated by it: 2 of 8 pages suffice
  np.testing.assert_allclose(res2.out[:, 0], full2.out[:, 0], atol=2e-3)
