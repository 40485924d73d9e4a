"""Sharded caches on a `jax.sharding.Mesh` with axes ("data", "model").

Caches shard over kv heads on `model` (tensor parallel: each device holds the keys and
values of its heads, which is exactly what its slice of the q/k/v projections produces)
and over batch rows on `data` (data parallel). Attention needs no communication under
this layout: query head h reads kv head h // G, and the reshape [Hq] -> [Hkv, G] keeps
each device's query heads with its kv heads as long as both head axes are split the same
number of ways. XLA's SPMD partitioner then runs `models.prefill/decode` unchanged:

    mesh = kvjax.sharding.make_mesh(data=2, model=4)
    cache = kvjax.sharding.shard(models.init_cache(cfg, batch, capacity), mesh)
    logits, cache = models.prefill(model, tokens, cache=cache)   # computation follows data

`cache_sharding(cache, mesh)` returns the NamedSharding pytree (for `jax.device_put`,
`jit(out_shardings=...)` or `with_sharding_constraint`). Placement of a leaf:

  * a kind may declare `PARTITION = {field: per-dim mesh axes}`, or a method
    `partition_axes(mesh)` returning that dict (kvjax.paged does: the page pool
    [N, Hkv, P, D] shards heads over `model`; a pool built with `partitions=S` (S a multiple
    of the mesh's data size) also shards its pages over `data`, one partition per data
    shard, each serving its own rows, so no page ever crosses devices; a single-partition
    pool is replicated over `data`; tables [B, M] shard over `data`);
  * otherwise the cache conventions decide: a leaf whose leading dims are [B, Hkv, ...]
    gets ("data", "model"), one that starts with [B] gets ("data",), others are replicated.
    B and Hkv come from the kind's `lengths` [B, Hkv] (DenseKVCache, QuantizedKVCache and
    every kind following docs/CONVENTIONS.md).

Leaves of a `ModelCache` segment carry a leading layer axis, which is never sharded.
An axis whose size the mesh axis does not divide stays replicated (correct, only less
parallel); `strict=True` raises instead.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
try:
  from jax.experimental import mesh_utils
except ImportError:  # pragma: no cover - moved in some jax versions
  mesh_utils = None
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvjax import cache as cache_lib

AXES = ("data", "model")


def make_mesh(data: int = -1, model: int = 1, devices: Optional[Sequence] = None) -> Mesh:
  """A (data, model) mesh over `devices` (default all); data=-1 takes what model leaves.

  Devices are placed by the platform's topology where jax knows it
  (`mesh_utils.create_device_mesh`), else in the order given.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if model < 1 or n % model:
    raise ValueError(f"model={model} must be >= 1 and divide the device count {n}")
  if data == -1:
    data = n // model
  if data < 1 or data * model != n:
    raise ValueError(f"data={data} x model={model} = {data * model} devices; {n} are "
                     "available (use data=-1 to fill)")
  try:
    arr = mesh_utils.create_device_mesh((data, model), devices=devices)
  except (AttributeError, ValueError, AssertionError, NotImplementedError):
    arr = np.asarray(devices).reshape(data, model)
  return Mesh(arr, AXES)


def _fit(spec: Sequence[Optional[str]], shape, mesh: Mesh, strict: bool, what: str) -> P:
  out = []
  for ax, n in zip(spec, shape):
    if ax is not None and n % mesh.shape[ax]:
      if strict:
        raise ValueError(f"{what}: dim of size {n} cannot be split over mesh axis {ax!r} "
                         f"of size {mesh.shape[ax]}")
      ax = None
    out.append(ax)
  return P(*out)


def _conventional(shape, b: int, h: int):
  if len(shape) >= 2 and shape[0] == b and shape[1] == h:
    return ("data", "model") + (None,) * (len(shape) - 2)
  if len(shape) >= 1 and shape[0] == b:
    return ("data",) + (None,) * (len(shape) - 1)
  return (None,) * len(shape)


def _layer_cache_specs(cache, layer_axis: bool, mesh: Optional[Mesh] = None):
  """Per-leaf logical axes of one cache kind (a pytree matching the cache)."""
  axes_fn = getattr(cache, "partition_axes", None)
  partition = axes_fn(mesh) if axes_fn is not None else getattr(type(cache), "PARTITION", None)
  lengths = getattr(cache, "lengths", None)
  b = h = None
  if lengths is not None:
    b, h = lengths.shape[-2:]
  lead = (None,) if layer_axis else ()

  def spec_of(path, leaf):
    name = None
    if path:
      k = path[0]
      name = getattr(k, "name", None) or getattr(k, "key", None)
    shape = tuple(leaf.shape)[len(lead):]
    if partition is not None and name in partition:
      logical = tuple(partition[name])
    elif b is not None:
      logical = _conventional(shape, b, h)
    else:
      logical = (None,) * len(shape)
    if len(logical) != len(shape):
      raise ValueError(f"{type(cache).__name__}.{name}: PARTITION has {len(logical)} axes but "
                       f"the leaf has shape {shape}")
    return lead + logical

  return jax.tree_util.tree_map_with_path(spec_of, cache)


def cache_sharding(cache, mesh: Mesh, *, strict: bool = False):
  """Pytree of NamedShardings for a ModelCache or a single layer cache (see module doc)."""
  for ax in AXES:
    if ax not in mesh.axis_names:
      raise ValueError(f"mesh axes {mesh.axis_names} must include {AXES}")

  def named(logical_tree, tree):
    return jax.tree.map(
        lambda lg, x: NamedSharding(mesh, _fit(lg, x.shape, mesh, strict,
                                               type(tree).__name__)),
        logical_tree, tree, is_leaf=lambda z: isinstance(z, tuple))

  if cache_lib.is_model_cache(cache):
    segs = tuple(named(_layer_cache_specs(s, layer_axis=True, mesh=mesh), s)
                 for s in cache.segments)
    nxt = NamedSharding(mesh, _fit(("data",), cache.next_position.shape, mesh, strict,
                                   "next_position"))
    return cache.replace(segments=segs, next_position=nxt)
  return named(_layer_cache_specs(cache, layer_axis=False, mesh=mesh), cache)


def shard(cache, mesh: Mesh, *, strict: bool = False):
  """device_put(cache, cache_sharding(cache, mesh))."""
  return jax.device_put(cache, cache_sharding(cache, mesh, strict=strict))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a [B, ...] input (tokens, masks): rows over `data`."""
  return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def constrain(cache, mesh: Mesh):
  """with_sharding_constraint(cache, cache_sharding(cache, mesh)) for use inside jit."""
  return jax.lax.with_sharding_constraint(cache, cache_sharding(cache, mesh))


def describe(cache, mesh: Mesh) -> list:
  """[(path, shape, PartitionSpec)] of every leaf: what lives where."""
  sh = cache_sharding(cache, mesh)
  out = []
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(cache)[0], jax.tree.leaves(sh)):
    out.append((jax.tree_util.keystr(path), tuple(x.shape), s.spec))
  return out
