"""Checks of what callers hand the public API, run once at the boundary (outside jit).

Values are concrete there, so each check reads them (a host copy of a [B, T] int array is
negligible next to a forward pass) and raises a ValueError / TypeError that names the
argument, the offending value and what is allowed, instead of letting a bad value turn
into NaN logits, a wrapped index or a raw XLA error deep inside a jitted function.

Inside a trace (a caller jitting the API itself) values are abstract: only dtypes and
shapes are checked then.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  """False for tracers (values unknown until run); True for arrays and Python values."""
  return not isinstance(x, jax.core.Tracer)


def _dtype_of(x):
  dt = getattr(x, "dtype", None)
  if dt is None:
    dt = np.asarray(x).dtype
  return np.dtype(dt)


def _as_array(x, name: str):
  """x as an array (jax arrays and tracers pass through); lists become numpy arrays."""
  if isinstance(x, (jax.Array, np.ndarray)) or isinstance(x, jax.core.Tracer):
    return x
  try:
    return np.asarray(x)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be an array; got {type(x).__name__}") from e


def require_int(name: str, value, lo: int = 1, hi: Optional[int] = None) -> int:
  """value as a Python int; ValueError unless it is an int (numpy ints too, not bool/float)
  in [lo, hi]."""
  rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name}={value!r}; must be an int {rng} (got {type(value).__name__})")
  if value < lo or (hi is not None and value > hi):
    raise ValueError(f"{name}={value!r}; must be an int {rng}")
  return int(value)


def require_float(name: str, value, lo: float = -math.inf, hi: float = math.inf, *,
                  lo_open: bool = False, hi_open: bool = False) -> float:
  """value as a Python float; ValueError unless it is a finite real number in the range."""
  lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
  rng = f"a finite number in {lb}{lo}, {hi}{rb}"
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                   np.floating)):
    raise ValueError(f"{name}={value!r}; must be {rng} (got {type(value).__name__})")
  v = float(value)
  if (not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or
      (hi_open and v == hi)):
    raise ValueError(f"{name}={value!r}; must be {rng}")
  return v


def token_ids(tokens, vocab_size: Optional[int], name: str = "tokens"):
  """Validated token ids [B, T] as int32.

  Checks: an integer array of rank 2 with T >= 1, every id in [0, vocab_size) (the id is
  checked before the cast to int32, so an int64 id of 2**40 is not wrapped to 0).
  """
  tokens = _as_array(tokens, name)
  dt = _dtype_of(tokens)
  if not np.issubdtype(dt, np.integer):
    raise TypeError(f"{name} must be an integer array [batch, seq]; got dtype {dt}")
  if tokens.ndim != 2:
    raise ValueError(f"{name} must have rank 2 [batch, seq]; got shape {tuple(tokens.shape)}")
  if tokens.shape[0] < 1 or tokens.shape[1] < 1:
    raise ValueError(f"{name} must hold at least one row and one token per row; got shape "
                     f"{tuple(tokens.shape)}")
  if not is_concrete(tokens):
    return tokens.astype(jnp.int32)
  host = np.asarray(tokens)
  if vocab_size is not None:
    lo, hi = host.min(), host.max()
    if lo < 0 or hi >= vocab_size:
      bad = lo if lo < 0 else hi
      where = tuple(int(i) for i in np.argwhere(host == bad)[0])
      raise ValueError(f"{name} holds id {int(bad)} at {where}; ids must be in [0, "
                       f"{vocab_size}) (the model's vocab_size)")
  if isinstance(tokens, jax.Array) and dt == np.int32:
    return tokens                      # already on device in the right dtype: no copy
  return jnp.asarray(host.astype(np.int32))


def attention_mask(mask, shape: Sequence[int], name: str = "attention_mask"):
  """Validated mask of `shape`: bool or integer dtype with values 0 / 1 only."""
  mask = _as_array(mask, name)
  dt = _dtype_of(mask)
  if not (dt == np.bool_ or np.issubdtype(dt, np.integer)):
    raise TypeError(f"{name} must be a bool or integer array of 0 (padding) / 1 (token); got "
                    f"dtype {dt} (a float mask such as 0.5 is not a mask)")
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(f"{name} shape {tuple(mask.shape)}; expected {tuple(shape)}")
  if is_concrete(mask) and dt != np.bool_:
    host = np.asarray(mask)
    bad = host[(host != 0) & (host != 1)]
    if bad.size:
      raise ValueError(f"{name} holds the value {bad.flat[0]}; allowed values are 0 "
                       "(padding) and 1 (token)")
  return mask


def prompt_lengths(lengths, batch: int, seq: int, name: str = "prompt_lengths"):
  """Validated lengths [batch]: integers in [1, seq]."""
  lengths = _as_array(lengths, name)
  dt = _dtype_of(lengths)
  if not np.issubdtype(dt, np.integer) or dt == np.bool_:
    raise TypeError(f"{name} must be integers [batch]; got dtype {dt}")
  if tuple(lengths.shape) != (batch,):
    raise ValueError(f"{name} shape {tuple(lengths.shape)}; expected {(batch,)}")
  if is_concrete(lengths):
    host = np.asarray(lengths)
    bad = host[(host < 1) | (host > seq)]
    if bad.size:
      raise ValueError(f"{name} holds {int(bad.flat[0])}; each length must be in [1, {seq}] "
                       f"(the prompt has {seq} tokens per row)")
  return lengths


def capacities(capacity, num_layers: int, name: str = "capacity") -> list[int]:
  """[int] * num_layers from an int or a per-layer sequence of ints, each >= 1."""
  if isinstance(capacity, (int, np.integer)) and not isinstance(capacity, (bool, np.bool_)):
    return [require_int(name, capacity)] * num_layers
  if isinstance(capacity, (str, bytes)) or not isinstance(capacity, Sequence) and not (
      isinstance(capacity, np.ndarray) and capacity.ndim == 1):
    raise ValueError(f"{name}={capacity!r}; must be an int >= 1 or a sequence of "
                     f"{num_layers} such ints (one per layer)")
  caps = [require_int(f"{name}[{i}]", c) for i, c in enumerate(capacity)]
  if len(caps) != num_layers:
    raise ValueError(f"{name} has {len(caps)} entries; num_layers={num_layers}")
  return caps


def float_dtype(name: str, dtype):
  """A floating jnp dtype from a string / numpy / jnp dtype; ValueError otherwise."""
  try:
    dt = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"{name}={dtype!r} is not a dtype; allowed: a floating dtype such as "
                     "'float32', 'bfloat16', 'float16'") from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"{name}={dtype!r} is not a floating dtype; allowed: e.g. 'float32', "
                     "'bfloat16', 'float16' (integer caches come from kvjax.quant specs, "
                     "which keep scales)")
  return dt


def sampling(temperature, top_p, top_k) -> None:
  """temperature finite >= 0, top_p in (0, 1], top_k an int >= 0."""
  require_float("temperature", temperature, 0.0)
  require_float("top_p", top_p, 0.0, 1.0, lo_open=True)
  require_int("top_k", top_k, 0)


def live_cache(cache: Any, name: str = "cache") -> None:
  """ValueError if any array of `cache` was donated (deleted) by an earlier call."""
  for leaf in jax.tree_util.tree_leaves(cache):
    deleted = getattr(leaf, "is_deleted", None)
    if deleted is not None and deleted():
      raise ValueError(
          f"{name} was donated to a previous call (prefill/decode donate their cache "
          "argument, so its buffers are reused for the new cache) and its arrays are "
          "deleted; pass the cache that call returned, or keep a copy first "
          f"(e.g. `jax.tree.map(jnp.copy, {name})`)")


def writable_dir_problem(path: str) -> Optional[str]:
  """None if files can be written in directory `path`, else the reason.

  Probes by creating and removing a temporary file in `path`, or in its nearest existing
  ancestor when `path` does not exist yet (so nothing is created or left behind), so an
  unwritable output directory is found before a long run rather than after it.
  """
  p = os.path.abspath(os.path.expanduser(os.fspath(path)))
  probe_dir = p
  while not os.path.exists(probe_dir):
    parent = os.path.dirname(probe_dir)
    if parent == probe_dir:
      break
    probe_dir = parent
  if not os.path.isdir(probe_dir):
    return f"{probe_dir} exists and is not a directory"
  try:
    fd, name = tempfile.mkstemp(prefix=".kvjax_probe_", dir=probe_dir)
    os.close(fd)
    os.remove(name)
  except OSError as e:
    return f"cannot create a file in {probe_dir}: {e.strerror or e}"
  return None
