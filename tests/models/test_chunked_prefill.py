"""models.prefill(chunk_size=C): the prompt C tokens at a time, compressed after each chunk.

Reference for the pressed path (independent of the cache code): a sliding-window model
(window W) never looks more than W tokens back, so a cache pressed to its last W tokens
after every chunk must give exactly the no-cache forward's logits at every position.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax.presses import StreamingLLMPress
from models import api

W = 4
MISTRAL = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=W,
                             architecture="MistralForCausalLM")
LLAMA = MISTRAL.replace(sliding_window=None, architecture="LlamaForCausalLM")
GEMMA2 = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf", "gemma2_local_global")


def toks(b, t, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 64, dtype=jnp.int32)


def test_without_press_equals_one_shot_left_padded_and_chunk_ge_prompt_is_one_shot():
  m = models.Transformer(LLAMA, rngs=nnx.Rngs(0))
  tok = toks(2, 11)
  mask = np.ones((2, 11), np.int32)
  mask[1, :4] = 0
  one, c1 = models.prefill(m, tok, attention_mask=mask, capacity=14)
  chunked, c2 = models.prefill(m, tok, attention_mask=mask, capacity=14, chunk_size=4)
  sel = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(chunked)[sel], np.asarray(one)[sel], atol=1e-5)
  for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_array_equal(c2.next_position, [11, 7])
  # logits="last" takes each row's last token from whichever chunk holds it
  kw = dict(prompt_lengths=jnp.array([11, 6]), capacity=14, chunk_size=4)  # row 1 ends in chunk 2
  every, _ = models.prefill(m, tok, **kw)
  last, _ = models.prefill(m, tok, logits="last", **kw)
  np.testing.assert_allclose(last[:, 0], np.asarray(every)[[0, 1], [10, 5]], atol=1e-5)
  # chunk_size >= prompt length runs the one-shot path: bit-identical
  same, c3 = models.prefill(m, tok, attention_mask=mask, capacity=14, chunk_size=11)
  np.testing.assert_array_equal(same, one)
  for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c3)):
    np.testing.assert_array_equal(a, b)


def test_press_inside_the_loop_bounds_memory_and_keeps_logits(monkeypatch):
  m = models.Transformer(MISTRAL, rngs=nnx.Rngs(0))
  tok = toks(2, 14, seed=3)
  lengths = np.array([14, 9])                       # per-row prompts (right padding)
  seen = []
  run = api._run

  def spy(graphdef, state, tokens, positions, cache, **kw):
    seen.append(cache.capacity)
    return run(graphdef, state, tokens, positions, cache, **kw)

  monkeypatch.setattr(api, "_run", spy)
  press = StreamingLLMPress(budget=W, n_sink=0)
  lg, cache = models.prefill(m, tok, prompt_lengths=lengths, press=press, chunk_size=3,
                             decode_room=2, window_cache=False)
  # KV memory: never more than the budget + one chunk per layer (here W + 3)
  assert max(max(c) for c in seen) <= W + 3 and len(seen) == 5
  assert cache.capacity == (W + 2, W + 2)
  for b in range(2):
    ref = m(tok[b:b + 1, :lengths[b]])
    np.testing.assert_allclose(lg[b:b + 1, :lengths[b]], ref, atol=1e-5)
  np.testing.assert_array_equal(cache.next_position, lengths)
  # decoding continues at each row's own position
  nxt = jnp.array([[5], [6]], jnp.int32)
  lg2, _ = models.decode(m, nxt, cache)
  for b in range(2):
    ref = m(jnp.concatenate([tok[b:b + 1, :lengths[b]], nxt[b:b + 1]], 1))[:, -1]
    np.testing.assert_allclose(lg2[b, 0], ref[0], atol=1e-5)


def test_gemma2_rings_chunked_matches_transformers():
  m = models.from_pretrained(GEMMA2, dtype="float32")
  exp = np.load(os.path.join(GEMMA2, "expected.npz"))
  lg, cache = models.prefill(m, jnp.asarray(exp["input_ids"], jnp.int32), chunk_size=5)
  np.testing.assert_allclose(lg, exp["logits"], atol=1e-4, rtol=0)
  assert cache.capacity == (8, 24, 8, 24)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_bad_chunk_size_raises(bad):
  m = models.Transformer(LLAMA, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="chunk_size"):
    models.prefill(m, toks(1, 5), chunk_size=bad)
