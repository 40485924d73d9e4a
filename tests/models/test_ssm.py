"""Mamba-2 (SSD): chunked scan == recurrent step, O(1) conv + SSM state, padding."""

import jax.numpy as jnp
import numpy as np
import pytest

from models import ssm
from tests.models import family_checks as fc

CFG = ssm.Mamba2Config(vocab_size=fc.VOCAB, hidden_size=32, num_layers=2, head_dim=16,
                       state_dim=8, chunk_size=4)


def test_cached_equals_parallel_and_state_is_constant():
  m = fc.build(CFG)
  cache = fc.check_cached_equals_parallel(m)
  fc.check_constant_memory(m)
  # conv window [B, K-1, E + 2N] (float32) + SSM state [B, E/P, N, P] float32, per layer
  e = 2 * 32
  per_layer = 2 * 3 * (e + 2 * 8) * 4 + 2 * (e // 16) * 8 * 16 * 4
  assert cache.nbytes == 2 * per_layer + 2 * 4


def test_forward_with_left_padding_mask_equals_row_alone():
  # the cache-free forward packs rows for the causal conv, so padding is not convolved
  m = fc.build(CFG)
  f = fc.jit_forward(m)
  tok = fc.tokens(2, 13)  # the shape of the cached check: its forward compile is reused
  alone = f(tok)
  padded = np.array(tok)
  padded[1, 3:] = tok[1, :10]
  padded[1, :3] = 7
  mask = np.ones((2, 13), np.int32)
  mask[1, :3] = 0
  got = f(jnp.asarray(padded), jnp.asarray(mask))
  np.testing.assert_allclose(got[0], alone[0], atol=2e-5)
  np.testing.assert_allclose(got[1, 3:], alone[1, :10], atol=2e-5)


@pytest.mark.parametrize("kw, msg", [
    (dict(hidden_size=40, head_dim=32), "inner_size=80"),
    (dict(ngroups=3), "ngroups=3"),
    (dict(expand=0), "expand=0"),
    (dict(conv_kernel=0), "conv_kernel=0"),
    (dict(state_dim=0), "state_dim=0"),
])
def test_bad_config_names_field_and_value(kw, msg):
  with pytest.raises(ValueError, match=msg):
    ssm.Mamba2Config(**kw)
