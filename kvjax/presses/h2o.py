"""H2O: heavy-hitter oracle (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", arXiv:2306.14048).

Score = accumulated attention mass each slot received, summed over the queries of the
prompt and the query heads of its kv group: the attention's `colsum` output, computed
chunk by chunk inside attention (never an S x S matrix).

Differences from the paper: H2O splits the budget between heavy hitters and a recent
window; here the window is the `protect_recent` option (absolute size). `normalize=True`
divides by the number of queries that could see each slot, as kvpress's
ObservedAttentionPress does (an unnormalized sum favours early tokens).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.observation import Observe
from kvjax.presses import base, registry


@registry.register("h2o", query_agnostic=False, needs=("colsum",))
@dataclasses.dataclass(frozen=True)
class H2OPress(base.ScorerPress):
  """Cumulative attention (heavy hitters).

  Attributes:
    normalize: divide the mass by the number of queries that saw each slot
      (next position - the slot's position, for a causal prompt; positions, not slot
      indices, so it holds after earlier evictions).
  """

  normalize: bool = False

  @property
  def observe(self) -> Observe:
    return Observe(colsum=True)

  def score(self, cache, obs, ctx):
    del ctx
    col = obs["colsum"].astype(jnp.float32)
    if self.normalize:  # causal: the queries at positions p .. next - 1 saw position p
      nxt = base.next_positions(cache, obs)[:, None, None]
      seen = jnp.where(cache.positions >= 0, nxt - cache.positions, 1)
      col = col / jnp.maximum(seen, 1).astype(jnp.float32)
    return col
