"""Autoregressive generation over any model that follows the kvjax model protocol.

The model is duck-typed (kvjax never imports a model class): it needs
  model.prefill(tokens, capacity=..., attention_mask=..., logits="last", press=...) -> (logits, cache)
  model.decode(tokens, cache, logits="last", check_capacity=...) -> (logits, cache)
where cache is a kvjax.cache.ModelCache (or any pytree with `next_position`).

    out = kvjax.generate(model, tokens, max_new_tokens=32, temperature=0.0)
    out.tokens  # [B, max_new_tokens] int32, padded with pad_id after each row's EOS
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import checks


@dataclasses.dataclass
class GenerateOutput:
  tokens: np.ndarray          # [B, N] generated ids (pad_id after EOS)
  lengths: np.ndarray         # [B] generated tokens before (and including) EOS
  cache: Any                  # final cache
  prefill_seconds: float
  decode_seconds: float
  steps: int

  @property
  def decode_tokens_per_second(self) -> float:
    return self.tokens.shape[0] * self.steps / max(self.decode_seconds, 1e-9)


def _top_p_filter(logits, top_p):
  """Masks logits outside the smallest set whose probability mass >= top_p."""
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  cum = jnp.cumsum(probs, axis=-1)
  # keep tokens whose preceding mass < top_p (the first token is always kept)
  keep_sorted = (cum - probs) < top_p
  cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("temperature", "top_p", "top_k"))
def sample(logits, key, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0):
  """Samples ids [B] from logits [B, V]; temperature 0 is greedy (argmax).

  temperature: finite >= 0; top_p in (0, 1]; top_k an int >= 0 (0 = off). These are static,
  so they are checked when the function is traced, at no cost per call.
  """
  checks.sampling(temperature, top_p, top_k)
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p < 1.0:
    logits = _top_p_filter(logits, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _validate(max_new_tokens, temperature, top_p, top_k, seed, eos_id, pad_id):
  checks.require_int("max_new_tokens", max_new_tokens, 0)
  checks.sampling(temperature, top_p, top_k)
  checks.require_int("seed", seed, -2 ** 63, 2 ** 64 - 1)
  if eos_id is not None:
    checks.require_int("eos_id", eos_id, 0)
  checks.require_int("pad_id", pad_id, -2 ** 31, 2 ** 31 - 1)


def generate(model, tokens, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, attention_mask=None,
             capacity: Optional[int] = None, eos_id: Optional[int] = None, pad_id: int = 0,
             press=None, decode_press=None, cache_dtype=None, backend: str = "auto",
             callback: Optional[Callable[[int, np.ndarray], None]] = None,
             offload=None, chunk_size: Optional[int] = None) -> GenerateOutput:
  """Generates up to max_new_tokens per row.

  Args:
    model: object with prefill/decode (see module docstring).
    tokens: int [B, T] prompts (left padding marked by attention_mask).
    max_new_tokens: tokens to generate per row (int >= 0; 0 runs the prompt only).
    temperature, top_p, top_k: sampling (temperature 0 = greedy): temperature finite
      >= 0, top_p in (0, 1], top_k an int >= 0 (0 = off).
    seed: PRNG seed (randomness only through explicit keys).
    capacity: cache slots; default prompt + max_new_tokens. With a `decode_press`
      generation may run past it (the press frees slots).
    eos_id: stop a row after it emits this id.
    press: press applied after prefill. The prompt is cached with T slots, the press
      compresses them, and the cache gets capacity - T (default max_new_tokens) free
      slots for decoding, so memory is the press's budget + room.
    decode_press: a decode-time policy object with `maybe_compress(cache, step) -> cache`
      (see kvjax.presses.DecodingPress); it is responsible for keeping room in the cache.
      If it has an `observe` attribute asking for statistics, the prompt's observations
      (moved onto the slots a prefill press kept) and then each step's are passed as
      `maybe_compress(cache, step, obs=...)`; `reset()` is called first. With
      `chunk_size`, only cumulative attention mass (H2O's) comes from the prompt; other
      statistics start at the first decode step.
    callback: called as callback(step, new_ids) after each step (streaming).
    chunk_size: feed the prompt this many tokens at a time (models.prefill's chunk_size;
      with `press`, it compresses after every chunk, so prefill memory stays near the
      press's budget + chunk_size).
    offload: a kvjax.offload.OffloadSpec passed to model.prefill(offload=...): the cache
      lives in host memory (mode "stream": layers streamed in with prefetch; "quest": the
      prompt paged out, top-k pages per step, spec.room >= max_new_tokens). A `press`
      combines with mode "stream" (the prompt is compressed on the device, then the
      compressed layers move to the host); decode_press does not combine with offload.
  """
  _validate(max_new_tokens, temperature, top_p, top_k, seed, eos_id, pad_id)
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  tokens = checks.token_ids(tokens, vocab)
  b, t = tokens.shape
  if attention_mask is not None:
    checks.attention_mask(attention_mask, (b, t))
  if cache_dtype is not None:
    checks.float_dtype("cache_dtype", cache_dtype)
  if capacity is None:
    capacity = t + max_new_tokens
  capacity = checks.require_int("capacity", capacity)
  if decode_press is None and capacity < t + max_new_tokens:
    raise ValueError(f"capacity={capacity} < prompt ({t}) + max_new_tokens ({max_new_tokens}); "
                     "raise capacity or pass a decode_press")
  kw = dict(capacity=capacity, attention_mask=attention_mask, logits="last", backend=backend)
  if press is not None:
    if capacity < t:
      raise ValueError(f"capacity={capacity} < prompt ({t}); with a press, capacity is the "
                       "prompt length + the room left for decoding")
    # Budget from the prompt's T slots; the decode room survives the press.
    kw.update(press=press, capacity=t, decode_room=capacity - t)
  if cache_dtype is not None:
    kw["cache_dtype"] = cache_dtype
  if chunk_size is not None:
    kw["chunk_size"] = checks.require_int("chunk_size", chunk_size, 1)
  if offload is not None:
    if decode_press is not None or (press is not None and
                                    getattr(offload, "mode", None) != "stream"):
      raise ValueError(f"offload={offload} does not combine with "
                       f"{'decode_press' if decode_press is not None else 'press'} (a press "
                       "combines with mode='stream')")
    kw["offload"] = offload
    if getattr(offload, "mode", None) == "quest":
      del kw["capacity"]           # the prompt is paged exactly; decoding uses spec.room
      if offload.room < max_new_tokens:
        raise ValueError(f"OffloadSpec.room={offload.room} < max_new_tokens="
                         f"{max_new_tokens}; raise room")
  obs_request = getattr(decode_press, "observe", None) if decode_press is not None else None
  want_obs = obs_request is not None and bool(obs_request.colsum or obs_request.queries)
  if decode_press is not None and hasattr(decode_press, "reset"):
    decode_press.reset()
  obs = None
  prefill_obs = obs_request
  if want_obs and chunk_size is not None and chunk_size < t:
    cumulative = obs_request.colsum and obs_request.colsum_window is None
    prefill_obs = type(obs_request)(colsum=True) if cumulative else None
  t0 = time.perf_counter()
  if want_obs and prefill_obs is not None:
    logits, cache, obs = model.prefill(tokens, observe=prefill_obs, **kw)
  else:
    logits, cache = model.prefill(tokens, **kw)
  key = jax.random.key(seed)
  key, sub = jax.random.split(key)
  nxt = sample(logits[:, -1], sub, temperature=temperature, top_p=top_p, top_k=top_k)
  nxt.block_until_ready()
  t1 = time.perf_counter()
  out = np.full((b, max_new_tokens), pad_id, np.int32)
  if max_new_tokens == 0:  # the prompt's cache, nothing sampled
    return GenerateOutput(tokens=out, lengths=np.zeros((b,), np.int32), cache=cache,
                          prefill_seconds=t1 - t0, decode_seconds=0.0, steps=0)
  done = np.zeros((b,), bool)
  lengths = np.zeros((b,), np.int32)
  steps = 0
  for step in range(max_new_tokens):
    ids = np.asarray(nxt)
    ids = np.where(done, pad_id, ids)
    out[:, step] = ids
    lengths += ~done
    if eos_id is not None:
      done |= ids == eos_id
    if callback is not None:
      callback(step, ids)
    if step == max_new_tokens - 1 or done.all():
      break
    if decode_press is not None:
      if want_obs:
        cache = decode_press.maybe_compress(cache, step, obs=obs)
      else:
        cache = decode_press.maybe_compress(cache, step)
    # Room is guaranteed statically (capacity >= prompt + new) or by the decode press, so
    # skip the per-step host sync of the capacity check.
    dkw = dict(logits="last", check_capacity=decode_press is not None, backend=backend)
    if want_obs:
      logits, cache, obs = model.decode(jnp.asarray(ids)[:, None], cache, observe=obs_request,
                                        **dkw)
    else:
      logits, cache = model.decode(jnp.asarray(ids)[:, None], cache, **dkw)
    key, sub = jax.random.split(key)
    nxt = sample(logits[:, -1], sub, temperature=temperature, top_p=top_p, top_k=top_k)
    steps += 1
  jax.block_until_ready(nxt)
  t2 = time.perf_counter()
  return GenerateOutput(tokens=out, lengths=lengths, cache=cache, prefill_seconds=t1 - t0,
                        decode_seconds=t2 - t1, steps=steps)
