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
# # kvjax quickstart: load the default model, compress its cache, compare, plot
#
# The default model (`models/default/`) is a 3-layer byte-level Llama trained by this
# project on Python source plus synthetic retrieval tasks. We hide a pass key in a long
# context, compress the KV cache *before* the question is asked (the query-agnostic
# protocol), then ask. Runs on a CPU in a few minutes; on Colab pick a GPU or TPU runtime
# for speed (the setup cells install the matching jax).

# %%
import os

import jax.numpy as jnp

import models
from models import presets
from experiments import compare, plots, results
from experiments import tasks as T
from kvjax import memory, presses

SMOKE = os.environ.get("KVJAX_NOTEBOOK_SMOKE") == "1"   # CI: tiny settings
LENGTH = 256 if SMOKE else 2048
N = 2 if SMOKE else 8
model, tok = presets.load_model_and_tokenizer("default")
print(f"{presets.count_params(model):,} parameters; context length {LENGTH}")

# %% [markdown]
# ## One sample by hand: prefill, compress, then ask
# `models.prefill(..., press=...)` compresses right after the context; `decode_room` leaves
# slots for the question and the answer. The question is decoded at positions that
# continue from the original context length. Memory is the exact bytes the cache holds
# (`kvjax.memory`), compared with a bf16 full cache of the same tokens *including* the
# decode room, so the full cache reads 1.00x.

# %%
sample = T.make("passkey").samples(LENGTH, 1)[0]
ctx, question = sample.prompt_tokens(tok)
ROOM = 64
factors = {}
for press in (None, presses.SnapKVPress(compression_ratio=0.75),
              presses.StreamingLLMPress(compression_ratio=0.75)):
  kw = dict(press=press, decode_room=ROOM) if press else dict(capacity=len(ctx) + ROOM)
  _, cache = models.prefill(model, jnp.asarray([ctx]), logits="last",
                            cache_dtype=jnp.bfloat16, **kw)
  rep = memory.report(cache, tokens=[len(ctx) + ROOM])   # reference: bf16, same room
  logits, cache = models.decode(model, jnp.asarray([question]), cache, logits="last")
  out = []
  for _ in range(len(sample.answers[0])):
    nxt = int(logits[0, -1].argmax())
    out.append(nxt)
    logits, cache = models.decode(model, jnp.asarray([[nxt]]), cache, logits="last")
  name = type(press).__name__ if press else "full cache"
  factors[name] = rep.factor
  print(f"{name:>18}: {rep.total:>9,} bytes ({rep.factor:.2f}x vs bf16)  "
        f"answer {tok.decode(out)!r} (truth {sample.answers[0]!r})")

# %% [markdown]
# ## A small comparison grid
# `experiments.compare.run` shares one prefill per batch across techniques and returns one
# row per (technique, task, length); `python -m experiments.compare` is the same with
# flags, a table and plots.

# %%
names, ratios = ((["full", "snapkv", "int4"], [0.5]) if SMOKE else
                 (["full", "streaming_llm", "snapkv", "int4", "snapkv+int8"], [0.5, 0.9]))
techniques = compare.parse_techniques(names, ratios)
samples = (T.make("passkey").samples(LENGTH, N)
           + T.synthetic.needle_grid([LENGTH // 2, LENGTH], [0.0, 0.5, 1.0], 1))
rows, info = compare.run(model, tok, techniques, samples, batch_size=N, decode_steps=2)
print(results.table(rows))

# %% [markdown]
# ## Plots
# The memory-accuracy frontier, the needle heatmaps and decode throughput, shown here and
# saved as PNGs in `quickstart_out/`.

# %%
os.makedirs("quickstart_out", exist_ok=True)
print(plots.all_plots(rows, "quickstart_out", show=True))
