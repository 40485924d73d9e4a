"""Inference API: init_cache, prefill, decode (each jitted once per shape).

    logits = model(tokens)                                     # no cache
    logits, cache = models.prefill(model, tokens, capacity=N)  # builds the per-layer cache
    logits, cache = models.decode(model, tokens, cache)        # appends T' >= 1 tokens

Batches may be left-padded (`attention_mask`) or right-padded (`prompt_lengths`); padding
never enters the cache. Positions continue from `cache.next_position`, the original
sequence length, whatever presses have evicted.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import cache as cache_lib
from kvjax import checks
from kvjax import observation
from kvjax import offload as offload_lib
from kvjax import paged as paged_lib
from kvjax import presses as press_lib
from kvjax.window import WindowKVCache
from models import press_inputs
from models import protocol
from models import transformer as tfm
from models.config import ModelConfig


def empty_layer(config: ModelConfig, layer: int, batch: int, capacity: int, dtype,
                window_cache: bool = True):
  """The empty cache of one layer: a WindowKVCache ring of `sliding_window` slots on
  sliding-window layers (with `window_cache`), else a DenseKVCache of `capacity` slots."""
  w = config.layer_window(layer)
  if window_cache and w is not None:
    return WindowKVCache.init(batch, config.num_kv_heads, w, config.head_dim, dtype)
  return cache_lib.DenseKVCache.init(batch, config.num_kv_heads, capacity, config.head_dim,
                                     dtype)


def init_cache(config: ModelConfig, batch: int, capacity, *, dtype=None,
               layer_factory: Optional[Callable[[int, int], Any]] = None,
               window_cache: bool = True) -> cache_lib.ModelCache:
  """An empty ModelCache.

  Args:
    config: model config.
    batch: rows.
    capacity: slots per full-attention layer (int) or a per-layer sequence of ints.
    dtype: cache dtype (default: the model's parameter dtype).
    layer_factory: optional fn(layer_index, capacity) -> layer cache, for other cache kinds.
    window_cache: sliding-window layers get a `kvjax.WindowKVCache` ring of exactly
      `sliding_window` slots (their `capacity` entry is ignored): decode runs to any length
      on them in fixed memory. False: a DenseKVCache of `capacity` slots like other layers.

  The caches are stacked into the model's scan groups (kvjax.cache.group_layers).
  """
  checks.require_int("batch", batch)
  caps = checks.capacities(capacity, config.num_layers)
  dt = checks.float_dtype("dtype", config.dtype if dtype is None else dtype)
  if layer_factory is None:
    def layer_factory(i, cap):
      return empty_layer(config, i, batch, cap, dt, window_cache)
  layers = [layer_factory(i, cap) for i, cap in enumerate(caps)]
  return cache_lib.ModelCache.from_layers(layers, jnp.zeros((batch,), jnp.int32),
                                          keys=tfm.layer_keys(config))


@functools.partial(jax.jit, static_argnames=("graphdef", "observe", "backend", "logits_mode"),
                   donate_argnames=("cache",))
def _run(graphdef, state, tokens, positions, cache, *, observe, backend, logits_mode):
  model = nnx.merge(graphdef, state)
  logits, new_cache, obs = tfm.forward(model, tokens, positions, cache, observe, backend,
                                        last_only=logits_mode == "last")
  return logits, new_cache, obs


def _check_inputs(model, b, t, *, capacity=None, attention_mask=None, prompt_lengths=None,
                  cache=None, cache_dtype=None, press=None):
  """Boundary checks of prefill's arguments (kvjax.checks), before anything is built."""
  if capacity is not None:
    checks.capacities(capacity, model.config.num_layers)
  if attention_mask is not None:
    checks.attention_mask(attention_mask, (b, t))
  if prompt_lengths is not None:
    checks.prompt_lengths(prompt_lengths, b, t)
  if cache_dtype is not None:
    checks.float_dtype("cache_dtype", cache_dtype)
  if cache is not None:
    checks.live_cache(cache)
    if press is not None:
      paged_lib.check_press(press, cache)


def _apply_press(model, press, cache, obs, *, room=0, prompt_length=None):
  """Runs a press over every layer of a ModelCache (press API: kvjax.presses).

  The compressed cache gets `room` empty slots per layer for the tokens decoded next.
  """
  fn = getattr(press, "compress_model", None)
  if fn is None:
    raise ValueError(f"press {press!r} has no compress_model(cache, observations, config)")
  cache = fn(cache, obs, model.config, room=room, prompt_length=prompt_length)
  # Per-layer budgets change layer structures: stack the layers in the scan groups forward()
  # uses now, once, so the decode steps that follow never regroup (copy) the cache.
  sigs = [cache_lib._signature(s) for s in cache.layer_structs()]  # pylint: disable=protected-access
  return cache.regroup(cache_lib.group_layers(list(zip(tfm.layer_keys(model.config), sigs))))


def prefill(model: tfm.Transformer, tokens, *, capacity: Optional[int | Sequence[int]] = None,
            attention_mask=None, prompt_lengths=None, cache: Optional[cache_lib.ModelCache] = None,
            cache_dtype=None, press=None, decode_room: Optional[int] = None,
            logits: str = "all", backend: str = "auto",
            observe: Optional[tfm.Observe] = None, window_cache: bool = True,
            chunk_size: Optional[int] = None, offload: Optional[offload_lib.OffloadSpec] = None):
  """Runs the prompt and returns (logits, cache).

  Args:
    model: a Transformer.
    tokens: int [B, T] prompt ids (padding anywhere, marked by attention_mask).
    capacity: cache slots per full-attention layer (>= the longest prompt); default T.
      Sliding-window layers get rings of exactly `sliding_window` slots (window_cache).
    attention_mask: [B, T] 1 = token, 0 = padding (left padding supported).
    prompt_lengths: [B] valid tokens per row when rows are right-padded.
    cache: an existing (empty) ModelCache to fill instead of building one.
    cache_dtype: dtype of a newly built cache (default: parameter dtype).
    press: optional press applied after the prompt (see kvjax.presses). The press sizes
      its budget from the prompt slots, then adds room for decoding: with an int
      `capacity` and no `decode_room`, the cache is built with T slots and the press
      leaves capacity - T free slots after compression (so capacity keeps meaning
      "prompt + room"); `decode_room=N` sets the room explicitly (then `capacity`, if
      given, is the pre-compression capacity).
    decode_room: empty slots per layer after the press (only with press).
    logits: "all" -> [B, T, V]; "last" -> [B, 1, V] at each row's last token.
    backend: attention backend ("auto" | "xla" | "pallas").
    observe: extra per-layer observations to return (then returns logits, cache, obs).
      With a press, "colsum" is moved onto the returned cache's slots by position; with
      chunk_size, only Observe(colsum=True) is available (summed over every chunk).
    window_cache: ring caches for sliding-window layers (see init_cache); False gives
      every layer a DenseKVCache of `capacity` slots.
    chunk_size: feed the prompt `chunk_size` tokens at a time (int >= 1). Without a press
      the result equals one-shot prefill (up to float rounding); with a press, the cache
      starts with `chunk_size` slots and is compressed after every chunk, keeping room for
      the next one, so KV memory stays at about the press's budget + chunk_size whatever
      the prompt length (the last compression leaves the decode room instead). Ratio
      presses (compression_ratio) then remove that fraction of what is held at every
      chunk; use `budget=` for a fixed final size. chunk_size >= T is one-shot prefill.
    offload: a kvjax.offload.OffloadSpec: the cache is built in host memory and the layers
      are streamed through the device (mode="stream": returns a kvjax.offload.HostCache),
      or the prompt is paged to the host for top-k page retrieval (mode="quest": returns a
      QuestCache); models.decode takes either (see models/offload.py). With a press
      (stream mode), the prompt is compressed on the device (`chunk_size` bounds what the
      device holds meanwhile) and the compressed layers move to the host: the HostCache
      holds the press's budget + room. Not combined with cache or observe, nor quest mode
      with a press or chunk_size.
  """
  tokens = checks.token_ids(tokens, model.config.vocab_size)
  protocol.check_logits(logits)
  b, t = tokens.shape
  _check_inputs(model, b, t, capacity=capacity, attention_mask=attention_mask,
                prompt_lengths=prompt_lengths, cache=cache, cache_dtype=cache_dtype,
                press=press)
  if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or
                                 isinstance(chunk_size, bool) or chunk_size < 1):
    raise ValueError(f"chunk_size={chunk_size!r}; must be an int >= 1 (or None)")
  chunked = chunk_size is not None and int(chunk_size) < t
  if chunked and observe is not None and tfm.Observe(
      colsum=observe.colsum, query_moments=observe.query_moments) != observe:
    raise ValueError(f"observe={observe} with chunk_size < prompt length: only "
                     "Observe(colsum=True) (attention mass summed over every prompt query) "
                     "and query_moments (moment sums), which add up across chunks, are "
                     "supported; other statistics are per chunk")
  streamed_press = (offload is not None and press is not None and cache is None and
                    observe is None and getattr(offload, "mode", None) == offload_lib.STREAM)
  if streamed_press:
    out, dev = prefill(model, tokens, capacity=capacity, attention_mask=attention_mask,
                       prompt_lengths=prompt_lengths, cache_dtype=cache_dtype, press=press,
                       decode_room=decode_room, logits=logits, backend=backend,
                       window_cache=window_cache, chunk_size=chunk_size)
    return out, offload_lib.HostCache.from_model_cache(
        dev, compress=offload.compress, prefetch=offload.prefetch, kind=offload.kind)
  capacity, room = protocol.press_room(press, cache, capacity, decode_room, t)
  attention_mask = protocol.prompt_mask(attention_mask, prompt_lengths, t)
  if offload is not None:
    from models import offload as model_offload  # pylint: disable=import-outside-toplevel
    given = [n for n, v in (("press", press), ("cache", cache), ("observe", observe),
                            ("chunk_size", chunk_size)) if v is not None]
    if given:
      raise ValueError(f"offload={offload} does not combine with {', '.join(given)} (a press "
                       "combines with mode='stream', without cache or observe)")
    positions = tfm.positions_from_mask(tokens, attention_mask)
    return model_offload.prefill(model, tokens, positions, offload, capacity=capacity,
                                 cache_dtype=cache_dtype, window_cache=window_cache,
                                 logits=logits, backend=backend)
  check_cache = cache
  if cache is None and chunked and press is not None:
    # Compressed after every chunk: dense layers start with room for one chunk and grow
    # by a chunk until the press fits (e.g. budget > chunk_size).
    kw = dict(dtype=cache_dtype, window_cache=window_cache)
    cache = init_cache(model.config, b, int(chunk_size), **kw)
    check_cache = jax.eval_shape(lambda: init_cache(model.config, b, t, **kw))
  elif cache is None:
    cfg = model.config
    cap = t if capacity is None else capacity
    longest = t
    if attention_mask is not None and not isinstance(attention_mask, jax.core.Tracer):
      longest = int(np.asarray(attention_mask).sum(axis=-1).max())
    caps = [cap] * cfg.num_layers if isinstance(cap, (int, np.integer)) else list(cap)
    # Ring caches of sliding layers hold any prompt; only dense layers need the room.
    dense_caps = [c for i, c in enumerate(caps)
                  if not (window_cache and cfg.layer_window(i) is not None)]
    if dense_caps and min(dense_caps) < longest:
      raise ValueError(f"capacity={cap} is smaller than the prompt ({longest} tokens); "
                       "use capacity >= prompt length, or chunk_size with a press")
    cache = init_cache(cfg, b, cap, dtype=cache_dtype, window_cache=window_cache)
    check_cache = cache
  else:
    protocol.check_batch(tokens, cache)
  positions = tfm.positions_from_mask(tokens, attention_mask, start=cache.next_position)
  need = observe or tfm.Observe()
  if press is not None:
    need = need.merge(getattr(press, "observe", tfm.Observe()))
  if chunked:
    press_inputs.check_supported(need, "chunked prefill (chunk_size < prompt length)")
    if press is not None:  # checked against the whole prompt, as one-shot prefill is
      _validate_press(press, check_cache, int(chunk_size))
    out, cache, obs = _prefill_chunks(model, tokens, positions, cache,
                                      chunk_size=int(chunk_size), press=press, room=room,
                                      need=need, logits=logits, backend=backend)
    return (out, cache, obs) if observe is not None else (out, cache)
  if press is not None:  # fail before the prompt runs, not after it
    _validate_press(press, check_cache, t)
  protocol.check_room(cache, positions)
  graphdef, state = nnx.split(model)
  out, cache, obs = _run(graphdef, state, tokens, positions, cache,
                         observe=need.forward_part(), backend=backend, logits_mode=logits)
  obs = press_inputs.add_observations(model, _run, tokens, positions, cache, obs, need,
                                      backend=backend)  # KVzip's reconstruction, o_proj
  if press is not None:
    before = [l.positions for l in cache.layers()] if observe is not None else None
    cache = _apply_press(model, press, cache, obs, room=room, prompt_length=t)
    if before is not None:  # the returned statistics describe the returned cache's slots
      obs = observation.realign_colsum(obs, before, cache,
                                       int(jnp.max(cache.next_position)))
  if observe is not None:
    return out, cache, obs
  return out, cache


def _validate_press(press, cache, prompt_length) -> None:
  """press.validate() against every layer a press compresses (`cache.pressable_layers()`)."""
  validate = getattr(press, "validate", None)
  if validate is None:
    return
  structs = cache.layer_structs()
  for i in cache.pressable_layers():
    validate(capacity=structs[i].capacity, prompt_length=prompt_length,
             num_layers=cache.num_layers)


def _press_fits(press, cache, prompt_length) -> bool:
  try:
    _validate_press(press, cache, prompt_length)
  except ValueError:
    return False
  return True


def _prefill_chunks(model, tokens, positions, cache, *, chunk_size, press, room, need, logits,
                    backend):
  """Chunked prefill: C tokens at a time, compressing after each chunk when a press is set."""
  b, t = tokens.shape
  c = chunk_size
  n = -(-t // c)
  pad = n * c - t  # the last chunk is padded (position -1) so every chunk has one shape
  toks = jnp.pad(tokens, ((0, 0), (0, pad)))
  pos = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
  if press is None:
    protocol.check_room(cache, positions)
  valid = np.asarray(positions) >= 0
  last_chunk = np.where(valid.any(-1), (t - 1 - np.argmax(valid[:, ::-1], -1)) // c, 0)
  graphdef, state = nnx.split(model)
  outs, last = [], None
  # Statistics summed over every query of the prompt (H2O's) add up across chunks, by token
  # position, so the press after chunk i scores with all queries so far, not chunk i's.
  cumulative = need.colsum and need.colsum_window is None
  totals, span = None, int(np.asarray(positions).max(initial=0)) + 1
  moments = None
  for i in range(n):
    sl = slice(i * c, (i + 1) * c)
    if press is not None:
      protocol.check_room(cache, pos[:, sl])
    out, cache, obs = _run(graphdef, state, toks[:, sl], pos[:, sl], cache,
                           observe=need.forward_part(), backend=backend, logits_mode=logits)
    if cumulative:
      totals, obs = _accumulate_colsum(totals, obs, [l.positions for l in cache.layers()],
                                       length=span)
    if need.query_moments is not None:   # moment sums add up over the chunks
      moments, obs = observation.add_moments(moments, obs)
    if need.o_proj:
      obs = press_inputs.add_o_proj(model, obs)
    if press is not None:
      r = room if i == n - 1 else c
      if _press_fits(press, cache, c):
        cache = _apply_press(model, press, cache, obs, room=r, prompt_length=c)
      else:  # too small for the press yet (budget > held slots): grow by the room
        cache = press_lib.compress_model([None] * cache.num_layers, cache, rooms=r)
    if logits == "all":
      outs.append(out)
    else:  # keep each row's logits from the chunk that holds its last token
      here = jnp.asarray(last_chunk == i)[:, None, None]
      last = out if last is None else jnp.where(here, out, last)
  out = jnp.concatenate(outs, axis=1)[:, :t] if logits == "all" else last
  obs = None
  if cumulative:  # the totals, read back at the returned cache's slots
    obs = [{} if tot is None else {"colsum": observation.colsum_at_slots(tot, l.positions)}
           for tot, l in zip(totals, cache.layers())]
  if moments is not None:
    obs = [dict(o, **m) for o, m in zip(obs or [{} for _ in moments], moments)]
  return out, cache, obs


@functools.partial(jax.jit, static_argnames=("length",))
def _accumulate_colsum(totals, obs, positions, *, length):
  """Adds each layer's slot-aligned colsum to its running total by token position; returns
  (totals, obs with the running totals read back at the current slots)."""
  totals = totals or [None] * len(obs)
  new_totals, new_obs = [], []
  for tot, o, p in zip(totals, obs, positions):
    if o.get("colsum") is None:
      new_totals.append(tot)
      new_obs.append(o)
      continue
    by_pos = observation.colsum_by_position(o["colsum"], p, length)
    tot = by_pos if tot is None else tot + by_pos
    new_totals.append(tot)
    new_obs.append(dict(o, colsum=observation.colsum_at_slots(tot, p)))
  return new_totals, new_obs


def decode(model: tfm.Transformer, tokens, cache: cache_lib.ModelCache, *, attention_mask=None,
           logits: str = "all", backend: str = "auto", check_capacity: bool = True,
           observe: Optional[tfm.Observe] = None, press=None, decode_room: int = 0):
  """Appends T' >= 1 tokens per row to the cache and returns (logits, cache).

  Positions continue from `cache.next_position`. `attention_mask` [B, T'] marks padding
  inside the chunk (rows that add fewer tokens). The cache argument is donated.
  With `press`, the cache is compressed after the step (using this step's observations)
  and gets `decode_room` free slots per layer; for a policy that compresses every N steps
  or when full, see kvjax.presses.DecodingPress.
  """
  protocol.check_decode_room(decode_room)
  tokens = checks.token_ids(tokens, model.config.vocab_size)
  checks.live_cache(cache)
  if attention_mask is not None:
    checks.attention_mask(attention_mask, tokens.shape)
  if cache_lib.caps(cache).offloaded:
    from models import offload as model_offload  # pylint: disable=import-outside-toplevel
    if observe is not None or press is not None:
      raise ValueError(f"observe= and press= do not apply to a {type(cache).__name__}")
    protocol.check_batch(tokens, cache)
    positions = tfm.positions_from_mask(tokens, attention_mask, start=cache.next_position)
    return model_offload.decode(model, tokens, positions, cache, logits=logits,
                                backend=backend, check_capacity=check_capacity)
  if not cache_lib.is_model_cache(cache):
    raise ValueError(f"cache must be a kvjax.cache.ModelCache (or a kvjax.offload HostCache / "
                     f"QuestCache); got {type(cache).__name__}")
  protocol.check_logits(logits)
  protocol.check_batch(tokens, cache)
  if press is not None:
    paged_lib.check_press(press, cache)
  positions = tfm.positions_from_mask(tokens, attention_mask, start=cache.next_position)
  if check_capacity:
    protocol.check_room(cache, positions)
  need = observe or tfm.Observe()
  if press is not None:
    need = need.merge(getattr(press, "observe", tfm.Observe()))
  press_inputs.check_supported(need, "models.decode")
  graphdef, state = nnx.split(model)
  out, cache, obs = _run(graphdef, state, tokens, positions, cache,
                         observe=need.forward_part(), backend=backend, logits_mode=logits)
  if need.o_proj:
    obs = press_inputs.add_o_proj(model, obs)
  if press is not None:
    cache = _apply_press(model, press, cache, obs, room=decode_room)
  if observe is not None:
    return out, cache, obs
  return out, cache
