"""Decode-time compression: a policy for `kvjax.generate(decode_press=...)`.

    policy = DecodingPress(StreamingLLMPress(n_sink=4), target_size=1024,
                           compression_interval=0)     # compress only when full
    out = kvjax.generate(model, tokens, capacity=1280, max_new_tokens=8192,
                         decode_press=policy)           # memory stays at 1280 slots

Before each decode step, `maybe_compress(cache, step, obs)` compresses every layer to
`target_size` kept slots when a layer has no room for the next token, or every
`compression_interval` steps. The cache keeps its capacity (kept slots + room), so the
decode step compiles once and memory is bounded however long generation runs. Names
follow kvpress's DecodingPress (base_press, compression_interval, target_size).

Attention statistics during decode: the policy accumulates what its base press observes
from every decode step (generate passes the step's observations): cumulative colsum for
H2O-style presses (re-aligned after each compression), the sum over the last
`colsum_window` steps for window presses (SnapKV, TOVA: the last step), and the last
`queries` query vectors for ExpectedAttention. The policy object holds this state, so it
is a plain (mutable) object; the base press stays a frozen, static one.
"""

from __future__ import annotations

import collections
from typing import Any, Optional

import jax
import jax.numpy as jnp

from kvjax import cache as cache_lib
from kvjax.observation import Observe
from kvjax.presses import base


@jax.jit
def _any_full(model_cache) -> jax.Array:
  full = jnp.zeros((), bool)
  for seg in model_cache.segments:
    if not cache_lib.caps(seg).pressable:
      continue  # left as they are by presses (rings never fill up)
    cap = seg.positions.shape[-1]
    full = full | jnp.any(seg.lengths >= cap)
  return full


class DecodingPress:
  """Compress every N steps or on memory pressure, to a fixed kept size.

  Args:
    base_press: the press that scores and chooses (any press with `with_budget`).
    compression_interval: compress every this many decode steps (0: only when full).
      512 (kvpress).
    target_size: kept slots per (row, kv head) after a compression (capped at each
      layer's capacity - 1 so a slot is always free). 2048 (kvpress).
    config: the model config (duck-typed; `rope`, `num_layers`), needed by presses that
      re-rotate keys or use RoPE (ExpectedAttention).
  """

  def __init__(self, base_press: base.Press, compression_interval: int = 512,
               target_size: int = 2048, config: Any = None):
    if not isinstance(base_press, base.Press):
      raise ValueError(f"base_press={base_press!r} is not a kvjax press")
    base.check_nonneg_int("compression_interval", compression_interval)
    base.check_nonneg_int("target_size", target_size, 1)
    base_press.with_budget(target_size)  # fails early for presses without a budget
    self.base_press = base_press
    self.compression_interval = int(compression_interval)
    self.target_size = int(target_size)
    self.config = config
    self.compressions = 0
    self.reset()

  @property
  def observe(self) -> Observe:
    return self.base_press.observe

  def reset(self) -> None:
    """Clears the accumulated statistics (generate calls this before a new prompt)."""
    self._steps = 0
    self._colsum = None          # cumulative, per layer
    self._window = collections.deque(maxlen=max(1, self.observe.colsum_window or 1))
    self._queries = None

  # --- statistics ------------------------------------------------------------------------
  def update(self, obs_list) -> None:
    """Adds one forward call's per-layer observations."""
    if not obs_list:
      return
    need = self.observe
    if need.colsum and all(o.get("colsum") is not None for o in obs_list):
      col = [o["colsum"] for o in obs_list]
      if need.colsum_window is None:
        if self._colsum is not None and all(a.shape == c.shape for a, c in
                                            zip(self._colsum, col)):
          col = [a + c for a, c in zip(self._colsum, col)]
        self._colsum = col
      else:
        if self._window and self._window[-1][0].shape != col[0].shape:
          self._window.clear()
        self._window.append(col)
    if need.queries and all(o.get("queries") is not None for o in obs_list):
      q = [o["queries"] for o in obs_list]
      if self._queries is None or self._queries[0].shape != q[0].shape:
        self._queries = q
      else:
        self._queries = [jnp.concatenate([a[:, :, 1:], c[:, :, -1:]], axis=2)
                         for a, c in zip(self._queries, q)]

  def observations(self, num_layers: int) -> list:
    obs = [{} for _ in range(num_layers)]
    for i in range(num_layers):
      if self._colsum is not None:
        obs[i]["colsum"] = self._colsum[i]
      elif self._window:
        obs[i]["colsum"] = sum(w[i] for w in self._window)
      if self._queries is not None:
        obs[i]["queries"] = self._queries[i]
    return obs

  # --- policy ------------------------------------------------------------------------------
  def needs_compression(self, model_cache) -> bool:
    if self.compression_interval and self._steps >= self.compression_interval:
      return True
    return bool(_any_full(model_cache))

  def compress(self, model_cache: cache_lib.ModelCache) -> cache_lib.ModelCache:
    """Compresses every layer to target_size kept slots, keeping each layer's capacity."""
    caps = model_cache.capacity
    presses, rooms = [], []
    for i, cap in enumerate(caps):
      budget = min(self.target_size, cap - 1)
      if budget < 1:
        raise ValueError(f"a layer has capacity {cap}; decode-time compression needs "
                         "capacity >= 2 (one kept slot and one free slot)")
      press = self.base_press.with_budget(budget)
      # per-layer rules (PyramidKV) keep more than the mean in some layers: the room is
      # what the layer's own kept capacity leaves, so every capacity stays as it is
      kept = press.layer_capacity(cap, base.LayerContext(layer_idx=i, num_layers=len(caps)))
      presses.append(press)
      rooms.append(max(1, cap - kept))
    new, obs = base.compress_model(presses, model_cache, self.observations(len(caps)),
                                   self.config, rooms=rooms, return_obs=True)
    if self._colsum is not None:
      self._colsum = [o["colsum"] for o in obs]
    self._window.clear()
    self._steps = 0
    self.compressions += 1
    return new

  def maybe_compress(self, model_cache, step: int, obs=None):
    """The generate hook: called before decode step `step` with the last call's obs."""
    del step
    self.update(obs)
    out = model_cache
    if self.needs_compression(model_cache):
      out = self.compress(model_cache)
    self._steps += 1
    return out
