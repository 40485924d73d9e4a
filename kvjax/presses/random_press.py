"""Random eviction: the baseline every press should beat (kvpress's RandomPress).

Scores are uniform random numbers drawn from an explicit seed, folded with the layer, the
kv head and the slot's *token position*, so a row scores the same in a batch as alone and
a run is reproducible.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.presses import base, registry


@registry.register("random", query_agnostic=True)
@dataclasses.dataclass(frozen=True)
class RandomPress(base.ScorerPress):
  """Uniform random scores.

  Attributes:
    seed: PRNG seed (explicit: randomness only through keys).
  """

  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.seed, int):
      raise ValueError(f"seed={self.seed!r}; must be an int")

  def score(self, cache, obs, ctx):
    # compress_model passes the layer index as data (obs["layer_index"]) so one vmapped
    # call serves a whole stacked segment of layers.
    layer = obs.get("layer_index", ctx.layer_idx)
    key = jax.random.fold_in(jax.random.key(self.seed), layer)
    b, h, s = cache.positions.shape
    heads = jnp.broadcast_to(jnp.arange(h, dtype=jnp.int32)[None, :, None], (b, h, s))
    pos = jnp.maximum(cache.positions, 0)

    def one(hd, p):
      return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, hd), p))

    return jax.vmap(one)(heads.reshape(-1), pos.reshape(-1)).reshape(b, h, s)
