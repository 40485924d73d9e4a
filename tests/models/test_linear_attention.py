"""GLA / RetNet / Mamba-2-decay linear attention: chunked == recurrent, O(1) state."""

import numpy as np
import pytest

from models import linear_attention as la
from tests.models import family_checks as fc

DIMS = dict(num_heads=2, key_dim=8, value_dim=16, chunk_size=4)  # 13, 10, 5 not multiples of 4


# decay="mamba2" shares retnet's scalar-decay kernels; its gate is checked in closed form below
@pytest.mark.parametrize("cls", [la.GLAConfig, la.RetNetConfig])
def test_cached_equals_parallel_and_state_is_constant(cls):
  cfg = cls(**fc.BASE, **DIMS, num_layers=2)
  m = fc.build(cfg)
  cache = fc.check_cached_equals_parallel(m)
  fc.check_constant_memory(m)
  # the state is exactly [B, heads, key_dim, value_dim] float32 per layer
  state_bytes = 2 * 2 * 8 * 16 * 4
  assert cache.nbytes == 2 * state_bytes + 2 * 4
  assert cache.capacity == (0, 0)


def test_decays_have_the_documented_form():
  x = np.full((1, 3, 4), 0.5, np.float32)
  ret = la.GLAMixer(num_heads=3, decay="retnet").log_decay({}, x)          # [B, Hh, T]
  np.testing.assert_allclose(np.exp(ret[0, :, 1]), 1 - 2.0 ** (-5 - np.arange(3)), rtol=1e-6)
  p = {"wdt": np.ones((4, 2), np.float32), "dt_bias": np.array([0.0, -1.0], np.float32),
       "a_log": np.log(np.array([1.0, 4.0], np.float32))}
  m2 = la.GLAMixer(num_heads=2, decay="mamba2").log_decay(p, x)            # [B, Hh, T]
  dt = np.log1p(np.exp(np.array([2.0, 1.0])))                              # softplus(x W + b)
  np.testing.assert_allclose(m2[0, :, 0], -dt * np.array([1.0, 4.0]), rtol=1e-6)
  p = {"wa1": np.ones((4, 1), np.float32), "wa2": np.ones((1, 2 * 3), np.float32),
       "ba": np.zeros((6,), np.float32)}
  g = la.GLAMixer(num_heads=2, key_dim=3, decay="gla", gate_rank=1).log_decay(p, x)
  assert g.shape == (1, 2, 3, 3)                                           # per key dim
  np.testing.assert_allclose(g, np.log(1 / (1 + np.exp(-2.0))) / 16, rtol=1e-6)


@pytest.mark.parametrize("kw, msg", [
    (dict(decay="lstm"), "decay='lstm'"),
    (dict(key_dim=0), "key_dim=0"),
    (dict(key_dim=7, use_rope=True), "key_dim=7"),
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(num_heads=-2), "num_heads=-2"),
    (dict(gate_normalizer=0.0), "gate_normalizer=0.0"),
])
def test_bad_config_names_field_and_value(kw, msg):
  with pytest.raises(ValueError, match=msg):
    la.LinearAttentionConfig(**kw)
