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
from kvjax import presses as P
from tests.kvjax.presses import helpers

PROMPT, CAP = 8, 16


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
  _, cache = models.prefill(model, seq[:, :PROMPT], capacity=CAP)
  _, ref = models.prefill(windowed, seq[:, :PROMPT], capacity=PROMPT + n_new)
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


@pytest.mark.parametrize("press", [P.StreamingLLMPress(n_sink=4), P.H2OPress(protect_recent=2),
                                   P.TOVAPress()], ids=lambda p: type(p).__name__)
def test_generate_runs_4x_past_capacity_in_bounded_memory(model, press):
  tok = jax.random.randint(jax.random.key(1), (2, PROMPT), 1, 64).astype(jnp.int32)
  policy = P.DecodingPress(press, compression_interval=0, target_size=CAP - 4)
  start = models.init_cache(model.config, 2, CAP).nbytes
  out = kvjax.generate(model, tok, max_new_tokens=4 * CAP, capacity=CAP, decode_press=policy)
  assert out.tokens.shape == (2, 4 * CAP) and out.steps == 4 * CAP - 1
  assert out.cache.capacity == (CAP, CAP) and out.cache.nbytes == start
  assert policy.compressions >= (4 * CAP - (CAP - PROMPT)) // 4
  np.testing.assert_array_equal(np.asarray(out.cache.next_position), PROMPT + 4 * CAP - 1)
  for c in out.cache.layers():  # kept tokens keep their original positions
    pos = np.asarray(c.positions)
    ln = np.asarray(c.lengths)
    for b in range(2):
      for h in range(2):
        kept = pos[b, h, :ln[b, h]]
        assert (np.diff(kept) > 0).all() and kept[-1] == PROMPT + 4 * CAP - 2


def test_h2o_policy_accumulates_decode_attention(model):
  tok = jax.random.randint(jax.random.key(2), (1, PROMPT), 1, 64).astype(jnp.int32)
  policy = P.DecodingPress(P.H2OPress(), compression_interval=5, target_size=6)
  _, cache, obs = models.prefill(model, tok, capacity=CAP, observe=policy.observe)
  cache = policy.maybe_compress(cache, 0, obs=obs)   # step 0: not due, not full
  assert policy.compressions == 0
  acc = np.asarray(policy.observations(2)[0]["colsum"])
  np.testing.assert_allclose(acc, np.asarray(obs[0]["colsum"]))
  total = np.asarray(obs[1]["colsum"])
  for step in range(1, 5):
    _, cache, obs = models.decode(model, tok[:, :1], cache, observe=policy.observe)
    total = total + np.asarray(obs[1]["colsum"])
    cache = policy.maybe_compress(cache, step, obs=obs)
  # The accumulated mass is the sum over prefill and decode steps; at step 5 (interval) the
  # layer keeps its 6 heaviest slots and the statistics follow the kept slots.
  np.testing.assert_allclose(np.asarray(policy.observations(2)[1]["colsum"]), total, rtol=1e-6)
  _, cache, obs = models.decode(model, tok[:, :1], cache, observe=policy.observe)
  total = total + np.asarray(obs[1]["colsum"])
  cache = policy.maybe_compress(cache, 5, obs=obs)
  assert policy.compressions == 1
  layer = cache.layers()[1]
  np.testing.assert_array_equal(np.asarray(layer.lengths), 6)
  top = np.sort(np.argsort(-total[0], axis=-1, kind="stable")[:, :6], axis=-1)
  np.testing.assert_array_equal(np.asarray(layer.positions)[0, :, :6], top)
  realigned = np.asarray(policy.observations(2)[1]["colsum"])[0, :, :6]
  np.testing.assert_allclose(realigned, np.take_along_axis(total[0], top, -1), rtol=1e-6)
