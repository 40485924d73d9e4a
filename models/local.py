"""Local attention: sliding windows with attention sinks, dilated windows, and local/global
interleaving.

* Sliding window (Beltagy et al., 2020; Mistral): a query sees exactly `window` tokens
  (itself included), plus the first `n_sink` tokens of the sequence, the attention
  sinks of StreamingLLM (Xiao et al., 2023), here trained with the model rather than added
  after the fact. Decode memory is a ring buffer of `n_sink + window` slots
  (`kvjax.window.WindowKVCache`), whatever the length.
* Dilated window: keys at positions that are multiples of `dilation` within a span of
  `window * dilation` tokens (plus sinks). Where this differs from Longformer: the stride
  has an absolute phase (Child et al., 2019's strided pattern) instead of Longformer's
  query-relative one, so the ring holds only the `window` keys the layer can ever see (a
  query-relative dilation needs the whole span in the cache at decode).
* Interleaving: `local_per_global` local layers, then one global layer, repeated (Gemma 2:
  1, Gemma 3: 5; None = no global layer, so all decode memory is O(window)). Global layers
  keep a `DenseKVCache` of `capacity` slots.

`AttentionMixer` is also the attention of the hybrid (Griffin) and CLA families.
Shapes: B batch, T tokens, H hidden, Hq / Hkv heads, D head_dim.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from kvjax import attention as attn_lib
from kvjax import cache as cache_lib
from kvjax import rope as rope_lib
from kvjax import window as window_lib
from models import decoder as dec
from models import transformer as tfm

SHARE_MODES = ("own", "reuse")
LOCAL_KINDS = ("sliding", "dilated")


@dataclasses.dataclass(frozen=True)
class AttentionMixer(dec.Mixer):
  """GQA attention with RoPE; global, sliding-window or dilated.

  Attributes:
    num_heads, num_kv_heads, head_dim: Hq, Hkv, D.
    rope_theta: RoPE base.
    window: None = global (full causal) attention; else the local window W.
    n_sink: attention sinks of a local layer.
    dilation: stride of a dilated local layer (1 = sliding window).
    share: "own" computes and caches K/V; "reuse" (cross-layer attention) has no K/V
      projections and attends over the K/V of the preceding "own" layer of its repeat.
  """

  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  rope_theta: float = 10000.0
  window: Optional[int] = None
  n_sink: int = 0
  dilation: int = 1
  share: str = "own"

  def __post_init__(self):
    dec.require_int("num_heads", self.num_heads)
    dec.require_int("num_kv_heads", self.num_kv_heads)
    dec.require_int("head_dim", self.head_dim, lo=2)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even (RoPE)")
    if self.window is not None:
      dec.require_int("window", self.window)
    dec.require_int("n_sink", self.n_sink, lo=0)
    dec.require_int("dilation", self.dilation)
    dec.require_choice("share", self.share, SHARE_MODES)
    if self.window is None and (self.n_sink or self.dilation != 1):
      raise ValueError(f"n_sink={self.n_sink} / dilation={self.dilation} need a "
                       "local window (window=None is global attention)")
    if self.share == "reuse" and self.window is not None:
      raise ValueError(f"share='reuse' needs global attention; got window={self.window}")

  @property
  def has_cache(self):
    return self.share == "own"

  @property
  def bounded_by_capacity(self):
    return self.share == "own" and self.window is None

  @property
  def rope(self):
    return rope_lib.RopeConfig(head_dim=self.head_dim, theta=self.rope_theta)

  def spec(self, backend):
    if self.window is None:
      return attn_lib.AttentionSpec(backend=backend)
    return attn_lib.AttentionSpec(window=self.window * self.dilation,
                                  n_sink=self.n_sink, backend=backend)

  def init(self, rand, config):
    dt = jnp.dtype(config.dtype)
    h, s = config.hidden_size, config.init_std
    hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
    p = {"wq": rand.normal((h, hq * d), dt, s), "wo": rand.normal((hq * d, h), dt, s)}
    if self.share == "own":
      p["wk"] = rand.normal((h, hkv * d), dt, s)
      p["wv"] = rand.normal((h, hkv * d), dt, s)
    return p

  def init_cache(self, config, batch, capacity, dtype):
    if self.share != "own":
      return None
    if self.window is None:
      return cache_lib.DenseKVCache.init(batch, self.num_kv_heads, capacity, self.head_dim,
                                         dtype)
    return window_lib.WindowKVCache.init(batch, self.num_kv_heads, self.window, self.head_dim,
                                         dtype, n_sink=self.n_sink,
                                         dilation=self.dilation)

  def _heads(self, x, w, n, positions):
    b, t, _ = x.shape
    y = jnp.einsum("bth,hk->btk", x, w).reshape(b, t, n, self.head_dim).transpose(0, 2, 1, 3)
    return y if positions is None else rope_lib.apply_rope(y, positions, self.rope)

  def __call__(self, p, x, positions, cache, shared, ctx):
    return self.observed(p, x, positions, cache, shared, ctx)[:3]

  def observed(self, p, x, positions, cache, shared, ctx):
    """__call__ plus press observations of a dense-KV layer (`ctx.observe`; see
    kvjax.observation): colsum aligned with its cache slots, the last queries post-RoPE."""
    b, t, _ = x.shape
    spec = self.spec(ctx.backend)
    obs = {}
    q = self._heads(x, p["wq"], self.num_heads, positions)
    if self.share == "reuse":
      if shared is None:
        raise ValueError("a 'reuse' attention layer needs a preceding 'own' layer")
      if ctx.cached:  # the owner's cache, already holding this chunk
        res = attn_lib.attention(q, shared.k, shared.v, shared.lengths, q_positions=positions,
                                 k_positions=shared.positions, spec=spec)
      else:
        k, v, kpos = shared
        lengths = jnp.full((b, self.num_kv_heads), t, jnp.int32)
        res = attn_lib.attention(q, k, v, lengths, q_positions=positions, k_positions=kpos,
                                 spec=spec)
    else:
      k = self._heads(x, p["wk"], self.num_kv_heads, positions)
      v = self._heads(x, p["wv"], self.num_kv_heads, None)
      if cache is None:
        kpos = window_lib.dilated_positions(positions, self.dilation, self.n_sink)
        kpos = jnp.broadcast_to(kpos[:, None, :], (b, self.num_kv_heads, t))
        lengths = jnp.full((b, self.num_kv_heads), t, jnp.int32)
        res = attn_lib.attention(q, k, v, lengths, q_positions=positions, k_positions=kpos,
                                 spec=spec)
        shared = (k, v, kpos)
      elif cache_lib.caps(cache).pressable:
        ob = ctx.observe
        res, cache = cache.attend(q, k, v, positions, spec, return_colsum=ob.colsum,
                                  colsum_window=ob.colsum_window)
        if ob.colsum:
          obs["colsum"] = res.colsum
        if ob.queries:  # pylint: disable-next=protected-access
          obs["queries"] = tfm._last_queries(q, positions, ob.queries)
        shared = cache
      else:
        res, cache = cache.attend(q, k, v, positions, spec)
        shared = cache
    o = res.out.transpose(0, 2, 1, 3).reshape(b, t, self.num_heads * self.head_dim)
    return jnp.einsum("btk,kh->bth", o, p["wo"]), cache, shared, obs


@dataclasses.dataclass(frozen=True)
class LocalAttentionConfig(dec.DecoderConfig):
  """Local (sliding / dilated) attention with optional global layers.

  Attributes:
    num_heads, num_kv_heads, head_dim, rope_theta: attention shape (GQA).
    window: keys per local query (a dilated layer spans window * dilation positions).
    n_sink: attention sinks kept by every local layer.
    dilation: stride of "dilated" local layers.
    local_kinds: kinds of the local slots, cycled ("sliding" | "dilated").
    local_per_global: local layers before each global layer (Gemma 2: 1, Gemma 3: 5);
      None = no global layers (O(window) decode memory); 0 = all global.
  """

  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  rope_theta: float = 10000.0
  window: int = 64
  n_sink: int = 4
  dilation: int = 4
  local_kinds: tuple = ("sliding",)
  local_per_global: Optional[int] = 3

  def validate(self):
    super().validate()
    dec.require_int("window", self.window)
    dec.require_int("n_sink", self.n_sink, lo=0)
    dec.require_int("dilation", self.dilation)
    if not self.local_kinds:
      raise ValueError(f"local_kinds={self.local_kinds!r}; must name at least one kind")
    for k in self.local_kinds:
      dec.require_choice("local_kinds entry", k, LOCAL_KINDS)
    if self.local_per_global is not None:
      dec.require_int("local_per_global", self.local_per_global, lo=0)
    self.pattern()  # validates the attention dims

  def pattern(self):
    base = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim, rope_theta=self.rope_theta)

    def local(i):
      kind = self.local_kinds[i % len(self.local_kinds)]
      return AttentionMixer(window=self.window, n_sink=self.n_sink,
                            dilation=self.dilation if kind == "dilated" else 1, **base)

    if self.local_per_global is None:
      return tuple(local(i) for i in range(len(self.local_kinds)))
    return tuple(local(i) for i in range(self.local_per_global)) + (AttentionMixer(**base),)


@dataclasses.dataclass(frozen=True)
class SlidingConfig(LocalAttentionConfig):
  """Sliding-window + sinks, 3 local : 1 global by default."""


@dataclasses.dataclass(frozen=True)
class DilatedConfig(LocalAttentionConfig):
  """Sliding and dilated local layers alternating, then a global layer."""

  window: int = 32
  local_kinds: tuple = ("sliding", "dilated")
