"""LagKV: lag-relative scoring without attention (Liang et al., 2025, "LagKV: Lag-Relative
Information of the KV Cache Tells Which Tokens Are Important", arXiv:2504.04704).

After `n_sink` sink slots the sequence is cut into partitions of `lag_size`; partition p is
scored against partition p + 1 (its "lag" reference): each token's keys and values are
min-max normalised by the reference's per-channel range and scored by their standard
deviation over channels, softmaxed within the partition; key and value scores averaged.
The last full partition and the remainder (the tail) and the sinks score 1 (always
preferred). With `cross_scoring=False` scores become within-partition ranks / lag_size.
Rows shorter than n_sink + 2 * lag_size get recency scores (kvpress: no compression
signal; the budget still applies, like StreamingLLM). Same as kvpress's LagKVPress, with
partitions computed per row from that row's valid length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.presses import base, registry


def _lag_scores(x):
  """x [B, H, P, lag, D] -> [B, H, P-1, lag] scores of partitions 0..P-2 against the next."""
  ref = x[:, :, 1:]
  cur = x[:, :, :-1]
  lo = jnp.min(ref, axis=-2, keepdims=True)
  hi = jnp.max(ref, axis=-2, keepdims=True)
  span = jnp.where(hi - lo > 0, hi - lo, 1.0)
  z = (cur - lo) / span
  std = jnp.std(z, axis=-1, ddof=1)  # torch .std is unbiased
  return jax.nn.softmax(std, axis=-1)


@registry.register("lagkv", query_agnostic=True)
@dataclasses.dataclass(frozen=True)
class LagKVPress(base.ScorerPress):
  """Lag-relative scores (kvpress defaults).

  Attributes:
    n_sink: sink slots kept. 4.
    lag_size: partition length. 128.
    cross_scoring: keep raw softmax scores (comparable across partitions) instead of ranks.
  """

  n_sink: int = 4
  lag_size: int = 128
  cross_scoring: bool = False

  def __post_init__(self):
    super().__post_init__()
    base.check_nonneg_int("n_sink", self.n_sink)
    base.check_nonneg_int("lag_size", self.lag_size, 2)

  def protected(self):
    return self.n_sink, self.protect_recent

  def score(self, cache, obs, ctx):
    del obs, ctx
    b, h, s, d = cache.k.shape
    lag, sink = self.lag_size, self.n_sink
    slot = jnp.arange(s, dtype=jnp.int32)
    length = cache.lengths[..., None]
    # Fallback (short rows): recency after the sinks.
    denom = jnp.maximum(length - sink, 1).astype(jnp.float32)
    recency = (slot - sink).astype(jnp.float32) / denom
    out = jnp.where(slot < sink, 1.0, recency)
    n_part = (s - sink) // lag if s > sink else 0
    if n_part < 2:
      return out
    region = slice(sink, sink + n_part * lag)
    k = cache.k[:, :, region].astype(jnp.float32).reshape(b, h, n_part, lag, d)
    v = cache.v[:, :, region].astype(jnp.float32).reshape(b, h, n_part, lag, -1)
    sc = (_lag_scores(k) + _lag_scores(v)) / 2  # [B, H, P-1, lag]
    if not self.cross_scoring:
      sc = jnp.argsort(jnp.argsort(sc, axis=-1), axis=-1).astype(jnp.float32) / lag
    sc = jnp.pad(sc.reshape(b, h, (n_part - 1) * lag), ((0, 0), (0, 0), (sink, 0)),
                 constant_values=1.0)
    sc = jnp.pad(sc, ((0, 0), (0, 0), (0, s - sc.shape[-1])), constant_values=1.0)
    # Per row: partitions p <= n_full - 2 are scored; sinks and the tail score 1.
    n_full = (length - sink) // lag
    part = (slot - sink) // lag
    scored = (slot >= sink) & (part <= n_full - 2)
    lagged = jnp.where(scored, sc, 1.0)
    long_row = length >= sink + 2 * lag
    return jnp.where(long_row, lagged, out)
