"""Placement by JAX memory kinds: which memory spaces a device addresses, and `to_host` /
`to_device`, each one asynchronous `jax.device_put` that keeps the array's sharding and
changes its memory kind (`pinned_host` where the backend offers it, else `unpinned_host`;
numpy arrays where it offers no host memory kind).
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np


# -- memory kinds -----------------------------------------------------------------------------
def memory_kinds(device=None) -> tuple:
  """Memory kinds the device can address, e.g. ('device', 'pinned_host', 'unpinned_host')."""
  d = device if device is not None else jax.devices()[0]
  try:
    return tuple(m.kind for m in d.addressable_memories())
  except (AttributeError, NotImplementedError, RuntimeError):
    return ()


def host_memory_kind(device=None) -> Optional[str]:
  """'pinned_host' if available, else 'unpinned_host', else None (no host memory space)."""
  kinds = memory_kinds(device)
  for k in ("pinned_host", "unpinned_host"):
    if k in kinds:
      return k
  return None


def device_memory_kind(device=None) -> str:
  d = device if device is not None else jax.devices()[0]
  try:
    return d.default_memory().kind
  except (AttributeError, NotImplementedError, RuntimeError):
    return "device"


def memory_kind(x) -> str:
  """'numpy' for host numpy arrays, else the array's sharding memory kind."""
  if isinstance(x, np.ndarray):
    return "numpy"
  return x.sharding.memory_kind or device_memory_kind()


def _first_device(x):
  return next(iter(x.sharding.device_set))


def to_host(tree, kind: Optional[str] = None):
  """Moves every array leaf to host memory (async; shardings kept, memory kind changed).

  Args:
    tree: pytree of jax arrays (on any device / mesh).
    kind: host memory kind; default `host_memory_kind()` of each array's device.
  """
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for x in leaves:
    if isinstance(x, np.ndarray) or not isinstance(x, jax.Array):
      out.append(x)
      continue
    k = kind or host_memory_kind(_first_device(x))
    if k is None:
      out.append(np.asarray(x))
    else:
      out.append(jax.device_put(x, x.sharding.with_memory_kind(k)))
  return jax.tree.unflatten(treedef, out)


def to_device(tree, device=None):
  """Brings host arrays back to device memory (async). numpy leaves go to `device`."""
  leaves, treedef = jax.tree.flatten(tree)
  out = []
  for x in leaves:
    if isinstance(x, np.ndarray):
      out.append(jax.device_put(x, device))
    elif isinstance(x, jax.Array):
      out.append(jax.device_put(
          x, x.sharding.with_memory_kind(device_memory_kind(_first_device(x)))))
    else:
      out.append(x)
  return jax.tree.unflatten(treedef, out)
