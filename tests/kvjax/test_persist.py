"""Compress once, ask many: saved caches load back bit-exactly, fork into a batch of
questions, and take new turns after compression with positions that continue from the
original length.

The references are independent of the cache path: a sliding-window model (window W) never
looks more than W tokens back, so a cache pressed down to its last W tokens must give the
same logits as the no-cache forward over the whole conversation -- but only if the new
tokens' positions continue from the original length (RoPE and the window mask use them).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax import persist, quant
from kvjax import safetensors_io as st_io
from kvjax.cache import DenseKVCache, fork
from kvjax.presses import StreamingLLMPress

W = 4
CFG = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=W,
                         architecture="MistralForCausalLM")
GEMMA2 = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf", "gemma2_local_global")
KEEP_LAST_W = StreamingLLMPress(budget=W, n_sink=0)


def assert_bit_exact(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb  # same kinds, static fields (window, QuantSpec, scan groups ...)
  for x, y in zip(la, lb):
    assert (x.dtype, x.shape) == (y.dtype, y.shape)
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def held_positions(cache, row=0):
  return [sorted(int(p) for p in np.asarray(c.positions[row, 0]) if p >= 0)
          for c in cache.layers()]


@pytest.fixture(scope="module")
def model_and_tokens():
  m = models.Transformer(CFG, rngs=nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(1), (1, 20), 0, 64, dtype=jnp.int32)
  return m, tok, np.asarray(m(tok))


def test_multi_turn_after_compression_with_a_round_trip(model_and_tokens, tmp_path):
  m, tok, full = model_and_tokens
  # Turn 1: 10-token context, pressed to its last W tokens + room for a 5-token turn.
  lg, cache = models.prefill(m, tok[:, :10], press=KEEP_LAST_W, decode_room=5,
                             window_cache=False)
  np.testing.assert_allclose(lg, full[:, :10], atol=1e-5)
  assert cache.capacity == (W + 5, W + 5)
  assert held_positions(cache) == [[6, 7, 8, 9]] * 2
  path = str(tmp_path / "ctx.safetensors")
  models.save_cache(m, cache, path, metadata={"note": "turn 1"})
  loaded, info = models.load_cache(m, path, return_info=True)
  assert_bit_exact(loaded, cache)
  assert info["user"]["note"] == "turn 1" and info["summary"]["next_position"] == [10]
  # Turn 2 on the loaded cache: a multi-token chunk at positions 10..14 (not 4..8).
  lg, cache = models.decode(m, tok[:, 10:15], loaded)
  np.testing.assert_allclose(lg, full[:, 10:15], atol=1e-5)
  np.testing.assert_array_equal(cache.next_position, [15])
  assert held_positions(cache) == [list(range(6, 15))] * 2
  # Compress again, then turn 3.
  cache = KEEP_LAST_W.compress_model(cache, None, m.config, room=5)
  assert held_positions(cache) == [[11, 12, 13, 14]] * 2
  lg, cache = models.decode(m, tok[:, 15:20], cache)
  np.testing.assert_allclose(lg, full[:, 15:20], atol=1e-5)
  np.testing.assert_array_equal(cache.next_position, [20])


def test_fork_one_context_into_a_batch_of_questions(model_and_tokens):
  m, tok, _ = model_and_tokens
  _, cache = models.prefill(m, tok[:, :10], press=KEEP_LAST_W, decode_room=5,
                            window_cache=False)
  before = jax.tree.map(np.asarray, cache)
  questions = jax.random.randint(jax.random.key(5), (3, 3), 0, 64, dtype=jnp.int32)
  batch = fork(cache, 3)
  assert batch.batch == 3 and batch.capacity == cache.capacity
  np.testing.assert_array_equal(batch.next_position, [10, 10, 10])
  lg, _ = models.decode(m, questions, batch)
  for i in range(3):
    ref = m(jnp.concatenate([tok[:, :10], questions[i:i + 1]], 1))[:, 10:]
    np.testing.assert_allclose(lg[i:i + 1], ref, atol=1e-5)
  assert_bit_exact(jax.tree.map(np.asarray, cache), before)  # forking left it untouched


def test_fork_layer_caches_and_errors():
  c = DenseKVCache.init(2, 1, 3, 4).append(jnp.ones((2, 1, 2, 4)), jnp.ones((2, 1, 2, 4)),
                                          jnp.array([[0, 1], [0, -1]], jnp.int32))
  f = fork(c, 2)
  np.testing.assert_array_equal(f.lengths[:, 0], [2, 2, 1, 1])  # row b -> rows 2b, 2b+1
  with pytest.raises(ValueError, match="n=0"):
    fork(c, 0)
  with pytest.raises(ValueError, match="batch-leading"):
    fork(c.replace(lengths=c.lengths.T), 2)


def test_quantized_and_ring_caches_round_trip_with_metadata(tmp_path):
  gemma = models.from_pretrained(GEMMA2, dtype="float32")
  ids = jnp.asarray(np.load(os.path.join(GEMMA2, "expected.npz"))["input_ids"], jnp.int32)
  _, cache = models.prefill(gemma, ids[:, :6], capacity=24)  # shapes of the parity tests
  mixed = quant.quantize_model(cache, quant.int8(), room=4)  # global: int8; rings stay
  for c, name in ((cache, "ring.safetensors"), (mixed, "int8.safetensors")):
    path = str(tmp_path / name)
    models.save_cache(gemma, c, path)
    back = models.load_cache(gemma, path)
    assert_bit_exact(back, c)
  info = persist.inspect(path)
  assert info["fingerprint"] == gemma.config.fingerprint()
  layers = info["summary"]["layers"]
  assert [l["kind"] for l in layers] == ["WindowKVCache", "QuantizedKVCache"] * 2
  assert layers[0]["capacity"] == 8 and layers[0]["static"] == {"n_sink": 0, "dilation": 1}
  assert layers[1]["static"]["spec"]["fields"]["k_bits"] == 8
  assert layers[0]["lengths"] == [[6, 6]] * 2 and layers[1]["lengths"] == [[6, 6]] * 2
  assert info["summary"]["grouping"] == [[4, 2]]
  # a model whose config differs: the error names the field
  other = models.Transformer(gemma.config.replace(sliding_window=6), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="sliding_window: saved 8, model 6"):
    models.load_cache(other, path)
  with pytest.raises(ValueError, match="saved for model config"):
    persist.load(path, fingerprint="0123")


def test_foreign_kinds_are_not_imported(tmp_path):
  path = str(tmp_path / "c.safetensors")
  c = DenseKVCache.init(1, 1, 2, 4)
  persist.save(path, c, fingerprint="abc")
  assert_bit_exact(persist.load(path)[0], c)
  meta = st_io.read_metadata(path)
  meta["tree"] = meta["tree"].replace("kvjax.cache:DenseKVCache", "os:system")
  tensors = {k: np.array(v) for k, v in st_io.read_safetensors(path).items()}
  st_io.write_safetensors(path, tensors, meta)
  with pytest.raises(ValueError, match="not a kvjax kind"):
    persist.load(path)
