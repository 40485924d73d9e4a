"""The decoder on host-offloaded caches: layer streaming with prefetch, and Quest decoding.

    spec = kvjax.offload.OffloadSpec(prefetch=1)                  # or compress="int8"
    logits, cache = models.prefill(model, tokens, capacity=N, offload=spec)   # HostCache
    logits, cache = models.decode(model, next_tokens, cache)     # layers streamed in

    spec = kvjax.offload.OffloadSpec(mode="quest", page_size=16, top_k=4, room=64)
    logits, cache = models.prefill(model, tokens, offload=spec)  # QuestCache
    logits, cache = models.decode(model, next_tokens, cache)     # top-k pages per layer

Streaming (FlexGen, Sheng et al., 2023, schedules layer-wise offload the same way): the
layer loop of `models.transformer.forward` becomes a Python loop of one jitted call per
layer, because the host transfers have to be issued between layers; `kvjax.offload.
stream_layers` issues the fetch of layer l+1 (and further, `prefetch`) before layer l is
dispatched and writes each updated layer back asynchronously. The per-layer math is the
same function as the scanned forward (`models.transformer._layer`), so with compress=None
the logits equal the on-device cache's (exact up to XLA's fusion choices). Prefill streams
too: empty layer caches are built and sent to the host one at a time, so the device never
holds more than prefetch + 1 layers' caches.

Quest (Tang et al., 2024): the prompt is prefilled by streaming, then each layer is paged
to the host with per-page key bounds kept on the device (kvjax.offload.QuestCache); a
decode step splits each layer around attention (`layer_qkv` / `layer_finish`), selects
the top_k pages per (row, kv head) by the Quest bound of this step's queries, gathers
only those on the host, and attends to them plus the device window of decoded tokens.
With top_k >= the number of pages it is exact attention over the whole context.

Shapes: B batch, T tokens, H hidden, V vocab.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import offload
from kvjax.observation import Observe
from models import api
from models import protocol
from models import transformer as tfm


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef, state, tokens):
  return nnx.merge(graphdef, state).embed_tokens(tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "last_only"))
def _unembed(graphdef, state, x, positions, last_only):
  if last_only:  # positions increase along valid tokens
    last = jnp.argmax(positions, axis=-1)
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)
  return nnx.merge(graphdef, state).unembed(x)


def _at(params, i):
  return jax.tree.map(lambda w: w[i], params)


@functools.partial(jax.jit, static_argnames=("spec", "config"))
def _layer_step(params, i, x, positions, cache, *, spec, config):
  layer = tfm._layer  # pylint: disable=protected-access
  x, cache, _ = layer(_at(params, i), x, positions, cache, spec, config, Observe())
  return x, cache


@functools.partial(jax.jit, static_argnames=("spec", "config"))
def _layer_qkv(params, i, x, positions, *, spec, config):
  return tfm.layer_qkv(_at(params, i), x, positions, spec, config)


@functools.partial(jax.jit, static_argnames=("config",))
def _layer_finish(params, i, x, attn_out, *, config):
  return tfm.layer_finish(_at(params, i), x, attn_out, config)


def _empty_layers(config, batch: int, capacity: int, dtype, window_cache: bool) -> Iterator:
  """The layers of models.init_cache, built one at a time (so each goes to the host alone)."""
  for i in range(config.num_layers):
    yield api.empty_layer(config, i, batch, capacity, dtype, window_cache)


def _prologue(model, tokens, backend):
  """(graphdef, state, config, stacked layer params, per-layer specs, embedded tokens)."""
  graphdef, state = nnx.split(model)
  cfg = model.config
  return (graphdef, state, cfg, model.layer_params(), tfm.layer_specs(cfg, backend),
          _embed(graphdef, state, tokens))


def _stream_forward(model, tokens, positions, cache: offload.HostCache, backend: str,
                    logits_mode: str):
  """forward() with every layer's cache streamed from the host. Returns (logits, cache')."""
  graphdef, state, cfg, params, specs, x = _prologue(model, tokens, backend)

  def step(i, x, layer_cache):
    return _layer_step(params, i, x, positions, layer_cache, spec=specs[i], config=cfg)

  x, layers = offload.stream_layers(step, x, cache.layers, prefetch=cache.prefetch)
  logits = _unembed(graphdef, state, x, positions, logits_mode == "last")
  n_new = jnp.sum(positions >= 0, axis=-1).astype(jnp.int32)
  return logits, cache.replace(layers=tuple(layers),
                               next_position=cache.next_position + n_new)


def _quest_forward(model, tokens, positions, cache: offload.QuestCache, backend: str,
                   logits_mode: str):
  """A forward pass whose attention reads the top-k offloaded pages + the device window."""
  graphdef, state, cfg, params, specs, x = _prologue(model, tokens, backend)
  recent, selected = [], []
  for i in range(cfg.num_layers):
    q, k, v = _layer_qkv(params, i, x, positions, spec=specs[i], config=cfg)
    res, rec, idx = offload.quest_attend(q, k, v, positions, cache.stores[i], cache.recent[i],
                                         specs[i].attn, top_k=cache.top_k,
                                         keep_last=cache.keep_last)
    x = _layer_finish(params, i, x, res.out, config=cfg)
    recent.append(rec)
    selected.append(idx)
  logits = _unembed(graphdef, state, x, positions, logits_mode == "last")
  n_new = jnp.sum(positions >= 0, axis=-1).astype(jnp.int32)
  return logits, cache.replace(recent=tuple(recent), selected=tuple(selected),
                               next_position=cache.next_position + n_new)


def prefill(model, tokens, positions, spec: offload.OffloadSpec, *, capacity=None,
            cache_dtype=None, window_cache: bool = True, logits: str = "all",
            backend: str = "auto"):
  """Prefill into a host-offloaded cache (models.prefill(offload=spec) calls this).

  Args:
    model: a models.Transformer.
    tokens: int32 [B, T]; positions [B, T] (-1 = padding), starting at 0.
    spec: kvjax.offload.OffloadSpec.
    capacity: stream mode: slots per full-attention layer (an int >= the longest prompt;
      default T). Quest mode pages exactly the prompt (T slots); decode room is spec.room.
    cache_dtype, window_cache, logits, backend: as models.prefill.

  Returns: (logits, HostCache | QuestCache).
  """
  if not isinstance(spec, offload.OffloadSpec):
    raise ValueError(f"offload={spec!r}; must be a kvjax.offload.OffloadSpec")
  protocol.check_logits(logits)
  cfg = model.config
  b, t = tokens.shape
  longest = int(jnp.max(jnp.sum(positions >= 0, axis=-1)))
  if spec.mode == offload.QUEST:
    if capacity is not None:
      raise ValueError(f"capacity={capacity} does not apply to OffloadSpec(mode='quest'): the "
                       "prompt is paged exactly; set OffloadSpec.room for the decoded tokens")
    window_cache = False      # Quest pages dense layers only
    cap = t
  else:
    cap = t if capacity is None else capacity
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < longest:
      raise ValueError(f"capacity={capacity!r}; with offload it must be an int >= the longest "
                       f"prompt ({longest} tokens)")
  dt = jnp.dtype(cache_dtype or cfg.dtype)
  compress = spec.compress if spec.mode == offload.STREAM else None
  host = offload.HostCache.from_layers(_empty_layers(cfg, b, cap, dt, window_cache),
                                       jnp.zeros((b,), jnp.int32), compress=compress,
                                       prefetch=spec.prefetch, kind=spec.kind)
  out, host = _stream_forward(model, tokens, positions, host, backend, logits)
  if spec.mode == offload.QUEST:
    return out, offload.QuestCache.from_model_cache(
        host, page_size=spec.page_size, room=spec.room, top_k=spec.top_k,
        keep_last=spec.keep_last, kind=spec.kind)
  return out, host


def decode(model, tokens, positions, cache, *, logits: str = "all", backend: str = "auto",
           check_capacity: bool = True):
  """One step on a HostCache (layers streamed) or a QuestCache (top-k pages per layer).

  positions [B, T'] continue from cache.next_position (models.decode computes them).
  Returns (logits, cache').
  """
  protocol.check_logits(logits)
  if check_capacity:
    cache.check_room(positions)
  if cache.offload_mode == offload.QUEST:
    return _quest_forward(model, tokens, positions, cache, backend, logits)
  return _stream_forward(model, tokens, positions, cache, backend, logits)
