"""KNorm: keep keys with the smallest L2 norm (Devoto et al., 2024, "A Simple and Effective
L2 Norm-Based Strategy for KV Cache Compression", arXiv:2406.11430).

Low key norm correlates with high attention, so score = -||k||. Needs no attention
statistics. Same as kvpress's KnormPress.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.presses import base, registry


@registry.register("knorm", query_agnostic=True)
@dataclasses.dataclass(frozen=True)
class KnormPress(base.ScorerPress):
  """Score = -||k||_2 per slot."""

  def score(self, cache, obs, ctx):
    del obs, ctx
    k = cache.k.astype(jnp.float32)
    return -jnp.sqrt(jnp.sum(k * k, axis=-1))
