"""ThinK as a press: prune key channels after the prompt (Xu et al., 2024, "ThinK: Thinner
Key Cache by Query-Driven Pruning", arXiv:2407.21018).

Channel c of kv head h scores ||Q[:, c]|| * ||K[:, c]|| over the last `window` queries of
the prompt (kvjax.lowrank.think_channels); each layer becomes a kvjax.lowrank.PrunedKeyCache
holding the best `keep_ratio` fraction of the key channels, with every token kept and
`room` free slots for decode (later tokens are pruned to the same channels).

`compression_ratio` (the registry's ratio) is the fraction of *key channels* removed; the
values stay whole, so the cache's bytes shrink by about half that fraction (plus the kept
channel indices): `kv_fraction` is the real figure, and the repr says it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from kvjax import lowrank
from kvjax.observation import Observe
from kvjax.presses import base, registry


def _think_factory(cls, compression_ratio, **options):
  """Registry factory: the ratio is the fraction of key channels removed."""
  return cls(keep_ratio=1.0 - compression_ratio, **options)


@registry.register("think", query_agnostic=False, needs=("queries",), factory=_think_factory)
@dataclasses.dataclass(frozen=True, repr=False)
class ThinKPress(base.Press):
  """Query-driven key-channel pruning (every token kept, thinner keys).

  Attributes:
    keep_ratio: fraction of key channels kept, in (0, 1].
    window: last prompt queries whose channel norms are observed. 8.
  """

  keep_ratio: float = 0.5
  window: int = 8

  def __post_init__(self):
    if (isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float))
        or not 0 < self.keep_ratio <= 1):
      raise ValueError(f"keep_ratio={self.keep_ratio!r}; must be a float in (0, 1]")
    object.__setattr__(self, "keep_ratio", float(self.keep_ratio))
    base.check_nonneg_int("window", self.window, 1)

  def __repr__(self) -> str:
    return (f"ThinKPress(keep_ratio={self.keep_ratio:g}, window={self.window}; "
            f"kv bytes kept ~{self.kv_fraction():.3g})")

  @property
  def observe(self) -> Observe:
    return Observe(queries=self.window)

  @property
  def layer_invariant(self) -> bool:
    return True

  @property
  def compression_ratio(self) -> float:
    """Fraction of key channels removed (values untouched: see kv_fraction)."""
    return 1.0 - self.keep_ratio

  def keep_channels(self, head_dim: int) -> int:
    return max(1, int(round(self.keep_ratio * head_dim)))

  def kv_fraction(self, head_dim: int = 128) -> float:
    """Fraction of the dense K + V bytes per token that the pruned cache keeps."""
    return (self.keep_channels(head_dim) + head_dim) / (2 * head_dim)

  def memory_fraction(self, capacity: int, *, num_layers=None, head_dim: int = 128) -> float:
    del capacity, num_layers
    return self.kv_fraction(head_dim)

  def layer_capacity(self, capacity: int, ctx: base.LayerContext = base.LayerContext()) -> int:
    del ctx
    return capacity

  def validate(self, *, capacity: int, prompt_length: Optional[int] = None,
               num_layers: Optional[int] = None) -> None:
    del num_layers
    base.check_nonneg_int("capacity", capacity, 1)
    if prompt_length is not None and prompt_length < 1:
      raise ValueError(f"prompt_length={prompt_length}; ThinK needs at least one query")

  def compress_layer(self, cache, obs: dict, ctx: base.LayerContext):
    base.check_layer_cache(self, cache)
    base.require_observations(self, obs, cache)
    s, d = cache.positions.shape[-1], cache.k.shape[-1]
    out = lowrank.think_prune(cache, obs["queries"], self.keep_channels(d),
                              capacity=s + ctx.room)
    return out, base.pad_obs_room(obs, ctx.room)
