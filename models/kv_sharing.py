"""Model-level KV sharing: cross-layer attention (CLA) and multi-head latent attention (MLA).

* CLA (Brandon et al., 2024, "Reducing Transformer Key-Value Cache Size with Cross-Layer
  Attention"): groups of `share_factor` consecutive layers share one KV cache. The first
  layer of a group projects and caches K/V; the others only project queries and attend over
  that cache (no K/V projections). Cache bytes per token shrink by `share_factor`.
* MLA (DeepSeek-AI, 2024, "DeepSeek-V2"): K and V are up-projected from one latent per token,
  c_kv = RMSNorm(W_DKV x) of rank r, and RoPE rides on a separate key part k_rope of d_r
  channels shared by all heads:
      k_h = [c_kv W_UK_h ; k_rope],  v_h = c_kv W_UV_h,  q_h = [q_nope_h ; RoPE(q_rope_h)].
  The cache stores only c_kv [B, S, r] and k_rope [B, S, d_r] (`LatentKVCache`). Training
  runs the explicit per-head form; prefill/decode absorb W_UK into the query
  (q_nope_h W_UK_h^T . c_kv == q_nope_h . k_nope_h) and W_UV into the output, so attention is
  multi-query over the latents. Differences from DeepSeek-V2: no low-rank query
  compression (q_lora_rank), plain RoPE (no YaRN).
Shapes: B batch, T tokens, H hidden, Hh heads, r kv_lora_rank, dn / dr / dv head dims.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax import attention as attn_lib
from kvjax import recurrent as rec_lib
from kvjax import rope as rope_lib
from models import decoder as dec
from models import local
from models import transformer as tfm


@dataclasses.dataclass(frozen=True)
class CLAConfig(dec.DecoderConfig):
  """Global GQA attention where each KV cache serves `share_factor` consecutive layers.

  Attributes:
    num_heads, num_kv_heads, head_dim, rope_theta: attention shape.
    share_factor: layers per KV cache (CLA2 = 2); 1 = no sharing (a plain GQA model).
  """

  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  rope_theta: float = 10000.0
  share_factor: int = 2

  def validate(self):
    super().validate()
    dec.require_int("share_factor", self.share_factor)
    if self.share_factor > self.num_layers:
      raise ValueError(f"share_factor={self.share_factor} exceeds num_layers={self.num_layers}")
    self.pattern()

  def pattern(self):
    base = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim, rope_theta=self.rope_theta)
    return ((local.AttentionMixer(share="own", **base),)
            + (local.AttentionMixer(share="reuse", **base),) * (self.share_factor - 1))


@dataclasses.dataclass(frozen=True)
class MLAMixer(dec.Mixer):
  """Multi-head latent attention (see module docstring)."""

  num_heads: int = 4
  kv_lora_rank: int = 32
  qk_nope_head_dim: int = 32
  qk_rope_head_dim: int = 16
  v_head_dim: int = 32
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6

  has_cache = True
  bounded_by_capacity = True

  def __post_init__(self):
    for n in ("num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      dec.require_int(n, getattr(self, n))
    if self.qk_rope_head_dim % 2:
      raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE)")

  @property
  def rope(self):
    return rope_lib.RopeConfig(head_dim=self.qk_rope_head_dim, theta=self.rope_theta)

  def spec(self, backend):
    return attn_lib.AttentionSpec(scale=(self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5,
                                  backend=backend)

  def init(self, rand, config):
    dt = jnp.dtype(config.dtype)
    h, s = config.hidden_size, config.init_std
    nh, r = self.num_heads, self.kv_lora_rank
    dn, dr, dv = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
    return {"wq": rand.normal((h, nh * (dn + dr)), dt, s),
            "w_dkv": rand.normal((h, r + dr), dt, s), "kv_norm": jnp.ones((r,), dt),
            "w_uk": rand.normal((r, nh, dn), dt, s), "w_uv": rand.normal((r, nh, dv), dt, s),
            "wo": rand.normal((nh * dv, h), dt, s)}

  def init_cache(self, config, batch, capacity, dtype):
    return rec_lib.LatentKVCache.init(batch, capacity, self.kv_lora_rank, self.qk_rope_head_dim,
                                      dtype)

  def __call__(self, p, x, positions, cache, shared, ctx):
    b, t, _ = x.shape
    nh, r = self.num_heads, self.kv_lora_rank
    dn, dr, dv = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
    q = jnp.einsum("bth,hk->btk", x, p["wq"]).reshape(b, t, nh, dn + dr).transpose(0, 2, 1, 3)
    q_nope = q[..., :dn]
    q_rope = rope_lib.apply_rope(q[..., dn:], positions, self.rope)     # [B, Hh, T, dr]
    ckv = jnp.einsum("bth,hk->btk", x, p["w_dkv"])
    c = tfm.rms_norm(ckv[..., :r], p["kv_norm"], self.norm_eps)          # [B, T, r]
    k_rope = rope_lib.apply_rope(ckv[:, None, :, r:], positions, self.rope)  # [B, 1, T, dr]
    spec = self.spec(ctx.backend)
    if cache is None:  # explicit per-head keys and values (training)
      k_nope = jnp.einsum("btr,rhd->bhtd", c, p["w_uk"])
      k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (b, nh, t, dr))], axis=-1)
      v = jnp.einsum("btr,rhd->bhtd", c, p["w_uv"])
      qq = jnp.concatenate([q_nope, q_rope], axis=-1)
      kpos = jnp.broadcast_to(positions[:, None, :], (b, nh, t))
      res = attn_lib.attention(qq, k, v, jnp.full((b, nh), t, jnp.int32),
                               q_positions=positions, k_positions=kpos, spec=spec)
      o = res.out                                                        # [B, Hh, T, dv]
    else:  # absorbed: multi-query attention over the latent cache
      q_lat = jnp.einsum("bhtd,rhd->bhtr", q_nope, p["w_uk"])
      qa = jnp.concatenate([q_lat, q_rope.astype(q_lat.dtype)], axis=-1)
      k_new = jnp.concatenate([c[:, None], k_rope.astype(c.dtype)], axis=-1)
      res, cache = cache.attend(qa, k_new, None, positions, spec)
      o = jnp.einsum("bhtr,rhd->bhtd", res.out, p["w_uv"])
    o = o.transpose(0, 2, 1, 3).reshape(b, t, nh * dv)
    return jnp.einsum("btk,kh->bth", o, p["wo"]), cache, shared


@dataclasses.dataclass(frozen=True)
class MLAConfig(dec.DecoderConfig):
  """Multi-head latent attention in every layer.

  Attributes:
    num_heads: Hh.
    kv_lora_rank: r, the latent width cached per token.
    qk_nope_head_dim, qk_rope_head_dim: per-head query/key widths without / with RoPE.
    v_head_dim: per-head value width.
  """

  num_heads: int = 4
  kv_lora_rank: int = 32
  qk_nope_head_dim: int = 32
  qk_rope_head_dim: int = 16
  v_head_dim: int = 32
  rope_theta: float = 10000.0

  def validate(self):
    super().validate()
    self.pattern()

  def pattern(self):
    return (MLAMixer(num_heads=self.num_heads, kv_lora_rank=self.kv_lora_rank,
                     qk_nope_head_dim=self.qk_nope_head_dim,
                     qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
                     rope_theta=self.rope_theta),)
