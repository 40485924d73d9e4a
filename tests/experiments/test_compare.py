"""Smoke run of experiments.compare on a tiny random model with two techniques.

Checks the protocol, not the model: with the full cache, query-agnostic answers and
perplexity must equal those of one plain forward pass over context + question (+ answer),
and an eviction press must hold fewer bytes than the full cache.
"""

import io
import os
from contextlib import redirect_stdout

import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from absl import flags
from flax import nnx

import models
from experiments import compare
from experiments import tasks as T
from models.config import ModelConfig
from models.tokenizer import ByteTokenizer

CFG = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=1024,
                  rope_theta=10000.0, bos_token_id=256, eos_token_id=257, pad_token_id=258)
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_model"))
  models.save_pretrained(models.Transformer(CFG, rngs=nnx.Rngs(3)), path)
  TOK.save(path)
  return path


def test_parse_techniques():
  ts = compare.parse_techniques(["full", "snapkv", "int4", "knorm+kivi2"], [0.5, 0.9])
  assert [t.label for t in ts] == ["full", "snapkv@0.5", "snapkv@0.9", "int4",
                                   "knorm@0.5+kivi2", "knorm@0.9+kivi2"]
  assert {t.family for t in ts} == {"full", "press", "quant", "press+quant"}
  with pytest.raises(ValueError, match=r"unknown technique 'snapkvv'; known: full, adakv"):
    compare.parse_techniques(["snapkvv"], [0.5])
  with pytest.raises(ValueError, match="not in"):
    compare.parse_techniques(["snapkv"], [1.5])


def test_model_errors(tmp_path):
  with pytest.raises(ValueError, match="neither an existing HF directory"):
    compare.load_model(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="has no config.json"):
    compare.load_model(str(tmp_path))


def test_run_full_cache_matches_a_plain_forward(model_dir):
  model, tok = compare.load_model(model_dir)
  samples = (T.make("passkey").samples(128, 2)
             + T.perplexity.HeldOutPerplexity(continuation=16).samples(128, 2))
  techs = compare.parse_techniques(["full", "streaming_llm"], [0.5])
  rows, info = compare.run(model, tok, techs, samples, batch_size=2, cache_dtype="float32",
                           decode_steps=2, progress=False)
  by = {(r["technique"], r["task"]): r for r in rows}
  assert set(by) == {(t, k) for t in ("full", "streaming_llm@0.5")
                     for k in ("passkey", "perplexity")}
  assert all(r["mode"] == "query_agnostic" and r["length"] == 128 for r in rows)
  full, sl = by[("full", "passkey")], by[("streaming_llm@0.5", "passkey")]
  assert sl["kv_bytes"] < full["kv_bytes"] and sl["kv_factor"] > full["kv_factor"]
  assert full["decode_tok_s"] > 0

  # Reference: one uncached forward over context + question + answer.
  hits, nll, cnt = [], 0.0, 0
  for i, s in enumerate(samples):
    ctx, q = s.prompt_tokens(tok)
    ans = tok.encode(s.answers[0]) if s.answers else []
    seq = ctx + q + ans
    logits = np.asarray(model(jnp.asarray([seq], jnp.int32))[0], np.float64)
    if s.metric == "nll":
      pos = np.arange(len(ctx), len(ctx) + len(q) - 1)     # predict q[1:]
      lse = np.log(np.exp(logits[pos] - logits[pos].max(-1, keepdims=True)).sum(-1)) + \
          logits[pos].max(-1)
      nll += float((lse - logits[pos, np.asarray(q[1:])]).sum())
      cnt += len(q) - 1
    else:
      pos = np.arange(len(ctx) + len(q) - 1, len(seq) - 1)
      pred = tok.decode(logits[pos].argmax(-1).tolist())
      assert info["predictions"][f"full|{i}"] == pred
      hits.append(float(pred.startswith(s.answers[0])))
  assert full["score"] == pytest.approx(np.mean(hits))
  assert by[("full", "perplexity")]["score"] == pytest.approx(np.exp(nll / cnt), rel=1e-4)


def test_cli_writes_table_results_and_plots(model_dir, tmp_path):
  out = str(tmp_path / "out")
  argv = ["compare", f"--model={model_dir}", "--techniques=full,streaming_llm", "--ratios=0.5", "--cache_dtype=float32",
          "--tasks=passkey", "--lengths=128", "--n=2", "--batch_size=2", "--decode_steps=1",
          f"--out_dir={out}", "--compilation_cache=", "--noprogress"]
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  buf = io.StringIO()
  with redirect_stdout(buf):
    compare.main(["compare"])
  text = buf.getvalue()
  assert "mode: query_agnostic" in text and "streaming_llm@0.5" in text
  for name in ("results.jsonl", "results.csv", "run.json", "frontier.png", "throughput.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["compare", "--techniques=full,nope", "--compilation_cache="])
  with pytest.raises(app.UsageError, match="known: full"):
    compare.main(["compare"])
  flags.FLAGS.unparse_flags()
