"""Gemma 2 / Gemma 3 (text): logits parity with transformers, ring caches, scan groups.

The fixtures (tests/fixtures/hf/gemma2_local_global, gemma3_text; written by
tests/fixtures/make_hf_fixtures.py with torch + transformers) have a sliding window of 8 and
24-token sequences, so every local layer's ring cache wraps. Tolerance: 1e-4 in float32.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from kvjax import memory
from models import transformer as tfm
from tests.models.hf_fixtures import FIXTURES, TOL, check_full_forward, check_left_padded, load

CASES = ["gemma2_local_global", "gemma3_text"]


def hf_config(case):
  with open(os.path.join(FIXTURES, case, "config.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("case", CASES)
def test_full_forward_and_left_padded_batch(case):
  model, exp = load(case)
  assert exp["input_ids"].shape[1] > model.config.sliding_window
  check_full_forward(model, exp)
  check_left_padded(model, exp)


@pytest.mark.parametrize("case", CASES)
def test_prefill_then_token_by_token_decode_on_rings(case):
  """Short prefill, then one token at a time: every local ring wraps during decode."""
  model, exp = load(case)
  ids = jnp.asarray(exp["input_ids"], jnp.int32)
  t, w = ids.shape[1], model.config.sliding_window
  lg, cache = models.prefill(model, ids[:, :6], capacity=t)
  # global layers: dense, full capacity; local layers: rings of exactly `window` slots
  for i, (kind, cap) in enumerate(zip(cache.layer_kinds, cache.capacity)):
    local = model.config.layer_window(i) is not None
    assert (kind, cap) == (("WindowKVCache", w) if local else ("DenseKVCache", t))
  outs = [np.asarray(lg)]
  for i in range(6, t):
    lg, cache = models.decode(model, ids[:, i:i + 1], cache)
    outs.append(np.asarray(lg))
  np.testing.assert_allclose(np.concatenate(outs, 1), exp["logits"], atol=TOL, rtol=0)
  np.testing.assert_array_equal(cache.next_position, [t, t])
  for i, layer in enumerate(cache.layers()):
    held = w if model.config.layer_window(i) is not None else t
    np.testing.assert_array_equal(layer.length, np.full((2, model.config.num_kv_heads), held))


@pytest.mark.parametrize("case", CASES)
def test_left_padded_prefill_longer_than_window_then_chunk_and_tokens(case):
  """Left-padded prompt of 14 > window tokens, a 5-token chunk (> 1 token: ring + chunk
  attention), then single tokens; compared where attention_mask == 1."""
  model, exp = load(case)
  ids = jnp.asarray(exp["input_ids_leftpad"], jnp.int32)
  mask = exp["attention_mask"]
  lg, cache = models.prefill(model, ids[:, :14], attention_mask=jnp.asarray(mask[:, :14]),
                             capacity=24)
  outs = [np.asarray(lg)]
  lg, cache = models.decode(model, ids[:, 14:19], cache)
  outs.append(np.asarray(lg))
  for i in range(19, 24):
    lg, cache = models.decode(model, ids[:, i:i + 1], cache)
    outs.append(np.asarray(lg))
  sel = mask.astype(bool)
  np.testing.assert_allclose(np.concatenate(outs, 1)[sel], exp["logits_leftpad"][sel],
                             atol=TOL, rtol=0)
  np.testing.assert_array_equal(cache.next_position, mask.sum(-1))


def test_memory_report_shows_global_full_and_local_window_sized():
  model, exp = load("gemma2_local_global")
  ids = jnp.asarray(exp["input_ids"], jnp.int32)
  _, cache = models.prefill(model, ids, capacity=40)
  c = model.config
  b, h, d = 2, c.num_kv_heads, c.head_dim

  def dense_bytes(slots):  # k, v float32 + positions int32 + lengths int32
    return b * h * slots * (2 * d * 4 + 4) + b * h * 4

  ring = dense_bytes(c.sliding_window) + b * h * 4  # + the write counter `total`
  want = [ring, dense_bytes(40), ring, dense_bytes(40)]
  assert cache.layer_nbytes == tuple(want)
  rep = memory.report(cache)
  assert [r.layer for r in rep.layers] == [0, 1, 2, 3]
  assert [r.total for r in rep.layers] == want
  assert [r.capacity for r in rep.layers] == [8, 40, 8, 40]
  assert [r.kind for r in rep.layers] == ["WindowKVCache", "DenseKVCache"] * 2
  assert rep.total == cache.nbytes


# --- config translation -------------------------------------------------------------------
def test_layer_types_defaults_and_legacy_rope_keys():
  g2 = hf_config("gemma2_local_global")
  del g2["layer_types"]
  g2["num_hidden_layers"] = 5
  cfg = models.ModelConfig.from_hf_dict(g2)
  assert cfg.layer_types == ("sliding_attention", "full_attention") * 2 + ("sliding_attention",)
  assert cfg.query_pre_attn_scalar == 24 and cfg.attn_logit_softcapping == 50.0
  assert cfg.final_logit_softcapping == 30.0 and cfg.tie_word_embeddings
  g3 = hf_config("gemma3_text")
  cfg3 = models.ModelConfig.from_hf_dict(g3)
  assert cfg3.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
  assert cfg3.attn_logit_softcapping is None and cfg3.qk_norm
  assert (cfg3.layer_rope(0).theta, cfg3.layer_rope(2).theta) == (1e4, 1e6)
  # default pattern 6 when the config has neither layer_types nor sliding_window_pattern
  del g3["sliding_window_pattern"]
  g3["num_hidden_layers"] = 7
  assert models.ModelConfig.from_hf_dict(g3).layer_types == (
      ("sliding_attention",) * 5 + ("full_attention", "sliding_attention"))
  # legacy rope_scaling applies to the global layers only
  g3["rope_scaling"] = {"rope_type": "linear", "factor": 8.0}
  cfg = models.ModelConfig.from_hf_dict(g3)
  assert cfg.layer_rope(5).rope_type == "linear" and cfg.layer_rope(0).rope_type == "default"


def test_v5_rope_parameters_equal_legacy_keys_and_hf_dict_round_trips():
  legacy = hf_config("gemma3_text")
  v5 = {k: v for k, v in legacy.items()
        if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
  v5["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                           "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
  cfg = models.ModelConfig.from_hf_dict(legacy)
  assert models.ModelConfig.from_hf_dict(v5) == cfg
  for c in (cfg, models.ModelConfig.from_hf_dict(hf_config("gemma2_local_global"))):
    assert models.ModelConfig.from_hf_dict(c.to_hf_dict()) == c


def test_unknown_layer_type_and_unsupported_options_raise():
  g2 = hf_config("gemma2_local_global")
  g2["layer_types"] = ["sliding_attention", "chunked_attention", "full_attention",
                       "full_attention"]
  with pytest.raises(ValueError, match="unknown layer_types entry 'chunked_attention'"):
    models.ModelConfig.from_hf_dict(g2)
  g3 = hf_config("gemma3_text")
  g3["use_bidirectional_attention"] = True
  with pytest.raises(ValueError, match="use_bidirectional_attention"):
    models.ModelConfig.from_hf_dict(g3)


# --- scan over the repeating group ------------------------------------------------------
def _gemma2_like(num_layers):
  return models.ModelConfig(
      vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=num_layers, num_heads=2,
      num_kv_heads=1, head_dim=8, sliding_window=4, architecture="Gemma2ForCausalLM",
      layer_types=("sliding_attention", "full_attention") * (num_layers // 2),
      norm_unit_offset=True, embed_scale=True, sandwich_norms=True, query_pre_attn_scalar=8,
      attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True,
      hidden_act="gelu_pytorch_tanh")


def _scan_body_sizes(num_layers):
  """(repetitions, body equations) of each scan in the traced forward (abstract: no init)."""
  model = nnx.eval_shape(lambda: models.Transformer(_gemma2_like(num_layers), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  cache = jax.eval_shape(lambda: models.init_cache(model.config, 1, 8))
  assert cache.grouping == ((num_layers, 2),)  # one group: period 2 (local, global)
  tok = jnp.zeros((1, 3), jnp.int32)
  pos = jnp.arange(3, dtype=jnp.int32)[None]
  jaxpr = jax.make_jaxpr(lambda s, c: tfm.forward(nnx.merge(graphdef, s), tok, pos, c)[:2])(
      state, cache)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  return [(e.params["length"], len(e.params["jaxpr"].jaxpr.eqns)) for e in scans]


def test_alternating_layers_scan_over_the_period_so_trace_is_flat_in_depth():
  shallow, deep = _scan_body_sizes(4), _scan_body_sizes(12)
  assert len(shallow) == len(deep) == 1
  assert shallow[0][0] == 2 and deep[0][0] == 6   # repetitions of the (local, global) pair
  assert shallow[0][1] == deep[0][1]               # same body: compile cost flat in depth
