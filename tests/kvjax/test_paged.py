"""Paged KV cache: equals dense attention, prefix sharing + copy-on-write, allocator invariants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

import kvjax
import models
from kvjax import attention as A
from kvjax import cache as cache_lib
from kvjax import paged
from kvjax.cache import DenseKVCache

# -- layer level ------------------------------------------------------------------------------


def _chunk(rng, b, h, t, d, valid, start):
  k = jnp.asarray(rng.normal(size=(b, h, t, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, h, t, d)), jnp.float32)
  pos = np.full((b, t), -1, np.int32)
  for i in range(b):
    pos[i, :valid[i]] = start[i] + np.arange(valid[i])
  return k, v, jnp.asarray(pos)


@functools.partial(jax.jit, static_argnames=("spec",))
def _attend(c, q, k, v, pos, spec):
  return c.attend(q, k, v, pos, spec, return_lse=True, return_colsum=True)


@pytest.mark.parametrize("page_size,hq,hkv,window", [(3, 8, 2, 6)])
def test_paged_attention_equals_dense(page_size, hq, hkv, window):
  """Given ragged chunks appended to a paged and a dense cache, attention agrees exactly."""
  rng = np.random.default_rng(page_size)
  b, d, cap = 3, 8, 20
  pc = paged.PagedKVCache.init(b, hkv, d, num_pages=3 * cap // page_size, page_size=page_size,
                               max_pages=paged.pages_needed(cap, page_size))
  dc = DenseKVCache.init(b, hkv, pc.capacity, d)
  spec = A.AttentionSpec(window=window)
  start = np.zeros(b, np.int32)
  for t, valid in ((7, [7, 2, 5]), (1, [1, 1, 0]), (7, [3, 7, 4]), (1, [1, 1, 1])):
    k, v, pos = _chunk(rng, b, hkv, t, d, valid, start)
    q = jnp.asarray(rng.normal(size=(b, hq, t, d)), jnp.float32)
    rp, pc = _attend(pc, q, k, v, pos, spec)
    rd, dc = _attend(dc, q, k, v, pos, spec)
    np.testing.assert_allclose(rp.out, rd.out, atol=1e-6)
    np.testing.assert_allclose(rp.lse, rd.lse, atol=1e-5)
    np.testing.assert_allclose(rp.colsum, rd.colsum, atol=1e-6)
    start += np.asarray(valid)
  view = pc.to_dense()
  np.testing.assert_array_equal(view.lengths, dc.lengths)
  valid = np.asarray(dc.valid_mask())
  np.testing.assert_array_equal(np.asarray(view.k)[valid], np.asarray(dc.k)[valid])
  np.testing.assert_array_equal(np.asarray(view.positions), np.where(valid, dc.positions, -1))
  paged.check_invariants(pc)
  # pages really are allocated on demand: ceil(len / P) per row
  want = sum(paged.pages_needed(n, page_size) for n in start)
  assert int(pc.pages_in_use) == want


def test_quantized_pages_match_quantized_cache():
  """An int8 page pool stores the same codes as kvjax.quant's per-token int8 cache."""
  quant = pytest.importorskip("kvjax.quant")
  spec = quant.int8()
  rng = np.random.default_rng(0)
  b, h, d = 2, 2, 8
  pc = paged.PagedKVCache.init(b, h, d, num_pages=8, page_size=4, quant=spec)
  qc = quant.QuantizedKVCache.init(b, h, 32, d, spec)
  assert pc.k_pages.dtype == jnp.uint8 and pc.k_scale is not None
  start = np.zeros(b, np.int32)
  for t, valid in ((6, [6, 3]), (1, [1, 1]), (1, [1, 0])):
    k, v, pos = _chunk(rng, b, h, t, d, valid, start)
    q = jnp.asarray(rng.normal(size=(b, 4, t, d)), jnp.float32)
    rp, pc = _attend(pc, q, k, v, pos, A.AttentionSpec())
    rq, qc = _attend(qc, q, k, v, pos, A.AttentionSpec())
    np.testing.assert_allclose(rp.out, rq.out, atol=1e-5)
    start += np.asarray(valid)
  a, bq = pc.to_dense(), qc.to_dense()
  valid = np.asarray(bq.valid_mask())
  np.testing.assert_allclose(np.asarray(a.k)[valid], np.asarray(bq.k)[valid], atol=1e-6)
  # int8 pages: 1 byte per element + a float16 scale per token vector
  assert pc.page_nbytes == 2 * (2 * 4 * 8 + 2 * 4 * 2) + 2 * 4 * 4


# -- allocator: hypothesis over random request sequences ---------------------------------------

HB, HH, HD, HP, HN, HT = 4, 2, 1, 2, 10, 3   # rows, heads, dim, page size, pages, chunk


@jax.jit
def _h_append(c, k, pos):
  return paged.alloc._write(c, None, k, k, jnp.broadcast_to(pos[:, None], (HB, HH, HT)))[0]


_h_fork = jax.jit(paged.fork)
_h_release = jax.jit(paged.release)


def _h_view(c):
  k, _, _, lengths = paged.dense_view(c)
  k, lengths = np.asarray(k), np.asarray(lengths)
  return [k[r, 0, :lengths[r, 0], 0].tolist() for r in range(HB)]


ops = st.one_of(
    st.tuples(st.just("append"), st.lists(st.integers(0, HT), min_size=HB, max_size=HB)),
    st.tuples(st.just("fork"), st.integers(0, HB - 1), st.integers(0, HB - 1),
              st.integers(0, 8)),
    st.tuples(st.just("release"), st.integers(0, HB - 1)))


@pytest.mark.parametrize("parts", [1, 2])
@settings(max_examples=40, deadline=None)
@given(program=st.lists(ops, min_size=1, max_size=14))
def test_alloc_free_never_leaks_and_rows_are_isolated(parts, program):
  """Random appends / forks / releases against a list-of-tokens model of every row; with 2
  pool partitions, each partition's rows draw only on its own pages."""
  c = paged.PagedKVCache.init(HB, HH, HD, num_pages=HN, page_size=HP, max_pages=4,
                              partitions=parts)
  per_rows, per_pages = HB // parts, HN // parts
  rows = [[] for _ in range(HB)]   # the reference: token ids each row holds
  next_id = 1.0
  for op in program:
    if op[0] == "append":
      n = [min(x, 4 * HP - len(rows[r])) for r, x in enumerate(op[1])]
      pos = np.full((HB, HT), -1, np.int32)
      k = np.zeros((HB, HH, HT, HD), np.float32)
      new = []
      for r in range(HB):
        ids = [next_id + i for i in range(n[r])]
        next_id += n[r]
        pos[r, :n[r]] = len(rows[r]) + np.arange(n[r])
        k[r, :, :n[r], 0] = ids
        new.append(ids)
      pos_h = jnp.broadcast_to(jnp.asarray(pos)[:, None], (HB, HH, HT))
      # Pages this append must at least allocate per partition (fresh pages only, no copies).
      fresh = [0] * parts
      for r in range(HB):
        fresh[r // per_rows] += max(0, -(-(len(rows[r]) + n[r]) // HP) - -(-len(rows[r]) // HP))
      free = [int(c.num_free)] if parts == 1 else np.asarray(c.part_free).tolist()
      try:
        paged.check_admission(c, pos_h)
        admitted = True
      except paged.OutOfPages as e:
        admitted = False
        assert e.free == free[e.partition or 0] and e.needed > e.free
      if any(f > fr for f, fr in zip(fresh, free)):
        assert not admitted
      c = _h_append(c, jnp.asarray(k), jnp.asarray(pos))
      assert bool(c.overflow) == (not admitted)
      if admitted:
        for r in range(HB):
          rows[r] = rows[r] + new[r]
      c = c.replace(overflow=jnp.asarray(False))
    elif op[0] == "fork":
      _, s, d, n = op
      if s == d:
        with pytest.raises(ValueError, match="disjoint"):
          paged.fork(c, [s], [d])
        continue
      if s // per_rows != d // per_rows:
        with pytest.raises(ValueError, match="same pool partition"):
          paged.fork(c, [s], [d])
        continue
      n = min(n, len(rows[s]))
      c = _h_fork(c, jnp.asarray([s]), jnp.asarray([d]), jnp.asarray([n]))
      rows[d] = rows[s][:n]
    else:
      c = _h_release(c, jnp.asarray([op[1]]))
      rows[op[1]] = []
    paged.check_invariants(c)      # includes: a row only maps pages of its partition
    assert _h_view(c) == rows, "a row's view differs from what it wrote / shared"
    # sharing is real: pages in use never exceed what unshared rows would need
    assert int(c.pages_in_use) <= sum(-(-len(r) // HP) for r in rows)
    if parts > 1:
      used = [per_pages - f for f in np.asarray(c.part_free).tolist()]
      want = [sum(-(-len(rows[r]) // HP) for r in range(p * per_rows, (p + 1) * per_rows))
              for p in range(parts)]
      assert all(u <= w for u, w in zip(used, want)), (used, want)
  c = _h_release(c, jnp.ones((HB,), bool))
  paged.check_invariants(c)
  assert int(c.num_free) == HN and int(c.pages_in_use) == 0


def test_all_or_nothing_when_pool_runs_out():
  """Under jit an append that lacks pages changes no row and raises the overflow flag."""
  c = paged.PagedKVCache.init(2, 1, 1, num_pages=3, page_size=2)
  k = jnp.arange(1, 4, dtype=jnp.float32).reshape(1, 1, 3, 1).repeat(2, 0)
  write = jax.jit(lambda c, k, p: paged.alloc._write(c, None, k, k, p[:, None])[0])
  c = write(c, k, jnp.asarray([[0, 1, 2], [-1, -1, -1]]))  # 2 pages
  before = _view1(c)
  pos = jnp.asarray([[3, -1, -1], [0, 1, 2]])       # row 1 needs 2 pages, 1 is free
  with pytest.raises(paged.OutOfPages, match="needs 2 new pages but only 1"):
    c.append(k, k, pos)
  c2 = write(c, k, pos)
  assert bool(c2.overflow)
  assert _view1(c2) == before
  paged.check_invariants(c2)


def _view1(c):
  k, _, _, n = paged.dense_view(c)
  return [np.asarray(k)[r, 0, :int(n[r, 0]), 0].tolist() for r in range(c.batch)]


def test_rejects_requests_larger_than_the_pool():
  c = paged.PagedKVCache.init(1, 1, 4, num_pages=4, page_size=8, max_pages=8)
  with pytest.raises(ValueError, match="40 tokens needs 5 pages .* num_pages=4"):
    paged.check_request(c, 40)
  pos = jnp.arange(40, dtype=jnp.int32)[None]
  with pytest.raises(ValueError, match="whole pool has num_pages=4") as e:
    c.append(jnp.zeros((1, 1, 40, 4)), jnp.zeros((1, 1, 40, 4)), pos)
  assert not isinstance(e.value, paged.OutOfPages)
  with pytest.raises(ValueError, match="page_size"):
    paged.PagedKVCache.init(1, 1, 4, num_pages=4, page_size=0)


# -- models --------------------------------------------------------------------------------------

CFG = models.ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2)
PAGE, PAGES = 4, 7   # two rows of 12 tokens fit (6 pages), of 13 do not


@functools.lru_cache(maxsize=None)
def _model():
  return models.Transformer(CFG, rngs=nnx.Rngs(0))


def _paged_cache(batch, capacity=16, num_pages=PAGES, quant=None):
  fac = paged.layer_factory(batch, CFG.num_kv_heads, CFG.head_dim, num_pages=num_pages,
                            page_size=PAGE, quant=quant)
  return models.init_cache(CFG, batch, capacity, layer_factory=fac)


# logits="last" everywhere: one compile per cache kind and shape, shared with kvjax.generate
# (which asks for the last logits) and with the other test files using this geometry.
_prefill = functools.partial(models.prefill, logits="last")
_decode = functools.partial(models.decode, logits="last")


def _toks(b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size, dtype=jnp.int32)


def test_model_decode_paged_equals_dense_and_generate_runs():
  """prefill + decode on a paged cache give the dense cache's logits; generate agrees."""
  m, tok = _model(), _toks(2, 10)
  mask = np.ones((2, 5), np.int32)
  mask[1, 3:] = 0                                     # a shorter right-padded prompt
  lp, pc = _prefill(m, tok[:, :5], cache=_paged_cache(2), attention_mask=mask)
  ld, dc = _prefill(m, tok[:, :5], capacity=16, attention_mask=mask)
  np.testing.assert_allclose(lp, ld, atol=1e-5)
  for i in range(5, 10):
    lp, pc = _decode(m, tok[:, i:i + 1], pc)
    ld, dc = _decode(m, tok[:, i:i + 1], dc)
    np.testing.assert_allclose(lp, ld, atol=1e-5)
  assert paged.pages_in_use(pc).tolist() == [3 + 2] * CFG.num_layers   # 10 and 8 tokens
  paged.check_invariants(pc.segments[0])
  # kvjax.generate through the adapter = a greedy loop on the dense cache
  a = kvjax.generate(paged.PagedModel(m, _paged_cache), tok[:, :5], max_new_tokens=4)
  ld, dc = _prefill(m, tok[:, :5], capacity=16)
  greedy = []
  for _ in range(4):
    greedy.append(np.asarray(jnp.argmax(ld[:, -1], -1)))
    ld, dc = _decode(m, jnp.asarray(greedy[-1])[:, None].astype(jnp.int32), dc)
  np.testing.assert_array_equal(a.tokens, np.stack(greedy, 1))


def test_prefix_sharing_stores_once_and_writes_stay_private():
  """Rows forked from a system prompt share its pages; each row's decode matches dense."""
  m = _model()
  system = _toks(1, 6, seed=3)
  tok = jnp.concatenate([system, system], 0)
  only_row0 = np.array([[1] * 6, [0] * 6], np.int32)
  _, pc = _prefill(m, tok[:, :5], cache=_paged_cache(2), attention_mask=only_row0[:, :5])
  _, pc = _decode(m, tok[:, 5:6], pc, attention_mask=only_row0[:, 5:6])
  one = paged.pages_in_use(pc).copy()                     # 6 tokens -> 2 pages per layer
  assert one.tolist() == [2, 2]
  pc = paged.fork_rows(pc, [0], [1])
  assert paged.pages_in_use(pc).tolist() == one.tolist()   # stored once
  np.testing.assert_array_equal(pc.next_position, [6, 6])
  view0 = np.asarray(paged.to_dense(pc).segments[0].k[0])     # layer 0: [B, H, S, D]
  # each row continues with its own suffix; the shared half-full page is copied on write
  suffix = _toks(2, 4, seed=4)
  _, dc = _prefill(m, tok[:, :5], capacity=16)
  _, dc = _decode(m, tok[:, 5:6], dc)
  for i in range(4):
    lp, pc = _decode(m, suffix[:, i:i + 1], pc)
    ld, dc = _decode(m, suffix[:, i:i + 1], dc)
    np.testing.assert_allclose(lp, ld, atol=1e-5)
  after0 = np.asarray(paged.to_dense(pc).segments[0].k[0])
  np.testing.assert_array_equal(after0[0, :, :6], view0[0, :, :6])   # row 0's prefix intact
  np.testing.assert_array_equal(after0[1, :, :6], view0[0, :, :6])   # row 1 reads the same
  # page 0 still shared; the half-full page 1 was copied: 1 + 2 * 2 pages per layer
  assert paged.pages_in_use(pc).tolist() == [5, 5]
  paged.check_invariants(pc.segments[0])
  pc = paged.release_rows(pc, [0, 1])
  assert paged.pages_in_use(pc).tolist() == [0, 0]


def test_model_out_of_pages_is_a_clean_error():
  m, tok = _model(), _toks(2, 13)
  _, pc = _prefill(m, tok[:, :5], cache=_paged_cache(2))
  for i in range(5, 12):
    _, pc = _decode(m, tok[:, i:i + 1], pc)            # 12 tokens: 6 of 7 pages
  with pytest.raises(paged.OutOfPages, match="needs 2 new pages but only 1"):
    _decode(m, tok[:, 12:13], pc)
  # jitted path (no host check): nothing written, flag raised
  before = paged.to_dense(pc)
  _, pc2 = _decode(m, tok[:, 12:13], pc, check_capacity=False)
  assert paged.overflowed(pc2)
  after = paged.to_dense(pc2)
  np.testing.assert_array_equal(after.segments[0].lengths, before.segments[0].lengths)
  np.testing.assert_array_equal(after.segments[0].k, before.segments[0].k)
  with pytest.raises(ValueError, match="whole pool has num_pages=4"):
    _prefill(m, _toks(1, 20), cache=_paged_cache(1, capacity=20, num_pages=4))


def test_press_on_paged_cache_frees_pages_and_matches_dense():
  """A kvjax press (KNorm, half the tokens) on a paged cache = on a dense cache; pages freed."""
  from kvjax.presses import KnormPress  # pylint: disable=import-outside-toplevel
  m, tok = _model(), _toks(2, 12)
  press = KnormPress(compression_ratio=0.5)
  _, pc = _prefill(m, tok[:, :5], cache=_paged_cache(2))
  _, dc = _prefill(m, tok[:, :5], capacity=16)
  for i in range(5, 10):
    _, pc = _decode(m, tok[:, i:i + 1], pc)
    _, dc = _decode(m, tok[:, i:i + 1], dc)
  assert paged.pages_in_use(pc).tolist() == [6, 6]
  pc = paged.PagedPress(press).compress_model(pc, None, CFG)
  dc = press.compress_model(dc, None, CFG, room=8)        # capacity 8 + 8: same shapes
  assert paged.pages_in_use(pc).tolist() == [4, 4]           # 10 tokens -> 5 kept: 2 pages/row
  np.testing.assert_array_equal(pc.next_position, [10, 10])
  paged.check_invariants(pc.segments[0])
  for i in range(10, 12):
    lp, pc = _decode(m, tok[:, i:i + 1], pc)
    ld, dc = _decode(m, tok[:, i:i + 1], dc)
    np.testing.assert_allclose(lp, ld, atol=1e-5)
  # decode-time compression through kvjax.generate = the same on a dense cache
  from kvjax.presses import DecodingPress  # pylint: disable=import-outside-toplevel
  dp = lambda: DecodingPress(press, compression_interval=3, target_size=6)  # noqa: E731
  wrapped = paged.PagedPress(dp())
  a = kvjax.generate(paged.PagedModel(m, _paged_cache), tok[:, :5], max_new_tokens=8,
                     decode_press=wrapped, capacity=16)
  b = kvjax.generate(m, tok[:, :5], max_new_tokens=8, decode_press=dp(), capacity=16)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert wrapped.press.compressions >= 1
  assert paged.pages_in_use(a.cache).tolist() == [4, 4]      # 6 kept + 2 new per row
  # only some rows: row 1 keeps all its pages
  _, pc = _prefill(m, tok[:, :5], cache=_paged_cache(2))
  pc = paged.PagedPress(press).compress_model(pc, None, CFG, rows=[0])
  assert paged.pages_in_use(pc).tolist() == [3, 3]           # row 0: 5 -> 2 tokens
  np.testing.assert_array_equal(paged.to_dense(pc).segments[0].lengths[0], [[2, 2], [5, 5]])


# -- KIVI pages: per-channel key groups, per-token values, a full-precision residual window --

KIVI = dict(bits=4, group_size=2, residual=4)


def _by_position(colsum, positions, size=64):
  """colsum [B, H, S] re-indexed by token position (slot layouts differ between kinds)."""
  colsum, positions = np.asarray(colsum), np.asarray(positions)
  out = np.zeros(colsum.shape[:2] + (size,))
  b, h, s = np.nonzero(positions >= 0)
  np.add.at(out, (b, h, positions[b, h, s]), colsum[b, h, s])
  return out


@pytest.mark.parametrize("partitions", [1, 3])
def test_kivi_pages_match_dense_kivi_cache(partitions):
  """Given ragged chunks appended to a KIVI page pool (the page holds whole key groups) and
  to kvjax.quant's dense KIVI cache, attention (out, lse, colsum by position), the decoded
  keys and the residual windows agree; pages hold only flushed whole groups."""
  from kvjax import quant  # pylint: disable=import-outside-toplevel
  spec = quant.kivi(**KIVI)
  rng = np.random.default_rng(0)
  b, h, d, hq = 3, 2, 8, 4
  pc = paged.PagedKVCache.init(b, h, d, num_pages=24, page_size=4, max_pages=6, quant=spec,
                               partitions=partitions)
  qc = quant.QuantizedKVCache.init(b, h, 28, d, spec)
  assert pc.k_scale.shape == (24, h, 2, d)       # a per-channel scale per group of 2 tokens
  assert pc.v_scale.shape == (24, h, 4, d // 2)  # per token, per group of 2 channels
  assert pc.capacity == 6 * 4 + 4
  start = np.zeros(b, np.int32)
  for t, valid in ((7, [7, 2, 5]), (1, [1, 1, 0]), (5, [3, 5, 4]), (1, [1, 1, 1]),
                   (3, [3, 0, 2])):
    k, v, pos = _chunk(rng, b, h, t, d, valid, start)
    q = jnp.asarray(rng.normal(size=(b, hq, t, d)), jnp.float32)
    rp, pc = _attend(pc, q, k, v, pos, A.AttentionSpec())
    rq, qc = _attend(qc, q, k, v, pos, A.AttentionSpec())
    np.testing.assert_allclose(rp.out, rq.out, atol=1e-5)
    np.testing.assert_allclose(rp.lse, rq.lse, atol=1e-5)
    qpos = np.concatenate([np.asarray(qc.positions), np.asarray(qc.res_positions)], -1)
    np.testing.assert_allclose(_by_position(rp.colsum, pc.to_dense().positions),
                               _by_position(rq.colsum, qpos), atol=1e-5)
    start += np.asarray(valid)
    np.testing.assert_array_equal(pc.res_lengths, qc.res_lengths)
    paged.check_invariants(pc)
  a, bq = pc.to_dense(), qc.to_dense()
  np.testing.assert_array_equal(a.lengths, bq.lengths)
  va, vb = np.asarray(a.valid_mask()), np.asarray(bq.valid_mask())
  np.testing.assert_array_equal(np.asarray(a.k)[:, :, :28][va[:, :, :28]], np.asarray(bq.k)[vb])
  # flushed tokens = lengths - residual, always whole groups, in ceil(. / P) pages per row
  flushed = np.asarray(pc.lengths - pc.res_lengths).max(-1)
  assert int(pc.pages_in_use) == sum(-(-int(n) // 4) for n in flushed)


def test_kivi_page_keys_are_quantized_per_channel_group():
  """Against a numpy KIVI reference: each flushed group of G keys is quantized per channel
  (channels of very different ranges each keep their own error bound), values per token,
  and the newest tokens stay exact in the residual window."""
  from kvjax import quant  # pylint: disable=import-outside-toplevel
  spec = quant.kivi(bits=4, group_size=2, residual=2)
  rng = np.random.default_rng(1)
  d, n = 8, 9
  ranges = 10.0 ** np.arange(-3, 5)                    # channel c spans ~ranges[c]
  x = (rng.uniform(-1, 1, size=(1, 1, n, d)) * ranges).astype(np.float32)
  pc = paged.PagedKVCache.init(1, 1, d, num_pages=4, page_size=4, quant=spec)
  pc = pc.append(jnp.asarray(x), jnp.asarray(x), jnp.arange(n, dtype=jnp.int32)[None])
  k, v, pos, lengths = paged.dense_view(pc)
  k, v = np.asarray(k)[0, 0], np.asarray(v)[0, 0]
  flushed = 8                 # 9 tokens, R = 2, G = 2: flush ceil(7 / 2) * 2 = 8, keep 1
  assert int(pc.res_lengths[0, 0]) == 1 and int(lengths[0, 0]) == n
  np.testing.assert_array_equal(k[flushed:n], x[0, 0, flushed:])     # residual: exact
  for g0 in range(0, flushed, 2):
    grp = x[0, 0, g0:g0 + 2]                                          # [G, D]
    # per-channel scale (stored in float16, so never below its smallest normal number)
    step = np.maximum((grp.max(0) - grp.min(0)) / 15, np.finfo(np.float16).tiny)
    err = np.abs(k[g0:g0 + 2] - grp)
    assert (err <= step / 2 * 1.01 + 1e-6 * ranges).all(), (g0, err / np.maximum(step, 1e-30))
    vg = grp.reshape(2, d // 2, 2)                     # values: per token, 2-channel groups
    vstep = np.maximum((vg.max(-1) - vg.min(-1)) / 15, np.finfo(np.float16).tiny)
    verr = np.abs(v[g0:g0 + 2].reshape(2, d // 2, 2) - vg).max(-1)
    assert (verr <= vstep / 2 * 1.01 + 1e-6 * ranges.reshape(d // 2, 2).max(-1)).all()
  np.testing.assert_array_equal(np.asarray(pos)[0, 0, :n], np.arange(n))


def test_kivi_fork_shares_groups_and_writes_stay_private():
  """Forking a KIVI row mid-pages and mid-window: the child reads exactly the parent's
  prefix (shared pages + a copied window), and later appends of either row never change
  the other's view (copy-on-write of a partially shared page)."""
  from kvjax import quant  # pylint: disable=import-outside-toplevel
  spec = quant.kivi(bits=4, group_size=2, residual=4)
  rng = np.random.default_rng(2)
  b, h, d = 3, 2, 8
  c = paged.PagedKVCache.init(b, h, d, num_pages=16, page_size=4, max_pages=5, quant=spec)
  k, v, pos = _chunk(rng, b, h, 12, d, [12, 0, 0], np.zeros(b, np.int32))
  c = c.append(k, v, pos)                               # row 0: 8 flushed (2 pages) + 4
  before = paged.dense_view(c)
  # row 1: 7 tokens = 3 groups (page 1 half shared) + 1 decoded token in its window;
  # row 2: 10 tokens = both pages + 2 of the 4 window tokens
  c = paged.fork(c, [0, 0], [1, 2], n_tokens=[7, 10])
  paged.check_invariants(c)
  assert int(c.pages_in_use) == 2                       # nothing copied yet
  view = paged.dense_view(c)
  for row, n in ((1, 7), (2, 10)):
    assert (np.asarray(view[3])[row] == n).all()
    np.testing.assert_array_equal(np.asarray(view[0])[row, :, :n],
                                  np.asarray(before[0])[0, :, :n])
    np.testing.assert_array_equal(np.asarray(view[2])[row, :, :n], [np.arange(n)] * h)
  assert np.asarray(c.res_lengths)[1:, 0].tolist() == [1, 2]
  # every row appends its own tokens: a row's view depends only on its own writes (the
  # same as when it appends alone), and one row's append leaves the others' views intact
  k2, v2, pos2 = _chunk(rng, b, h, 6, d, [6, 6, 6], np.asarray([12, 7, 10], np.int32))
  joint = c.append(k2, v2, pos2)
  paged.check_invariants(joint)
  after = paged.dense_view(joint)
  for row in range(b):
    alone = c.append(k2, v2, jnp.where(jnp.arange(b)[:, None] == row, pos2, -1))
    va = paged.dense_view(alone)
    np.testing.assert_array_equal(np.asarray(after[0])[row], np.asarray(va[0])[row])
    for other in set(range(b)) - {row}:
      np.testing.assert_array_equal(np.asarray(va[0])[other], np.asarray(view[0])[other])
  assert (np.asarray(after[3]) == np.asarray([[18], [13], [16]])).all()
  c = joint
  c = paged.release(c, [0, 1, 2])
  paged.check_invariants(c)
  assert int(c.num_free) == 16


def test_quant_spec_errors_name_the_argument():
  from kvjax import quant  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="group_size=4 must divide page_size=6"):
    paged.PagedKVCache.init(1, 1, 8, num_pages=4, page_size=6, quant=quant.kivi(4, 4, 8))
  with pytest.raises(ValueError, match="outlier_frac=0.1 .allowed: 0."):
    paged.PagedKVCache.init(1, 1, 8, num_pages=4, page_size=4,
                            quant=quant.int8(outlier_frac=0.1))
  with pytest.raises(ValueError, match="partitions=3 must divide batch=4 and num_pages=6"):
    paged.PagedKVCache.init(4, 1, 8, num_pages=6, page_size=4, partitions=3)


def test_model_kivi_pages_equal_dense_kivi_and_press_frees_pages():
  """A model decoding on KIVI pages gives the logits of kvjax.quant's dense KIVI cache;
  an eviction press on the KIVI pages (re-grouping the kept tokens) equals pressing the
  dense KIVI cache's tokens and re-quantizing them, and frees pages."""
  from kvjax import quant  # pylint: disable=import-outside-toplevel
  from kvjax.presses import KnormPress  # pylint: disable=import-outside-toplevel
  spec = quant.kivi(bits=4, group_size=2, residual=4)
  m, tok = _model(), _toks(2, 14)
  pc = _paged_cache(2, capacity=16, num_pages=8, quant=spec)
  qc = quant.init_model_cache(CFG, 2, 16, spec)
  lp, pc = _prefill(m, tok[:, :5], cache=pc)
  lq, qc = _prefill(m, tok[:, :5], cache=qc)
  np.testing.assert_allclose(lp, lq, atol=1e-5)
  for i in range(5, 12):
    lp, pc = _decode(m, tok[:, i:i + 1], pc)
    lq, qc = _decode(m, tok[:, i:i + 1], qc)
    np.testing.assert_allclose(lp, lq, atol=1e-5)
  # 12 tokens, R = 4, G = 2: 8 flushed = 2 pages per row (a full-precision pool: 3)
  assert paged.pages_in_use(pc).tolist() == [4, 4]
  paged.check_invariants(pc.segments[0])
  press = KnormPress(compression_ratio=0.5)
  pc = paged.PagedPress(press).compress_model(pc, None, CFG)
  dense = cache_lib.ModelCache.from_layers([c.to_dense() for c in qc.layers()],
                                           qc.next_position, grouping=qc.grouping)
  qc = quant.quantize_model(press.compress_model(dense, None, CFG, room=4), spec)
  assert paged.pages_in_use(pc).tolist() == [2, 2]       # 6 kept: 2 flushed + 4 exact
  for i in range(12, 14):
    lp, pc = _decode(m, tok[:, i:i + 1], pc)
    lq, qc = _decode(m, tok[:, i:i + 1], qc)
    np.testing.assert_allclose(lp, lq, atol=1e-5)



def test_partitioned_pool_runs_out_per_partition():
  """Two pool partitions of 4 pages, two rows each: partition 0 running out is an
  OutOfPages naming it although partition 1 has free pages; under jit nothing is written;
  after releasing a row the step runs, and every row's logits equal the dense cache's."""
  m, tok = _model(), _toks(4, 9)
  fac = paged.layer_factory(4, CFG.num_kv_heads, CFG.head_dim, num_pages=8, page_size=4,
                            partitions=2)
  pc = models.init_cache(CFG, 4, 16, layer_factory=fac)
  assert pc.segments[0].max_pages == 4                    # default: one partition's pages
  mask = np.ones((4, 8), np.int32)
  mask[2:, 1:] = 0                                        # rows 2, 3 (partition 1): 1 token
  _, pc = _prefill(m, tok[:, :8], cache=pc, attention_mask=mask)
  _, dc = _prefill(m, tok[:, :8], capacity=16, attention_mask=mask)
  assert np.asarray(pc.segments[0].part_free).tolist() == [[0, 2]] * 2
  with pytest.raises(paged.OutOfPages, match="partition 0: .* needs 2 new pages but only 0") as e:
    _decode(m, tok[:, 8:9], pc)
  assert e.value.partition == 0
  before = paged.to_dense(pc)
  _, pc2 = _decode(m, tok[:, 8:9], jax.tree.map(jnp.copy, pc), check_capacity=False)
  assert paged.overflowed(pc2)
  np.testing.assert_array_equal(paged.to_dense(pc2).segments[0].k, before.segments[0].k)
  pc = paged.release_rows(pc, [1])
  lp, pc = _decode(m, tok[:, 8:9], pc, attention_mask=np.asarray([[1], [0], [1], [1]]))
  ld, dc = _decode(m, tok[:, 8:9], dc)
  np.testing.assert_allclose(np.asarray(lp)[[0, 2, 3]], np.asarray(ld)[[0, 2, 3]], atol=1e-5)
  paged.check_invariants(pc.segments[0])
  assert np.asarray(pc.segments[0].part_free).tolist() == [[1, 2]] * 2
  with pytest.raises(ValueError, match="same pool partition"):
    paged.fork_rows(pc, [0], [2])
