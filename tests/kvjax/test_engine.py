"""Serving engine (continuous batching on paged caches) and adaptive policies."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax import engine, paged, policy
from kvjax.presses import KnormPress, SnapKVPress

CFG = models.ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2)
NEW = 6
# Every sequence + NEW fits 16 tokens: the geometry of tests/kvjax/test_paged.py (2 rows,
# 7 pages of 4, 16 tokens per row), so the decode compiles are shared with it.
PROMPTS = [list(np.random.default_rng(0).integers(0, 256, size=n)) for n in (9, 8, 10, 7, 9)]
PREFIX = list(np.random.default_rng(1).integers(0, 256, size=6))
SUFFIXES = [list(np.random.default_rng(2 + i).integers(0, 256, size=n))
            for i, n in enumerate((2, 4, 3))]


@functools.lru_cache(maxsize=None)
def _model():
  return models.Transformer(CFG, rngs=nnx.Rngs(0))


def _make(num_pages=7):
  return paged.model_cache_fn(models.init_cache, CFG, num_pages=num_pages, page_size=4,
                              max_tokens=16)


def _engine(**kw):
  return engine.Engine(_model(), _make(kw.pop("num_pages", 7)), max_batch=2, chunk=4, **kw)


@functools.lru_cache(maxsize=None)
def _reference():
  """Greedy continuations, each sequence fed token by token through a dense cache (no
  paging, no chunks, no engine), two sequences at a time."""
  seqs = PROMPTS + [PREFIX + s for s in SUFFIXES]
  out = []
  for i in range(0, len(seqs), 2):
    pair = seqs[i:i + 2]
    feed = [list(s) for s in pair]
    gen = [[] for _ in pair]
    cache = models.init_cache(CFG, 2, 16)
    while any(len(g) < NEW for g in gen):
      tok = np.zeros((2, 1), np.int32)
      mask = np.zeros((2, 1), np.int32)
      for r, f in enumerate(feed):
        if len(gen[r]) < NEW:
          tok[r, 0], mask[r, 0] = f.pop(0), 1
      lg, cache = models.decode(_model(), jnp.asarray(tok), cache, logits="last",
                                attention_mask=jnp.asarray(mask))
      nxt = np.asarray(jnp.argmax(lg[:, -1], -1))
      for r, f in enumerate(feed):
        if mask[r, 0] and not f:          # the prompt is in: this logit is an output
          gen[r].append(int(nxt[r]))
          f.append(int(nxt[r]))
    out.extend(gen)
  return np.asarray(out)


def test_continuous_batching_with_preemption_equals_greedy():
  """5 requests, 2 rows, a 7-page pool: requests queue, get swapped out and back, and every
  output equals the request decoded alone (exact swaps, chunked prefill, ragged rows)."""
  e = _engine()
  reqs = e.run([engine.Request(p, NEW) for p in PROMPTS])
  np.testing.assert_array_equal([r.output for r in reqs], _reference()[:len(PROMPTS)])
  assert all(r.status == "done" for r in reqs)
  assert e.stats["swaps_out"] >= 1 and e.stats["swaps_in"] == e.stats["swaps_out"]
  assert e.stats["peak_pages"] <= 7
  assert paged.pages_in_use(e.cache).tolist() == [0, 0]          # nothing leaked
  assert sum(r.preemptions for r in reqs) == e.stats["swaps_out"]


def test_shared_prefix_is_stored_once():
  e = _engine()
  pid = e.register_prefix(PREFIX)
  assert paged.pages_in_use(e.cache).tolist() == [2, 2]          # 6 tokens, one copy
  reqs = [e.submit(s, NEW, prefix=pid) for s in SUFFIXES]
  e.step()                                                        # admits the first
  prow = e.prefixes[pid][0][0]                                    # its row (one partition)
  meta = e._meta  # pylint: disable=protected-access
  assert meta("refcount")[meta("page_table")[prow][0]] == 2      # prefix row + request
  e.run()
  np.testing.assert_array_equal([r.output for r in reqs], _reference()[len(PROMPTS):])
  assert e.stats["prompt_tokens"] == sum(map(len, SUFFIXES))      # the prefix ran once
  assert paged.pages_in_use(e.cache).tolist() == [2, 2]          # only the prefix is left


def test_compress_on_pressure_keeps_everyone_running():
  press = KnormPress(compression_ratio=0.5)
  pol = policy.CompressOnPressure(press, min_tokens=8)
  e = _engine(policy=pol)
  reqs = e.run([engine.Request(p, NEW) for p in PROMPTS])
  assert all(r.status == "done" and len(r.output) == NEW for r in reqs)
  assert e.stats["compressions"] >= 1 and e.stats["swaps_out"] == 0
  assert e.stats["peak_pages"] <= 7


def test_length_adaptive_compresses_only_long_prompts():
  pol = policy.Tiered([policy.LengthAdaptive(((8, None), (None, KnormPress(0.5)))),
                       policy.SwapOnPressure(compress="int8")])
  e = _engine(policy=pol)
  reqs = e.run([engine.Request(p, NEW) for p in PROMPTS])
  long_ = [len(p) > 8 for p in PROMPTS]
  assert [r.compressions > 0 for r in reqs] == long_
  assert all(r.status == "done" for r in reqs)
  short = [r.output for r, l in zip(reqs, long_) if not l and r.preemptions == 0]
  ref = [o for o, l, r in zip(_reference(), long_, reqs) if not l and r.preemptions == 0]
  np.testing.assert_array_equal(short, ref)      # untouched requests are exact


def test_rejections_name_sizes():
  e = _engine()
  with pytest.raises(ValueError, match="prompt 12 .* = 18 tokens.*max_pages=4"):
    e.submit(list(range(12)), 6)
  with pytest.raises(ValueError, match="at least one prompt token"):
    e.submit([], 4)
  with pytest.raises(ValueError, match="prefix=3 is not registered"):
    e.submit([1, 2], 4, prefix=3)
  small = _engine(num_pages=3)
  with pytest.raises(ValueError, match="needs 4 pages .* num_pages=3"):
    small.submit(list(range(10)), 4)
  with pytest.raises(ValueError, match="needs attention observations"):
    policy.CompressOnPressure(SnapKVPress(compression_ratio=0.5))


# -- policies on synthetic views (no model) ------------------------------------------------------
def _rows(*specs):
  return tuple(policy.RowView(row=i, request_id=i, state="running", tokens=t, position=t,
                              pages=-(-t // 4), private_pages=p, admitted=a,
                              just_prefilled=j)
               for i, (t, p, a, j) in enumerate(specs))


def test_policy_decisions():
  view = policy.PoolView(num_pages=20, page_size=4, free_pages=1, needed=4,
                         rows=_rows((12, 3, 0, False), (8, 2, 2, False), (16, 1, 1, False)))
  # swap: latest admitted first until private pages cover the 3-page shortfall
  assert policy.SwapOnPressure().on_pressure(view) == [policy.SwapOut((1, 2))]
  # compress: longest first; 16 tokens -> 8 frees 2 pages, 12 -> 6 frees 1
  press = KnormPress(compression_ratio=0.5)
  assert policy.CompressOnPressure(press, min_tokens=10).on_pressure(view) == [
      policy.Compress((2, 0), press)]
  # nothing long enough: falls back to swapping
  assert policy.CompressOnPressure(press, min_tokens=100).on_pressure(view) == [
      policy.SwapOut((1, 2))]
  lv = policy.PoolView(20, 4, 10, 0, _rows((5, 2, 0, True), (40, 10, 1, True),
                                           (400, 100, 2, False)))
  big = KnormPress(compression_ratio=0.75)
  la = policy.LengthAdaptive(((8, None), (100, press), (None, big)))
  assert la.after_step(lv) == [policy.Compress((1,), press)]
  with pytest.raises(ValueError, match="must increase"):
    policy.LengthAdaptive(((8, None), (4, press)))


# -- preemption by recomputation, bad input, partitioned pools, KIVI pages ----------------------
def test_recompute_preemption_equals_greedy():
  """Preempting by recomputation (pages dropped, prompt + output re-prefilled later) gives
  every request the output it gets decoded alone, and leaks no page."""
  e = _engine(preemption="recompute")
  reqs = e.run([engine.Request(p, NEW) for p in PROMPTS])
  np.testing.assert_array_equal([r.output for r in reqs], _reference()[:len(PROMPTS)])
  assert e.stats["recomputes"] >= 1 and e.stats["swaps_out"] == 0
  assert sum(r.preemptions for r in reqs) == e.stats["recomputes"]
  assert e.stats["recomputed_tokens"] == sum(r.recomputed_tokens for r in reqs) > 0
  assert paged.pages_in_use(e.cache).tolist() == [0, 0]
  with pytest.raises(ValueError, match=r"preemption='drop'; allowed: \('swap', 'recompute'\)"):
    _engine(preemption="drop")


def test_oversized_request_is_rejected_while_others_keep_running():
  """A request larger than the whole pool (though within a row's table), submitted while
  others run, is rejected naming the sizes; the running requests are untouched and finish
  with their exact outputs."""
  e = _engine(num_pages=3)                            # rows hold up to 4 pages; the pool 3
  reqs = [e.submit(PROMPTS[i], 2) for i in (1, 3)]     # 10 and 9 tokens: 3 pages each
  for _ in range(2):
    e.step()
  big = engine.Request(list(range(14)), 2)            # 16 tokens = 4 pages
  with pytest.raises(ValueError, match=r"prompt 14 \+ max_new_tokens 2 = 16 tokens: .*needs 4 "
                     r"pages of page_size=4, but the whole pool has num_pages=3"):
    e.submit(big)
  assert big.status == "rejected" and e.stats["rejected"] == 1
  with pytest.raises(ValueError, match="34 tokens needs 9 pages"):
    e.submit(list(range(30)), 4)
  e.run()
  np.testing.assert_array_equal([r.output for r in reqs], _reference()[[1, 3], :2])
  assert [r.status for r in reqs] == ["done", "done"] and e.stats["rejected"] == 2
  assert paged.pages_in_use(e.cache).tolist() == [0, 0]


def test_partitioned_pool_engine_equals_greedy():
  """Two pool partitions (one per data shard), three rows and 6 pages each: requests are
  placed by free pages, shortfalls are resolved inside the short partition, a prefix is
  stored once per partition, and every output equals the request decoded alone."""
  make = paged.model_cache_fn(models.init_cache, CFG, num_pages=12, page_size=4,
                              max_tokens=16, partitions=2)
  e = engine.Engine(_model(), make, max_batch=6, chunk=4)
  pid = e.register_prefix(PREFIX)
  rows = e.prefixes[pid][0]
  assert [r // 3 for r in rows] == [0, 1]                       # one prefix row per partition
  reqs = [e.submit(p, NEW) for p in PROMPTS] + [e.submit(s, NEW, prefix=pid) for s in SUFFIXES]
  seen = []
  e.run(callback=lambda eng: (seen.append(eng.running), paged.check_invariants(
      eng.cache.segments[0])))
  np.testing.assert_array_equal([r.output for r in reqs], _reference())
  assert e.stats["swaps_out"] >= 1 and max(seen) == 4         # every request row was busy
  # only the two prefixes (2 pages each, one copy per partition) are left
  assert paged.pages_in_use(e.cache).tolist() == [4, 4]
  assert np.asarray(e.cache.segments[0].part_free).tolist() == [[4, 4]] * 2


def test_kivi_pages_engine_recomputes_under_pressure():
  """KIVI pages (per-channel int4 key groups, exact window) under a tight pool: preemption
  recomputes (swaps cannot carry the window); every request finishes, nothing leaks, and
  requests never preempted produce the outputs of a pool large enough for all of them."""
  from kvjax import quant  # pylint: disable=import-outside-toplevel
  spec = quant.kivi(bits=4, group_size=2, residual=4)

  def run(num_pages):
    make = paged.model_cache_fn(models.init_cache, CFG, num_pages=num_pages, page_size=4,
                                max_tokens=16, quant=spec)
    e = engine.Engine(_model(), make, max_batch=2, chunk=4)
    return e, e.run([engine.Request(p, NEW) for p in PROMPTS])

  big, ref = run(12)
  tight, reqs = run(4)
  assert tight.preemption == "recompute" and big.stats["recomputes"] == 0
  assert tight.stats["recomputes"] >= 1 and tight.stats["swaps_out"] == 0
  assert all(r.status == "done" and len(r.output) == NEW for r in reqs)
  same = [(r.output, q.output) for r, q in zip(reqs, ref) if r.preemptions == 0]
  assert same and all(a == b for a, b in same)
  assert paged.pages_in_use(tight.cache).tolist() == [0, 0]
  assert tight.stats["peak_pages"] <= 4


def test_prefill_sub_batch_and_narrow_tables_equal_greedy():
  """Prefill chunks on a [1, chunk] sub-batch of the cache (no page copied) while decoding
  rows take [B, 1] steps, and page tables narrowed to 2 or 4 entries as rows grow and
  finish: every output still equals the request decoded alone, shared prefixes included,
  and the swap preemption path still round-trips."""
  e = engine.Engine(_model(), _make(8), max_batch=3, chunk=4, prefill_batch=1,
                    table_buckets=2)
  assert e.widths == [2, 4]
  pid = e.register_prefix(PREFIX)
  reqs = [e.submit(p, NEW) for p in PROMPTS] + [e.submit(s, NEW, prefix=pid) for s in SUFFIXES]
  widths = []
  e.run(callback=lambda eng: widths.append(paged.to_dense(eng.cache).segments[0].k.shape[3]))
  np.testing.assert_array_equal([r.output for r in reqs], _reference())
  assert set(widths) == {2 * 4, 4 * 4}                 # view slots: table width x page size
  assert e.stats["swaps_out"] >= 1
  assert paged.pages_in_use(e.cache).tolist() == [2, 2]          # only the prefix is left
  with pytest.raises(ValueError, match=r"prefill_batch=4; must be None or an int in \[1, "):
    engine.Engine(_model(), _make(), max_batch=3, prefill_batch=4)
