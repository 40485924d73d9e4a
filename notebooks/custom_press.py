# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Write your own press in 20 lines
#
# A press scores every cached slot; the framework does the rest (protected sink and
# recent slots, per-row budgets from `compression_ratio`, gathering into a smaller cache
# whose bytes really shrink, room for decoding). Below: keep the tokens whose *values*
# have the largest norm (a value-side cousin of Knorm), with the question fed only after
# compression, register it by name, and compare it with two built-in presses on the
# default model.

# %%
import dataclasses
import os

import jax.numpy as jnp

import models
from models import presets
from experiments import compare, results
from experiments import tasks as T
from kvjax.presses import base, registry


@registry.register("value_norm", query_agnostic=True)   # needs nothing but the cache
@dataclasses.dataclass(frozen=True)
class ValueNormPress(base.ScorerPress):
  """Keep the slots whose value vectors are longest (plus 4 attention sinks)."""

  n_sink: int = 4

  def protected(self):
    return self.n_sink, self.protect_recent

  def score(self, cache, obs, ctx):
    del obs, ctx                      # needs no attention statistics
    v = cache.v.astype(jnp.float32)   # [batch, kv_heads, slots, head_dim]
    return jnp.linalg.norm(v, axis=-1)  # [batch, kv_heads, slots]: higher = keep


# %% [markdown]
# Any press runs inside `models.prefill(press=...)` and `kvjax.generate(press=...)`. Once
# registered, its name works wherever a built-in press's does: `compare --techniques`, the
# benches, the policies (`kvjax.policy.press_names()` lists it: it is query-agnostic and
# needs no observations) and `registry.make("value_norm", 0.75)`.

# %%
SMOKE = os.environ.get("KVJAX_NOTEBOOK_SMOKE") == "1"   # CI: tiny settings
LENGTH, N = (256, 2) if SMOKE else (2048, 16)
model, tok = presets.load_model_and_tokenizer("default")
ratio = 0.75
names = ["full", "value_norm"] if SMOKE else ["full", "knorm", "snapkv", "value_norm"]
techniques = compare.parse_techniques(names, [ratio])
samples = T.make("passkey").samples(LENGTH, N) + T.make("kv_retrieval").samples(LENGTH, N)
rows, _ = compare.run(model, tok, techniques, samples, batch_size=min(N, 8), decode_steps=2)
print(results.table(rows))
