"""Decoder-only transformer (Llama 2/3.x, Qwen2, Mistral) as one Flax NNX module.

Reads like the Llama paper (Touvron et al., 2023): token embedding -> L x [RMSNorm ->
GQA attention with RoPE -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm ->
LM head. Qwen2 adds q/k/v biases; Mistral uses a sliding window.

Layer parameters are stacked along a leading layer axis ([L, ...]) so the layers run under
`lax.scan`: compile time does not grow with depth. Layers whose attention differs (window
vs full) or whose caches differ (kind, capacity) are grouped into consecutive *segments*;
each segment is one scan.

Shapes: B batch, T tokens, H hidden, Hq/Hkv heads, D head_dim, F mlp, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib
from kvjax import rope as rope_lib
from kvjax.observation import Observe
from models.config import ModelConfig

Array = jax.Array


def rms_norm(x, weight, eps):
  xf = x.astype(jnp.float32)
  var = jnp.mean(xf * xf, axis=-1, keepdims=True)
  return (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype) * weight


def activation(name):
  if name == "silu":
    return jax.nn.silu
  if name == "gelu_pytorch_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  return lambda x: jax.nn.gelu(x, approximate=False)


def _dtype(name):
  return jnp.dtype(name)


class Transformer(nnx.Module):
  """The decoder. `model(tokens)` -> logits; caches via models.prefill / models.decode."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    dt = _dtype(c.dtype)
    L, H, D, F = c.num_layers, c.hidden_size, c.head_dim, c.intermediate_size
    init = nnx.initializers.normal(0.02)
    key = rngs.params

    def p(shape, zeros=False, ones=False):
      if ones:
        return nnx.Param(jnp.ones(shape, dt))
      if zeros:
        return nnx.Param(jnp.zeros(shape, dt))
      return nnx.Param(init(key(), shape, dt))

    self.embed = p((c.vocab_size, H))
    self.wq = p((L, H, c.num_heads * D))
    self.wk = p((L, H, c.num_kv_heads * D))
    self.wv = p((L, H, c.num_kv_heads * D))
    self.wo = p((L, c.num_heads * D, H))
    if c.attention_bias:
      self.bq = p((L, c.num_heads * D), zeros=True)
      self.bk = p((L, c.num_kv_heads * D), zeros=True)
      self.bv = p((L, c.num_kv_heads * D), zeros=True)
    if c.o_bias:
      self.bo = p((L, H), zeros=True)
    self.w_gate = p((L, H, F))
    self.w_up = p((L, H, F))
    self.w_down = p((L, F, H))
    if c.mlp_bias:
      self.b_gate = p((L, F), zeros=True)
      self.b_up = p((L, F), zeros=True)
      self.b_down = p((L, H), zeros=True)
    self.attn_norm = p((L, H), ones=True)
    self.mlp_norm = p((L, H), ones=True)
    self.final_norm = p((H,), ones=True)
    if not c.tie_word_embeddings:
      self.lm_head = p((H, c.vocab_size))

  # -- parameter plumbing ----------------------------------------------------------------
  LAYER_PARAMS = ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "w_gate", "w_up", "w_down",
                  "b_gate", "b_up", "b_down", "attn_norm", "mlp_norm")

  def layer_params(self) -> dict:
    """Stacked per-layer parameters {name: [L, ...]}."""
    return {n: getattr(self, n).value for n in self.LAYER_PARAMS if hasattr(self, n)}

  def embed_tokens(self, tokens):
    return jnp.take(self.embed.value, tokens, axis=0)

  def unembed(self, x):
    x = rms_norm(x, self.final_norm.value, self.config.rms_norm_eps)
    w = self.embed.value.T if self.config.tie_word_embeddings else self.lm_head.value
    return jnp.einsum("...h,hv->...v", x, w, preferred_element_type=jnp.float32)

  # -- forward -----------------------------------------------------------------------------
  def __call__(self, tokens: Array, *, positions: Optional[Array] = None,
               attention_mask: Optional[Array] = None) -> Array:
    """Full forward without a cache: tokens int32 [B, T] -> logits float32 [B, T, V].

    attention_mask [B, T] (1 = token, 0 = padding, any side) sets positions to
    cumsum(mask) - 1 so real tokens start at position 0, like HF with position_ids.
    """
    tokens = check_tokens(tokens, self.config)
    if positions is None:
      positions = positions_from_mask(tokens, attention_mask)
    logits, _, _ = forward(self, tokens, positions, cache=None)
    return logits

  # duck-typed hooks for kvjax.generate (kvjax never imports models)
  def prefill(self, tokens, **kw):
    from models.api import prefill  # pylint: disable=import-outside-toplevel
    return prefill(self, tokens, **kw)

  def decode(self, tokens, cache, **kw):
    from models.api import decode  # pylint: disable=import-outside-toplevel
    return decode(self, tokens, cache, **kw)


def check_tokens(tokens, config: ModelConfig):
  """Validates token ids: int dtype, rank 2."""
  if not hasattr(tokens, "dtype") or not jnp.issubdtype(tokens.dtype, jnp.integer):
    dt = getattr(tokens, "dtype", type(tokens).__name__)
    raise ValueError(f"tokens must be an integer array [batch, seq]; got dtype {dt}")
  if tokens.ndim != 2:
    raise ValueError(f"tokens must have rank 2 [batch, seq]; got shape {tuple(tokens.shape)}")
  if tokens.shape[1] < 1:
    raise ValueError("tokens must hold at least one token per row")
  return tokens.astype(jnp.int32)


def positions_from_mask(tokens, attention_mask=None, start=None):
  """Positions [B, T]: start + cumsum(mask) - 1 for real tokens, -1 for padding."""
  b, t = tokens.shape
  if attention_mask is None:
    mask = jnp.ones((b, t), jnp.int32)
  else:
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != (b, t):
      raise ValueError(f"attention_mask shape {attention_mask.shape}; expected {(b, t)}")
    mask = attention_mask.astype(jnp.int32)
  pos = jnp.cumsum(mask, axis=-1) - 1
  if start is not None:
    pos = pos + start[:, None]
  return jnp.where(mask > 0, pos, -1).astype(jnp.int32)


class LayerSpec(NamedTuple):
  """Static per-layer settings that decide segment boundaries."""
  attn: attn_lib.AttentionSpec
  rope: rope_lib.RopeConfig


def layer_specs(config: ModelConfig, backend: str = "auto") -> list[LayerSpec]:
  rope = config.rope
  return [LayerSpec(attn_lib.AttentionSpec(window=config.layer_window(i), backend=backend), rope)
          for i in range(config.num_layers)]


def _segments(specs, cache_sizes):
  """Splits layers into runs with equal LayerSpec that do not straddle cache segments."""
  bounds = set()
  acc = 0
  for n in cache_sizes:
    acc += n
    bounds.add(acc)
  segs, start = [], 0
  for i in range(1, len(specs) + 1):
    if i == len(specs) or i in bounds or specs[i] != specs[start]:
      segs.append((start, i))
      start = i
  return segs


def _proj(x, w, b=None):
  y = jnp.einsum("bth,hk->btk", x, w)
  return y if b is None else y + b


def _layer(p, x, positions, layer_cache, spec: LayerSpec, config: ModelConfig,
           observe: Observe, layer_index=None):
  """One decoder layer. x [B, T, H] -> x, layer_cache', obs dict.

  With `layer_index` set, `layer_cache` is a stacked segment cache and the layer updates its
  own slice in place (`attend_stacked`).
  """
  c = config
  b, t, _ = x.shape
  h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
  q = _proj(h, p["wq"], p.get("bq")).reshape(b, t, c.num_heads, c.head_dim)
  k = _proj(h, p["wk"], p.get("bk")).reshape(b, t, c.num_kv_heads, c.head_dim)
  v = _proj(h, p["wv"], p.get("bv")).reshape(b, t, c.num_kv_heads, c.head_dim)
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
  q = rope_lib.apply_rope(q, positions, spec.rope)
  k = rope_lib.apply_rope(k, positions, spec.rope)
  want_colsum = observe.colsum
  akw = dict(return_colsum=want_colsum, colsum_window=observe.colsum_window)
  if layer_cache is None:
    # No cache: the chunk attends to itself.
    kpos = jnp.broadcast_to(positions[:, None, :], (b, c.num_kv_heads, t))
    lengths = jnp.full((b, c.num_kv_heads), t, jnp.int32)
    res = attn_lib.attention(q, k, v, lengths, q_positions=positions, k_positions=kpos,
                             spec=spec.attn, **akw)
    new_cache = None
  elif layer_index is not None:
    res, new_cache = layer_cache.attend_stacked(layer_index, q, k, v, positions, spec.attn, **akw)
  else:
    res, new_cache = layer_cache.attend(q, k, v, positions, spec.attn, **akw)
  o = res.out.transpose(0, 2, 1, 3).reshape(b, t, c.num_heads * c.head_dim)
  x = x + _proj(o, p["wo"], p.get("bo")).astype(x.dtype)
  h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
  act = activation(c.hidden_act)
  g = _proj(h, p["w_gate"], p.get("b_gate"))
  u = _proj(h, p["w_up"], p.get("b_up"))
  x = x + _proj(act(g) * u, p["w_down"], p.get("b_down")).astype(x.dtype)
  obs = {}
  if want_colsum:
    obs["colsum"] = res.colsum
  if observe.queries:
    w = observe.queries
    obs["queries"] = _last_queries(q, positions, w)
  return x, new_cache, obs


def _last_queries(q, positions, w):
  """The last w valid queries of each row: [B, Hq, w, D] (rows with fewer are zero-padded)."""
  b, hq, t, d = q.shape
  valid = positions >= 0
  rank_from_end = jnp.flip(jnp.cumsum(jnp.flip(valid, -1), -1), -1) - 1  # 0 = last valid
  slot = jnp.where(valid & (rank_from_end < w), w - 1 - rank_from_end, w)  # [B, T]
  out = jnp.zeros((b, hq, w + 1, d), q.dtype)
  bi = jnp.arange(b)[:, None]
  out = out.at[bi, :, slot].set(q.transpose(0, 2, 1, 3))
  return out[:, :, :w]


def forward(model: Transformer, tokens, positions, cache: Optional[cache_lib.ModelCache],
            observe: Observe = Observe(), backend: str = "auto", last_only: bool = False):
  """Runs all layers. Returns (logits [B,T,V] f32, new ModelCache | None, per-layer obs list).

  With last_only, logits are [B, 1, V] at each row's last valid token (long prompts).
  """
  c = model.config
  x = model.embed_tokens(tokens)
  params = model.layer_params()
  specs = layer_specs(c, backend)
  cache_sizes = cache.segment_sizes if cache is not None else (c.num_layers,)
  segs = _segments(specs, cache_sizes)
  new_layer_segments = []
  obs_all = []
  # map layer index -> (cache segment id, offset)
  seg_of_layer = []
  for si, n in enumerate(cache_sizes):
    seg_of_layer += [(si, j) for j in range(n)]
  for (a, bnd) in segs:
    spec = specs[a]
    p_seg = jax.tree.map(lambda w, a=a, bnd=bnd: w[a:bnd], params)
    if cache is not None:
      si, off = seg_of_layer[a]
      cseg = jax.tree.map(lambda z, off=off, n=bnd - a: z[off:off + n], cache.segments[si])
    else:
      cseg = None

    if cseg is not None and hasattr(cseg, "attend_stacked"):
      # In-place path: the stacked segment cache is carried through the scan.
      def body(carry, xs, spec=spec):
        x, cs = carry
        p_l, i = xs
        x, cs, obs = _layer(p_l, x, positions, cs, spec, c, observe, layer_index=i)
        return (x, cs), obs

      (x, cseg_new), obs = jax.lax.scan(body, (x, cseg), (p_seg, jnp.arange(bnd - a)))
    else:
      def body(x, xs, spec=spec):
        p_l, c_l = xs
        x, c_new, obs = _layer(p_l, x, positions, c_l, spec, c, observe)
        return x, (c_new, obs)

      x, (cseg_new, obs) = jax.lax.scan(body, x, (p_seg, cseg))
    new_layer_segments.append((a, bnd, cseg_new))
    for i in range(bnd - a):
      obs_all.append(jax.tree.map(lambda o, i=i: o[i], obs))
  if last_only:
    last = jnp.argmax(positions, axis=-1)  # positions increase along valid tokens
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)
  logits = model.unembed(x)
  new_cache = None
  if cache is not None:
    # Reassemble the cache segments (a cache segment may have been split by layer specs).
    pieces = {si: [] for si in range(len(cache.segments))}
    for a, bnd, cseg_new in new_layer_segments:
      si, _ = seg_of_layer[a]
      pieces[si].append(cseg_new)
    segments = tuple(
        p[0] if len(p) == 1 else jax.tree.map(lambda *zs: jnp.concatenate(zs), *p)
        for _, p in sorted(pieces.items()))
    n_new = jnp.sum(positions >= 0, axis=-1).astype(jnp.int32)
    new_cache = cache.replace(segments=segments, next_position=cache.next_position + n_new)
  return logits, new_cache, obs_all
