"""Mamba-2 (Dao & Gu, 2024, "Transformers are SSMs"): the SSD block.

    [z, xBC, dt] = x W_in
    xBC          = silu(conv1d(xBC))                      causal, depthwise, width K
    [x, B, C]    = xBC                                    x: heads x P, B/C: groups x N
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t^T x_t           per head: state N x P
    y_t = C_t h_t + D x_t
    out = W_out RMSNorm(y * silu(z))                      (gated norm, norm after the gate)

The SSD recurrence is gated linear attention with a scalar per-head decay (q = C, k = B,
v = dt * x), so training/prefill use the chunkwise algorithm of `ssd_minimal.py` and decode
the recurrent step, both from `kvjax.recurrent`. The decode cache is the conv window
[B, K-1, conv_dim] plus the SSM state [B, heads, N, P] (`ConvRecurrentState`), independent
of the sequence length. As in the reference `Mamba2Simple`, A is a scalar per head, B and C
are shared within `ngroups` groups, there is no dt limit and no learnable initial state.
By default the block stands alone (intermediate_size=0): Mamba-2 has no separate MLP.
Shapes: B batch, T tokens, H hidden, E = expand * H inner, P head_dim, N state_dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax import recurrent as rec_lib
from models import decoder as dec
from models import linear_attention as la_lib
from models import transformer as tfm


@dataclasses.dataclass(frozen=True)
class Mamba2Mixer(dec.Mixer):
  """One Mamba-2 block (without its pre-norm and residual, which the decoder adds)."""

  inner_size: int = 256
  head_dim: int = 32
  state_dim: int = 32
  ngroups: int = 1
  conv_kernel: int = 4
  chunk_size: int = 16
  norm_eps: float = 1e-5

  has_cache = True

  def __post_init__(self):
    for n in ("inner_size", "head_dim", "state_dim", "ngroups", "conv_kernel", "chunk_size"):
      dec.require_int(n, getattr(self, n))
    if self.inner_size % self.head_dim:
      raise ValueError(f"inner_size={self.inner_size} (expand * hidden_size) must be a "
                       f"multiple of head_dim={self.head_dim}")
    if self.num_heads % self.ngroups:
      raise ValueError(f"ngroups={self.ngroups} must divide the number of heads "
                       f"({self.num_heads} = inner_size / head_dim)")

  @property
  def num_heads(self):
    return self.inner_size // self.head_dim

  @property
  def conv_dim(self):
    return self.inner_size + 2 * self.ngroups * self.state_dim

  def init(self, rand, config):
    dt = jnp.dtype(config.dtype)
    h, s = config.hidden_size, config.init_std
    e, nh = self.inner_size, self.num_heads
    decay = la_lib.mamba2_decay_params(rand, h, nh, dt, s)
    return {"w_in": rand.normal((h, 2 * e + 2 * self.ngroups * self.state_dim), dt, s),
            "w_dt": decay["wdt"], "dt_bias": decay["dt_bias"], "a_log": decay["a_log"],
            "conv_w": rand.normal((self.conv_kernel, self.conv_dim), dt, self.conv_kernel ** -0.5),
            "conv_b": jnp.zeros((self.conv_dim,), dt), "d_skip": jnp.ones((nh,), dt),
            "norm": jnp.ones((e,), dt), "w_out": rand.normal((e, h), dt, s)}

  def init_cache(self, config, batch, capacity, dtype):
    return rec_lib.ConvRecurrentState(
        conv=rec_lib.ConvState.init(batch, self.conv_kernel, self.conv_dim, dtype),
        rec=rec_lib.LinearAttentionState.init(batch, self.num_heads, self.state_dim,
                                              self.head_dim))

  def __call__(self, p, x, positions, cache, shared, ctx):
    b, t, _ = x.shape
    e, nh, pd, n, g = self.inner_size, self.num_heads, self.head_dim, self.state_dim, self.ngroups
    zxbc = jnp.einsum("bth,hk->btk", x, p["w_in"])
    z, xbc = zxbc[..., :e], zxbc[..., e:]
    conv = (cache.conv if cache is not None else
            rec_lib.ConvState.init(b, self.conv_kernel, self.conv_dim, x.dtype))
    xbc, conv = conv.scan((xbc,), positions, w=p["conv_w"], b=p["conv_b"])
    xbc = jax.nn.silu(xbc)
    xs = xbc[..., :e].reshape(b, t, nh, pd)
    bmat = xbc[..., e:e + g * n].reshape(b, t, g, n)
    cmat = xbc[..., e + g * n:].reshape(b, t, g, n)
    dt = la_lib.mamba2_dt({"wdt": p["w_dt"], "dt_bias": p["dt_bias"]}, x)  # [B, T, nh]
    log_a = -dt * jnp.exp(p["a_log"].astype(jnp.float32))
    rep = nh // g
    q = jnp.repeat(cmat, rep, axis=2).transpose(0, 2, 1, 3)            # [B, nh, T, N]
    k = jnp.repeat(bmat, rep, axis=2).transpose(0, 2, 1, 3)
    v = (xs.astype(jnp.float32) * dt[..., None]).transpose(0, 2, 1, 3)  # [B, nh, T, P]
    spec = rec_lib.LinearAttentionSpec(chunk_size=self.chunk_size)
    if cache is None:
      state0 = jnp.zeros((b, nh, n, pd), jnp.float32)
      y, _ = rec_lib.linear_attention(q, k, v, log_a.transpose(0, 2, 1), state0,
                                      positions >= 0, spec=spec)
      new_cache = None
    else:
      y, ssm = cache.rec.scan((q, k, v, log_a.transpose(0, 2, 1)), positions, spec=spec)
      new_cache = cache.replace(conv=conv, rec=ssm)
    y = y.transpose(0, 2, 1, 3) + xs.astype(jnp.float32) * p["d_skip"].astype(jnp.float32)[:, None]
    y = y.reshape(b, t, e) * jax.nn.silu(z.astype(jnp.float32))
    y = tfm.rms_norm(y, p["norm"].astype(jnp.float32), self.norm_eps).astype(x.dtype)
    return jnp.einsum("bte,eh->bth", y, p["w_out"]), new_cache, shared


@dataclasses.dataclass(frozen=True)
class Mamba2Config(dec.DecoderConfig):
  """A Mamba-2 language model (pre-norm residual SSD blocks, no MLP by default).

  Attributes:
    expand: inner width E = expand * hidden_size.
    head_dim: P, channels per SSM head (heads = E / P).
    state_dim: N, the SSM state size per head.
    ngroups: B/C groups (heads per group share B and C).
    conv_kernel: K, width of the causal depthwise conv.
    chunk_size: chunk length of the SSD parallel form.
  """

  intermediate_size: int = 0
  num_layers: int = 8  # a block replaces attention + MLP: twice a transformer's depth
  expand: int = 2
  head_dim: int = 32
  state_dim: int = 32
  ngroups: int = 1
  conv_kernel: int = 4
  chunk_size: int = 16

  def validate(self):
    super().validate()
    dec.require_int("expand", self.expand)
    self.pattern()

  def pattern(self):
    return (Mamba2Mixer(inner_size=self.expand * self.hidden_size, head_dim=self.head_dim,
                        state_dim=self.state_dim, ngroups=self.ngroups,
                        conv_kernel=self.conv_kernel, chunk_size=self.chunk_size),)
