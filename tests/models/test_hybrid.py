"""Griffin-style hybrids (RG-LRU or GLA + local attention): cached == parallel, O(1) memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import recurrent as rec_lib
from models import hybrid
from tests.models import family_checks as fc

ATTN = dict(num_heads=2, num_kv_heads=1, head_dim=16, window=4, sink_tokens=1)
RGLRU = hybrid.HybridConfig(**fc.BASE, **ATTN, num_layers=3, rglru_blocks=2)  # (r, r, a)


def test_rglru_hybrid_cached_equals_parallel_and_memory_is_constant():
  m = fc.build(RGLRU)
  cache = fc.check_cached_equals_parallel(m)
  fc.check_constant_memory(m)
  kinds = [(type(c).__name__, type(getattr(c, "rec", c)).__name__) for c in cache.layers()]
  assert kinds == [("ConvRecurrentState", "DiagonalState")] * 2 + [("RingKVCache",) * 2]


def test_gla_hybrid_layers_and_state_sizes():
  # the GLA and local-attention mixers are checked cached == parallel in their own families
  cfg = hybrid.HybridConfig(**fc.BASE, **ATTN, num_layers=4, recurrent="gla",
                            gla_heads=2, key_dim=8, value_dim=8, chunk_size=4)
  kinds = [type(mx).__name__ for mx in cfg.layer_mixers()]
  assert kinds == ["GLAMixer", "GLAMixer", "AttentionMixer", "GLAMixer"]
  m = fc.build_abstract(cfg)
  fc.check_constant_memory(m)
  gla = rec_lib.LinearAttentionState.init(1, 2, 8, 8).nbytes
  ring = rec_lib.RingKVCache.init(1, 1, 16, window=4, sink_tokens=1).nbytes
  assert fc.nbytes_at(m, 64) == 3 * gla + ring + 4


def test_rglru_gradients_are_finite_at_saturated_decay():
  # a -> 1 makes sqrt(1 - a^2) non-differentiable; the bounded derivative keeps grads finite
  m = fc.build(RGLRU.replace(num_layers=1))  # a single RG-LRU block
  for group in m.groups:
    for slot in group:
      if "a_param" in slot["mixer"]:
        slot["mixer"]["a_param"][...] = jnp.full_like(slot["mixer"]["a_param"][...], -30.0)
  graphdef, state = nnx.split(m)
  tok = fc.tokens(2, 9)

  @jax.jit
  def grads(s):
    def loss(s):
      lg = nnx.merge(graphdef, s)(tok)
      return jnp.mean(jax.nn.logsumexp(lg, -1)
                      - jnp.take_along_axis(lg, tok[..., None], -1)[..., 0])
    return jax.grad(loss)(s)

  leaves = jax.tree.leaves(grads(state))
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)


def test_rglru_first_token_is_not_normalised():
  # at position 0 the RG-LRU input passes unscaled (recurrentgemma's reset): h_0 = i_0 * u_0
  a = jnp.full((1, 3, 2), 0.5)
  x = jnp.ones((1, 3, 2))
  h, last = rec_lib.diagonal_scan(a, x, jnp.zeros((1, 2)))
  np.testing.assert_allclose(h[0, :, 0], [1.0, 1.5, 1.75])
  np.testing.assert_allclose(last, h[:, -1])


@pytest.mark.parametrize("kw, msg", [
    (dict(recurrent="lstm"), "recurrent='lstm'"),
    (dict(lru_width=30, rglru_blocks=4), "lru_width=30"),
    (dict(window=0), "window=0"),
    (dict(num_heads=4, num_kv_heads=3), "num_heads=4"),
    (dict(recurrent_per_attention=-1), "recurrent_per_attention=-1"),
])
def test_bad_config_names_field_and_value(kw, msg):
  with pytest.raises(ValueError, match=msg):
    hybrid.HybridConfig(**kw)
