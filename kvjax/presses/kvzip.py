"""KVzip: query-agnostic scores from context reconstruction (Kim et al., 2025, "KVzip:
Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv:2505.23416).

After the context is prefilled, the model is asked to reproduce it: a repeat instruction
(`repeat_ids`, e.g. the tokens of "Repeat the previous context exactly.") and then the
context itself are fed through the model on top of the prefilled cache. A KV pair the
model needs to reconstruct the context is one that any future question may need, so

  score(slot) = max over reconstruction queries q and the query heads of the slot's kv
                group of softmax(q . k / sqrt(d))[slot],

the softmax running over everything the query sees (the context cache and the
reconstruction tokens before it), exactly as the model's own attention does (window,
soft-capping, scale). The reconstruction is fed `chunk_size` tokens at a time and the
score is a running max over chunks, so the score matrix never exceeds
[B, Hq, chunk_size, S + reconstruction]: chunking gives the same scores as one chunk.

Budgets are head-wise, as in the paper: a layer keeps the same total as the uniform rule
(the sum of every kv head's int(L * (1 - compression_ratio))), chosen as the best scores
across the layer's heads, so heads keep different numbers of slots (AdaKV's selection with
no safeguard). For real savings each layer's static capacity is
min(S, ceil(head_capacity_factor * uniform budget)); 1.0 keeps exactly the uniform
number of slots per head (nbytes shrinks by the ratio) at the cost of head-wise freedom.
The first `n_sink` slots are always kept (kvpress's KVzipPress sets their score to 1).

The extra forward is the model's, so it lives beside the model: the press asks for it
with `Observe(reconstruction=chunk_size, reconstruction_prefix=repeat_ids)` and
models.prefill runs it (models/press_inputs.py), calling `reconstruction_max_attention`
below once per chunk; the result reaches the press as obs["reconstruction"] [B, Hkv, S].

Differences from the paper and kvpress: kvpress scores chunk c only against the context
chunk it reproduces (and sinks), with each chunk seeing only its own repeat prompt; here
every reconstruction query attends to the whole context plus all reconstruction tokens
before it (the model's real attention), which is what makes chunking exact. kvpress's
default also pools the budget across layers (`layerwise=False`); budgets here are per
layer, so one compile serves every input of a shape. Sliding-window ring layers are not
pressed (their size is already bounded) and get no scores.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib
from kvjax.observation import Observe
from kvjax.presses import base, registry
from kvjax.presses.adakv import AdaKVPress


def aligned_query_positions(positions, w: int):
  """Positions [B, w] of the last w valid queries of positions [B, T] (-1 = padding),
  right-aligned like Observe.queries (rows with fewer valid queries: -1 at the front)."""
  b, t = positions.shape
  valid = positions >= 0
  rank_from_end = jnp.flip(jnp.cumsum(jnp.flip(valid, -1), -1), -1) - 1
  slot = jnp.where(valid & (rank_from_end < w), w - 1 - rank_from_end, w)
  out = jnp.full((b, w + 1), -1, jnp.int32)
  out = out.at[jnp.arange(b)[:, None], slot].set(positions.astype(jnp.int32))
  return out[:, :w]


def max_attention(queries, q_positions, k, k_positions, k_lengths,
                  spec: attn_lib.AttentionSpec = attn_lib.AttentionSpec()):
  """[B, Hkv, S] float32: per slot, the max softmax probability over queries and the query
  heads of its kv group.

  Args:
    queries: [B, Hq, W, D] (post-RoPE).
    q_positions: [B, W] int32 (-1 = no query).
    k: [B, Hkv, S, D]; k_positions [B, Hkv, S]; k_lengths [B, Hkv] (a layer cache's).
    spec: the layer's attention options (scale, window, sink tokens, soft-cap).
  """
  b, hq, w, d = queries.shape
  hkv = k.shape[1]
  g = hq // hkv
  scale = spec.scale if spec.scale is not None else d ** -0.5
  qg = queries.reshape(b, hkv, g, w, d).astype(jnp.float32)
  logits = jnp.einsum("bhgwd,bhsd->bhgws", qg, k.astype(jnp.float32)) * scale
  if spec.softcap is not None:
    logits = spec.softcap * jnp.tanh(logits / spec.softcap)
  mask = attn_lib.visibility_mask(q_positions, k_positions, k_lengths, causal=spec.causal,
                                  window=spec.window, sink_tokens=spec.sink_tokens)
  mask = mask[:, :, None]                                        # [B, Hkv, 1, W, S]
  logits = jnp.where(mask, logits, attn_lib.NEG_INF)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(logits - m), 0.0)
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  return jnp.max(p, axis=(2, 3))


@functools.partial(jax.jit, static_argnames=("specs",))
def reconstruction_max_attention(scores, model_cache, queries, q_positions, context_lengths,
                                 specs: Sequence[attn_lib.AttentionSpec]):
  """One reconstruction chunk: scores[i] <- max(scores[i], this chunk's max attention).

  Args:
    scores: per layer [B, Hkv, S_i] float32 running maxima (None for ring layers).
    model_cache: the ModelCache after the chunk was appended (context slots first).
    queries: per layer [B, Hq, W, D] the chunk's queries (Observe(queries=W)).
    q_positions: [B, T_chunk] the chunk's positions (-1 = padding).
    context_lengths: per layer [B, Hkv] valid context slots before the reconstruction
      (None for ring layers); slots past them hold reconstruction tokens and score 0.
    specs: per layer AttentionSpec (static).

  Returns: the updated per-layer scores. Layers of one stacked segment run one after the
  other (lax.map), so only one layer's [B, Hq, W, S] probabilities exist at a time.
  """
  scores = list(scores)
  w = queries[0].shape[2]
  qpos = aligned_query_positions(q_positions, w)
  for e, idxs in base._entries(model_cache):  # pylint: disable=protected-access
    seg = model_cache.segments[e]
    if not cache_lib.caps(seg).pressable or scores[idxs[0]] is None:
      continue
    spec = specs[idxs[0]]
    q = jnp.stack([queries[i] for i in idxs])

    def one(xs, spec=spec):
      layer, qi = xs
      return max_attention(qi, qpos, layer.k, layer.positions, layer.lengths, spec)

    m = jax.lax.map(one, (seg, q))                               # [n, B, Hkv, S']
    for j, i in enumerate(idxs):
      s = scores[i].shape[-1]
      slot = jnp.arange(s, dtype=jnp.int32)
      ctx = slot < context_lengths[i][..., None]
      scores[i] = jnp.maximum(scores[i], jnp.where(ctx, m[j][..., :s], 0.0))
  return scores


@registry.register("kvzip", query_agnostic=True, needs=("reconstruction",))
@dataclasses.dataclass(frozen=True)
class KVzipPress(base.ScorerPress):
  """Context-reconstruction scores with head-wise budgets (see the module docstring).

  Attributes:
    n_sink: first slots always kept. 4 (kvpress).
    chunk_size: reconstruction tokens fed per forward call (bounds the score matrix to
      [B, Hq, chunk_size, S + reconstruction]). 512.
    repeat_ids: token ids fed before the context copy (the repeat instruction, e.g. the
      tokenizer's encoding of "\\n\\nRepeat the previous context exactly."). () feeds the
      context again with no instruction.
    headwise: choose the layer's total budget across its kv heads (the paper); False gives
      every head the uniform budget.
    head_capacity_factor: with headwise, a head keeps at most this times the uniform
      budget; sets the layer's static capacity (see AdaKVPress). 1.5.
  """

  n_sink: int = 4
  chunk_size: int = 512
  repeat_ids: tuple = ()
  headwise: bool = True
  head_capacity_factor: float = 1.5

  def __post_init__(self):
    super().__post_init__()
    base.check_nonneg_int("n_sink", self.n_sink)
    base.check_nonneg_int("chunk_size", self.chunk_size, 1)
    ids = tuple(self.repeat_ids)
    for i, t in enumerate(ids):
      if isinstance(t, bool) or not hasattr(t, "__index__") or int(t) < 0:
        raise ValueError(f"repeat_ids[{i}]={t!r}; must be a token id (int >= 0)")
    object.__setattr__(self, "repeat_ids", tuple(int(t) for t in ids))
    if not isinstance(self.headwise, bool):
      raise ValueError(f"headwise={self.headwise!r}; must be True or False")
    if not self.head_capacity_factor >= 1:
      raise ValueError(f"head_capacity_factor={self.head_capacity_factor}; must be >= 1")

  @property
  def observe(self) -> Observe:
    return Observe(reconstruction=self.chunk_size, reconstruction_prefix=self.repeat_ids)

  def protected(self):
    return max(self.protect_sinks, self.n_sink), self.protect_recent

  def score(self, cache, obs, ctx):
    del ctx
    rec = obs.get("reconstruction")
    if rec is None:
      raise ValueError("KVzipPress needs obs['reconstruction'] (the context-reconstruction "
                       "scores): run it through models.prefill(press=...), or prefill with "
                       "observe=press.observe")
    if tuple(rec.shape) != tuple(cache.positions.shape):
      raise ValueError(f"obs['reconstruction'] has shape {tuple(rec.shape)}; expected "
                       f"{tuple(cache.positions.shape)} (aligned with the cache slots)")
    return jnp.where(base.valid_slots(cache), rec.astype(jnp.float32), 0.0)

  def _headwise(self) -> AdaKVPress:
    return AdaKVPress(press=dataclasses.replace(self, headwise=False), alpha_safeguard=0.0,
                      head_capacity_factor=self.head_capacity_factor)

  def layer_capacity(self, capacity, ctx=base.LayerContext()):
    if self.headwise:
      return self._headwise().layer_capacity(capacity, ctx)
    return super().layer_capacity(capacity, ctx)

  def compress_layer(self, cache, obs, ctx):
    if self.headwise:
      return self._headwise().compress_layer(cache, obs, ctx)
    return super().compress_layer(cache, obs, ctx)


__all__ = ["KVzipPress", "max_attention", "reconstruction_max_attention",
           "aligned_query_positions"]
