"""Rotary position embeddings (Su et al., 2021, "RoFormer") and their context extensions.

Variants (HF `rope_scaling["rope_type"]` names):
  "default"  — inv_freq = base ** (-2i / rotary_dim).
  "linear"   — positions divided by `factor` (Chen et al., 2023, position interpolation).
  "dynamic"  — dynamic NTK scaling (bloc97, 2023): once the sequence exceeds
               `max_position_embeddings`, base becomes
               base * (factor * L / max_pos - (factor - 1)) ** (d / (d - 2)), L = max position + 1
               of the current call. Like transformers, the base is chosen per forward call; with a
               cache, earlier keys keep the rotation they were cached with (no re-rotation).
  "llama3"   — Llama 3.1 frequency-dependent scaling (Meta, 2024): long wavelengths divided
               by `factor`, short ones kept, smooth interpolation between.
Partial rotary (`partial_rotary_factor` < 1, e.g. Phi/NeoX style) rotates only the first
`rotary_dim` channels. Rotation uses the HF "rotate_half" layout (first half / second half).

RoPE is applied before caching, so cached keys keep their original positions; `rerotate`
re-indexes cached keys to new positions (used by presses that compact positions).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Static RoPE configuration (hashable)."""

  head_dim: int
  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  partial_rotary_factor: float = 1.0
  max_position_embeddings: int = 2048
  # llama3 only
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_type!r}; allowed: {ROPE_TYPES}")
    if not 0 < self.partial_rotary_factor <= 1:
      raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor}; must be in (0, 1]")
    if self.rotary_dim % 2:
      raise ValueError(f"rotary_dim={self.rotary_dim} (head_dim * partial_rotary_factor) must be even")

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @classmethod
  def from_hf(cls, head_dim, theta, rope_scaling: Optional[dict], max_position_embeddings,
              partial_rotary_factor=1.0) -> "RopeConfig":
    """Builds from HF config fields (`rope_theta`, `rope_scaling`, ...)."""
    kw = dict(head_dim=head_dim, theta=float(theta), max_position_embeddings=max_position_embeddings,
              partial_rotary_factor=float(partial_rotary_factor))
    if rope_scaling:
      rtype = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
      if rtype not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={rtype!r} is not supported; allowed: {ROPE_TYPES}")
      kw["rope_type"] = rtype
      if "factor" in rope_scaling and rope_scaling["factor"] is not None:
        kw["factor"] = float(rope_scaling["factor"])
      if rtype == "llama3":
        kw["low_freq_factor"] = float(rope_scaling.get("low_freq_factor", 1.0))
        kw["high_freq_factor"] = float(rope_scaling.get("high_freq_factor", 4.0))
        kw["original_max_position_embeddings"] = int(
            rope_scaling.get("original_max_position_embeddings", 8192))
    return cls(**kw)

  def to_hf(self) -> Optional[dict]:
    if self.rope_type == "default":
      return None
    d = {"rope_type": self.rope_type, "factor": self.factor}
    if self.rope_type == "llama3":
      d.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
               original_max_position_embeddings=self.original_max_position_embeddings)
    return d


def inv_frequencies(cfg: RopeConfig, base=None) -> jax.Array:
  """[rotary_dim // 2] float32 inverse frequencies (before dynamic scaling)."""
  dim = cfg.rotary_dim
  base = cfg.theta if base is None else base
  inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  if cfg.rope_type == "llama3":
    old = cfg.original_max_position_embeddings
    low_wavelen = old / cfg.low_freq_factor
    high_wavelen = old / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / cfg.factor, inv)
    smooth = (old / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = jnp.where(is_medium, smoothed, scaled)
  return inv


def cos_sin(cfg: RopeConfig, positions: jax.Array):
  """cos, sin tables [..., rotary_dim] float32 for integer positions [...]."""
  pos = jnp.maximum(positions, 0).astype(jnp.float32)
  if cfg.rope_type == "dynamic":
    seq_len = jnp.max(positions) + 1
    dim = cfg.rotary_dim
    mp = cfg.max_position_embeddings
    grown = cfg.theta * ((cfg.factor * seq_len / mp) - (cfg.factor - 1)) ** (dim / (dim - 2))
    base = jnp.where(seq_len > mp, grown, cfg.theta)
    inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  else:
    inv = inv_frequencies(cfg)
    if cfg.rope_type == "linear":
      pos = pos / cfg.factor
  freqs = pos[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x):
  h = x.shape[-1] // 2
  return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: RopeConfig) -> jax.Array:
  """Rotates x [B, H, T, D] by positions [B, T] (HF rotate_half layout, partial rotary aware)."""
  cos, sin = cos_sin(cfg, positions)
  cos, sin = cos[:, None], sin[:, None]  # [B,1,T,rd]
  rd = cfg.rotary_dim
  xf = x.astype(jnp.float32)
  rot, rest = xf[..., :rd], xf[..., rd:]
  rot = rot * cos + _rotate_half(rot) * sin
  return jnp.concatenate([rot, rest], axis=-1).astype(x.dtype)


def rerotate(k: jax.Array, old_positions: jax.Array, new_positions: jax.Array,
             cfg: RopeConfig) -> jax.Array:
  """Re-indexes cached keys k [B, Hkv, S, D] from old to new positions [B, Hkv, S].

  RoPE rotations compose, so rotating by (new - old) moves a key to its new position
  (exact for default/linear/llama3; dynamic-NTK keys are re-rotated with the base of the
  new positions).
  """
  if cfg.rope_type == "dynamic":
    raise ValueError("rerotate is not supported for rope_type='dynamic' (base depends on length)")
  delta = jnp.where(old_positions >= 0, new_positions - old_positions, 0)
  inv = inv_frequencies(cfg)
  d = delta.astype(jnp.float32)
  if cfg.rope_type == "linear":
    d = d / cfg.factor
  freqs = d[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  rd = cfg.rotary_dim
  kf = k.astype(jnp.float32)
  rot = kf[..., :rd] * cos + _rotate_half(kf[..., :rd]) * sin
  return jnp.concatenate([rot, kf[..., rd:]], axis=-1).astype(k.dtype)
