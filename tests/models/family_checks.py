"""Checks every retrained family must pass (used by tests/models/test_{local,linear_attention,
ssm,hybrid,kv_sharing}.py).

The reference is always the cache-free parallel form (`model(tokens)`), computed for each
row alone (no padding); the cached path runs chunked prefill + token-by-token decode on a
batch where one row is left-padded, so one check covers parallel == recurrent, odd chunk
sizes and padding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import decoder as dec
from models import hybrid
from models import registry

VOCAB = 64
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64)


def build(cfg, seed=0):
  return dec.Decoder(cfg, rngs=nnx.Rngs(seed))


@functools.lru_cache(maxsize=None)
def tiny_hybrid():
  """A Decoder built once per process: RG-LRU, RG-LRU, then global attention (window=None,
  a dense KV cache beside the recurrent state), hidden 32, VOCAB ids."""
  return build(hybrid.HybridConfig(**BASE, num_layers=3, num_heads=2, num_kv_heads=1,
                                   head_dim=16, window=None, rglru_blocks=2))


def build_abstract(cfg):
  """ShapeDtypeStruct parameters: for checks that never run the model (no init compile)."""
  return nnx.eval_shape(lambda: build(cfg))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, mask):
  return nnx.merge(graphdef, state)(tokens, attention_mask=mask)


def jit_forward(model):
  """model(tokens, attention_mask=None) under one jit shared by equal models (graphdefs)."""
  graphdef, state = nnx.split(model)
  return lambda tokens, mask=None: _forward(graphdef, state, tokens, mask)


def tokens(b, t, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (b, t)), jnp.int32)


def check_cached_equals_parallel(model, *, t=13, prefill_len=10, chunk=5, pad=6, atol=2e-5):
  """Given a model, when row 1 is left-padded by `pad` and the prompt is prefilled in chunks
  of `chunk` (the first chunk of row 1 is all padding) then decoded token by token, then each
  row's logits equal the parallel forward of that row alone, and the cache size is fixed."""
  tok = tokens(2, t)
  full = jit_forward(model)(tok)                                   # rows alone, no padding
  padded = np.array(tok)
  padded[1] = np.concatenate([np.zeros(pad, np.int32), np.asarray(tok[1, :t - pad])])
  mask = np.ones((2, t), np.int32)
  mask[1, :pad] = 0
  lg, cache = model.prefill(jnp.asarray(padded[:, :prefill_len]),
                            attention_mask=mask[:, :prefill_len], chunk_size=chunk, capacity=t)
  nbytes = cache.nbytes
  outs = [lg]
  for i in range(prefill_len, t):
    lg, cache = model.decode(jnp.asarray(padded[:, i:i + 1]), cache)
    outs.append(lg)
  got = np.concatenate(outs, axis=1)
  np.testing.assert_allclose(got[0], full[0], atol=atol, rtol=1e-5)
  np.testing.assert_allclose(got[1, pad:], full[1, :t - pad], atol=atol, rtol=1e-5)
  np.testing.assert_array_equal(cache.next_position, [t, t - pad])
  assert cache.nbytes == nbytes
  return cache


def nbytes_at(model, length):
  return registry.prefill_cache_nbytes(model, length)


def check_constant_memory(model):
  """Decode memory does not depend on the sequence length (fixed-size caches)."""
  assert nbytes_at(model, 64) == nbytes_at(model, 256)
