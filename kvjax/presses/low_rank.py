"""Low-rank keys and values as a press: project each layer onto bases calibrated on its own
prompt (Chang et al., 2024, "Palu: Compressing KV-Cache with Low-Rank Projection",
arXiv:2407.21118; the basis here is the top eigenvectors of each kv head's key / value
second moment, kvjax.lowrank.calibrate_basis).

After the prompt each layer becomes a kvjax.lowrank.LowRankKVCache: keys and values stored
as rank-r latents, r = round((1 - compression_ratio) * head_dim), every token kept, `room`
free slots for decode (later tokens are projected onto the same bases).

Memory: the latents cost (1 - compression_ratio) of the dense K + V, but each (row, kv head)
also stores its two [D, r] bases, a fixed cost that matters for short prompts:
`kv_fraction(capacity, head_dim)` is the exact figure at a given length (the repr shows it
at 4096 tokens, head_dim 128).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from kvjax import lowrank
from kvjax.presses import base, registry


@registry.register("lowrank", query_agnostic=True)
@dataclasses.dataclass(frozen=True, repr=False)
class LowRankPress(base.Press):
  """Keys and values projected to calibrated rank-r bases (every token kept).

  Attributes:
    compression_ratio: fraction of the head dimension removed, in [0, 1).
    values: project the values too (False keeps them whole). True.
  """

  compression_ratio: float = 0.5
  values: bool = True

  def __post_init__(self):
    base.check_ratio("compression_ratio", self.compression_ratio)
    object.__setattr__(self, "compression_ratio", float(self.compression_ratio))

  def __repr__(self) -> str:
    return (f"LowRankPress(compression_ratio={self.compression_ratio:g}, "
            f"values={self.values}; kv bytes kept ~{self.kv_fraction(4096, 128):.3g} at "
            "4096 tokens, head_dim 128)")

  @property
  def layer_invariant(self) -> bool:
    return True

  def rank(self, head_dim: int) -> int:
    return max(1, int(round((1 - self.compression_ratio) * head_dim)))

  def kv_fraction(self, capacity: int, head_dim: int) -> float:
    """Bytes of the low-rank layer (latents + bases) over the dense K + V bytes, per
    (row, kv head) holding `capacity` tokens (same dtype; positions excluded)."""
    r = self.rank(head_dim)
    k = capacity * r + head_dim * r
    v = capacity * r + head_dim * r if self.values else capacity * head_dim
    return (k + v) / (2 * capacity * head_dim)

  def memory_fraction(self, capacity: int, *, num_layers=None, head_dim: int = 128) -> float:
    del num_layers
    return self.kv_fraction(capacity, head_dim)

  def layer_capacity(self, capacity: int, ctx: base.LayerContext = base.LayerContext()) -> int:
    del ctx
    return capacity

  def validate(self, *, capacity: int, prompt_length: Optional[int] = None,
               num_layers: Optional[int] = None) -> None:
    del prompt_length, num_layers
    base.check_nonneg_int("capacity", capacity, 1)

  def compress_layer(self, cache, obs: dict, ctx: base.LayerContext):
    base.check_layer_cache(self, cache)
    s, d = cache.positions.shape[-1], cache.k.shape[-1]
    r = self.rank(d)
    out = lowrank.lowrank_from_dense(cache, r, r if self.values else None,
                                     capacity=s + ctx.room)
    return out, base.pad_obs_room(obs, ctx.room)
