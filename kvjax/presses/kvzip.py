"""KVzip: query-agnostic scores from context reconstruction (Kim et al., 2025, "KVzip:
Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv:2505.23416).

After the context is prefilled, the model is asked to reproduce it. As in the paper's
chunked scoring, the context is cut into chunks of `chunk_size` tokens; chunk c is fed on
top of the prefilled context cache alone (never another chunk's tokens) as

  chunk 0:  repeat_ids   + answer_ids + chunk 0        ("Repeat the previous context exactly.")
  chunk c:  continue_ids + the last `overlap` tokens of chunk c-1 + answer_ids + chunk c
            ("Repeat the part of the previous context exactly, starting with ..."),

and a KV pair the model needs to reconstruct its part of the context is one that any
future question may need, so

  score(slot) = max over the queries q of the chunk that reproduces the slot's token and
                the query heads of the slot's kv group of softmax(q . k / sqrt(d))[slot],

the softmax running over everything the query sees (the context cache and its own chunk
input), exactly as the model's own attention does (window, soft-capping, scale). The score
matrix never exceeds [B, Hq, W, S + W] (W = one chunk's input), and the whole scoring costs
about one more pass over the context.

Budgets are head-wise, as in the paper: a layer keeps the same total as the uniform rule
(the sum of every kv head's int(L * (1 - compression_ratio))), chosen as the best scores
across the layer's heads, so heads keep different numbers of slots (AdaKV's selection with
no safeguard). For real savings each layer's static capacity is
min(S, ceil(head_capacity_factor * uniform budget)); 1.0 keeps exactly the uniform
number of slots per head (nbytes shrinks by the ratio) at the cost of head-wise freedom.
The first `n_sink` slots are always kept (kvpress's KVzipPress sets their score to 1).

The extra forward is the model's, so it lives beside the model: the press asks for it
with an `Observe(reconstruction=chunk_size, reconstruction_prompt=(...))` and
models.prefill runs it (models/press_inputs.py), calling `reconstruction_max_attention`
below once per chunk; the result reaches the press as obs["reconstruction"] [B, Hkv, S].

Differences from the paper's code and kvpress: kvpress's default pools the budget across
layers (`layerwise=False`); budgets here are per layer, so one compile serves every input
of a shape. Sliding-window ring layers are not pressed (their size is already bounded) and
get no scores.
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
                  spec: attn_lib.AttentionSpec = attn_lib.AttentionSpec(), lse=None,
                  q_block: int = 256):
  """[B, Hkv, S] float32: per slot, the max softmax probability over queries and the query
  heads of its kv group.

  Args:
    queries: [B, Hq, W, D] (post-RoPE).
    q_positions: [B, W] int32 (-1 = no query).
    k: [B, Hkv, S, D]; k_positions [B, Hkv, S]; k_lengths [B, Hkv] (a layer cache's).
    spec: the layer's attention options (scale, window, sink tokens, soft-cap).
    lse: optional [B, Hq, W] float32 log-sum-exp of each query's visible logits, as the
      forward pass computed it (Observe(lse=True)); then a probability is
      exp(logit - lse) and the max needs no softmax pass: exp runs once per slot. Without
      it the softmax over the slots of `k` is computed here.
    q_block: queries per step; the logits never exceed [B, Hq, q_block, S].
  """
  b, hq, w, d = queries.shape
  hkv, s = k.shape[1], k.shape[2]
  g = hq // hkv
  scale = spec.scale if spec.scale is not None else d ** -0.5
  kf = k.astype(jnp.float32)
  nb = -(-w // q_block)
  pad = nb * q_block - w
  qf = jnp.pad(queries.astype(jnp.float32), ((0, 0), (0, 0), (0, pad), (0, 0)))
  qf = qf.reshape(b, hkv, g, nb, q_block, d).transpose(3, 0, 1, 2, 4, 5)
  qp = jnp.pad(q_positions, ((0, 0), (0, pad)), constant_values=-1)
  qp = qp.reshape(b, nb, q_block).transpose(1, 0, 2)
  if lse is not None:
    lf = jnp.pad(lse.astype(jnp.float32), ((0, 0), (0, 0), (0, pad)))
    lf = lf.reshape(b, hkv, g, nb, q_block).transpose(3, 0, 1, 2, 4)
  else:
    lf = jnp.zeros((nb, b, hkv, g, q_block), jnp.float32)

  def step(best, xs):
    qb, pb, lb = xs
    logits = jnp.einsum("bhgwd,bhsd->bhgws", qb, kf) * scale
    if spec.softcap is not None:
      logits = spec.softcap * jnp.tanh(logits / spec.softcap)
    mask = attn_lib.visibility_mask(pb, k_positions, k_lengths, causal=spec.causal,
                                    window=spec.window, n_sink=spec.n_sink)
    mask = mask[:, :, None]                                      # [B, Hkv, 1, w, S]
    if lse is not None:
      logp = jnp.where(mask, logits - lb[..., None], attn_lib.NEG_INF)
      return jnp.maximum(best, jnp.max(logp, axis=(2, 3))), None
    logits = jnp.where(mask, logits, attn_lib.NEG_INF)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    logp = jnp.log(p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30))
    return jnp.maximum(best, jnp.max(jnp.where(mask, logp, attn_lib.NEG_INF), axis=(2, 3))), None

  best, _ = jax.lax.scan(step, jnp.full((b, hkv, s), attn_lib.NEG_INF, jnp.float32),
                         (qf, qp, lf))
  return jnp.where(best > attn_lib.NEG_INF / 2, jnp.exp(best), 0.0)


@functools.partial(jax.jit, static_argnames=("specs", "span"))
def reconstruction_max_attention(scores, model_cache, queries, lses, q_positions, lo, hi,
                                 specs: Sequence[attn_lib.AttentionSpec], span: int):
  """One reconstruction chunk: scores[i] <- max(scores[i], this chunk's max attention) on
  the slots whose original position is in [lo, hi] (the tokens the chunk reproduces).

  Only those slots are scored: per row and kv head, the `span` slots from the first one
  at position >= lo are gathered (a layer's slots are in position order), so the logits
  are [B, Hq, W, span], not [B, Hq, W, S]; the softmax normalizer is the forward's lse.

  Args:
    scores: per layer [B, Hkv, S_i] float32 running maxima (None for ring layers).
    model_cache: the ModelCache after the chunk was appended (context slots first).
    queries: per layer [B, Hq, W, D] the chunk's queries (Observe(queries=W)).
    lses: per layer [B, Hq, W] their log-sum-exps from the forward (Observe(lse=True)), or
      None entries (then the softmax runs over the gathered slots only, which is exact
      only when they are all the query sees: tests and references).
    q_positions: [B, T_chunk] the chunk's positions (-1 = padding).
    lo, hi: [B] the range of original positions the chunk reproduces (lo > hi: none).
    specs: per layer AttentionSpec (static).
    span: static upper bound of hi - lo + 1 (the chunk size).

  Returns: the updated per-layer scores. Layers of one stacked segment run one after the
  other (lax.map), so only one layer's logits exist at a time.
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
    lse = None if lses[idxs[0]] is None else jnp.stack([lses[i] for i in idxs])
    s = scores[idxs[0]].shape[-1]
    n = min(span, s)

    def one(xs, spec=spec, s=s, n=n):
      layer, qi, li = xs
      pos = layer.positions[..., :s]
      valid = jnp.arange(s) < layer.lengths[..., None]
      first = jnp.sum(valid & (pos >= 0) & (pos < lo[:, None, None]), axis=-1)  # [B, Hkv]
      idx = jnp.minimum(first[..., None] + jnp.arange(n), s - 1)                # [B, Hkv, n]
      kw = jnp.take_along_axis(layer.k[..., :s, :], idx[..., None], axis=2)
      pw = jnp.take_along_axis(pos, idx, axis=2)
      mine = ((first[..., None] + jnp.arange(n) < layer.lengths[..., None]) &
              (pw >= lo[:, None, None]) & (pw <= hi[:, None, None]))
      pw = jnp.where(mine, pw, -1)
      m = max_attention(qi, qpos, kw, pw, jnp.full(pw.shape[:2], n, jnp.int32), spec, lse=li)
      return idx, jnp.where(mine, m, 0.0)

    idx, m = jax.lax.map(one, (seg, q, lse))                      # [n_layers, B, Hkv, n]
    bi = jnp.arange(idx.shape[1])[:, None, None]
    hi_ = jnp.arange(idx.shape[2])[None, :, None]
    for j, i in enumerate(idxs):
      scores[i] = scores[i].at[bi, hi_, idx[j]].max(m[j])
  return scores


@registry.register("kvzip", query_agnostic=True, needs=("reconstruction",))
@dataclasses.dataclass(frozen=True, repr=False)
class KVzipPress(base.ScorerPress):
  """Context-reconstruction scores with head-wise budgets (see the module docstring).

  Attributes:
    n_sink: first slots always kept. 4 (kvpress).
    chunk_size: context tokens reproduced per forward call. 2048 (the paper's 2K).
    repeat_ids: token ids of the repeat instruction fed before the first chunk (e.g. the
      tokenizer's encoding of "\\n\\nRepeat the previous context exactly."). () feeds the
      context again with no instruction.
    continue_ids: the instruction before every later chunk, followed by the previous
      chunk's last `overlap` tokens (e.g. "\\n\\nRepeat the part of the previous context
      exactly, starting with "). () repeats `repeat_ids` with no overlap.
    overlap: previous-chunk tokens quoted after `continue_ids`. 8 (the paper's code).
    answer_ids: token ids between the instruction and the chunk (in chat form, the end of
      the user turn and the assistant's generation prompt).
    headwise: choose the layer's total budget across its kv heads (the paper); False gives
      every head the uniform budget.
    head_capacity_factor: with headwise, a head keeps at most this times the uniform
      budget; sets the layer's static capacity (see AdaKVPress). 1.5.
  """

  n_sink: int = 4
  chunk_size: int = 2048
  repeat_ids: tuple = ()
  continue_ids: tuple = ()
  overlap: int = 8
  answer_ids: tuple = ()
  headwise: bool = True
  head_capacity_factor: float = 1.5

  def __post_init__(self):
    super().__post_init__()
    base.check_nonneg_int("n_sink", self.n_sink)
    base.check_nonneg_int("chunk_size", self.chunk_size, 1)
    base.check_nonneg_int("overlap", self.overlap)
    for name in ("repeat_ids", "continue_ids", "answer_ids"):
      ids = tuple(getattr(self, name))
      for i, t in enumerate(ids):
        if isinstance(t, bool) or not hasattr(t, "__index__") or int(t) < 0:
          raise ValueError(f"{name}[{i}]={t!r}; must be a token id (int >= 0)")
      object.__setattr__(self, name, tuple(int(t) for t in ids))
    if not isinstance(self.headwise, bool):
      raise ValueError(f"headwise={self.headwise!r}; must be True or False")
    if not self.head_capacity_factor >= 1:
      raise ValueError(f"head_capacity_factor={self.head_capacity_factor}; must be >= 1")

  @property
  def observe(self) -> Observe:
    overlap = self.overlap if self.continue_ids else 0
    return Observe(reconstruction=self.chunk_size, reconstruction_prompt=(
        self.repeat_ids, self.continue_ids, overlap, self.answer_ids))

  def protected(self):
    return self.n_sink, self.protect_recent

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

  def __repr__(self) -> str:
    return base.repr_with_memory(self)  # head-wise budgets pad (see AdaKVPress)

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
