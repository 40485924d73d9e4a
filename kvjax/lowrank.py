"""Key-channel pruning (ThinK) and low-rank projection (Palu-style) cache kinds.

ThinK (Xu et al., 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning"): many key
channels contribute little to q . k. Channel c of kv head h scores
`||Q[:, c]||_2 * ||K[:, c]||_2` over an observation window of queries (the last W, all query
heads of the group) and the cached keys -- the greedy form of ThinK's criterion
`min ||Q K^T - Q S (K S)^T||_F`; the top `keep` channels per (row, kv head) are stored.
`PrunedKeyCache` holds keys [B, Hkv, S, keep] and the kept channel indices [B, Hkv, keep];
attention reads keys zero-filled back to D (exactly the pruned dot product). Differences
from the paper: the channel set is chosen once (at conversion) and applied to every later
token too; values are not pruned.

Low-rank (Palu, Chang et al., 2024, projects keys/values through a low-rank factor of
W_k / W_v and caches the latent): here the basis is calibrated on data -- the top
eigenvectors of each kv head's key (value) second-moment matrix over calibration tokens,
which minimises the reconstruction error ||K - K P P^T||_F among rank-r projections.
`LowRankKVCache` stores latents k P [B, Hkv, S, r_k] (and optionally v P_v), and the
orthonormal bases P [B, Hkv, D, r] themselves (counted in nbytes; batch-leading like every
cache leaf, so a row can be forked or persisted alone, and rows may use their own bases). Keys are post-RoPE, so the
basis is calibrated on rotated keys (Palu reconstructs before RoPE instead; here no kernel
change is needed, at some cost in rank).

Both implement the cache protocol through kvjax.quant.base.CompressedCache. As presses
(`models.prefill(press=...)`, `experiments.compare --techniques=think,lowrank`):
kvjax.presses.ThinKPress and kvjax.presses.LowRankPress.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from kvjax import cache as cache_lib
from kvjax.quant.base import CompressedCache, KVView, chunk_destinations

_static = lambda: flax.struct.field(pytree_node=False)  # noqa: E731


def _src_after_write(positions_old, dest, t, size):
  """src map (see CompressedCache): old slots keep their index, chunk token t -> S + t."""
  s = positions_old.shape[-1]
  kept = jnp.where(positions_old >= 0, jnp.arange(s, dtype=jnp.int32), -1)
  chunk = jnp.broadcast_to(s + jnp.arange(t, dtype=jnp.int32), dest.shape)
  return cache_lib.scatter_slots(kept, dest, chunk)


def _write_common(cache, k_store, v_store, pos):
  """Appends already-transformed k/v [B,H,T,.] at head-wise pos [B,H,T]; returns (upd, src)."""
  cap = cache.positions.shape[-1]
  dest = chunk_destinations(cache.lengths, pos, cap)
  n = jnp.sum(pos >= 0, axis=-1).astype(jnp.int32)
  upd = dict(k=cache_lib.scatter_slots(cache.k, dest, k_store),
             v=cache_lib.scatter_slots(cache.v, dest, v_store),
             positions=cache_lib.scatter_slots(cache.positions, dest, pos),
             lengths=jnp.minimum(cache.lengths + n, cap))
  return upd, _src_after_write(cache.positions, dest, k_store.shape[2], cap)


# -- ThinK -----------------------------------------------------------------------------------
@flax.struct.dataclass
class PrunedKeyCache(CompressedCache):
  """Keys pruned to `keep` channels per (row, kv head) (ThinK).

  Attributes:
    k: [B, Hkv, S, keep] kept key channels, in increasing channel order.
    v: [B, Hkv, S, Dv] values.
    channels: [B, Hkv, keep] int32 kept channel indices (sorted).
    positions: [B, Hkv, S] int32 (-1 = empty); lengths: [B, Hkv] int32.
    head_dim: D (static).
  """

  k: jax.Array
  v: jax.Array
  channels: jax.Array
  positions: jax.Array
  lengths: jax.Array
  head_dim: int = _static()

  BYTE_CATEGORIES = {"k": "codes", "v": "kv", "channels": "projection"}

  @classmethod
  def init(cls, batch, kv_heads, capacity, head_dim, keep: int, dtype=jnp.float32,
           v_head_dim=None, channels=None) -> "PrunedKeyCache":
    if not 1 <= keep <= head_dim:
      raise ValueError(f"keep={keep}; must be in [1, head_dim={head_dim}]")
    if capacity < 1:
      raise ValueError(f"capacity={capacity}; must be >= 1")
    dv = head_dim if v_head_dim is None else v_head_dim
    if channels is None:
      channels = jnp.broadcast_to(jnp.arange(keep, dtype=jnp.int32), (batch, kv_heads, keep))
    elif channels.shape != (batch, kv_heads, keep):
      raise ValueError(f"channels shape {channels.shape}; expected {(batch, kv_heads, keep)}")
    return cls(k=jnp.zeros((batch, kv_heads, capacity, keep), dtype),
               v=jnp.zeros((batch, kv_heads, capacity, dv), dtype),
               channels=jnp.asarray(channels, jnp.int32),
               positions=jnp.full((batch, kv_heads, capacity), -1, jnp.int32),
               lengths=jnp.zeros((batch, kv_heads), jnp.int32), head_dim=head_dim)

  @property
  def capacity(self) -> int:
    return self.positions.shape[-1]

  @property
  def kind_label(self) -> str:
    return f"think-{self.k.shape[-1]}/{self.head_dim}"

  @property
  def head_dims(self) -> tuple:
    return self.head_dim, self.v.shape[-1]

  def _write(self, k_new, v_new, pos):
    k_sel = jnp.take_along_axis(k_new, self.channels[:, :, None, :], axis=-1)
    upd, src = _write_common(self, k_sel, v_new, pos)
    return self.replace(**upd), src

  def materialize(self) -> KVView:
    onehot = jax.nn.one_hot(self.channels, self.head_dim, dtype=self.k.dtype)  # [B,H,r,D]
    k = jnp.einsum("bhsr,bhrd->bhsd", self.k, onehot)
    return KVView(k, self.v, self.positions, self.positions >= 0)


def think_channels(keys, valid, queries, keep: int):
  """ThinK channel choice: top-`keep` channels of ||Q_c|| * ||K_c|| per (row, kv head).

  Args:
    keys: [B, Hkv, S, D]; valid: [B, Hkv, S] bool.
    queries: [B, Hq, W, D] observation-window queries (zero rows are ignored).
    keep: channels kept.
  Returns:
    [B, Hkv, keep] int32 sorted channel indices.
  """
  b, hkv, _, d = keys.shape
  hq = queries.shape[1]
  if hq % hkv:
    raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
  if not 1 <= keep <= d:
    raise ValueError(f"keep={keep}; must be in [1, head_dim={d}]")
  kf = jnp.where(valid[..., None], keys.astype(jnp.float32), 0.0)
  k_norm = jnp.sqrt(jnp.sum(kf * kf, axis=2))                                # [B,H,D]
  qf = queries.astype(jnp.float32).reshape(b, hkv, hq // hkv, -1, d)
  q_norm = jnp.sqrt(jnp.sum(qf * qf, axis=(2, 3)))                           # [B,H,D]
  _, idx = jax.lax.top_k(q_norm * k_norm, keep)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def think_prune(layer_cache, queries, keep: int, capacity: Optional[int] = None) -> PrunedKeyCache:
  """Prunes a dense layer cache's keys to `keep` channels chosen by ThinK's criterion."""
  dense = layer_cache.to_dense()
  b, h, s, d = dense.k.shape
  valid = dense.valid_mask()
  ch = think_channels(dense.k, valid, queries, keep)
  out = PrunedKeyCache.init(b, h, capacity or s, d, keep, dense.k.dtype, dense.v.shape[-1], ch)
  return out._write(dense.k, dense.v, jnp.where(valid, dense.positions, -1))[0]  # pylint: disable=protected-access


_think_prune_jit = jax.jit(think_prune, static_argnames=("keep", "capacity"))


# -- low rank --------------------------------------------------------------------------------
def calibrate_basis(x, valid, rank: int):
  """Top-`rank` eigenvectors of each head's second moment: x [B, H, S, D] -> P [H, D, rank].

  Columns are orthonormal, so x P P^T is the best rank-r reconstruction of the samples.
  """
  d = x.shape[-1]
  if not 1 <= rank <= d:
    raise ValueError(f"rank={rank}; must be in [1, head_dim={d}]")
  xf = jnp.where(valid[..., None], x.astype(jnp.float32), 0.0)
  cov = jnp.einsum("bhsd,bhse->hde", xf, xf)
  _, vecs = jnp.linalg.eigh(cov)             # ascending eigenvalues
  return vecs[..., ::-1][..., :rank]


@flax.struct.dataclass
class LowRankKVCache(CompressedCache):
  """Keys (and optionally values) stored as latents in a calibrated low-rank basis.

  Attributes:
    k: [B, Hkv, S, r_k] key latents k @ k_proj.
    v: [B, Hkv, S, r_v] value latents (with v_proj) or [B, Hkv, S, Dv] values.
    k_proj: [B, Hkv, D, r_k] orthonormal basis; v_proj: [B, Hkv, Dv, r_v] or None.
    positions: [B, Hkv, S] int32 (-1 = empty); lengths: [B, Hkv] int32.
  Read back: k = latent @ k_proj^T.
  """

  k: jax.Array
  v: jax.Array
  k_proj: jax.Array
  v_proj: Optional[jax.Array]
  positions: jax.Array
  lengths: jax.Array
  head_dim: int = _static()
  v_head_dim: int = _static()

  BYTE_CATEGORIES = {"k": "codes", "v": "codes", "k_proj": "projection",
                     "v_proj": "projection"}

  @classmethod
  def init(cls, batch, capacity, k_proj, v_proj=None, dtype=jnp.float32,
           v_head_dim=None) -> "LowRankKVCache":
    """An empty cache with bases k_proj [Hkv, D, r_k] (and v_proj [Hkv, Dv, r_v]).

    Bases may also be given per row, [B, Hkv, D, r]; shared ones are broadcast to the batch.
    """
    if capacity < 1:
      raise ValueError(f"capacity={capacity}; must be >= 1")
    bcast = lambda p: None if p is None else jnp.broadcast_to(  # noqa: E731
        jnp.asarray(p, dtype), (batch,) + tuple(p.shape[-3:]))
    k_proj, v_proj = bcast(k_proj), bcast(v_proj)
    _, h, d, rk = k_proj.shape
    dv = (v_proj.shape[2] if v_proj is not None else (v_head_dim or d))
    vw = v_proj.shape[-1] if v_proj is not None else dv
    return cls(k=jnp.zeros((batch, h, capacity, rk), dtype),
               v=jnp.zeros((batch, h, capacity, vw), dtype),
               k_proj=k_proj, v_proj=v_proj,
               positions=jnp.full((batch, h, capacity), -1, jnp.int32),
               lengths=jnp.zeros((batch, h), jnp.int32), head_dim=d, v_head_dim=dv)

  @property
  def capacity(self) -> int:
    return self.positions.shape[-1]

  @property
  def head_dims(self) -> tuple:
    return self.head_dim, self.v_head_dim

  @property
  def kind_label(self) -> str:
    s = f"lowrank-k{self.k.shape[-1]}"
    return s + (f"v{self.v.shape[-1]}" if self.v_proj is not None else "")

  def _write(self, k_new, v_new, pos):
    kl = jnp.einsum("bhtd,bhdr->bhtr", k_new.astype(self.k_proj.dtype), self.k_proj)
    vl = v_new if self.v_proj is None else jnp.einsum(
        "bhtd,bhdr->bhtr", v_new.astype(self.v_proj.dtype), self.v_proj)
    upd, src = _write_common(self, kl, vl, pos)
    return self.replace(**upd), src

  def materialize(self) -> KVView:
    k = jnp.einsum("bhsr,bhdr->bhsd", self.k, self.k_proj)
    v = self.v if self.v_proj is None else jnp.einsum("bhsr,bhdr->bhsd", self.v, self.v_proj)
    return KVView(k, v, self.positions, self.positions >= 0)


def lowrank_from_dense(layer_cache, k_rank: int, v_rank: Optional[int] = None, *,
                       k_proj=None, v_proj=None, capacity: Optional[int] = None):
  """Converts a dense layer cache; bases are calibrated on its own tokens unless given."""
  dense = layer_cache.to_dense()
  valid = dense.valid_mask()
  if k_proj is None:
    k_proj = calibrate_basis(dense.k, valid, k_rank)
  if v_proj is None and v_rank is not None:
    v_proj = calibrate_basis(dense.v, valid, v_rank)
  b, _, s, _ = dense.k.shape
  out = LowRankKVCache.init(b, capacity or s, k_proj, v_proj, dense.k.dtype, dense.v.shape[-1])
  return out._write(dense.k, dense.v, jnp.where(valid, dense.positions, -1))[0]  # pylint: disable=protected-access


def calibrate_model(model_cache, k_rank: int, v_rank: Optional[int] = None) -> list:
  """Per-layer (k_proj, v_proj) bases from a prefilled dense ModelCache (calibration data)."""
  out = []
  for c in model_cache.layers():
    dense = c.to_dense()
    valid = dense.valid_mask()
    out.append((calibrate_basis(dense.k, valid, k_rank),
                None if v_rank is None else calibrate_basis(dense.v, valid, v_rank)))
  return out
