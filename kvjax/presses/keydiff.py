"""KeyDiff: keep keys least similar to the average key (Park et al., 2025, "KeyDiff:
Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments", arXiv:2504.15364).

anchor = mean of the L2-normalised valid keys of a head; score = -cos(k, anchor).
Same as kvpress's KeyDiffPress (the paper's block-wise iteration is not reproduced; like
kvpress, this scores the whole cache at once). The anchor averages valid slots only, so
padding never moves it.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.presses import base, registry


def _normalize(x, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@registry.register("keydiff", query_agnostic=True)
@dataclasses.dataclass(frozen=True)
class KeyDiffPress(base.ScorerPress):
  """Score = -cosine(k, mean normalised key)."""

  def score(self, cache, obs, ctx):
    del obs, ctx
    valid = base.valid_slots(cache)
    kn = _normalize(cache.k.astype(jnp.float32))
    w = valid.astype(jnp.float32)[..., None]
    anchor = jnp.sum(kn * w, axis=2, keepdims=True) / jnp.maximum(
        jnp.sum(w, axis=2, keepdims=True), 1.0)
    return -jnp.sum(kn * _normalize(anchor), axis=-1)
