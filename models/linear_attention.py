"""Gated linear attention: GLA, RetNet and Mamba-2-style decay as one block.

    S_t = diag(a_t) S_{t-1} + k_t^T v_t          o_t = q_t S_t         (per head)
    y   = W_o (RMSNorm_head(o) * silu(W_g x))

The decay a_t is the config choice (`decay`):
  * "gla"    (Yang et al., 2023, "Gated Linear Attention Transformers with Hardware-Efficient
             Training"): data-dependent, per key dim, a_t = sigmoid(x W_a1 W_a2 + b) ** (1/16)
             via a low-rank projection (log-sigmoid divided by `gate_normalizer`).
  * "retnet" (Sun et al., 2023, "Retentive Network"): fixed per head,
             gamma_h = 1 - 2 ** (-5 - h); RetNet's xPos rotation is RoPE on q and k here
             (`use_rope`), without xPos's extra length-extrapolation scaling.
  * "mamba2" (Dao & Gu, 2024): data-dependent scalar per head, a_t = exp(-softplus(x W_dt +
             b_dt) * exp(A_log)) -- Mamba-2's decay inside an attention-shaped block (the full
             Mamba-2 SSM block is `models.ssm`).

Training and prefill run the chunkwise-parallel form, single-token decode the recurrence
(`kvjax.recurrent`); the decode cache is `LinearAttentionState` [B, heads, key_dim,
value_dim] float32 per layer, independent of the sequence length. Like GLA, q and k have no
feature map; q is scaled by key_dim ** -0.5.
Shapes: B batch, T tokens, H hidden, Hh heads, Dk key_dim, Dv value_dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import recurrent as rec_lib
from kvjax import rope as rope_lib
from models import decoder as dec
from models import transformer as tfm

DECAYS = ("gla", "retnet", "mamba2")


@dataclasses.dataclass(frozen=True)
class GLAMixer(dec.Mixer):
  """One gated-linear-attention layer (see module docstring)."""

  num_heads: int = 4
  key_dim: int = 16
  value_dim: int = 32
  decay: str = "gla"
  chunk_size: int = 16
  gate_rank: int = 16
  gate_normalizer: float = 16.0
  use_rope: bool = False
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5

  has_cache = True

  def __post_init__(self):
    dec.require_int("num_heads", self.num_heads)
    dec.require_int("key_dim", self.key_dim)
    dec.require_int("value_dim", self.value_dim)
    dec.require_int("chunk_size", self.chunk_size)
    dec.require_int("gate_rank", self.gate_rank)
    dec.require_choice("decay", self.decay, DECAYS)
    if self.use_rope and self.key_dim % 2:
      raise ValueError(f"key_dim={self.key_dim} must be even with use_rope=True")
    if not self.gate_normalizer > 0:
      raise ValueError(f"gate_normalizer={self.gate_normalizer!r}; must be > 0")

  @property
  def spec(self):
    return rec_lib.LinearAttentionSpec(chunk_size=self.chunk_size)

  def init(self, rand, config):
    dt = jnp.dtype(config.dtype)
    h, s = config.hidden_size, config.init_std
    nh, dk, dv = self.num_heads, self.key_dim, self.value_dim
    p = {"wq": rand.normal((h, nh * dk), dt, s), "wk": rand.normal((h, nh * dk), dt, s),
         "wv": rand.normal((h, nh * dv), dt, s), "wg": rand.normal((h, nh * dv), dt, s),
         "wo": rand.normal((nh * dv, h), dt, s), "o_norm": jnp.ones((dv,), dt)}
    if self.decay == "gla":
      p["wa1"] = rand.normal((h, self.gate_rank), dt, s)
      p["wa2"] = rand.normal((self.gate_rank, nh * dk), dt, s)
      p["ba"] = jnp.zeros((nh * dk,), dt)
    elif self.decay == "mamba2":
      p.update(mamba2_decay_params(rand, h, nh, dt, s))
    return p

  def init_cache(self, config, batch, capacity, dtype):
    return rec_lib.LinearAttentionState.init(batch, self.num_heads, self.key_dim, self.value_dim)

  def log_decay(self, p, x):
    """log a_t: [B, Hh, T, Dk] (gla) or [B, Hh, T] (retnet, mamba2), float32, <= 0."""
    b, t, _ = x.shape
    if self.decay == "gla":
      g = jnp.einsum("bth,hr,rk->btk", x, p["wa1"], p["wa2"]) + p["ba"]
      la = jax.nn.log_sigmoid(g.astype(jnp.float32)) / self.gate_normalizer
      return la.reshape(b, t, self.num_heads, self.key_dim).transpose(0, 2, 1, 3)
    if self.decay == "retnet":
      gamma = 1.0 - 2.0 ** (-5.0 - np.arange(self.num_heads, dtype=np.float64))
      return jnp.broadcast_to(jnp.asarray(np.log(gamma), jnp.float32)[None, :, None],
                              (b, self.num_heads, t))
    return mamba2_log_decay(p, x).transpose(0, 2, 1)

  def __call__(self, p, x, positions, cache, shared, ctx):
    b, t, _ = x.shape
    nh, dk, dv = self.num_heads, self.key_dim, self.value_dim

    def heads(w, d):
      return jnp.einsum("bth,hk->btk", x, w).reshape(b, t, nh, d).transpose(0, 2, 1, 3)

    q = heads(p["wq"], dk) * (dk ** -0.5)
    k = heads(p["wk"], dk)
    v = heads(p["wv"], dv)
    if self.use_rope:
      rope = rope_lib.RopeConfig(head_dim=dk, theta=self.rope_theta)
      q, k = rope_lib.apply_rope(q, positions, rope), rope_lib.apply_rope(k, positions, rope)
    la = self.log_decay(p, x)
    if cache is None:
      state0 = jnp.zeros((b, nh, dk, dv), jnp.float32)
      o, _ = rec_lib.linear_attention(q, k, v, la, state0, positions >= 0, spec=self.spec)
    else:
      o, cache = cache.scan((q, k, v, la), positions, spec=self.spec)
    o = tfm.rms_norm(o, p["o_norm"].astype(jnp.float32), self.norm_eps)
    o = o.transpose(0, 2, 1, 3).reshape(b, t, nh * dv).astype(x.dtype)
    o = o * jax.nn.silu(jnp.einsum("bth,hk->btk", x, p["wg"]))
    return jnp.einsum("btk,kh->bth", o, p["wo"]), cache, shared


def mamba2_decay_params(rand, hidden, heads, dtype, std, dt_min=1e-3, dt_max=0.1):
  """W_dt, dt_bias (inverse softplus of dt ~ logU[dt_min, dt_max]), A_log (A ~ U[1, 16])."""
  dt = jnp.exp(rand.uniform((heads,), np.log(dt_min), np.log(dt_max)))
  return {"wdt": rand.normal((hidden, heads), dtype, std),
          "dt_bias": (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype),
          "a_log": jnp.log(rand.uniform((heads,), 1.0, 16.0)).astype(dtype)}


def mamba2_dt(p, x):
  """Mamba-2 step size dt = softplus(x W_dt + dt_bias): [B, T, heads] float32 (> 0)."""
  raw = jnp.einsum("bth,hn->btn", x, p["wdt"]).astype(jnp.float32)
  return jax.nn.softplus(raw + p["dt_bias"].astype(jnp.float32))


def mamba2_log_decay(p, x):
  """Mamba-2 scalar log-decay log a_t = -dt_t * exp(A_log): [B, T, heads] float32."""
  return -mamba2_dt(p, x) * jnp.exp(p["a_log"].astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig(dec.DecoderConfig):
  """A stack of gated-linear-attention layers (each followed by the SwiGLU MLP).

  Attributes:
    num_heads, key_dim, value_dim: per-head state is key_dim x value_dim.
    decay: "gla" | "retnet" | "mamba2" (module docstring).
    chunk_size: chunk length of the parallel form.
    gate_rank, gate_normalizer: GLA's low-rank gate and its 1/16 exponent.
    use_rope: rotate q and k (RetNet's relative position), default off for GLA.
  """

  num_heads: int = 4
  key_dim: int = 16
  value_dim: int = 32
  decay: str = "gla"
  chunk_size: int = 16
  gate_rank: int = 16
  gate_normalizer: float = 16.0
  use_rope: bool = False
  rope_theta: float = 10000.0

  def validate(self):
    super().validate()
    self.pattern()

  def mixer(self) -> GLAMixer:
    return GLAMixer(num_heads=self.num_heads, key_dim=self.key_dim, value_dim=self.value_dim,
                    decay=self.decay, chunk_size=self.chunk_size, gate_rank=self.gate_rank,
                    gate_normalizer=self.gate_normalizer, use_rope=self.use_rope,
                    rope_theta=self.rope_theta)

  def pattern(self):
    return (self.mixer(),)


@dataclasses.dataclass(frozen=True)
class GLAConfig(LinearAttentionConfig):
  """GLA defaults."""


@dataclasses.dataclass(frozen=True)
class RetNetConfig(LinearAttentionConfig):
  """RetNet defaults: fixed per-head decay, RoPE on q/k."""

  decay: str = "retnet"
  use_rope: bool = True
