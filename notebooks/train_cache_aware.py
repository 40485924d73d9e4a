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
# # Train a cache-aware model and compare its cache
#
# Some architectures shrink the cache by design instead of compressing it afterwards: a
# sliding-window model keeps only the last `window` tokens (plus sinks) per layer, linear
# attention keeps a fixed-size state. They must be trained that way. Here we train a tiny
# Llama and a tiny sliding-window model (`train.registry` families "llama" and
# "sliding") with the same trainer and data, then compare held-out accuracy and the exact
# bytes of their caches at a long context.

# %%
import os
import tempfile

import jax.numpy as jnp

from kvjax import memory
from train import evaluate, registry, tasks
from train import train as train_lib
from train.configs import default as default_config

SMOKE = os.environ.get("KVJAX_NOTEBOOK_SMOKE") == "1"   # CI: tiny settings
STEPS = 2 if SMOKE else 600
SEQ = 64
print("families:", registry.names())


def config(family, model_kwargs):
  c = default_config.get_config()
  c.steps, c.batch_size, c.seq_len = STEPS, 16, SEQ
  c.model.family = family
  c.model.config = model_kwargs
  c.data.sources = {"mqar": {"kind": "mqar", "weight": 1.0, "num_pairs": 8}}
  c.opt.warmup_steps = max(1, STEPS // 10)
  c.eval_every, c.eval_examples, c.eval_batch_size = 0, 0 if SMOKE else 64, 32
  c.checkpoint_every, c.tensorboard, c.progress_bar, c.log_every = -1, False, False, 50
  return c


llama = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16, max_position_embeddings=4096, dtype="float32")
sliding = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2,
               num_heads=4, num_kv_heads=2, head_dim=16, window=32, n_sink=4,
               local_per_global=None)
trained = {}
for family, kw in (("llama", llama), ("sliding", sliding)):
  with tempfile.TemporaryDirectory() as wd:
    out = train_lib.train_and_evaluate(config(family, kw), wd)
  trained[family] = out["trainer"].model()
  print(f"{family:>8}: step {out['step']}, train loss {out['last'].get('loss', float('nan')):.3f}, "
        f"{out['train_seconds']:.0f}s")

# %% [markdown]
# ## Accuracy inside and beyond the window, and the cache at a long context
# MQAR with 8 pairs in 64 tokens fits in the 32-token window only partly: a sliding
# model must carry information across windows through its layers, or lose it.

# %%
for family, model in trained.items():
  acc = evaluate.task_accuracy(model, tasks.MQAR(length=SEQ + 1, num_pairs=8),
                               num_examples=32 if SMOKE else 256, batch_size=32)
  long_ctx = jnp.ones((1, 2048 if not SMOKE else 256), jnp.int32)
  _, cache = model.prefill(long_ctx, capacity=long_ctx.shape[1], logits="last")
  rep = memory.report(cache)
  print(f"{family:>8}: MQAR exact match {acc['exact_match']:.2f}; cache at "
        f"{long_ctx.shape[1]} tokens: {rep.total:,} bytes ({rep.factor:.2f}x vs bf16 full)")
