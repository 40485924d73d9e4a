"""kvjax presses on Decoder families: the dense-KV layers of local/global, hybrid and CLA
models are pressed; the reference is the Llama `models.Transformer` with the same weights,
whose press path (`models.prefill(press=...)`) is tested against hand computations in
tests/kvjax/presses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax import cache as cache_lib
from kvjax import presses
from models import api
from models import decoder as dec
from models import from_llama
from models import hybrid
from models import linear_attention as la_lib
from models import local
from models.config import ModelConfig
from models.transformer import Transformer

W = 6
T = 24
TEACHER = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=W,
                      layer_types=("sliding_attention", "full_attention") * 2)


@pytest.fixture(scope="module")
def pair():
  """A Llama with (sliding, full) x 2 layers and the Decoder (local/global) with its weights."""
  tm = Transformer(TEACHER, rngs=nnx.Rngs(0))
  student = from_llama.student_config(local.SlidingConfig, TEACHER, window=W, n_sink=0,
                                      local_per_global=1)
  dm, fresh = from_llama.decoder_from_transformer(tm, student)
  assert not fresh
  return tm, dm


def _tokens(b=2, t=T, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 64, (b, t)), jnp.int32)


def _dense(cache):
  return [c for c in cache.layers() if isinstance(c, cache_lib.DenseKVCache)]


def _assert_same_dense_layers(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g.lengths, w.lengths)
    n = int(np.max(w.lengths))
    assert int(np.max(g.lengths)) == n
    np.testing.assert_array_equal(g.positions[..., :n], w.positions[..., :n])
    np.testing.assert_allclose(g.k[..., :n, :], w.k[..., :n, :], atol=1e-5)
    np.testing.assert_allclose(g.v[..., :n, :], w.v[..., :n, :], atol=1e-5)


def test_cache_layers_are_in_depth_order(pair):
  # Given a (sliding, global) x 2 Decoder: its cache stacks the two global layers together
  tm, dm = pair
  tok = _tokens()
  _, cache = dm.prefill(tok)
  # Then layers() lists them in depth order, and the dense ones hold what the Llama's do
  assert cache.layer_kinds == ("WindowKVCache", "DenseKVCache") * 2
  assert cache.segment_sizes == (2, 2) and cache.segment_periods == (2, 2)
  _, ref = api.prefill(tm, tok)
  _assert_same_dense_layers(_dense(cache), _dense(ref))


@pytest.mark.parametrize("press", [
    presses.SnapKVPress(compression_ratio=0.5, window_size=4),
    presses.KnormPress(compression_ratio=0.5),
    # per-layer budgets on the two global layers (padded to one capacity in their segment)
    presses.PerLayerCompressionPress(presses.KnormPress(), (0.25, 0.75)),
], ids=["snapkv", "knorm", "per_layer"])
def test_press_on_local_global_decoder_matches_llama(pair, press):
  tm, dm = pair
  tok = _tokens()
  # the Llama reference presses all 4 layers' slots (rings are skipped); per-layer ratios
  # are given for its 4 layers, the Decoder's for its 2 dense layers
  ref_press = press
  if isinstance(press, presses.PerLayerCompressionPress):
    ref_press = presses.PerLayerCompressionPress(press.press, (0.0, 0.25, 0.0, 0.75))
  # When both prefill with the press, leaving room for 3 decode steps
  lg, cache = dm.prefill(tok, press=press, capacity=T + 3)
  lg_ref, ref = api.prefill(tm, tok, press=ref_press, capacity=T + 3)
  # Then the prompt logits, the pressed dense layers and every decode step agree
  np.testing.assert_allclose(lg, lg_ref, atol=2e-5)
  _assert_same_dense_layers(_dense(cache), _dense(ref))
  assert max(c.capacity for c in _dense(ref)) == _dense(cache)[0].capacity
  assert cache.nbytes < dm.init_cache(2, T + 3).nbytes
  for i in range(3):
    nxt = _tokens(2, 1, seed=10 + i)
    lg, cache = dm.decode(nxt, cache)
    lg_ref, ref = api.decode(tm, nxt, ref)
    np.testing.assert_allclose(lg, lg_ref, atol=2e-5)


def test_generate_with_press_serves_decoder_like_llama(pair):
  tm, dm = pair
  tok = _tokens()
  press = presses.StreamingLLMPress(compression_ratio=0.5, n_sink=2)
  out = kvjax.generate(dm, tok, max_new_tokens=4, press=press)
  ref = kvjax.generate(tm, tok, max_new_tokens=4, press=press)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  assert _dense(out.cache)[0].capacity == T // 2 + 4


def test_press_on_hybrid_touches_only_its_global_layer():
  # Given a Griffin-like hybrid (rg-lru, rg-lru, global attention) x 2
  cfg = hybrid.HybridConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=6,
                            num_heads=2, num_kv_heads=1, head_dim=16, window=None,
                            rglru_blocks=2)
  m = dec.Decoder(cfg, rngs=nnx.Rngs(0))
  tok = _tokens()
  press = presses.KnormPress(compression_ratio=0.5)
  _, plain = m.prefill(tok)
  # When the hybrid is prefilled with the press
  _, cache = m.prefill(tok, press=press)
  # Then each global layer equals the press applied to that layer alone (kvjax's per-layer
  # API), and the recurrent layers are untouched
  kinds = cache.layer_kinds
  assert kinds == ("ConvRecurrentState",) * 2 + ("DenseKVCache",) + \
      ("ConvRecurrentState",) * 2 + ("DenseKVCache",)
  for i, (got, before) in enumerate(zip(cache.layers(), plain.layers())):
    if isinstance(got, cache_lib.DenseKVCache):
      want = press(before, layer_idx=[2, 5].index(i), num_layers=2)
      _assert_same_dense_layers([got], [want])
      assert got.capacity == T // 2
    else:
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_press_on_model_without_dense_layers_is_refused_by_name():
  cfg = la_lib.GLAConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=2, key_dim=8, value_dim=8, chunk_size=4)
  m = nnx.eval_shape(lambda: dec.Decoder(cfg, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="GLAConfig has no dense-KV layer.*LinearAttentionState"):
    m.prefill(_tokens(), press=presses.KnormPress(compression_ratio=0.5))
  with pytest.raises(ValueError, match="not a kvjax press"):
    m.prefill(_tokens(), press=object())
