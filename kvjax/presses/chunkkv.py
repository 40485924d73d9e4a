"""ChunkKV: keep whole chunks of consecutive tokens (Liu et al., 2025, "ChunkKV:
Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference",
arXiv:2502.00299).

Wraps any ScorerPress: its scores are summed over kv heads and averaged over each chunk of
`chunk_length` slots (valid slots only); chunks are kept best-first, the same chunks for
every head. Parameter names follow kvpress's ChunkKVPress.

Difference from kvpress: kvpress keeps int(n_chunks * (1 - ratio)) whole chunks, so the
token count misses the budget; here the budget is honoured exactly: whole chunks are kept
best-first and the last chunk that does not fit is filled with its best tokens (the inner
scores break ties). Protected slots of the inner press still come first.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.presses import base, registry


@registry.register("chunkkv", query_agnostic=True, wraps="snapkv")
@dataclasses.dataclass(frozen=True)
class ChunkKVPress(base.ScorerWrapperPress):
  """Chunk-level selection over any scorer.

  Attributes:
    press: the ScorerPress that scores tokens (its budget and options apply).
    chunk_length: slots per chunk; default 20 (kvpress).
  """

  press: base.ScorerPress = None
  chunk_length: int = 20

  def __post_init__(self):
    self._check_scorer()
    base.check_nonneg_int("chunk_length", self.chunk_length, 1)

  def layer_capacity(self, capacity, ctx=base.LayerContext()):
    return self.press.layer_capacity(capacity, ctx)

  def chunk_scores(self, scores, valid):
    """[B, 1, S]: each slot's chunk score (mean over the chunk's valid slots, summed heads)."""
    b, h, s = scores.shape
    c = self.chunk_length
    n = -(-s // c)
    pad = n * c - s
    x = jnp.where(valid, jnp.nan_to_num(scores.astype(jnp.float32), neginf=0.0), 0.0)
    x = jnp.pad(jnp.sum(x, axis=1), ((0, 0), (0, pad))).reshape(b, n, c)
    any_valid = jnp.pad(jnp.any(valid, axis=1), ((0, 0), (0, pad))).reshape(b, n, c)
    mean = jnp.sum(x, -1) / jnp.maximum(jnp.sum(any_valid, -1), 1)
    per_slot = jnp.repeat(mean, c, axis=-1)[:, :s]
    return per_slot[:, None, :]

  def score(self, cache, obs, ctx):
    """Each slot's chunk score (what a budget rule wrapping ChunkKV ranks by)."""
    scores = self.press.score(cache, obs, ctx)
    return jnp.broadcast_to(self.chunk_scores(scores, base.valid_slots(cache)), scores.shape)

  def choose(self, cache, obs, ctx, table, scores):
    s = cache.positions.shape[-1]
    p = self.press
    valid = base.valid_slots(cache)
    chunk = jnp.broadcast_to(self.chunk_scores(scores, valid), scores.shape)
    n_sink, n_recent = p.protected()
    order = base.rank_slots(chunk, valid, base.protection_tiers(cache.lengths, s, n_sink,
                                                                n_recent), secondary=scores)
    keep = jnp.asarray(table)[cache.lengths]
    idx = base.take_kept(order, keep, max(1, int(table.max())), s)
    return base.finish(p, cache, obs, ctx, idx, keep)
