"""Device mesh and parameter placement: data parallel, FSDP, tensor parallel.

The mesh has two named axes, `data` and `model`. Batches split their batch dimension over
`data`. A parameter gets its tensor-parallel placement from the family's rules (regex on
its path -> a per-dim tuple naming `model`), then, with FSDP on, its largest remaining
dimension that `data` divides is split over `data` too (ZeRO-3 style: XLA all-gathers it
for the forward pass and reduce-scatters its gradient). Small parameters stay replicated.
Optimizer moments take their parameter's placement (`optax.tree_map_params`).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kvjax.sharding import make_mesh  # pylint: disable=unused-import  (train's API)


def path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def param_spec(path: str, shape: tuple, mesh: Mesh, *, fsdp: bool, fsdp_min_size: int,
               tp_rules: Sequence[tuple[str, tuple]] = ()) -> P:
  """PartitionSpec of one parameter."""
  spec = [None] * len(shape)
  n_model = mesh.shape["model"]
  name = path.split("/")[-1]
  for pattern, dims in tp_rules:
    if (re.search(pattern, path) or re.search(pattern, name)) and len(dims) == len(shape):
      spec = [d if d is None or (shape[i] % n_model == 0) else None
              for i, d in enumerate(dims)]
      break
  n_data = mesh.shape["data"]
  if fsdp and n_data > 1 and int(np.prod(shape)) >= fsdp_min_size:
    free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % n_data == 0]
    if free:
      i = max(free, key=lambda j: (shape[j], -j))
      spec[i] = "data"
  return P(*spec)


def param_shardings(abstract_params, mesh: Mesh, *, fsdp: bool = False,
                    fsdp_min_size: int = 2 ** 14, tp_rules=()) -> Any:
  """NamedShardings for a pytree of parameters (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, param_spec(path_str(p), tuple(x.shape), mesh, fsdp=fsdp,
                                                  fsdp_min_size=fsdp_min_size,
                                                  tp_rules=tp_rules)),
      abstract_params)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, param_sh,
                        mesh: Mesh):
  """Moments follow their parameter; counters and other leaves are replicated."""
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt_state, param_sh,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  spec = [None] * ndim
  spec[batch_axis] = "data"
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
