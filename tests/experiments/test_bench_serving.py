"""experiments.bench_serving: a CLI smoke run on a tiny saved model, checked independently:
every configuration gets the same budget and its cache's exact bytes (rebuilt here) fit it,
every configuration does the same work, the full cache agrees with itself, and the ratios
are what the per-configuration numbers say. Runs in a subprocess (absl flags are global
and other experiment modules define flags of the same names)."""

import json
import os

import pytest

import models
from kvjax import cache as cache_lib
from kvjax import paged, quant
from models.config import ModelConfig
from tests.experiments.helpers import run_module, save_tiny_model

CFG = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=1024,
                  rope_theta=10000.0, bos_token_id=256, eos_token_id=257, pad_token_id=258)


def _run(args):
  return run_module("experiments.bench_serving", args, timeout=900)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return save_tiny_model(str(tmp_path_factory.mktemp("tiny_serving_model")), CFG, seed=3)


def test_cli_same_budget_same_work_and_exact_bytes(model_dir, tmp_path):
  out = str(tmp_path / "out")
  proc = _run([f"--model={model_dir}", "--num_requests=5", "--prompt_mix=8:16:1,40:60:1",
               "--system_len=8", "--max_new_tokens=3", "--page_size=8", "--chunk=16",
               "--configs=full,kivi4+press", "--kivi_group=8", "--kivi_residual=8",
               "--press_threshold=20", "--max_rows=4", "--prefill_batch=2",
               "--table_buckets=2", "--rounds=1", f"--out_dir={out}"])
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "best compressed pipeline: kivi4+press" in proc.stdout
  rows = json.load(open(os.path.join(out, "results.json")))["rows"]
  assert [r["config"] for r in rows] == ["full", "kivi4+press"]
  budget = rows[0]["budget_bytes"]
  max_tokens = 8 + 60 + 3
  for r, spec in zip(rows, (None, quant.kivi(4, group_size=8, residual=8))):
    assert r["budget_bytes"] == budget
    # the engine cache (request rows + the prefix row), rebuilt here, has exactly the
    # bytes the benchmark charged, within the budget
    make = paged.model_cache_fn(models.init_cache, CFG, num_pages=r["pages"], page_size=8,
                                max_tokens=max_tokens, quant=spec)
    assert cache_lib.tree_nbytes(make(r["rows"] + 1)) == r["cache_bytes"] <= budget
    assert r["tokens"] == 5 * 3                          # same work: EOS ignored
    assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])
    assert 1 <= r["peak_running"] <= r["rows"]
  full, comp = rows
  assert full["same_output"] == 1.0 and full["leading_match"] == 1.0
  assert full["throughput_x"] == 1.0 and full["memory_saved"] == 0.0
  assert comp["throughput_x"] == pytest.approx(comp["tokens_per_s"] / full["tokens_per_s"])
  assert comp["memory_saved"] == pytest.approx(1 - comp["bytes_per_seq"] / full["bytes_per_seq"])
  assert comp["kv_bytes_per_token"] < full["kv_bytes_per_token"] / 3    # int4 + scales
  assert comp["compressions"] >= 1                       # the 48..68-token prompts
  for name in ("results.csv", "serving.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0


def test_cli_bad_flags_name_the_flag():
  proc = _run(["--model=tiny", "--prompt_mix=8:4:1"])
  assert proc.returncode != 0
  assert "--prompt_mix entry '8:4:1': need 1 <= lo <= hi" in proc.stderr
  proc = _run(["--model=tiny", "--configs=full,int3"])
  assert "--configs entry 'int3'; allowed: full, int8, int4, kivi4, kivi2" in proc.stderr
