"""Presses inside the model: left padding, GQA, batch > 1, identity, positions, generate.

One tiny GQA model (2 layers, hidden 64, 4 query heads over 2 kv heads). A left-padded
batch of two prompts (20 and 12 tokens) is prefilled with each press; the padded row must
keep the same slots and give the same next-token logits as that prompt alone.

Compiles dominate the cost on CPU, so every prefill asks for one of two observation
requests (a superset of what its press needs), window presses use window_size=1, and the
unpadded prompt runs as two identical rows with the batch's capacity (so the press and the
decode step reuse the batch's compiles; the press budgets from each row's valid length, and
rows are independent: test_invariants). One test runs it literally alone (B=1, capacity 12).
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

T, PAD = 20, 8
DUO_SCORES = ((0.9, 0.1), (0.2, 0.8))

PRESSES = {
    "streaming_llm": P.StreamingLLMPress(compression_ratio=0.5, n_sink=2),
    "h2o": P.H2OPress(compression_ratio=0.5),
    "snapkv": P.SnapKVPress(compression_ratio=0.5, window_size=1),
    "pyramidkv": P.PyramidKVPress(compression_ratio=0.5, window_size=1, beta=2),
    "tova": P.TOVAPress(compression_ratio=0.5),
    "knorm": P.KnormPress(compression_ratio=0.5),
    "expected_attention": P.ExpectedAttentionPress(compression_ratio=0.5, n_sink=2,
                                                   query_window=4, n_future_positions=8),
    "keydiff": P.KeyDiffPress(compression_ratio=0.5),
    "chunkkv": P.ChunkKVPress(P.KnormPress(compression_ratio=0.5), chunk_length=4),
    "lagkv": P.LagKVPress(compression_ratio=0.5, n_sink=2, lag_size=3),
    "random": P.RandomPress(compression_ratio=0.5, seed=1),
    "adakv": P.AdaKVPress(P.SnapKVPress(compression_ratio=0.5, window_size=1),
                          head_capacity_factor=2.0),  # capacity 20: shares decode compiles
    "duo_attention": P.DuoAttentionPress(head_compression_ratio=0.5, n_sink=2,
                                         recent_size=4, head_scores=DUO_SCORES),
    # (0.25, 0.75) keeps 15 and 5 of 20 slots, the same layer capacities as pyramidkv above
    "per_layer_ratios": P.PerLayerCompressionPress(P.KnormPress(), (0.25, 0.75)),
    "per_layer_map": P.per_layer({1: P.SnapKVPress(compression_ratio=0.5, window_size=1)}, 2,
                                 default=P.KnormPress(compression_ratio=0.5)),
    "composed": P.compose(P.KnormPress(compression_ratio=0.2), P.H2OPress(compression_ratio=0.375)),
    "h2o_cam_merge": P.H2OPress(compression_ratio=0.5, merge="cam"),
    "streaming_rerotate": P.StreamingLLMPress(compression_ratio=0.5, n_sink=2, rerotate=True),
}


WINDOWED = models.Observe(colsum=True, colsum_window=1, queries=4)
CUMULATIVE = models.Observe(colsum=True, queries=4)


def observe_for(press):
  return CUMULATIVE if press.observe.colsum and press.observe.colsum_window is None else WINDOWED


@pytest.fixture(scope="module")
def model():
  return helpers.tiny_model()


@pytest.fixture(scope="module")
def batch():
  tok = np.array(jax.random.randint(jax.random.key(3), (2, T), 1, 64), np.int32)
  mask = np.ones((2, T), np.int32)
  mask[1, :PAD] = 0
  tok[1, :PAD] = 0
  nxt = np.asarray([[5], [9]], np.int32)
  return jnp.asarray(tok), jnp.asarray(mask), jnp.asarray(nxt)


def _valid_positions(cache):
  """Per layer [B][Hkv] lists of the valid slots' positions."""
  return [helpers.kept_positions(c) for c in cache.layers()]


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_left_padded_batch_matches_each_prompt_alone(model, batch, name):
  press = PRESSES[name]
  tok, mask, nxt = batch
  # Batch of two, row 1 left-padded.
  _, cache, _ = models.prefill(model, tok, attention_mask=mask, press=press, decode_room=1,
                               logits="last", observe=observe_for(press))
  lengths = [T, T - PAD]
  np.testing.assert_array_equal(np.asarray(cache.next_position), lengths)
  kept = _valid_positions(cache)
  for layer, cap in zip(kept, cache.capacity):
    for b, heads in enumerate(layer):
      for pos in heads:
        # no pad slot, no duplicate, original positions only
        assert all(0 <= p < lengths[b] for p in pos) or name == "streaming_rerotate"
        assert len(set(pos)) == len(pos) and len(pos) <= cap - 1
  if name == "pyramidkv":  # lower layers keep more; the total is the uniform budget's
    assert cache.capacity[0] > cache.capacity[1]
    assert sum(cache.capacity) - 2 == 2 * (T // 2)
  logits, after = models.decode(model, nxt, cache, logits="last")
  # next position after eviction = original length, in every layer
  for c in after.layers():
    last = np.take_along_axis(np.asarray(c.positions), np.asarray(c.lengths)[..., None] - 1,
                              axis=2)[..., 0]
    np.testing.assert_array_equal(last, np.broadcast_to(np.asarray(lengths)[:, None], last.shape))
  # The padded prompt without any padding (two copies, the batch's capacity).
  alone_tok = jnp.concatenate([tok[1:, PAD:]] * 2)
  _, alone, _ = models.prefill(model, alone_tok, press=press, capacity=T, decode_room=1,
                               logits="last", observe=observe_for(press))
  assert alone.capacity == cache.capacity
  assert _valid_positions(alone) == [[layer[1], layer[1]] for layer in kept]
  logits_alone, _ = models.decode(model, nxt[1:].repeat(2, 0), alone, logits="last")
  np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(logits_alone[0]),
                             rtol=1e-5, atol=1e-5)


def test_padded_prompt_literally_alone(model, batch):
  tok, mask, nxt = batch
  press = PRESSES["snapkv"]
  _, cache, _ = models.prefill(model, tok, attention_mask=mask, press=press, decode_room=1,
                               logits="last", observe=WINDOWED)
  kept = [layer[1] for layer in _valid_positions(cache)]
  logits, _ = models.decode(model, nxt, cache, logits="last")
  _, alone = models.prefill(model, tok[1:, PAD:], press=press, decode_room=1, logits="last")
  assert alone.capacity == ((T - PAD) // 2 + 1,) * 2
  assert [layer[0] for layer in _valid_positions(alone)] == kept
  logits_alone, _ = models.decode(model, nxt[1:], alone, logits="last")
  np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(logits_alone[0]),
                             rtol=1e-5, atol=1e-5)


def test_savings_are_real(model, batch):
  tok, mask, _ = batch
  full = models.init_cache(model.config, 2, T + 5)
  _, small = models.prefill(model, tok, attention_mask=mask, press=PRESSES["knorm"],
                            capacity=T + 5, logits="last")
  assert small.capacity == (T // 2 + 5,) * 2
  assert small.nbytes < 0.61 * full.nbytes  # 15 of 25 slots per layer


def test_compression_ratio_zero_is_identity(model, batch):
  # Same capacity with and without the press: the cache and the next-token logits are
  # bit-identical (test_hand_cases checks ratio 0 on every press kind).
  tok, mask, nxt = batch
  _, ref = models.prefill(model, tok, attention_mask=mask, capacity=T + 1, logits="last")
  ref_arrays = [np.asarray(x) for x in jax.tree.leaves(ref)]
  ref_logits, _ = models.decode(model, nxt, ref, logits="last")
  _, cache = models.prefill(model, tok, attention_mask=mask, capacity=T + 1, decode_room=0,
                            press=P.KnormPress(compression_ratio=0.0), logits="last")
  for a, b in zip(ref_arrays, jax.tree.leaves(cache)):
    np.testing.assert_array_equal(a, np.asarray(b))
  logits, _ = models.decode(model, nxt, cache, logits="last")
  np.testing.assert_array_equal(np.asarray(ref_logits), np.asarray(logits))


def test_generate_with_press_uses_room_and_matches_manual_loop(model, batch):
  tok, mask, _ = batch
  press = PRESSES["knorm"]
  out = kvjax.generate(model, tok, attention_mask=mask, max_new_tokens=5, press=press)
  assert out.cache.capacity == (T // 2 + 5,) * 2
  logits, cache = models.prefill(model, tok, attention_mask=mask, press=press, decode_room=5,
                                 logits="last")
  ids = []
  for _ in range(5):
    nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    ids.append(np.asarray(nxt))
    logits, cache = models.decode(model, nxt[:, None], cache, logits="last")
  np.testing.assert_array_equal(out.tokens, np.stack(ids, 1))
  np.testing.assert_array_equal(np.asarray(out.cache.next_position), [T + 4, T - PAD + 4])


def test_decode_with_press_compresses_after_the_step(model, batch):
  tok, mask, nxt = batch
  _, cache = models.prefill(model, tok, attention_mask=mask, capacity=T + 1, logits="last")
  _, cache = models.decode(model, nxt, cache, logits="last", press=P.H2OPress(budget=8),
                           decode_room=2)
  assert cache.capacity == (10, 10)
  for c in cache.layers():
    np.testing.assert_array_equal(np.asarray(c.lengths), 8)
  np.testing.assert_array_equal(np.asarray(cache.next_position), [T + 1, T - PAD + 1])


def test_duo_attention_profiled_on_calibration_data(model, batch):
  tok, mask, _ = batch
  _, cache, obs = models.prefill(model, tok, attention_mask=mask, observe=WINDOWED,
                                 logits="last")
  scores = P.profile_head_scores(obs, np.asarray(cache.length[0]), n_sink=2, recent_size=4)
  assert scores.shape == (2, 2) and ((scores >= 0) & (scores <= 1)).all()
  press = P.DuoAttentionPress(head_compression_ratio=0.5, n_sink=2, recent_size=4,
                              head_scores=scores)
  _, pressed = models.prefill(model, tok, attention_mask=mask, press=press, logits="last")
  mask_ = press.streaming_mask()
  assert mask_.sum() == 2
  for layer, c in enumerate(pressed.layers()):
    ln = np.asarray(c.lengths)
    for h in range(2):
      want = np.minimum([T, T - PAD], 6) if mask_[layer, h] else [T, T - PAD]
      np.testing.assert_array_equal(ln[:, h], want)


def test_profile_head_scores_ranks_a_sink_head_as_streaming():
  col = np.zeros((1, 2, 10), np.float32)
  col[0, 0, [0, 9]] = 1.0   # head 0: all mass on the sink and the last slot
  col[0, 1, 5] = 1.0        # head 1: mass in the middle (a retrieval head)
  scores = P.profile_head_scores([{"colsum": col}], [10], n_sink=1, recent_size=2)
  np.testing.assert_allclose(scores, [[0.0, 1.0]])
  press = P.DuoAttentionPress(head_compression_ratio=0.5, head_scores=scores)
  np.testing.assert_array_equal(press.streaming_mask(), [[True, False]])
