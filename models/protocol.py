"""The model protocol of the inference API, and the steps every model's API shares.

Two model stacks serve `prefill` / `decode`: the Llama-family `Transformer` (`models.api`)
and the pattern `Decoder` of the retrained families (`models.decoder`). Both satisfy
`CachedLM`, the small protocol `kvjax.generate`, the engine and the launchers rely on, and
both run the boundary steps below, so a room check, a logits mode or the scan-group
bookkeeping is written once:

  * arguments: `check_logits`, `check_batch`, `check_decode_room`, `prompt_mask` (right-padded
    `prompt_lengths` -> mask), `press_room` (how a press splits `capacity` into prompt
    slots and decode room);
  * the cache: `check_room` (every layer kind's own `check_room`, before a step);
  * the forward: a model runs its layers as scan groups, each `lax.scan` stacking its
    per-layer outputs over repeats; `depth_order` unstacks them into depth order,
    `last_token` picks each row's last valid token for logits="last", and `advance`
    installs the new segments and moves `next_position` past the valid new tokens.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import cache as cache_lib
from kvjax import checks

LOGITS_MODES = ("all", "last")


@runtime_checkable
class CachedLM(Protocol):
  """What a model provides to the inference API (models.prefill / decode, kvjax.generate).

  Attributes:
    config: the model's (frozen) config; `vocab_size` and `num_layers` are read.
  """

  config: Any

  def __call__(self, tokens, *, attention_mask=None, positions=None):
    """Cache-free forward: tokens int [B, T] -> logits float32 [B, T, V]."""

  def init_cache(self, batch: int, capacity, *, dtype=None) -> cache_lib.ModelCache:
    """An empty ModelCache in the model's own scan groups."""

  def prefill(self, tokens, **kw):
    """Runs the prompt: (logits, cache) (with press=, capacity=, logits=, ...)."""

  def decode(self, tokens, cache, **kw):
    """Appends T' >= 1 tokens per row: (logits, cache); the cache is donated."""


def check_logits(logits: str) -> None:
  """ValueError unless `logits` is a mode of LOGITS_MODES ("all": [B, T, V]; "last":
  [B, 1, V] at each row's last token)."""
  if logits not in LOGITS_MODES:
    raise ValueError(f"logits={logits!r}; allowed: {LOGITS_MODES}")


def check_batch(tokens, cache) -> None:
  if cache.batch != tokens.shape[0]:
    raise ValueError(f"batch mismatch: tokens have batch {tokens.shape[0]} but the cache holds "
                     f"{cache.batch} rows")


def check_room(cache: cache_lib.ModelCache, positions) -> None:
  """Every segment's own room check (outside jit) before `positions` [B, T] are appended:
  a full dense layer, a paged pool out of pages (kvjax.paged.OutOfPages), ... raise."""
  for seg in cache.segments:
    check = getattr(seg, "check_room", None)
    if check is not None:
      check(positions)


def prompt_mask(attention_mask, prompt_lengths, t: int):
  """The attention mask [B, T] of right-padded rows (`prompt_lengths` [B]), or the given
  mask; passing both is a ValueError."""
  if prompt_lengths is None:
    return attention_mask
  if attention_mask is not None:
    raise ValueError("pass either attention_mask or prompt_lengths, not both")
  return jnp.arange(t)[None, :] < jnp.asarray(prompt_lengths)[:, None]


def check_decode_room(decode_room: Optional[int]) -> None:
  if decode_room is not None:
    checks.require_int("decode_room", decode_room, lo=0)


def press_room(press, cache, capacity, decode_room: Optional[int], prompt_length: int):
  """(capacity to build, decode room left after the press).

  A press sizes its budget from the prompt's slots, then adds room for decoding: with an
  int `capacity`, no given `cache` and no `decode_room`, the cache is built with the
  prompt's T slots and the press leaves capacity - T free (so capacity keeps meaning
  "prompt + room"); `decode_room=N` sets the room explicitly (only with a press).
  """
  check_decode_room(decode_room)
  if decode_room is not None:
    if press is None:
      raise ValueError(f"decode_room={decode_room} only applies with a press; without one "
                       "use capacity=prompt length + room")
    return capacity, int(decode_room)
  if press is not None and cache is None and isinstance(capacity, (int, np.integer)):
    if capacity < prompt_length:
      raise ValueError(f"capacity={capacity} is smaller than the prompt ({prompt_length} "
                       "tokens)")
    return prompt_length, int(capacity) - prompt_length
  return capacity, 0


def depth_order(groups) -> list:
  """[(repeats, per-slot items stacked over repeats)] per scan group -> per-layer items in
  depth order (repeat-major within a group, as the layers run)."""
  out = []
  for reps, items in groups:
    for r in range(reps):
      out.extend(jax.tree.map(lambda a, r=r: a[r], it) for it in items)
  return out


def last_token(x, positions):
  """x [B, T, ...] at each row's last valid token (largest position): [B, 1, ...]."""
  last = jnp.argmax(positions, axis=-1)  # positions increase along valid tokens
  return jnp.take_along_axis(x, last.reshape(last.shape + (1,) * (x.ndim - 1)), axis=1)


def advance(cache: cache_lib.ModelCache, segments, positions) -> cache_lib.ModelCache:
  """The cache after a step: its new segments, next_position past the valid new tokens."""
  n_new = jnp.sum(positions >= 0, axis=-1).astype(jnp.int32)
  return cache.replace(segments=tuple(segments), next_position=cache.next_position + n_new)
