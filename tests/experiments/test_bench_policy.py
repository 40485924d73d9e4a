"""experiments.bench_policy: the verdict logic by hand, and a smoke run on a tiny random model
whose adaptive-pipeline perplexity is recomputed by hand (prefill, pipeline, teacher-forced
continuation), plus harness verification of the full pipeline (no quality drop)."""

import io
import json
import math
import os
from contextlib import redirect_stdout

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

import models
from experiments import bench_policy
from experiments import compare
from kvjax.policy.pipeline import AdaptivePipeline, Stage
from models.config import ModelConfig
from tests.experiments.helpers import save_tiny_model

CFG = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=1024,
                  rope_theta=10000.0, bos_token_id=256, eos_token_id=257, pad_token_id=258)


def test_verdicts_and_frontier_gaps_by_hand():
  summ = {
      "full": {"scores": {"passkey": 1.0, "perplexity": 10.0}, "kv_bytes": 1000},
      "knorm@0.5": {"scores": {"passkey": 0.5, "perplexity": 11.0}, "kv_bytes": 500},
      "int4": {"scores": {"passkey": 0.8, "perplexity": 10.2}, "kv_bytes": 300},
      "adaptive@0.5": {"scores": {"passkey": 0.75, "perplexity": 10.1}, "kv_bytes": 505},
  }
  plan = {0.5: [("knorm", "knorm@0.5"), ("int4", "int4"), ("int8", None)]}
  out = bench_policy.verdicts(summ, plan, {0.5: "adaptive@0.5"}, byte_slack=0.02)
  got = {(v["single"], v["task"]): v["dominates"] for v in out}
  # vs knorm: better on both, 505 <= 500 * 1.02 bytes; vs int4: worse passkey, more bytes,
  # better perplexity but 505 > 306 bytes
  assert got == {("knorm@0.5", "passkey"): True, ("knorm@0.5", "perplexity"): True,
                 ("int4", "passkey"): False, ("int4", "perplexity"): False}
  why = {(v["single"], v["task"]): v["why"] for v in out}
  assert why[("int4", "passkey")] == "passkey 0.75 vs 0.8; bytes 505 vs 300"
  assert bench_policy.frontier_gaps(summ, ["knorm@0.5", "int4"], ["adaptive@0.5"]) == [
      ("int4", "passkey"), ("int4", "perplexity")]
  assert bench_policy.quality_drop({"passkey": 0.7, "perplexity": 11.0},
                                   {"passkey": 0.75, "perplexity": 10.0}) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return save_tiny_model(str(tmp_path_factory.mktemp("tiny_policy_model")), CFG, seed=4)


def _hand_perplexity(model, tok, samples, pipe):
  nll, cnt = 0.0, 0
  for s in samples:
    ctx, q = s.prompt_tokens(tok)
    _, cache, obs = models.prefill(model, jnp.asarray([ctx], jnp.int32), cache_dtype="float32",
                                   observe=pipe.observe, logits="last")
    cache = pipe.compress_model(cache, obs, model.config, room=len(q), prompt_length=len(ctx))
    logits, _ = models.decode(model, jnp.asarray([q[:-1]], jnp.int32), cache)
    lg = np.asarray(logits[0], np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    nll += float((lse - lg[np.arange(len(q) - 1), np.asarray(q[1:])]).sum())
    cnt += len(q) - 1
  return math.exp(nll / cnt)


def test_cli_smoke_adaptive_row_matches_a_hand_run(model_dir, tmp_path):
  out = str(tmp_path / "out")
  argv = ["bench_policy", f"--model={model_dir}", "--budgets=0.5", "--families=knorm,int4",
          "--tasks=passkey,perplexity", "--lengths=128", "--n=2", "--calib_n=1",
          "--batch_size=2", "--cache_dtype=float32", "--ppl_continuation=16",
          "--pool_budgets=0.25", "--scenarios=streaming", "--scenario_budget=0.5",
          f"--out_dir={out}",
          "--compilation_cache=", "--noprogress"]
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  buf = io.StringIO()
  try:
    with redirect_stdout(buf):
      bench_policy.main(["bench_policy"])
  finally:
    flags.FLAGS.unparse_flags()
  text = buf.getvalue()
  assert "adaptive@0.5 [" in text and "verdict: the adaptive pipeline dominates" in text
  assert "scenario streaming" in text and "verified: quality_drop=" in text
  for name in ("results.jsonl", "results.csv", "run.json", "verdicts.json", "profile.txt",
               "frontier.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  rows = [json.loads(l) for l in open(os.path.join(out, "results.jsonl"))]
  assert {r["technique"] for r in rows} >= {"full", "int4", "adaptive@0.5"}
  ada = next(r for r in rows if r["technique"] == "adaptive@0.5" and r["task"] == "perplexity")
  pipe = AdaptivePipeline(tuple(Stage.parse(s) for s in ada["stages"]))
  model, tok = compare.load_model(model_dir)
  samples = compare.build_samples(["perplexity"], [128], 2, [], [], 0, 0, 16, 0, 0)
  assert ada["score"] == pytest.approx(_hand_perplexity(model, tok, samples, pipe), rel=1e-4)
  full = next(r for r in rows if r["technique"] == "full" and r["task"] == "perplexity")
  assert full["score"] == pytest.approx(
      _hand_perplexity(model, tok, samples, AdaptivePipeline.uniform(Stage(), 2)), rel=1e-4)
  # the harness verifies a pipeline against the full cache: the full pipeline loses nothing
  verify = bench_policy.harness_verify(model, tok, samples, batch_size=2,
                                       cache_dtype="float32")
  v = verify(AdaptivePipeline.uniform(Stage(), 2, name="full-as-pipeline"))
  assert v["quality_drop"] == 0.0 and v["perplexity"] == pytest.approx(full["score"])
