"""Any scorer under any budget rule: the pyramid (ratio or absolute budget, so decode-time
PyramidKV is a pyramid), head-wise AdaKV over a chunk scorer, and both nested.

References: kvpress's PyramidKV layer budget written out in numpy-free Python, and numpy
top-k of the scorer's own criterion (KnormPress keeps the smallest key norms).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import presses as P
from kvjax.presses import base
from tests.kvjax.presses import helpers


def kvpress_pyramid(length, mean_keep, window, beta, layer, n):
  """kvpress's get_layer_budget with max_capacity = window + mean_keep."""
  max_cap = window + mean_keep
  min_num = (max_cap - window) / beta
  max_num = (max_cap - window) * 2 - min_num
  if max_num >= length - window:
    max_num = length - window
    min_num = (max_cap - window) * 2 - max_num
  if not length >= max_num >= min_num >= window:
    return round(mean_keep)
  return round(max_num - layer * (max_num - min_num) / (n - 1))


def test_pyramidkv_with_an_absolute_budget_is_still_a_pyramid():
  press = P.PyramidKVPress(budget=6, window_size=2, beta=2)
  got = [press.layer_capacity(16, base.LayerContext(layer_idx=i, num_layers=4))
         for i in range(4)]
  # the table's max over every length L <= 16: the pyramid at L = 16, uniform below it
  want = [max(min(l, max(0, kvpress_pyramid(l, min(l, 6), 2, 2, i, 4))) for l in range(17))
          for i in range(4)]
  assert got == want and got[0] > got[-1]
  assert P.PyramidKVPress(compression_ratio=0.5).with_budget(6).layer_invariant is False


def test_decode_time_pyramid_keeps_every_layer_capacity():
  model = helpers.tiny_model()
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 64, (1, 20)), jnp.int32)
  policy = P.DecodingPress(P.PyramidKVPress(window_size=2, beta=2), compression_interval=0,
                           target_size=10)
  out = kvjax.generate(model, tokens, capacity=24, max_new_tokens=20, decode_press=policy)
  assert policy.compressions >= 2
  assert out.cache.capacity == (24, 24)            # the room absorbed the pyramid
  # the lower layer kept more than the higher one at each compression
  lengths = [int(np.asarray(l.lengths).max()) for l in out.cache.layers()]
  assert lengths[0] > lengths[1]


def test_pyramid_rule_over_another_scorer_keeps_its_best_slots():
  cache = helpers.make_cache(b=1, h=2, s=16)
  press = P.PyramidBudgetPress(P.KnormPress(compression_ratio=0.5), window_size=2, beta=2)
  norms = np.linalg.norm(np.asarray(cache.k), axis=-1)[0]           # [H, S]
  for layer in range(2):
    keep = kvpress_pyramid(16, 8.0, 2, 2, layer, 2)
    out = helpers.run(press, cache, None, layer_idx=layer, num_layers=2)
    assert out.capacity == keep
    for h in range(2):
      want = sorted(np.argsort(norms[h], kind="stable")[:keep].tolist())
      assert helpers.kept_positions(out)[0][h] == want


def test_adakv_wraps_a_chunk_scorer_heads_keep_whole_chunks():
  cache = helpers.make_cache(b=1, h=2, s=16)
  inner = P.ChunkKVPress(P.KnormPress(compression_ratio=0.5), chunk_length=4)
  out = helpers.run(P.AdaKVPress(inner, head_capacity_factor=2.0), cache, None)
  kept = helpers.kept_positions(out)[0]
  assert sum(map(len, kept)) == 16                  # the layer's total: 2 heads x 8
  # chunk scores: mean of the summed-over-heads Knorm score per chunk of 4 slots
  sc = -np.linalg.norm(np.asarray(cache.k), axis=-1)[0].sum(0).reshape(4, 4).mean(1)
  best = sorted(np.argsort(-sc, kind="stable")[:2].tolist())
  for h in range(2):                                # heads keep the two best chunks
    assert kept[h] == [c * 4 + j for c in best for j in range(4)]
