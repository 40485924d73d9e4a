"""Model + inference API: cache decode equals the full forward, padding, errors, jit reuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from models import api

CFGS = {
    "llama_gqa2": models.ModelConfig(num_layers=2, num_heads=4, num_kv_heads=2,
                                     tie_word_embeddings=True),
    "qwen_bias_gqa4": models.ModelConfig(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8,
                                         attention_bias=True,
                                         architecture="Qwen2ForCausalLM"),
    "mistral_window": models.ModelConfig(num_layers=2, num_heads=4, num_kv_heads=1,
                                         sliding_window=5, architecture="MistralForCausalLM"),
    "mixed_layers": models.ModelConfig(num_layers=3, sliding_window=4,
                                       layer_types=("sliding_attention", "full_attention",
                                                    "sliding_attention")),
}


def build(cfg, seed=0):
  m = models.Transformer(cfg, rngs=nnx.Rngs(seed))
  if cfg.attention_bias:  # non-zero biases so they matter
    for n in ("bq", "bk", "bv"):
      p = getattr(m, n)
      p.value = jax.random.normal(jax.random.key(seed + 1), p.value.shape) * 0.1
  return m


def toks(b, t, seed=1, vocab=256):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, vocab, dtype=jnp.int32)


@pytest.mark.parametrize("name", sorted(CFGS))
def test_prefill_then_decode_equals_forward(name):
  m = build(CFGS[name])
  tok = toks(2, 12)
  full = m(tok)
  lg, cache = models.prefill(m, tok[:, :5], capacity=12)
  outs = [lg]
  lg2, cache = models.decode(m, tok[:, 5:7], cache)  # multi-token chunk
  outs.append(lg2)
  for i in range(7, 12):
    lg, cache = models.decode(m, tok[:, i:i + 1], cache)
    outs.append(lg)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  np.testing.assert_array_equal(cache.next_position, [12, 12])


def test_left_padding_matches_each_prompt_alone():
  m = build(CFGS["mixed_layers"])
  tok = toks(2, 10)
  mask = np.ones((2, 10), np.int32)
  mask[1, :4] = 0
  lg, cache = models.prefill(m, tok, attention_mask=mask, capacity=16, logits="last")
  alone = m(tok[1:, 4:])
  np.testing.assert_allclose(lg[1, 0], alone[0, -1], atol=1e-5)
  np.testing.assert_allclose(lg[0, 0], m(tok[:1])[0, -1], atol=1e-5)
  for layer in cache.layers():
    # sliding layers hold a ring of the last `window` tokens (kvjax.WindowKVCache)
    held = np.minimum([10, 6], layer.capacity)
    np.testing.assert_array_equal(layer.lengths[:, 0], held)
    pos1 = np.asarray(layer.positions[1, 0])
    # no pad slot entered the cache: row 1 holds exactly its last `held` positions
    np.testing.assert_array_equal(np.sort(pos1[pos1 >= 0]), np.arange(6 - held[1], 6))
  np.testing.assert_array_equal(cache.next_position, [10, 6])
  # decoding one more token continues each row at its own position
  nxt = jnp.array([[3], [3]], jnp.int32)
  lg2, _ = models.decode(m, nxt, cache)
  ref1 = m(jnp.concatenate([tok[1:, 4:], nxt[1:]], 1))[0, -1]
  np.testing.assert_allclose(lg2[1, 0], ref1, atol=1e-5)


def test_right_padding_prompt_lengths():
  m = build(CFGS["llama_gqa2"])
  tok = toks(2, 8)
  lg, _ = models.prefill(m, tok, prompt_lengths=jnp.array([8, 5]), logits="last")
  np.testing.assert_allclose(lg[1, 0], m(tok[1:, :5])[0, -1], atol=1e-5)


def test_per_layer_capacities_and_segments():
  m = build(CFGS["llama_gqa2"])
  tok = toks(1, 6)
  lg, cache = models.prefill(m, tok, capacity=[8, 10])
  assert cache.capacity == (8, 10)
  assert cache.segment_sizes == (1, 1)
  np.testing.assert_allclose(lg, m(tok), atol=1e-5)


def test_jit_once_per_shape():
  m = build(CFGS["llama_gqa2"])
  _, cache = models.prefill(m, toks(2, 6), capacity=20)
  before = api._run._cache_size()
  for i in range(4):
    _, cache = models.decode(m, toks(2, 1, seed=i), cache)
  assert api._run._cache_size() - before == 1


def test_bad_inputs():
  m = build(CFGS["llama_gqa2"])
  with pytest.raises(ValueError, match="integer"):
    m(jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match="rank 2"):
    m(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="capacity=3 is smaller than the prompt"):
    models.prefill(m, toks(1, 6), capacity=3)
  _, cache = models.prefill(m, toks(2, 4), capacity=5)
  with pytest.raises(ValueError, match="batch mismatch"):
    models.decode(m, toks(3, 1), cache)
  with pytest.raises(ValueError, match="overflow"):
    models.decode(m, toks(2, 2), cache)
  with pytest.raises(ValueError, match="num_heads"):
    models.ModelConfig(num_heads=3, num_kv_heads=2)
  with pytest.raises(ValueError, match="layer_types"):
    models.ModelConfig(num_layers=1, sliding_window=4, layer_types=("local",))
  with pytest.raises(ValueError, match="logits"):
    models.prefill(m, toks(1, 2), logits="first")


def test_generate_greedy_matches_manual_loop():
  m = build(CFGS["mistral_window"])
  tok = toks(2, 5)
  out = kvjax.generate(m, tok, max_new_tokens=6)
  seq = tok
  for _ in range(6):
    nxt = jnp.argmax(m(seq)[:, -1], -1).astype(jnp.int32)
    seq = jnp.concatenate([seq, nxt[:, None]], 1)
  np.testing.assert_array_equal(out.tokens, seq[:, 5:])
  assert out.cache.capacity == (5, 5)  # sliding layers: rings of exactly `window` slots


def test_generate_sampling_seeded_and_eos():
  m = build(CFGS["llama_gqa2"])
  tok = toks(2, 4)
  a = kvjax.generate(m, tok, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
  b = kvjax.generate(m, tok, max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  first = int(a.tokens[0, 1])
  c = kvjax.generate(m, tok[:1], max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3,
                     eos_id=first, pad_id=-1)
  # the row stops after emitting eos (if it appears) and pads afterwards
  row = list(c.tokens[0])
  if first in row:
    i = row.index(first)
    assert all(x == -1 for x in row[i + 1:])
    assert c.lengths[0] == i + 1
  with pytest.raises(ValueError, match="top_p"):
    kvjax.generate(m, tok, max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="capacity"):
    kvjax.generate(m, tok, max_new_tokens=8, capacity=6)


def test_top_p_keeps_nucleus_only():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  seen = set()
  for s in range(200):
    seen.add(int(kvjax.sample(logits, jax.random.key(s), temperature=1.0, top_p=0.7)[0]))
  assert seen == {0, 1}


def test_bfloat16_model_runs_finite():
  m = build(CFGS["llama_gqa2"].replace(dtype="bfloat16"))
  lg, cache = models.prefill(m, toks(1, 6), capacity=8)
  assert cache.layers()[0].k.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(lg)))
