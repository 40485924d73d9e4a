"""Decoder-only transformer (Llama 2/3.x, Qwen2, Mistral, Gemma 2/3 text) as one NNX module.

Reads like the Llama paper (Touvron et al., 2023): token embedding -> L x [RMSNorm ->
GQA attention with RoPE -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm ->
LM head. Qwen2 adds q/k/v biases; Mistral uses a sliding window. Gemma 2 (Gemma Team,
2024) switches on, by config: (1 + w) RMSNorms, sqrt(H) embedding scale, "sandwich" norms
on the attention and MLP outputs, GeGLU-tanh, attention and final-logit soft-capping,
query_pre_attn_scalar, and alternating local (sliding) / global layers; Gemma 3 (2025)
adds QK-norm and a separate RoPE base for local layers (and drops attention soft-capping).

Layer parameters are stacked along a leading layer axis ([L, ...]) so the layers run under
`lax.scan`: compile time does not grow with depth. Layers are split into *scan groups*
(kvjax.cache.group_layers) by their attention settings and cache structure: a run of equal
layers is one scan over one layer; a repeating pattern (Gemma 2's local/global pairs,
Gemma 3's 5 local : 1 global blocks) is one scan over a body of one period, so layers of
different kinds still compile once per kind, not once per layer.

Shapes: B batch, T tokens, H hidden, Hq/Hkv heads, D head_dim, F mlp, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib
from kvjax import observation
from kvjax import rope as rope_lib
from kvjax.observation import Observe
from models import protocol
from models.config import ModelConfig

Array = jax.Array


def rms_norm(x, weight, eps, unit_offset: bool = False):
  """RMSNorm over the last axis.

  Llama: normalise in float32, cast back, then multiply by w. Gemma (unit_offset): scale by
  (1 + w) in float32 and cast after (identical in float32, differs in bfloat16).
  """
  xf = x.astype(jnp.float32)
  var = jnp.mean(xf * xf, axis=-1, keepdims=True)
  y = xf * jax.lax.rsqrt(var + eps)
  if unit_offset:
    return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
  return y.astype(x.dtype) * weight


def soft_cap(x, cap):
  return x if cap is None else cap * jnp.tanh(x / cap)


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

    def norm_w(shape):  # identity at init: w = 1, or w = 0 with a (1 + w) norm
      return p(shape, zeros=c.norm_unit_offset, ones=not c.norm_unit_offset)

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
    self.attn_norm = norm_w((L, H))
    self.mlp_norm = norm_w((L, H))
    if c.sandwich_norms:
      self.post_attn_norm = norm_w((L, H))
      self.post_mlp_norm = norm_w((L, H))
    if c.qk_norm:
      self.q_norm = norm_w((L, D))
      self.k_norm = norm_w((L, D))
    self.final_norm = norm_w((H,))
    if not c.tie_word_embeddings:
      self.lm_head = p((H, c.vocab_size))

  # -- parameter plumbing ----------------------------------------------------------------
  LAYER_PARAMS = ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "w_gate", "w_up", "w_down",
                  "b_gate", "b_up", "b_down", "attn_norm", "mlp_norm", "post_attn_norm",
                  "post_mlp_norm", "q_norm", "k_norm")

  def layer_params(self) -> dict:
    """Stacked per-layer parameters {name: [L, ...]}."""
    return {n: getattr(self, n).value for n in self.LAYER_PARAMS if hasattr(self, n)}

  def embed_tokens(self, tokens):
    x = jnp.take(self.embed.value, tokens, axis=0)
    if self.config.embed_scale:
      # HF: embed * torch.tensor(H ** 0.5).to(weight.dtype) -- float32 sqrt rounded to dtype.
      x = x * jnp.asarray(np.float32(self.config.hidden_size ** 0.5)).astype(x.dtype)
    return x

  def unembed(self, x):
    c = self.config
    x = rms_norm(x, self.final_norm.value, c.rms_norm_eps, c.norm_unit_offset)
    w = self.embed.value.T if c.tie_word_embeddings else self.lm_head.value
    logits = jnp.einsum("...h,hv->...v", x, w, preferred_element_type=jnp.float32)
    return soft_cap(logits, c.final_logit_softcapping)

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

  def init_cache(self, batch: int, capacity, *, dtype=None, layer_factory=None,
                 window_cache: bool = True) -> cache_lib.ModelCache:
    """An empty ModelCache in this model's scan groups (see models.init_cache)."""
    from models.api import init_cache  # pylint: disable=import-outside-toplevel
    return init_cache(self.config, batch, capacity, dtype=dtype, layer_factory=layer_factory,
                      window_cache=window_cache)


def check_tokens(tokens, config: ModelConfig):
  """Validates token ids: int dtype, rank 2, and (outside jit) every id in [0, vocab)."""
  if not hasattr(tokens, "dtype") or not jnp.issubdtype(tokens.dtype, jnp.integer):
    dt = getattr(tokens, "dtype", type(tokens).__name__)
    raise ValueError(f"tokens must be an integer array [batch, seq]; got dtype {dt}")
  if tokens.ndim != 2:
    raise ValueError(f"tokens must have rank 2 [batch, seq]; got shape {tuple(tokens.shape)}")
  if tokens.shape[1] < 1:
    raise ValueError("tokens must hold at least one token per row")
  from kvjax import checks  # pylint: disable=import-outside-toplevel
  return checks.token_ids(tokens, config.vocab_size)   # ids in [0, vocab) when concrete


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
  """Static per-layer settings: layers scan together only when these are equal."""
  attn: attn_lib.AttentionSpec
  rope: rope_lib.RopeConfig


def layer_specs(config: ModelConfig, backend: str = "auto") -> list[LayerSpec]:
  return [LayerSpec(attn_lib.AttentionSpec(window=config.layer_window(i),
                                           scale=config.attention_scale,
                                           softcap=config.attn_logit_softcapping,
                                           backend=backend),
                    config.layer_rope(i))
          for i in range(config.num_layers)]


def layer_keys(config: ModelConfig) -> list:
  """Per-layer keys that decide the scan groups of a model's caches (with their structure)."""
  return [(s.attn.window, s.attn.scale, s.attn.softcap, s.rope) for s in layer_specs(config)]


def _proj(x, w, b=None):
  y = jnp.einsum("bth,hk->btk", x, w)
  return y if b is None else y + b


def layer_qkv(p, x, positions, spec: LayerSpec, config: ModelConfig):
  """The half of a layer before attention: x [B, T, H] -> (q [B, Hq, T, D], k, v [B, Hkv, T, D]).

  q and k have RoPE applied (at `positions`), so k is what a cache stores.
  """
  c = config
  b, t, _ = x.shape
  norm = functools.partial(rms_norm, eps=c.rms_norm_eps, unit_offset=c.norm_unit_offset)
  h = norm(x, p["attn_norm"])
  q = _proj(h, p["wq"], p.get("bq")).reshape(b, t, c.num_heads, c.head_dim)
  k = _proj(h, p["wk"], p.get("bk")).reshape(b, t, c.num_kv_heads, c.head_dim)
  v = _proj(h, p["wv"], p.get("bv")).reshape(b, t, c.num_kv_heads, c.head_dim)
  if c.qk_norm:  # Gemma 3: per-head RMSNorm over head_dim, before RoPE
    q = norm(q, p["q_norm"])
    k = norm(k, p["k_norm"])
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
  q = rope_lib.apply_rope(q, positions, spec.rope)
  k = rope_lib.apply_rope(k, positions, spec.rope)
  return q, k, v


def layer_finish(p, x, attn_out, config: ModelConfig):
  """The half of a layer after attention: attn_out [B, Hq, T, D] -> x [B, T, H]
  (output projection, residual, MLP, residual)."""
  c = config
  b, t, _ = x.shape
  norm = functools.partial(rms_norm, eps=c.rms_norm_eps, unit_offset=c.norm_unit_offset)
  o = attn_out.transpose(0, 2, 1, 3).reshape(b, t, c.num_heads * c.head_dim)
  o = _proj(o, p["wo"], p.get("bo"))
  if c.sandwich_norms:
    o = norm(o, p["post_attn_norm"])
  x = x + o.astype(x.dtype)
  h = norm(x, p["mlp_norm"])
  act = activation(c.hidden_act)
  g = _proj(h, p["w_gate"], p.get("b_gate"))
  u = _proj(h, p["w_up"], p.get("b_up"))
  m = _proj(act(g) * u, p["w_down"], p.get("b_down"))
  if c.sandwich_norms:
    m = norm(m, p["post_mlp_norm"])
  return x + m.astype(x.dtype)


def _layer(p, x, positions, layer_cache, spec: LayerSpec, config: ModelConfig,
           observe: Observe, layer_index=None):
  """One decoder layer. x [B, T, H] -> x, layer_cache', obs dict.

  With `layer_index` set, `layer_cache` is a stacked segment cache and the layer updates its
  own slice in place (`attend(..., layer=layer_index)`).
  """
  c = config
  b, t, _ = x.shape
  q, k, v = layer_qkv(p, x, positions, spec, c)
  want_colsum = observe.colsum
  akw = dict(return_colsum=want_colsum, colsum_window=observe.colsum_window)
  if observe.lse:
    akw["return_lse"] = True
  if layer_cache is None:
    # No cache: the chunk attends to itself.
    kpos = jnp.broadcast_to(positions[:, None, :], (b, c.num_kv_heads, t))
    lengths = jnp.full((b, c.num_kv_heads), t, jnp.int32)
    res = attn_lib.attention(q, k, v, lengths, q_positions=positions, k_positions=kpos,
                             spec=spec.attn, **akw)
    new_cache = None
  elif layer_index is not None:
    res, new_cache = layer_cache.attend(q, k, v, positions, spec.attn, layer=layer_index,
                                        **akw)
  else:
    res, new_cache = layer_cache.attend(q, k, v, positions, spec.attn, **akw)
  x = layer_finish(p, x, res.out, c)
  obs = {}
  if want_colsum:
    obs["colsum"] = res.colsum
  if observe.queries:
    w = observe.queries
    obs["queries"] = _last_queries(q, positions, w)
    if observe.lse and res.lse is not None:
      obs["lse"] = _last_queries(res.lse[..., None], positions, w)[..., 0]
  if observe.query_moments is not None:
    obs.update(observation.query_moments(q, positions, observe.query_moments, spec.rope))
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

  Layers run as scan groups (kvjax.cache.group_layers over attention settings and cache
  structure); a cache stacked in other groups is regrouped first (a copy: models.init_cache
  and models.prefill build caches in the model's own groups, so the decode loop never
  regroups). With last_only, logits are [B, 1, V] at each row's last valid token.
  """
  c = model.config
  x = model.embed_tokens(tokens)
  params = model.layer_params()
  specs = layer_specs(c, backend)
  keys = layer_keys(c)
  if cache is None:
    grouping = cache_lib.group_layers(keys)
  else:
    sigs = [cache_lib._signature(s) for s in cache.layer_structs()]  # pylint: disable=protected-access
    grouping = cache_lib.group_layers(list(zip(keys, sigs)))
    cache = cache.regroup(grouping)
  obs_groups, new_segments = [], []
  entry = 0
  a = 0
  for n, per in grouping:
    reps = n // per
    a0 = a
    g_specs = specs[a:a + per]
    if cache is None:
      stacks = (None,) * per
    else:
      stacks = tuple(cache.segments[entry:entry + per])
    inplace = tuple(s is not None and cache_lib.caps(s).inplace_layer for s in stacks)
    # bfloat16 caches ride the scan as their bits (see kvjax.cache.to_bits).
    carried = tuple(cache_lib.to_bits(s) if ip else None for s, ip in zip(stacks, inplace))
    scanned = tuple(None if ip else s for s, ip in zip(stacks, inplace))

    def body(carry, xs, g_specs=g_specs, inplace=inplace, per=per, a0=a0):
      x, cs = carry
      i, sl = xs
      cs = list(cs)
      ys_c, ys_obs = [], []
      for j in range(per):
        # Index the stacked [L, ...] parameters in place: slicing/reshaping them into the
        # scan's xs made XLA:CPU copy every weight once per call (a decode step's fixed cost).
        p_l = jax.tree.map(lambda w, j=j: w[a0 + i * per + j], params)
        if inplace[j]:
          x, cs[j], obs = _layer(p_l, x, positions, cs[j], g_specs[j], c, observe,
                                 layer_index=i)
          ys_c.append(None)
        else:
          x, c_new, obs = _layer(p_l, x, positions, sl[j], g_specs[j], c, observe)
          ys_c.append(c_new)
        ys_obs.append(obs)
      return (x, tuple(cs)), (tuple(ys_c), tuple(ys_obs))

    (x, carried), (ys_c, ys_obs) = jax.lax.scan(
        body, (x, carried), (jnp.arange(reps), scanned))
    new_segments += [cache_lib.from_bits(carried[j]) if inplace[j] else ys_c[j]
                     for j in range(per)]
    obs_groups.append((reps, ys_obs))
    entry += per
    a += n
  if last_only:
    x = protocol.last_token(x, positions)
  logits = model.unembed(x)
  new_cache = None if cache is None else protocol.advance(cache, new_segments, positions)
  return logits, new_cache, protocol.depth_order(obs_groups)
