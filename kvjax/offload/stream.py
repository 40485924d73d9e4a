"""Layer streaming: per-layer caches live in host memory and are fetched layer by layer,
`prefetch` layers ahead, while the model runs (`stream_layers`); `HostCache` is a model's
whole cache held this way between forward passes.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from kvjax import cache as cache_lib
from kvjax.offload.placement import to_device, to_host
from kvjax.offload.spec import STREAM
from kvjax.offload.swap import HostCopy, swap_in, swap_out


# -- layer streaming with prefetch ---------------------------------------------------------------
def _fetch(host):
  """Host copy -> device (HostCopy: swap_in, dequantizing int8; else to_device)."""
  return swap_in(host) if isinstance(host, HostCopy) else to_device(host)


def _store(new, like):
  """Device -> host in the form of `like` (a HostCopy keeps its compression)."""
  if isinstance(like, HostCopy):
    return swap_out(new, compress=like.compress)
  return to_host(new)


def stream_layers(step_fn: Callable[[int, Any, Any], tuple], x, host_caches: Sequence[Any], *,
                  prefetch: int = 1, write_back: bool = True):
  """Runs layers whose caches live in host memory, prefetching the next ones.

  For each layer l: the device_put of layers l+1 .. l+prefetch is issued *before* layer l's
  compute is dispatched, so on an accelerator the copies run on the DMA engines while the
  device computes; the updated cache of layer l is sent back to the host asynchronously.

  Args:
    step_fn: fn(layer_index, x, device_cache) -> (x, new_device_cache); typically jitted.
    x: activations entering layer 0.
    host_caches: per-layer caches in host memory: trees (`to_host`) or HostCopy
      (`swap_out`, maybe int8: dequantized on the device after the fetch, quantized again
      on the device before the write-back).
    prefetch: layers fetched ahead (>= 0; 0 = fetch each layer just before it runs).
    write_back: return the updated caches in host memory, in the form they came in
      (else on the device).

  Returns: (x, new caches per layer).
  """
  if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
    raise ValueError(f"prefetch={prefetch!r}; must be an int >= 0")
  n = len(host_caches)
  inflight = {}

  def fetch(i):
    if i < n and i not in inflight:
      inflight[i] = _fetch(host_caches[i])

  out = []
  for i in range(n):
    fetch(i)                     # no-op when prefetched
    for j in range(i + 1, i + 1 + prefetch):
      fetch(j)                   # issued before layer i's compute is dispatched
    x, new = step_fn(i, x, inflight.pop(i))
    out.append(_store(new, host_caches[i]) if write_back else new)
  return x, out


@flax.struct.dataclass
class HostCache:
  """A model's per-layer caches held in host memory (one HostCopy per layer, layer order).

  Between forward passes no cache byte is on the device; a pass streams the layers in
  (stream_layers) with `prefetch` layers ahead, so the device holds at most prefetch + 1
  layers' caches at a time.

  Attributes:
    layers: tuple of HostCopy, one per layer (any layer cache kind, maybe int8-coded).
    next_position: [B] int32 (device), as ModelCache.next_position.
    prefetch: static, layers fetched ahead.
  """

  layers: tuple
  next_position: jax.Array
  prefetch: int = flax.struct.field(pytree_node=False, default=1)

  CAPS: ClassVar[cache_lib.Capabilities] = cache_lib.Capabilities(offloaded=True)
  offload_mode: ClassVar[str] = STREAM  # a step streams every layer through the device

  @classmethod
  def from_layers(cls, layers: Sequence[Any], next_position, *, compress: Optional[str] = None,
                  prefetch: int = 1, kind: Optional[str] = None) -> "HostCache":
    """Swaps device layer caches out (optionally int8-compressed)."""
    return cls(tuple(swap_out(c, compress=compress, kind=kind) for c in layers),
               jnp.asarray(next_position, jnp.int32), prefetch)

  @classmethod
  def from_model_cache(cls, cache: cache_lib.ModelCache, **kw) -> "HostCache":
    return cls.from_layers(cache.layers(), cache.next_position, **kw)

  def to_model_cache(self, keys=None) -> cache_lib.ModelCache:
    """Everything back on the device as a ModelCache (`keys`: the model's layer keys)."""
    return cache_lib.ModelCache.from_layers([swap_in(c) for c in self.layers],
                                            jnp.copy(self.next_position), keys=keys)

  @property
  def compress(self) -> Optional[str]:
    return self.layers[0].compress if self.layers else None

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  @property
  def batch(self) -> int:
    return int(self.next_position.shape[0])

  @property
  def host_nbytes(self) -> int:
    return sum(c.nbytes for c in self.layers)

  @property
  def nbytes(self) -> int:
    """Bytes held (all in host memory, next_position aside)."""
    return self.host_nbytes + cache_lib.tree_nbytes(self.next_position)

  def check_room(self, positions_new) -> None:
    for c in self.layers:
      check = getattr(c.tree, "check_room", None)
      if check is not None:
        check(positions_new)
