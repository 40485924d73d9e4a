"""Shared builders for press tests: synthetic caches and a tiny model."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from kvjax import cache as cache_lib
from kvjax import rope as rope_lib

ROPE = rope_lib.RopeConfig(head_dim=4)


def make_cache(b=2, h=2, s=12, d=4, lengths=None, seed=0, dtype=np.float32):
  """A DenseKVCache with random k/v, positions 0..L-1 per row and given lengths [B] or [B,H]."""
  rng = np.random.default_rng(seed)
  if lengths is None:
    lengths = np.full((b,), s)
  lengths = np.asarray(lengths)
  if lengths.ndim == 1:
    lengths = np.broadcast_to(lengths[:, None], (b, h))
  slot = np.arange(s)
  valid = slot[None, None] < lengths[..., None]
  k = rng.normal(size=(b, h, s, d)).astype(dtype) * valid[..., None]
  v = rng.normal(size=(b, h, s, d)).astype(dtype) * valid[..., None]
  pos = np.where(valid, slot[None, None], -1).astype(np.int32)
  return cache_lib.DenseKVCache(k=jnp.asarray(k), v=jnp.asarray(v), positions=jnp.asarray(pos),
                                lengths=jnp.asarray(lengths, jnp.int32))


def make_obs(cache, g=2, w=4, seed=1):
  """Random colsum (non-negative, zero on invalid slots) and queries for a cache."""
  rng = np.random.default_rng(seed)
  b, h, s, d = cache.k.shape
  valid = np.asarray(cache.valid_mask())
  col = rng.random((b, h, s)).astype(np.float32) * valid
  q = rng.normal(size=(b, h * g, w, d)).astype(np.float32)
  nxt = np.asarray(cache.lengths).max(axis=1)
  return {"colsum": jnp.asarray(col), "queries": jnp.asarray(q),
          "next_position": jnp.asarray(nxt, jnp.int32)}


def kept_positions(cache):
  """Per (b, h): the list of valid positions, in slot order."""
  pos = np.asarray(cache.positions)
  ln = np.asarray(cache.lengths)
  b, h, _ = pos.shape
  return [[pos[i, j, :ln[i, j]].tolist() for j in range(h)] for i in range(b)]


def row(cache, i):
  """Row i of a layer cache (batch of one)."""
  return cache.replace(k=cache.k[i:i + 1], v=cache.v[i:i + 1],
                       positions=cache.positions[i:i + 1], lengths=cache.lengths[i:i + 1])


def row_obs(obs, i):
  return {k: v[i:i + 1] for k, v in obs.items()}


@functools.lru_cache(maxsize=None)
def tiny_model(seed=0, **overrides):
  """2 layers, hidden 64, 4 query heads over 2 kv heads (GQA), head_dim 16."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  kw = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, max_position_embeddings=4096)
  kw.update(overrides)
  return models.Transformer(models.ModelConfig(**kw), rngs=nnx.Rngs(seed))


def run(press, cache, obs=None, **kw):
  """press(cache, obs, **kw) under jit (one compile is cheaper than eager op-by-op)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.jit(lambda c, o: press(c, o, **kw))(cache, dict(obs or {}))


def score(press, cache, obs=None, ctx=None):
  """press.score under jit."""
  import jax  # pylint: disable=import-outside-toplevel
  from kvjax.presses import base  # pylint: disable=import-outside-toplevel
  ctx = ctx or base.LayerContext()
  return jax.jit(lambda c, o: press.score(c, o, ctx))(cache, dict(obs or {}))
