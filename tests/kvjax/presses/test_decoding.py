"""Decode-time compression: DecodingPress with kvjax.generate and models.decode.

The strongest check: StreamingLLM eviction (no sinks) run by DecodingPress each time the
cache is full must reproduce a sliding-window model exactly (a window of W attends to the
last W tokens, itself included; the pressed cache holds W - 1 past tokens + the new one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import models
from kvjax import cache as cache_lib
from kvjax import presses as P
from tests.kvjax.presses import helpers

PROMPT, CAP = 4, 8
H2O = P.H2OPress(protect_recent=2)


@pytest.fixture(scope="module")
def model():
  return helpers.tiny_model()


def test_streaming_eviction_equals_sliding_window_attention(model):
  # Given the same weights as a sliding-window (W = CAP) model
  windowed = helpers.tiny_model(sliding_window=CAP)
  n_new = 4 * CAP
  seq = jax.random.randint(jax.random.key(0), (2, PROMPT + n_new), 1, 64).astype(jnp.int32)
  policy = P.DecodingPress(P.StreamingLLMPress(n_sink=0), compression_interval=0,
                           target_size=CAP - 1)
  # When decoding 4x past the cache capacity with eviction whenever the cache is full
  _, cache = models.prefill(model, seq[:, :PROMPT], capacity=CAP, logits="last")
  _, ref = models.prefill(windowed, seq[:, :PROMPT], capacity=PROMPT + n_new, logits="last")
  nbytes = cache.nbytes
  for step in range(n_new):
    cache = policy.maybe_compress(cache, step)
    tok = seq[:, PROMPT + step:PROMPT + step + 1]
    logits, cache = models.decode(model, tok, cache, logits="last")
    want, ref = models.decode(windowed, tok, ref, logits="last")
    # Then every step's logits match the windowed model, in fixed memory
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert cache.nbytes == nbytes
  assert policy.compressions == n_new - (CAP - PROMPT)
  np.testing.assert_array_equal(np.asarray(cache.next_position), PROMPT + n_new)


@pytest.mark.parametrize("press", [P.StreamingLLMPress(n_sink=2), H2O],
                         ids=lambda p: type(p).__name__)
def test_generate_runs_4x_past_capacity_in_bounded_memory(model, press):
  tok = jax.random.randint(jax.random.key(1), (2, PROMPT), 1, 64).astype(jnp.int32)
  policy = P.DecodingPress(press, compression_interval=0, target_size=CAP - 4)
  start = models.init_cache(model.config, 2, CAP).nbytes
  out = kvjax.generate(model, tok, max_new_tokens=4 * CAP, capacity=CAP, decode_press=policy)
  assert out.tokens.shape == (2, 4 * CAP) and out.steps == 4 * CAP - 1
  assert out.cache.capacity == (CAP, CAP) and out.cache.nbytes == start
  # every 4 steps the cache fills up: 8 - 4 prompt tokens, then (31 - 4) / 4 more
  assert policy.compressions == 1 + (4 * CAP - 1 - (CAP - PROMPT)) // 4
  np.testing.assert_array_equal(np.asarray(out.cache.next_position), PROMPT + 4 * CAP - 1)
  for c in out.cache.layers():  # kept tokens keep their original positions
    pos = np.asarray(c.positions)
    ln = np.asarray(c.lengths)
    for b in range(2):
      for h in range(2):
        kept = pos[b, h, :ln[b, h]]
        assert (np.diff(kept) > 0).all() and kept[-1] == PROMPT + 4 * CAP - 2


def test_h2o_policy_accumulates_attention_and_realigns_it(model):
  tok = jax.random.randint(jax.random.key(1), (2, PROMPT), 1, 64).astype(jnp.int32)
  policy = P.DecodingPress(H2O, compression_interval=0, target_size=CAP - 4)
  _, cache, obs = models.prefill(model, tok, capacity=CAP, observe=policy.observe,
                                 logits="last")
  cache = policy.maybe_compress(cache, 0, obs=obs)   # not full: nothing happens
  total = np.asarray(obs[1]["colsum"])
  for step in range(1, CAP - PROMPT + 1):
    assert policy.compressions == 0
    _, cache, obs = models.decode(model, tok[:, :1], cache, observe=policy.observe,
                                  logits="last")
    total = total + np.asarray(obs[1]["colsum"])
    cache = policy.maybe_compress(cache, step, obs=obs)
  # The cache filled up: every layer keeps the 2 recent slots + the 2 heaviest others, by
  # attention summed over the prefill and every decode step; statistics follow the slots.
  assert policy.compressions == 1
  layer = cache.layers()[1]
  np.testing.assert_array_equal(np.asarray(layer.lengths), CAP - 4)
  heavy = np.argsort(-total[:, :, :CAP - 2], axis=-1, kind="stable")[..., :2]
  want = np.sort(np.concatenate([heavy, np.broadcast_to([CAP - 2, CAP - 1], heavy.shape)], -1))
  np.testing.assert_array_equal(np.asarray(layer.positions)[:, :, :CAP - 4], want)
  realigned = np.asarray(policy.observations(2)[1]["colsum"])[:, :, :CAP - 4]
  np.testing.assert_allclose(realigned, np.take_along_axis(total, want, -1), rtol=1e-6)


def test_interval_policy_and_capacity_is_kept():
  layers = [helpers.make_cache(b=1, h=2, s=10, lengths=[6], seed=i) for i in range(2)]
  mc = cache_lib.ModelCache.from_layers(layers, jnp.asarray([6]))
  policy = P.DecodingPress(P.KnormPress(), compression_interval=3, target_size=4)
  for step in range(7):
    mc = policy.maybe_compress(mc, step)
  # due at the calls with 3 steps since the last compression: steps 3 and 6
  assert policy.compressions == 2
  assert mc.capacity == (10, 10)
  for c in mc.layers():
    np.testing.assert_array_equal(np.asarray(c.lengths), 4)
