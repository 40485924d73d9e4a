"""Built-in model presets and the shipped default model.

`load_model_and_tokenizer("default")` loads the project's trained default model from
`models/default/` when it is shipped there, and otherwise builds the "tiny" preset
(random weights, byte tokenizer) so every entry point runs offline on a fresh machine.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
from flax import nnx

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


def load_model_and_tokenizer(name: str, dtype: Optional[str] = None, seed: int = 0):
  """Model + tokenizer for an HF directory, "default", or a preset name."""
  from models import hf  # pylint: disable=import-outside-toplevel
  if name == "default":
    if os.path.exists(os.path.join(DEFAULT_DIR, "config.json")):
      return hf.from_pretrained(DEFAULT_DIR, dtype=dtype), tok_lib.load(DEFAULT_DIR)
    name = "tiny"
  if name in PRESETS:
    cfg = PRESETS[name]
    if dtype:
      cfg = cfg.replace(dtype=dtype)
    return Transformer(cfg, rngs=nnx.Rngs(seed)), tok_lib.ByteTokenizer()
  if os.path.isdir(name):
    return hf.from_pretrained(name, dtype=dtype), tok_lib.load(name)
  raise ValueError(f"--model={name!r} is neither an existing HF directory nor a preset; "
                   f"presets: {sorted(PRESETS)} or 'default'")
