"""TOVA: token omission via attention (Oren et al., 2024, "Transformers are Multi-State
RNNs", arXiv:2401.06104).

Score = attention of the *last* query, averaged over all query heads (so every kv head
keeps the same tokens, as in the paper and kvpress's TOVAPress). The last token is
protected (kvpress pads it with the max score). The attention comes from the `colsum`
output restricted to the last query (`colsum_window=1`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.observation import Observe
from kvjax.presses import base, registry


@registry.register("tova", query_agnostic=False, needs=("colsum",))
@dataclasses.dataclass(frozen=True)
class TOVAPress(base.ScorerPress):
  """Last-query attention averaged over heads."""

  @property
  def observe(self) -> Observe:
    return Observe(colsum=True, colsum_window=1)

  def protected(self):
    return self.n_sink, max(self.protect_recent, 1)

  def score(self, cache, obs, ctx):
    del ctx
    col = obs["colsum"].astype(jnp.float32)
    # Sum over kv heads of the group sums = sum over all query heads (mean up to scale).
    return jnp.broadcast_to(jnp.sum(col, axis=1, keepdims=True), col.shape)
