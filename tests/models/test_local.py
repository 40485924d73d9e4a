"""Sliding-window (+ sinks), dilated and local/global models: cached == parallel, O(window)."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import cache as cache_lib
from kvjax.window import WindowKVCache
from models import local
from tests.models import family_checks as fc

ATTN = dict(num_heads=2, num_kv_heads=1, head_dim=16)


def test_sliding_with_sinks_and_global_layer_cached_equals_parallel():
  # window 4 < prompt, 1 sink, Gemma-2-like (sliding, global)
  cfg = local.SlidingConfig(**fc.BASE, **ATTN, num_layers=2, window=4, n_sink=1,
                            local_per_global=1)
  cache = fc.check_cached_equals_parallel(fc.build(cfg))
  kinds = [type(c).__name__ for c in cache.layers()]
  assert kinds == ["WindowKVCache", "DenseKVCache"]
  assert cache.capacity == (5, 13)  # ring: window + sinks; global: capacity


def test_all_dilated_local_cached_equals_parallel_and_memory_is_constant():
  cfg = local.DilatedConfig(**fc.BASE, **ATTN, num_layers=2, window=3, dilation=2,
                            n_sink=1, local_per_global=None)
  m = fc.build(cfg)
  fc.check_cached_equals_parallel(m)
  fc.check_constant_memory(m)
  # the dilated layer (span 6) holds only its 3 visible keys + the sink, like the sliding one
  ring = WindowKVCache.init(1, 1, 3, 16, n_sink=1)
  assert ring.capacity == 4
  assert fc.nbytes_at(m, 256) == 2 * ring.nbytes + 4  # + next_position


def test_window_layers_are_constant_and_global_layers_grow_by_their_kv():
  cfg = local.SlidingConfig(**fc.BASE, **ATTN, num_layers=4, window=8, n_sink=2,
                            local_per_global=3)
  m = fc.build_abstract(cfg)
  grow = fc.nbytes_at(m, 256) - fc.nbytes_at(m, 64)
  # one global layer: k + v (2 * Hkv * D float32) + positions (Hkv int32) per token
  per_token = 2 * 1 * 16 * 4 + 1 * 4
  assert grow == per_token * (256 - 64)
  ring = WindowKVCache.init(1, 1, 8, 16, n_sink=2)
  dense = cache_lib.DenseKVCache.init(1, 1, 64, 16)
  assert fc.nbytes_at(m, 64) == 3 * ring.nbytes + dense.nbytes + 4  # + next_position


def test_pattern_follows_the_ratio():
  cfg = local.LocalAttentionConfig(num_layers=12, local_per_global=5,
                                   local_kinds=("sliding", "dilated"))
  windows = [(m.window, m.dilation) for m in cfg.layer_mixers()]
  assert windows == [(64, 1), (64, 4), (64, 1), (64, 4), (64, 1), (None, 1)] * 2
  assert local.LocalAttentionConfig(local_per_global=0).pattern()[0].window is None


@pytest.mark.parametrize("kw, msg", [
    (dict(window=0), "window=0"),
    (dict(dilation=0), "dilation=0"),
    (dict(num_heads=3, num_kv_heads=2), "num_heads=3"),
    (dict(head_dim=15), "head_dim=15"),
    (dict(local_kinds=("strided",)), "'strided'"),
    (dict(local_per_global=-1), "local_per_global=-1"),
    (dict(hidden_size=0), "hidden_size=0"),
])
def test_bad_config_names_field_and_value(kw, msg):
  with pytest.raises(ValueError, match=msg):
    local.SlidingConfig(**kw)


def test_prefill_rejects_capacity_below_prompt_for_global_layers_only():
  cfg = local.SlidingConfig(**fc.BASE, **ATTN, num_layers=2, window=4, local_per_global=1)
  m = fc.build_abstract(cfg)
  with pytest.raises(ValueError, match="capacity=3"):
    m.prefill(fc.tokens(1, 5), capacity=3)
  with pytest.raises(ValueError, match="press"):
    m.prefill(fc.tokens(1, 5), press=object())
  all_local = fc.build_abstract(cfg.replace(local_per_global=None))
  assert not any(mx.bounded_by_capacity for mx in all_local.config.layer_mixers())


def test_generate_loop_serves_the_family_with_left_padding():
  # Given a sliding + global model and a left-padded batch
  cfg = local.SlidingConfig(**fc.BASE, **ATTN, num_layers=2, window=4, n_sink=1,
                            local_per_global=1)
  m = fc.build(cfg)
  tok = np.asarray(fc.tokens(2, 6, seed=3))
  mask = np.ones((2, 6), np.int32)
  mask[1, :3] = 0
  # When kvjax.generate decodes greedily
  out = kvjax.generate(m, jnp.asarray(tok), max_new_tokens=4, attention_mask=mask)
  # Then every generated token is the argmax of the parallel forward of the row alone
  seq = np.zeros((2, 13), np.int32)  # the cached check's shape: its forward compile is reused
  seq[0, :10] = np.concatenate([tok[0], out.tokens[0]])
  seq[1, :7] = np.concatenate([tok[1, 3:], out.tokens[1]])  # causal: trailing zeros unseen
  logits = np.asarray(fc.jit_forward(m)(jnp.asarray(seq)))
  np.testing.assert_array_equal(out.tokens[0], logits[0, 5:9].argmax(-1))
  np.testing.assert_array_equal(out.tokens[1], logits[1, 2:6].argmax(-1))
  assert out.cache.capacity == (5, 10)  # ring stays window + sinks; global = prompt + new
