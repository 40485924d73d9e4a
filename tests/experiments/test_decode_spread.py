"""Decode speed is a median over separately timed steps, printed with its min-max; the full
cache reads 1.00x in the rows and the table."""

import pytest
from flax import nnx

import models
from experiments import compare, results
from experiments import tasks as T
from models.config import ModelConfig
from models.tokenizer import ByteTokenizer

CFG = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=1024,
                  rope_theta=10000.0, bos_token_id=256, eos_token_id=257, pad_token_id=258)


def test_decode_stats():
  assert compare.decode_stats([4.0, 1.0, 3.0, 2.0]) == {
      "decode_tok_s": 2.5, "decode_tok_s_min": 1.0, "decode_tok_s_max": 4.0,
      "decode_repeats": 4}
  assert compare.decode_stats([]) == compare.decode_stats(None) == {"decode_tok_s": None}


def _row(tech, fam, **kw):
  return dict(mode="query_agnostic", technique=tech, family=fam, press=None, ratio=None,
              quant=None, task="passkey", metric="prefix_match", length=256, depth=None,
              n=2, score=1.0, kv_bytes=1000.0, kv_factor=1.0, prefill_tok_s=1234.0,
              model="m", **kw)


def test_table_prints_median_and_spread():
  rows = [_row("full", "full", decode_tok_s=2.5, decode_tok_s_min=1.0, decode_tok_s_max=4.0),
          _row("int4", "quant", decode_tok_s=512.4, decode_tok_s_min=498.0,
               decode_tok_s_max=530.2),
          _row("x", "press", decode_tok_s=None)]
  lines = [" ".join(l.split()) for l in results.table(rows).splitlines()]
  assert lines[1].endswith("prefill tok/s decode tok/s (min-max)")
  assert lines[3].endswith("1,234 2.50 (1.00-4.00)")
  assert lines[4].endswith("1,234 512 (498-530)")
  assert lines[5].endswith("1,234 -")


def test_run_times_each_decode_step(tmp_path):
  model = models.Transformer(CFG, rngs=nnx.Rngs(3))
  tok = ByteTokenizer()
  samples = T.make("passkey").samples(128, 2)
  techs = compare.parse_techniques(["full", "knorm"], [0.5])
  rows, _ = compare.run(model, tok, techs, samples, batch_size=2, cache_dtype="bfloat16",
                        decode_steps=3, progress=False)
  for r in rows:
    assert r["decode_repeats"] == 3
    assert r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
  full = next(r for r in rows if r["technique"] == "full")
  assert full["kv_factor"] == pytest.approx(1.0, abs=1e-12)     # decode room included
  assert "1.00" in next(l for l in results.table(rows).splitlines() if l.startswith("full"))
