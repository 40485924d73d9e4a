"""Griffin-style hybrids (RG-LRU or GLA + local attention): cached == parallel, O(1) memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import recurrent as rec_lib
from kvjax.window import WindowKVCache
from models import hybrid
from tests.models import family_checks as fc

ATTN = dict(num_heads=2, num_kv_heads=1, head_dim=16, window=4, n_sink=1)
RGLRU = hybrid.HybridConfig(**fc.BASE, **ATTN, num_layers=3, rglru_blocks=2)  # (r, r, a)


def test_rglru_hybrid_cached_equals_parallel_and_memory_is_constant():
  m = fc.build(RGLRU)
  cache = fc.check_cached_equals_parallel(m)
  fc.check_constant_memory(m)
  kinds = [(type(c).__name__, type(getattr(c, "rec", c)).__name__) for c in cache.layers()]
  assert kinds == [("ConvRecurrentState", "DiagonalState")] * 2 + [("WindowKVCache",) * 2]


def test_gla_hybrid_layers_and_state_sizes():
  # the GLA and local-attention mixers are checked cached == parallel in their own families
  cfg = hybrid.HybridConfig(**fc.BASE, **ATTN, num_layers=4, recurrent="gla",
                            gla_heads=2, key_dim=8, value_dim=8, chunk_size=4)
  kinds = [type(mx).__name__ for mx in cfg.layer_mixers()]
  assert kinds == ["GLAMixer", "GLAMixer", "AttentionMixer", "GLAMixer"]
  m = fc.build_abstract(cfg)
  fc.check_constant_memory(m)
  gla = rec_lib.LinearAttentionState.init(1, 2, 8, 8).nbytes
  ring = WindowKVCache.init(1, 1, 4, 16, n_sink=1).nbytes
  assert fc.nbytes_at(m, 64) == 3 * gla + ring + 4


def test_rglru_gradients_are_finite_at_saturated_decay():
  # a -> 1 makes sqrt(1 - a^2) non-differentiable at 0; the bounded derivative keeps the
  # block's gradients finite (recurrentgemma's stable sqrt)
  g = jax.grad(lambda x: hybrid.sqrt_bound_derivative(x, 1000.0))(0.0)
  assert np.isfinite(g) and g == pytest.approx(1000.0)
  mixer = RGLRU.pattern()[0]
  from models import decoder as dec  # pylint: disable=import-outside-toplevel
  p = mixer.init(dec.Draws(jnp.asarray(np.random.default_rng(0).standard_normal(10_000)),
                           jnp.asarray(np.random.default_rng(1).uniform(size=1_000))), RGLRU)
  p["a_param"] = jnp.full_like(p["a_param"], -30.0)  # softplus ~ 1e-13: a = 1 - 1e-12
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 32)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  ctx = dec.Ctx(RGLRU, "xla", False)

  @jax.jit
  def grads(p, x):
    return jax.grad(lambda p, x: jnp.sum(mixer(p, x, pos, None, None, ctx)[0] ** 2),
                    argnums=(0, 1))(p, x)

  leaves = jax.tree.leaves(grads(p, x))
  assert all(np.isfinite(np.asarray(l)).all() for l in leaves)
  assert any(np.abs(np.asarray(l)).max() > 0 for l in leaves)


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
