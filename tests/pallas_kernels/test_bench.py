"""Smoke test of the benchmark's main function (interpret mode, tiny shapes)."""

import json

import pytest

from pallas_kernels import bench
from pallas_kernels.bench import harness


def test_peak_table():
  assert harness.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
  assert harness.peak_bandwidth("NVIDIA H200") == 4.8e12
  assert harness.peak_bandwidth("TPU v5 lite") == 8.2e11
  assert harness.peak_bandwidth("TPU v5p") == 2.76e12
  assert harness.peak_bandwidth("TPU v4") == 1.2e12
  assert harness.peak_bandwidth("cpu") is None


def test_main_runs_on_cpu_interpret(tmp_path, capsys):
  out = tmp_path / "rows.json"
  rows = bench.main(["bench", "--interpret", "--platform=cpu", "--kernels=decode",
                     "--context=64", "--batch=2", "--q_heads=2", "--kv_heads=1",
                     "--head_dim=32", "--iters=1", "--warmup=0", "--ragged",
                     f"--json_out={out}"])
  text = capsys.readouterr().out
  assert len(rows) == 1 and rows[0]["time_ms"] > 0 and rows[0]["frac_peak"] is None
  assert rows[0]["xla_ms"] is not None and rows[0]["speedup_vs_xla"] is not None
  assert "GB/s" in text and "%peak" in text and "n/a" in text
  assert json.loads(out.read_text())[0]["kernel"] == "decode"


def test_main_needs_interpret_without_accelerator():
  with pytest.raises(ValueError, match="--interpret"):
    bench.main(["bench", "--platform=cpu"])
