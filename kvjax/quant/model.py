"""Model-level helpers: quantized ModelCaches, whole-model conversion, a converting "press".

    cache = init_model_cache(config, batch, capacity, kvjax.quant.kivi(2))     # all layers
    cache = init_model_cache(config, batch, capacity, ["int8", None, "kivi2"])   # per layer
    logits, cache = models.prefill(model, tokens, cache=cache)    # quantized as appended
    out = kvjax.generate(model, tokens, press=QuantizePress(kvjax.quant.int8()))

The config is duck-typed (kvjax never imports models): `num_layers`, `num_kv_heads`,
`head_dim`, and optionally `dtype` (cache dtype) and `rope` (filled into pre-RoPE specs).

A per-layer kind is one of: None (a dense cache / left as is), a QuantSpec, a preset name
(kvjax.quant.NAMES), or a callable -- `make(batch, kv_heads, capacity, head_dim, dtype)` for
`init_model_cache`, `convert(layer_cache)` for `quantize_model` (e.g. low-rank, ThinK).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from kvjax import cache as cache_lib
from kvjax.observation import Observe
from kvjax.quant import spec as spec_lib
from kvjax.quant.cache import QuantizedKVCache, quantize
from kvjax.quant.spec import QuantSpec


def resolve_spec(kind, config=None):
  """A preset name -> QuantSpec; pre-RoPE specs get the config's RopeConfig."""
  if isinstance(kind, str):
    kind = spec_lib.from_name(kind)
  if isinstance(kind, QuantSpec) and kind.pre_rope and kind.rope is None:
    rope = getattr(config, "rope", None)
    if rope is None:
      raise ValueError(f"spec {kind.label!r} is pre-RoPE and needs a rope config; pass "
                       "spec.replace(rope=...) or a config with `.rope`")
    kind = kind.replace(rope=rope)
  return kind


def per_layer(kinds, num_layers: int) -> list:
  """One kind -> [kind] * num_layers; a sequence must have num_layers entries."""
  if isinstance(kinds, (list, tuple)):
    if len(kinds) != num_layers:
      raise ValueError(f"got {len(kinds)} per-layer kinds; num_layers={num_layers}")
    return list(kinds)
  return [kinds] * num_layers


def layer_factory(config, batch: int, kinds, *, dtype=None):
  """fn(layer_index, capacity) -> empty layer cache, for models.init_cache(layer_factory=)."""
  dt = jnp.dtype(dtype or getattr(config, "dtype", "float32"))
  kinds = [resolve_spec(k, config) for k in per_layer(kinds, config.num_layers)]
  h, d = config.num_kv_heads, config.head_dim

  def make(i, cap):
    k = kinds[i]
    if k is None:
      return cache_lib.DenseKVCache.init(batch, h, cap, d, dt)
    if isinstance(k, QuantSpec):
      return QuantizedKVCache.init(batch, h, cap, d, k, dtype=dt)
    if callable(k):
      return k(batch, h, cap, d, dt)
    raise ValueError(f"layer {i}: kind {k!r}; allowed: None, a QuantSpec, a preset name "
                     f"{spec_lib.NAMES}, or a callable")
  return make


def init_model_cache(config, batch: int, capacity, kinds, *, dtype=None) -> cache_lib.ModelCache:
  """An empty ModelCache whose layers quantize as tokens are appended.

  Args:
    config: duck-typed model config (num_layers, num_kv_heads, head_dim[, dtype, rope]).
    batch: rows.
    capacity: tokens per layer (int) or per-layer ints.
    kinds: one kind for every layer, or one per layer (see module docstring).
    dtype: dtype of residual windows / dense layers (default config.dtype).
  """
  n = config.num_layers
  caps = per_layer(capacity if not isinstance(capacity, int) else int(capacity), n)
  make = layer_factory(config, batch, kinds, dtype=dtype)
  layers = [make(i, int(c)) for i, c in enumerate(caps)]
  return cache_lib.ModelCache.from_layers(layers, jnp.zeros((batch,), jnp.int32))


@functools.partial(jax.jit, static_argnames=("spec", "capacity"))
def _quantize_jit(layer, spec, capacity):
  return quantize(layer, spec, capacity=capacity)


def convert_layer(layer, kind, *, room: int = 0, config=None):
  """Converts one layer cache to `kind` (None = unchanged), adding `room` free slots.

  Layers that are neither dense nor compressed (e.g. sliding-window rings) are returned as
  they are: their size is already bounded.
  """
  kind = resolve_spec(kind, config)
  if kind is None or not cache_lib.caps(layer).convertible:
    return layer
  if isinstance(kind, QuantSpec):
    return _quantize_jit(layer, kind, layer.capacity + room)
  if callable(kind):
    return kind(layer)
  raise ValueError(f"kind {kind!r}; allowed: None, a QuantSpec, a preset name, a callable")


def quantize_model(model_cache: cache_lib.ModelCache, kinds, *, room: int = 0,
                   config=None) -> cache_lib.ModelCache:
  """Converts every layer (kinds: one for all, or one per layer); regroups the segments."""
  kinds = per_layer(kinds, model_cache.num_layers)
  new = [convert_layer(c, k, room=room, config=config)
         for c, k in zip(model_cache.layers(), kinds)]
  return cache_lib.ModelCache.from_layers(new, model_cache.next_position)


@dataclasses.dataclass(frozen=True)
class QuantizePress:
  """Converts the cache after a full-precision prefill: `models.prefill(press=...)` and
  `kvjax.generate(press=...)` take it like an eviction press (nothing is evicted).

  Attributes:
    kinds: one kind for every layer or a tuple with one per layer (module docstring).
  """

  kinds: Any

  @property
  def observe(self) -> Observe:
    return Observe()

  def compress_model(self, model_cache, obs_list=None, config=None, *, room: int = 0,
                     prompt_length: Optional[int] = None):
    del obs_list, prompt_length
    return quantize_model(model_cache, self.kinds, room=room, config=config)
