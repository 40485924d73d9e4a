"""experiments.bench_cpu: FLOP and byte counts checked against hand counts, and a CLI smoke
run on the tiny preset whose JSON is checked for internal consistency and for the cache's
exact bytes (counted by hand here). The CLI runs in a subprocess (absl flags are global)."""

import json

import numpy as np
from flax import nnx

from experiments import bench_cpu
from models.config import ModelConfig
from models.transformer import Transformer
from tests.experiments.helpers import run_module

CFG = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=2)


def _run(args):
  return run_module("experiments.bench_cpu", args, timeout=600)


def test_flops_match_a_hand_count():
  # Per token and layer: q 8x8, k 8x4, v 8x4, o 8x8, gate/up 8x12 each, down 12x8.
  per_token_layer = 2 * (64 + 32 + 32 + 64 + 96 + 96 + 96)
  fl = bench_cpu.prefill_flops(CFG, batch=2, length=5)
  assert fl["gemm"] == 3 * 2 * 5 * per_token_layer
  # causal pairs for 5 tokens: 15; QK^T + PV: 2 matmuls x 2 flops x head_dim 2 x 4 heads.
  assert fl["attention"] == 3 * 2 * 4 * 2 * 2 * 15 * 2
  assert fl["lm_head"] == 2 * 2 * 8 * 10
  assert fl["total"] == fl["gemm"] + fl["attention"] + fl["lm_head"]


def test_weight_bytes_counts_every_parameter_once():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  want = sum(np.asarray(x).nbytes for x in (
      model.embed.value, model.wq.value, model.wk.value, model.wv.value, model.wo.value,
      model.w_gate.value, model.w_up.value, model.w_down.value, model.attn_norm.value,
      model.mlp_norm.value, model.final_norm.value, model.lm_head.value))
  assert bench_cpu.weight_bytes(model) == want


def test_smollm2_shape_has_135m_parameters():
  c = ModelConfig(**bench_cpu.SMOLLM2_SHAPE)
  layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
           + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
           + 2 * c.hidden_size)
  total = c.num_layers * layer + c.vocab_size * c.hidden_size + c.hidden_size
  assert 134e6 < total < 135e6


def test_cli_smoke_on_tiny_model(tmp_path):
  out = str(tmp_path / "bench.json")
  r = _run(["--model=tiny", "--lengths=128", "--reps=1", "--decode_steps=2",
            "--presses=snapkv", f"--out={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "torch" in r.stdout and "load1" in r.stdout
  rows = json.load(open(out, encoding="utf-8"))["rows"]
  assert len(rows) == 1
  row = rows[0]
  assert row["length"] == 128 and row["impl"] == "kvjax"
  assert np.isclose(row["tokens_per_s"], 128 / row["prefill_s"])
  assert np.isclose(row["fraction_of_matmul_peak"],
                    row["achieved_flops_per_s"] / row["matmul_peak_flops_per_s"])
  assert np.isclose(row["achieved_flops_per_s"] * row["prefill_s"], row["flops"]["total"])
  assert row["press_snapkv_s"] > 0
  # tiny preset: 2 layers, 2 kv heads, head_dim 16, capacity 128 + 2 steps + 2 = 132, f32:
  # k and v 2*132*16*4 each, positions 2*132*4, lengths 2*4 per layer; next_position 4.
  assert row["cache_bytes"] == 2 * (2 * 2 * 132 * 16 * 4 + 2 * 132 * 4 + 2 * 4) + 4
  assert row["bytes_read"] == row["cache_bytes"] + row["weight_bytes"]
  assert np.isclose(row["fraction_of_bandwidth"],
                    row["achieved_bytes_per_s"] / row["measured_bandwidth_bytes_per_s"])
  assert row["decode_ms"] > 0 and row["load1_min"] >= 0


def test_cli_rejects_bad_flags():
  r = _run(["--model=tiny", "--lengths=0", "--out="])
  assert r.returncode != 0 and "--lengths" in r.stderr
  r = _run(["--model=tiny", "--lengths=128", "--presses=bogus", "--out="])
  assert r.returncode != 0 and "bogus" in r.stderr and "snapkv" in r.stderr
