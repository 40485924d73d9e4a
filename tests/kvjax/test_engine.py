"""Serving engine (continuous batching on paged caches) and adaptive policies."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax import engine, paged, policy
from kvjax.presses import KnormPress, SnapKVPress

CFG = models.ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2)
NEW = 6
PROMPTS = [list(np.random.default_rng(0).integers(0, 256, size=n)) for n in (3, 9, 5, 12, 7)]
PREFIX = list(np.random.default_rng(1).integers(0, 256, size=6))
SUFFIXES = [list(np.random.default_rng(2 + i).integers(0, 256, size=n))
            for i, n in enumerate((2, 5, 4))]


@functools.lru_cache(maxsize=None)
def _model():
  return models.Transformer(CFG, rngs=nnx.Rngs(0))


def _make(num_pages=7):
  fac = lambda b: paged.layer_factory(b, CFG.num_kv_heads, CFG.head_dim,  # noqa: E731
                                      num_pages=num_pages, page_size=4)
  return lambda b: models.init_cache(CFG, b, 24, layer_factory=fac(b))


@functools.lru_cache(maxsize=None)
def _reference():
  """Greedy continuations of every test sequence, one batched dense-cache run."""
  seqs = PROMPTS + [PREFIX + s for s in SUFFIXES]
  t = max(map(len, seqs))
  toks = np.zeros((len(seqs), t), np.int32)
  for i, s in enumerate(seqs):
    toks[i, :len(s)] = s
  lg, c = models.prefill(_model(), jnp.asarray(toks), capacity=t + NEW, logits="last",
                         prompt_lengths=jnp.asarray([len(s) for s in seqs]))
  out = []
  for _ in range(NEW):
    nxt = jnp.argmax(lg[:, -1], -1).astype(jnp.int32)
    out.append(np.asarray(nxt))
    lg, c = models.decode(_model(), nxt[:, None], c, logits="last")
  return np.stack(out, 1)


def test_continuous_batching_with_preemption_equals_greedy():
  """5 requests, 3 rows, a 7-page pool: requests queue, get swapped out and back, and every
  output equals the request decoded alone (exact swaps, chunked prefill, ragged rows)."""
  e = engine.Engine(_model(), _make(), max_batch=3, chunk=4)
  reqs = e.run([engine.Request(p, NEW) for p in PROMPTS])
  np.testing.assert_array_equal([r.output for r in reqs], _reference()[:len(PROMPTS)])
  assert all(r.status == "done" for r in reqs)
  assert e.stats["swaps_out"] >= 1 and e.stats["swaps_in"] == e.stats["swaps_out"]
  assert e.stats["peak_pages"] <= 7
  assert paged.pages_in_use(e.cache).tolist() == [0, 0]          # nothing leaked
  assert sum(r.preemptions for r in reqs) == e.stats["swaps_out"]


def test_shared_prefix_is_stored_once():
  e = engine.Engine(_model(), _make(), max_batch=3, chunk=4)
  pid = e.register_prefix(PREFIX)
  assert paged.pages_in_use(e.cache).tolist() == [2, 2]          # 6 tokens, one copy
  reqs = [e.submit(s, NEW, prefix=pid) for s in SUFFIXES]
  e.step()                                                        # admits two of them
  prow = e.prefixes[pid][0]
  first_page = e._meta("page_table")[prow][0]                      # pylint: disable=protected-access
  assert e._meta("refcount")[first_page] == 3                      # pylint: disable=protected-access
  e.run()
  np.testing.assert_array_equal([r.output for r in reqs], _reference()[len(PROMPTS):])
  assert paged.pages_in_use(e.cache).tolist() == [2, 2]          # only the prefix is left


def test_compress_on_pressure_keeps_everyone_running():
  press = KnormPress(compression_ratio=0.5)
  pol = policy.CompressOnPressure(press, min_tokens=8)
  e = engine.Engine(_model(), _make(), max_batch=3, chunk=4, policy=pol)
  reqs = e.run([engine.Request(p, NEW) for p in PROMPTS])
  assert all(r.status == "done" and len(r.output) == NEW for r in reqs)
  assert e.stats["compressions"] >= 1 and e.stats["swaps_out"] == 0
  assert e.stats["peak_pages"] <= 7


def test_length_adaptive_compresses_only_long_prompts():
  pol = policy.Tiered([policy.LengthAdaptive(((8, None), (None, KnormPress(0.5)))),
                       policy.SwapOnPressure(compress="int8")])
  e = engine.Engine(_model(), _make(), max_batch=3, chunk=4, policy=pol)
  reqs = e.run([engine.Request(p, NEW) for p in PROMPTS])
  long_ = [len(p) > 8 for p in PROMPTS]
  assert [r.compressions > 0 for r in reqs] == long_
  assert all(r.status == "done" for r in reqs)
  short = [r.output for r, l in zip(reqs, long_) if not l and r.preemptions == 0]
  ref = [o for o, l, r in zip(_reference(), long_, reqs) if not l and r.preemptions == 0]
  np.testing.assert_array_equal(short, ref)      # untouched requests are exact


def test_rejections_name_sizes():
  e = engine.Engine(_model(), _make(), max_batch=3, chunk=4)
  with pytest.raises(ValueError, match="prompt 20 .* = 26 tokens.*max_pages=6"):
    e.submit(list(range(20)), 6)
  with pytest.raises(ValueError, match="at least one prompt token"):
    e.submit([], 4)
  with pytest.raises(ValueError, match="prefix=3 is not registered"):
    e.submit([1, 2], 4, prefix=3)
  small = engine.Engine(_model(), _make(num_pages=4), max_batch=1, chunk=4)
  with pytest.raises(ValueError, match="needs 5 pages .* num_pages=4"):
    small.submit(list(range(10)), 8)
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
