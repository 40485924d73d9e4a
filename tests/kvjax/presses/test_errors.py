"""Bad input gives a ValueError that names the argument and the allowed values."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import models
from kvjax import presses as P
from tests.kvjax.presses import helpers


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_ratio_outside_unit_interval(ratio):
  with pytest.raises(ValueError, match=r"compression_ratio=.*\[0, 1\)"):
    P.KnormPress(compression_ratio=ratio)
  with pytest.raises(ValueError, match=r"compression_ratios\[1\]=.*\[0, 1\)"):
    P.PerLayerCompressionPress(P.KnormPress(), (0.5, ratio))


def test_budget_larger_than_cache():
  cache = helpers.make_cache(s=12)
  with pytest.raises(ValueError, match=r"budget=13 is larger than the cache \(capacity=12\)"
                     r".*1\.\.12"):
    P.KnormPress(budget=13)(cache)
  with pytest.raises(ValueError, match="budget=0"):
    P.KnormPress(budget=0)
  with pytest.raises(ValueError, match="either compression_ratio"):
    P.KnormPress(compression_ratio=0.5, budget=3)


def test_window_larger_than_prompt():
  model = helpers.tiny_model()
  tok = jnp.ones((1, 6), jnp.int32)
  with pytest.raises(ValueError, match=r"window_size=6 must be smaller than the prompt "
                     r"length \(6\); allowed: 1\.\.5"):
    models.prefill(model, tok, press=P.SnapKVPress(compression_ratio=0.5, window_size=6))
  with pytest.raises(ValueError, match=r"window_size=12 must be smaller than the cache"):
    P.SnapKVPress(window_size=12, compression_ratio=.5)(helpers.make_cache(s=12),
                                                        {"colsum": jnp.ones((2, 2, 12))})


def test_press_needing_attention_statistics_without_them():
  cache = helpers.make_cache(s=12)
  for press in (P.H2OPress(compression_ratio=.5), P.SnapKVPress(compression_ratio=.5,
                                                                window_size=2),
                P.TOVAPress(compression_ratio=.5), P.AdaKVPress(P.H2OPress(compression_ratio=.5))):
    with pytest.raises(ValueError, match=r"needs attention statistics \(obs\['colsum'\]"):
      press(cache)
  with pytest.raises(ValueError, match=r"needs the last 4 queries"):
    P.ExpectedAttentionPress(compression_ratio=.5, query_window=4)(cache, rope=helpers.ROPE)
  with pytest.raises(ValueError, match=r"obs\['colsum'\] has shape \(2, 2, 5\); expected "):
    P.H2OPress(compression_ratio=.5)(cache, {"colsum": jnp.ones((2, 2, 5))})


def test_rope_needed():
  cache = helpers.make_cache(s=12)
  obs = helpers.make_obs(cache)
  with pytest.raises(ValueError, match="needs the model's RoPE config"):
    P.ExpectedAttentionPress(compression_ratio=.5, query_window=4)(cache, obs)
  with pytest.raises(ValueError, match="rerotate=True needs the model's RoPE config"):
    P.KnormPress(compression_ratio=.5, rerotate=True)(cache)


def test_other_options():
  with pytest.raises(ValueError, match=r"merge='avg'; allowed: \(None, 'cam', 'd2o'\)"):
    P.KnormPress(merge="avg")
  with pytest.raises(ValueError, match="kernel_size=4; must be odd"):
    P.SnapKVPress(kernel_size=4)
  with pytest.raises(ValueError, match=r"alpha_safeguard=2; must be in \[0, 1\]"):
    P.AdaKVPress(P.KnormPress(), alpha_safeguard=2)
  with pytest.raises(ValueError, match="needs a ScorerPress"):
    P.ChunkKVPress(P.DuoAttentionPress())
  with pytest.raises(ValueError, match="needs head_scores"):
    P.DuoAttentionPress(head_compression_ratio=.5)(helpers.make_cache())
  with pytest.raises(ValueError, match="conflicting colsum_window requests: 4 vs 1"):
    P.compose(P.SnapKVPress(window_size=4), P.TOVAPress())
  with pytest.raises(ValueError, match="compression_ratios has 1 entries; the model has "
                     "num_layers=2"):
    P.PerLayerCompressionPress(P.KnormPress(), (0.5,)).compress_model(
        models.init_cache(helpers.tiny_model().config, 1, 4))
  with pytest.raises(ValueError, match="target_size=0"):
    P.DecodingPress(P.KnormPress(), target_size=0)


def test_decode_room_arguments():
  model = helpers.tiny_model()
  tok = jnp.ones((1, 6), jnp.int32)
  with pytest.raises(ValueError, match=r"decode_room=-1; must be an int >= 0"):
    models.prefill(model, tok, press=P.KnormPress(), decode_room=-1)
  with pytest.raises(ValueError, match=r"decode_room=2 only applies with a press"):
    models.prefill(model, tok, decode_room=2)
