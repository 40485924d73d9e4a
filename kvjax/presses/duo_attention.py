"""DuoAttention: retrieval heads keep everything, streaming heads keep sinks + a recent
window (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with
Retrieval and Streaming Heads", arXiv:2410.10819).

`head_scores[layer][kv_head]` (high = retrieval head) is the per-head pattern: given (e.g.
the paper's learned gates), or profiled on calibration data with `profile_head_scores`.
The lowest `head_compression_ratio` fraction of all heads become streaming heads. Names
and defaults follow kvpress's DuoAttentionPress (sink 128 / recent 256 are its on-the-fly
defaults).

Memory: a layer's capacity pads to its largest head, so a layer saves memory only when all
its kv heads are streaming heads (then its capacity is n_sink + recent_size); mixed
layers keep capacity S with streaming heads holding fewer valid slots. The bytes are
therefore not 1 - head_compression_ratio of the dense cache's but the mean over layers of
(all-streaming ? min(S, sink + recent) : S) / S: `memory_fraction` is that exact figure and
the repr quotes it.

The profiler is a simple stand-in for the paper's gate training (and kvpress's
on-the-fly scorer): for each kv head, the share of the last queries' attention mass that
falls *outside* the sinks and the recent window, averaged over calibration rows. A head
whose mass stays in sinks + recent loses little as a streaming head.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from kvjax.presses import base, registry


def profile_head_scores(obs_list: Sequence[dict], lengths, *, n_sink: int,
                        recent_size: int) -> np.ndarray:
  """Per-(layer, kv head) retrieval scores [L, Hkv] from calibration observations.

  Args:
    obs_list: per-layer observations with "colsum" [B, Hkv, S] from a calibration prefill
      (models.prefill(..., observe=Observe(colsum=True, colsum_window=W))).
    lengths: [B] (or [B, Hkv]) valid slots per row (e.g. cache.length[0]).
    n_sink, recent_size: the streaming region (slots < sink or within the last recent).

  Returns: float64 [L, Hkv]: mean fraction of attention mass outside the streaming region.
  """
  out = []
  lengths = np.asarray(lengths)
  for obs in obs_list:
    if obs.get("colsum") is None:
      raise ValueError("profile_head_scores needs obs['colsum'] for every layer "
                       "(prefill with observe=Observe(colsum=True, colsum_window=W))")
    col = np.asarray(obs["colsum"], np.float64)
    b, h, s = col.shape
    ln = lengths if lengths.ndim == 2 else np.broadcast_to(lengths[:, None], (b, h))
    slot = np.arange(s)
    valid = slot[None, None] < ln[..., None]
    stream = (slot[None, None] < n_sink) | (slot[None, None] >= ln[..., None] - recent_size)
    total = np.maximum((col * valid).sum(-1), 1e-30)
    outside = (col * (valid & ~stream)).sum(-1)
    out.append((outside / total).mean(0))
  return np.stack(out)


def _duo_factory(cls, compression_ratio, **options):
  """Registry factory: the ratio is the fraction of heads that become streaming heads."""
  return cls(head_compression_ratio=compression_ratio, **options)


@registry.register("duo_attention", query_agnostic=True, needs=("head_scores",),
                   factory=_duo_factory)
@dataclasses.dataclass(frozen=True, repr=False)
class DuoAttentionPress(base.Press):
  """Retrieval (full) heads vs streaming (sink + recent) heads.

  Attributes:
    head_compression_ratio: fraction of (layer, kv head) pairs that become streaming heads.
    n_sink: first slots a streaming head keeps. 128.
    recent_size: last slots a streaming head keeps. 256.
    head_scores: [num_layers][num_kv_heads] retrieval scores (tuple of tuples, or any
      array-like; stored as nested tuples so the press stays hashable).
  """

  head_compression_ratio: float = 0.0
  n_sink: int = 128
  recent_size: int = 256
  head_scores: Optional[tuple] = None

  def __post_init__(self):
    if not isinstance(self.head_compression_ratio, (int, float)) or not (
        0 <= self.head_compression_ratio <= 1):
      raise ValueError(f"head_compression_ratio={self.head_compression_ratio!r}; must be in "
                       "[0, 1]")
    base.check_nonneg_int("n_sink", self.n_sink)
    base.check_nonneg_int("recent_size", self.recent_size)
    if self.head_scores is not None:
      arr = np.asarray(self.head_scores, np.float64)
      if arr.ndim != 2:
        raise ValueError(f"head_scores must be [num_layers, num_kv_heads]; got shape "
                         f"{arr.shape}")
      object.__setattr__(self, "head_scores", tuple(tuple(float(x) for x in row) for row in arr))

  def streaming_mask(self) -> np.ndarray:
    """bool [L, Hkv]: True for streaming heads (the lowest-scoring fraction)."""
    if self.head_scores is None:
      raise ValueError("DuoAttentionPress needs head_scores (a [num_layers, num_kv_heads] "
                       "pattern): pass one, or profile with profile_head_scores")
    scores = np.asarray(self.head_scores)
    n = int(round(scores.size * self.head_compression_ratio))
    mask = np.zeros(scores.shape, bool)
    if n:
      order = np.argsort(scores, axis=None, kind="stable")[:n]
      mask[np.unravel_index(order, scores.shape)] = True
    return mask

  def __repr__(self) -> str:
    if self.head_scores is None:
      return (f"DuoAttentionPress(head_compression_ratio={self.head_compression_ratio!r}, "
              f"n_sink={self.n_sink}, recent_size={self.recent_size}, head_scores=None)")
    return base.repr_with_memory(self)

  def memory_fraction(self, capacity, *, num_layers=None, head_dim=128) -> float:
    """Mean over the pattern's layers of kept capacity / capacity (see the module doc)."""
    del head_dim
    n = len(self.streaming_mask())
    if num_layers is not None and num_layers != n:
      raise ValueError(f"num_layers={num_layers}; head_scores has {n} layers")
    return sum(self.layer_capacity(capacity, base.LayerContext(layer_idx=i, num_layers=n))
               for i in range(n)) / (n * capacity)

  def layer_capacity(self, capacity, ctx=base.LayerContext()):
    mask = self.streaming_mask()[ctx.layer_idx]
    if mask.all():
      return max(1, min(capacity, self.n_sink + self.recent_size))
    return capacity

  def validate(self, *, capacity: int, prompt_length: Optional[int] = None,
               num_layers: Optional[int] = None) -> None:
    del capacity, prompt_length
    mask = self.streaming_mask()
    if num_layers is not None and mask.shape[0] != num_layers:
      raise ValueError(f"head_scores has {mask.shape[0]} layers; the model has {num_layers}")

  @property
  def compression_ratio(self) -> float:
    """Fraction of heads that are streaming (kvpress reports slots; that needs a length)."""
    return float(self.streaming_mask().mean())

  def compress_layer(self, cache, obs, ctx):
    base.check_layer_cache(self, cache)
    s = cache.positions.shape[-1]
    self.validate(capacity=s, num_layers=ctx.num_layers)
    mask = self.streaming_mask()[ctx.layer_idx]
    if mask.shape[0] != cache.positions.shape[1]:
      raise ValueError(f"head_scores has {mask.shape[0]} kv heads in layer {ctx.layer_idx}; "
                       f"the cache has {cache.positions.shape[1]}")
    window = self.n_sink + self.recent_size
    if not mask.any() or window >= s:
      return base.pad_room(cache, ctx.room), base.pad_obs_room(obs, ctx.room)
    streaming = jnp.asarray(mask)[None, :]
    keep = jnp.where(streaming, jnp.minimum(cache.lengths, window), cache.lengths)
    recency = jnp.broadcast_to(jnp.arange(s, dtype=jnp.float32), cache.positions.shape)
    order = base.rank_slots(recency, base.valid_slots(cache),
                            base.protection_tiers(cache.lengths, s, self.n_sink, 0))
    idx = base.take_kept(order, keep, self.layer_capacity(s, ctx), s)
    return base.finish(self, cache, obs, ctx, idx, keep)
