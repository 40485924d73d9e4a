"""A toy NNX language model that plugs into the trainer by path ("module:callable").

Nested, list-held submodules (int keys in the parameter tree) exercise the generic paths
of sharding, optimizer masks and checkpoints; it compiles in about a second.
"""

import jax
import jax.numpy as jnp
from flax import nnx


class ToyLM(nnx.Module):
  """Embedding -> causal running mean -> 2 residual GELU layers -> vocab projection."""

  def __init__(self, vocab_size: int, hidden_size: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (vocab_size, hidden_size)) * 0.1)
    self.layers = nnx.List([nnx.Linear(hidden_size, hidden_size, rngs=rngs) for _ in range(2)])
    self.out = nnx.Linear(hidden_size, vocab_size, rngs=rngs)

  def __call__(self, tokens):
    x = jnp.take(self.embed[...], tokens, axis=0)
    t = jnp.arange(1, tokens.shape[1] + 1, dtype=x.dtype)[:, None]
    x = x + jnp.cumsum(x, axis=1) / t
    for layer in self.layers:
      x = x + jax.nn.gelu(layer(x))
    return self.out(x).astype(jnp.float32)


def build(kw, *, rngs):
  return ToyLM(kw["vocab_size"], kw["hidden_size"], rngs=rngs)
