"""CLA and MLA: cached == parallel (MLA: absorbed decode == explicit heads), bytes per token."""

import jax
import pytest

from kvjax import cache as cache_lib
from models import api, kv_sharing
from models.config import ModelConfig
from tests.models import family_checks as fc

GQA = dict(num_heads=4, num_kv_heads=2, head_dim=16)


def baseline_bytes_per_token(num_layers):
  """The GQA transformer with the same attention shape (models.Transformer's own cache)."""
  cfg = ModelConfig(vocab_size=fc.VOCAB, hidden_size=32, intermediate_size=64,
                    num_layers=num_layers, **GQA)
  small = jax.eval_shape(lambda: api.init_cache(cfg, 1, 64))
  big = jax.eval_shape(lambda: api.init_cache(cfg, 1, 256))
  return (cache_lib.tree_nbytes(big) - cache_lib.tree_nbytes(small)) / 192


def test_cla_cached_equals_parallel_and_halves_the_cache():
  # 3 layers = (own, reuse) + a tail group (own): also exercises the decoder's tail
  cfg = kv_sharing.CLAConfig(**fc.BASE, **GQA, num_layers=3, share_factor=2)
  m = fc.build(cfg)
  cache = fc.check_cached_equals_parallel(m)
  assert cache.segment_sizes == (1, 1)  # 2 KV caches for 3 layers
  per_token = (fc.nbytes_at(m, 256) - fc.nbytes_at(m, 64)) / 192
  assert per_token == baseline_bytes_per_token(3) * 2 / 3
  cla4 = fc.build_abstract(cfg.replace(num_layers=4))
  assert (fc.nbytes_at(cla4, 256) - fc.nbytes_at(cla4, 64)) / 192 == (
      baseline_bytes_per_token(4) / 2)


def test_cla_reuse_layers_have_no_kv_projections():
  cfg = kv_sharing.CLAConfig(**fc.BASE, **GQA, num_layers=3, share_factor=3)
  m = fc.build_abstract(cfg)
  slots = m.groups[0]
  assert "wk" in slots[0]["mixer"] and "wk" not in slots[1]["mixer"]
  assert "wk" not in slots[2]["mixer"]


def test_mla_absorbed_decode_equals_explicit_forward_and_caches_the_latent():
  cfg = kv_sharing.MLAConfig(**fc.BASE, num_layers=2, num_heads=4, kv_lora_rank=8,
                             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
  m = fc.build(cfg)
  cache = fc.check_cached_equals_parallel(m)
  layer = cache.layers()[0]
  assert layer.c_kv.shape == (2, 13, 8) and layer.k_rope.shape == (2, 13, 4)
  per_token = (fc.nbytes_at(m, 256) - fc.nbytes_at(m, 64)) / 192
  # per layer and token: r + d_r float32 latents + one int32 position
  assert per_token == 2 * ((8 + 4) * 4 + 4)
  # vs GQA with Hkv=2, D=16: 2 layers * (2 * 2 * 16 * 4 + 2 * 4) = 528 -> 5.5x smaller
  assert baseline_bytes_per_token(2) / per_token == pytest.approx(528 / 104)


@pytest.mark.parametrize("cls, kw, msg", [
    (kv_sharing.CLAConfig, dict(share_factor=0), "share_factor=0"),
    (kv_sharing.CLAConfig, dict(share_factor=8, num_layers=4), "share_factor=8"),
    (kv_sharing.MLAConfig, dict(kv_lora_rank=0), "kv_lora_rank=0"),
    (kv_sharing.MLAConfig, dict(qk_rope_head_dim=5), "qk_rope_head_dim=5"),
    (kv_sharing.MLAConfig, dict(v_head_dim=-1), "v_head_dim=-1"),
])
def test_bad_config_names_field_and_value(cls, kw, msg):
  with pytest.raises(ValueError, match=msg):
    cls(**kw)
