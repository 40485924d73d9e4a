"""Hybrid recurrent / local-attention models: Griffin and RecurrentGemma (De et al., 2024).

The residual stack repeats `recurrent_per_attention` recurrent blocks then one local
(sliding-window, MQA by default) attention block, each followed by the MLP -- Griffin's 2:1.
The recurrent block is the choice of `recurrent`:

  * "rglru": Griffin's recurrent block, following recurrentgemma/jax/{modules,layers}.py:
        y  = gelu(W_y x)
        u  = RG-LRU(conv1d(W_x x))
        out = W_o (u * y)
    with the Real-Gated Linear Recurrent Unit
        r_t = sigmoid(W_a u_t + b_a),  i_t = sigmoid(W_i u_t + b_i)     (block-diagonal W)
        log a_t = -c * r_t * softplus(Lambda)                          (c = 8)
        h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t)                  (no normaliser and
                                                                        a_t = 0 at position 0)
    Differences from recurrentgemma: real-valued only, no embedding scaling by sqrt(width),
    the decoder's SwiGLU MLP instead of the GeGLU MLP, RMSNorm weights start at 1.
  * "gla": the GLA block of `models.linear_attention`.

Decode memory: conv window + RG-LRU state (or GLA state) per recurrent layer and a ring of
`window` (+ sinks) slots per attention layer: constant in the sequence length.
Shapes: B batch, T tokens, H hidden, W lru_width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from kvjax import recurrent as rec_lib
from models import decoder as dec
from models import linear_attention as la_lib
from models import local

RECURRENT_KINDS = ("rglru", "gla")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bound_derivative(x, max_gradient: float):
  """sqrt(x) whose gradient is clipped at max_gradient (recurrentgemma's stable sqrt)."""
  return jnp.sqrt(x)


def _sqrt_fwd(x, max_gradient):
  del max_gradient
  return jnp.sqrt(x), x


def _sqrt_bwd(max_gradient, x, g):
  return (g / (2.0 * jnp.sqrt(jnp.maximum(x, 1.0 / (4.0 * max_gradient ** 2)))),)


sqrt_bound_derivative.defvjp(_sqrt_fwd, _sqrt_bwd)


def _block_diag(x, w, b):
  """x [B, T, W] through num_blocks diagonal blocks w [nb, W/nb, W/nb] + b [nb, W/nb]."""
  bsz, t, width = x.shape
  nb = w.shape[0]
  y = jnp.einsum("btni,nij->btnj", x.reshape(bsz, t, nb, width // nb), w) + b
  return y.reshape(bsz, t, width)


@dataclasses.dataclass(frozen=True)
class RGLRUMixer(dec.Mixer):
  """Griffin's recurrent block (conv1d + RG-LRU, gated by a GeLU branch)."""

  width: int = 128
  num_blocks: int = 4
  conv_kernel: int = 4
  c: float = 8.0
  min_rad: float = 0.9
  max_rad: float = 0.999

  has_cache = True

  def __post_init__(self):
    dec.require_int("lru_width", self.width)
    dec.require_int("rglru_blocks", self.num_blocks)
    dec.require_int("conv_kernel", self.conv_kernel)
    if self.width % self.num_blocks:
      raise ValueError(f"lru_width={self.width} must be a multiple of "
                       f"rglru_blocks={self.num_blocks}")

  def init(self, rand, config):
    dt = jnp.dtype(config.dtype)
    h, s, w, nb = config.hidden_size, config.init_std, self.width, self.num_blocks
    bw = w // nb
    # recurrentgemma's ring init: softplus(Lambda) = -log r, r^2 ~ U[min_rad^2, max_rad^2],
    # so a fully open gate (r_t = 1) gives a = r^c.
    u = rand.uniform((w,))
    log_r = 0.5 * jnp.log(u * (self.max_rad ** 2 - self.min_rad ** 2) + self.min_rad ** 2 + 1e-8)
    lam = jnp.log(jnp.expm1(-log_r))  # inverse softplus
    return {"w_y": rand.normal((h, w), dt, s), "b_y": jnp.zeros((w,), dt),
            "w_x": rand.normal((h, w), dt, s), "b_x": jnp.zeros((w,), dt),
            "conv_w": rand.normal((self.conv_kernel, w), dt, self.conv_kernel ** -0.5),
            "conv_b": jnp.zeros((w,), dt),
            "w_a": rand.normal((nb, bw, bw), dt, bw ** -0.5), "b_a": jnp.zeros((nb, bw), dt),
            "w_i": rand.normal((nb, bw, bw), dt, bw ** -0.5), "b_i": jnp.zeros((nb, bw), dt),
            "a_param": lam.astype(dt), "w_o": rand.normal((w, h), dt, s)}

  def init_cache(self, config, batch, capacity, dtype):
    return rec_lib.ConvRecurrentState(
        conv=rec_lib.ConvState.init(batch, self.conv_kernel, self.width, dtype),
        rec=rec_lib.DiagonalState.init(batch, self.width))

  def __call__(self, p, x, positions, cache, shared, ctx):
    b, t, _ = x.shape
    y = jax.nn.gelu(jnp.einsum("bth,hw->btw", x, p["w_y"]) + p["b_y"])
    u = jnp.einsum("bth,hw->btw", x, p["w_x"]) + p["b_x"]
    conv = (cache.conv if cache is not None else
            rec_lib.ConvState.init(b, self.conv_kernel, self.width, x.dtype))
    u, conv = conv.scan((u,), positions, w=p["conv_w"], b=p["conv_b"])
    uf = u.astype(jnp.float32)
    gate_a = jax.nn.sigmoid(_block_diag(uf, p["w_a"].astype(jnp.float32), p["b_a"]))
    gate_x = jax.nn.sigmoid(_block_diag(uf, p["w_i"].astype(jnp.float32), p["b_i"]))
    log_a = -self.c * gate_a * jax.nn.softplus(p["a_param"].astype(jnp.float32))
    a = jnp.exp(log_a)
    reset = (positions == 0)[..., None]
    mult = jnp.where(reset, 1.0, sqrt_bound_derivative(1.0 - jnp.exp(2.0 * log_a), 1000.0))
    xin = uf * gate_x * mult
    a = jnp.where(reset, 0.0, a)
    if cache is None:
      h, _ = rec_lib.diagonal_scan(a, xin, jnp.zeros((b, self.width), jnp.float32),
                                   positions >= 0)
      new_cache = None
    else:
      h, lru = cache.rec.scan((a, xin), positions)
      new_cache = cache.replace(conv=conv, rec=lru)
    out = (h * y.astype(jnp.float32)).astype(x.dtype)
    return jnp.einsum("btw,wh->bth", out, p["w_o"]), new_cache, shared


@dataclasses.dataclass(frozen=True)
class HybridConfig(dec.DecoderConfig):
  """Griffin-style hybrid: `recurrent_per_attention` recurrent blocks, then local attention.

  Attributes:
    recurrent: "rglru" | "gla".
    recurrent_per_attention: recurrent blocks per local-attention block (Griffin: 2).
    num_heads, num_kv_heads, head_dim, rope_theta: local attention (MQA by default).
    window, n_sink: local attention window and sinks; window=None makes the attention
      block global (a DenseKVCache that grows with the context, which presses can compress).
    lru_width: RG-LRU width (default hidden_size); rglru_blocks: blocks of its gates.
    conv_kernel: temporal conv width of the RG-LRU block.
    gla_heads, key_dim, value_dim, chunk_size, gla_decay: the GLA block when recurrent="gla".
  """

  recurrent: str = "rglru"
  recurrent_per_attention: int = 2
  num_heads: int = 4
  num_kv_heads: int = 1
  head_dim: int = 32
  rope_theta: float = 10000.0
  window: int = 64
  n_sink: int = 0
  lru_width: Optional[int] = None
  rglru_blocks: int = 4
  conv_kernel: int = 4
  gla_heads: int = 4
  key_dim: int = 16
  value_dim: int = 32
  gla_decay: str = "gla"
  chunk_size: int = 16

  def validate(self):
    super().validate()
    dec.require_choice("recurrent", self.recurrent, RECURRENT_KINDS)
    dec.require_int("recurrent_per_attention", self.recurrent_per_attention, lo=0)
    self.pattern()

  def pattern(self):
    if self.recurrent == "rglru":
      rec = RGLRUMixer(width=self.lru_width or self.hidden_size, num_blocks=self.rglru_blocks,
                       conv_kernel=self.conv_kernel)
    else:
      rec = la_lib.GLAMixer(num_heads=self.gla_heads, key_dim=self.key_dim,
                            value_dim=self.value_dim, decay=self.gla_decay,
                            chunk_size=self.chunk_size)
    attn = local.AttentionMixer(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                head_dim=self.head_dim, rope_theta=self.rope_theta,
                                window=self.window, n_sink=self.n_sink)
    return (rec,) * self.recurrent_per_attention + (attn,)
