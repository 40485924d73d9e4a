"""experiments.compare with tokenizers that do not behave like the byte tokenizer.

A real tokenizer may encode " " to nothing (SentencePiece models that strip whitespace-only
input do). The decode-speed steps used to feed `tokenizer.encode(" ")[0]` and raised
IndexError; they now fall back to each row's last context token.
"""

import numpy as np
from flax import nnx

import models
from experiments import compare
from experiments import tasks as T
from models.config import ModelConfig
from models.tokenizer import ByteTokenizer

CFG = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=1024,
                  rope_theta=10000.0, bos_token_id=256, eos_token_id=257, pad_token_id=258)


class BlankDroppingTokenizer(ByteTokenizer):
  """Byte tokenizer that encodes whitespace-only text to no ids at all."""

  def encode(self, text, add_bos=False):
    if not text.strip():
      return [self.bos_id] if add_bos else []
    return super().encode(text, add_bos=add_bos)


def test_timing_tokens_prefer_a_space_and_fall_back_to_the_last_context_token():
  ctx = np.array([[258, 258, 256, 65, 66], [256, 67, 68, 69, 70]], np.int32)  # left-padded
  np.testing.assert_array_equal(compare.timing_tokens(ByteTokenizer(), ctx), [[32], [32]])
  got = compare.timing_tokens(BlankDroppingTokenizer(), ctx)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, [[66], [70]])


def test_compare_runs_when_a_space_encodes_to_nothing():
  tok = BlankDroppingTokenizer()
  assert tok.encode(" ") == [] and tok.encode("ab") == ByteTokenizer().encode("ab")
  model = models.Transformer(CFG, rngs=nnx.Rngs(3))
  samples = T.make("passkey").samples(128, 2)
  techs = compare.parse_techniques(["full"], [0.5])
  rows, info = compare.run(model, tok, techs, samples, batch_size=2, cache_dtype="float32",
                           decode_steps=1, progress=False)
  assert {r["technique"] for r in rows} == {"full"}
  assert all(r["decode_tok_s"] > 0 for r in rows)
  assert len([k for k in info["predictions"] if k.startswith("full|")]) == 2
