"""experiments.mqar_families: the recipe's configs are valid for every family, their cache
sizes are the hand-counted ones, and the table/CSV/PNG are written."""

import csv
import os

import pytest

from experiments import mqar_families as exp
from models import registry
from train import sharding as shard_lib
from train import train as train_lib
from train.configs import mqar_families as recipe


def test_every_family_config_is_valid_and_cache_sizes_are_hand_counted():
  mesh = shard_lib.make_mesh()
  per_token = {}
  for family in recipe.FAMILIES:
    c = recipe.get_config(family)
    parts = train_lib.build_parts(c)
    train_lib.check_config(c, parts, mesh)  # eval_shape of the forward, no FLOPs
    per_token[family] = registry.prefill_cache_nbytes(parts.abstract_model(), 4096) / 4096
  # llama: 2 layers x (K + V: 4 kv heads x 16 dims x 4 B, + a 4 B position per kv head),
  # plus per-layer lengths [1, 4] int32 and next_position, amortised over 4096 tokens
  assert per_token["llama"] == 2 * (2 * 4 * 16 * 4 + 4 * 4) + (2 * 4 * 4 + 4) / 4096
  assert per_token["cla"] == pytest.approx(per_token["llama"] / 2, rel=1e-4)  # 1 cache, 2 layers
  # MLA: 2 layers x (16-wide latent + 8 RoPE channels) x 4 B + a position
  assert per_token["mla"] == pytest.approx(2 * ((16 + 8) * 4 + 4), rel=1e-3)
  # window / state families are O(1) in the context: < 16 B per token at 4K
  for f in ("sliding", "dilated", "gla", "retnet", "mamba2", "hybrid"):
    assert per_token[f] < 16, (f, per_token[f])
  with pytest.raises(ValueError, match="family='transformer'; allowed"):
    recipe.get_config("transformer")


def test_results_are_written_as_table_csv_and_plot(tmp_path):
  rows = [dict(family="llama", params=100, cache_bytes_per_token=1056.0, mqar_acc=0.99,
               mqar_em=0.95, train_acc=0.99, train_em=0.9, steps=800, train_seconds=1.0),
          dict(family="gla", params=120, cache_bytes_per_token=2.0, mqar_acc=0.4,
               mqar_em=0.1, train_acc=0.5, train_em=0.0, steps=800, train_seconds=1.0)]
  paths = exp.write(rows, str(tmp_path), 4096)
  assert all(os.path.exists(p) for p in paths.values())
  with open(paths["csv"]) as f:
    got = list(csv.DictReader(f))
  assert [r["family"] for r in got] == ["llama", "gla"] and got[1]["mqar_acc"] == "0.4"
  md = open(paths["md"]).read().splitlines()
  assert md[2] == "| llama | 100 | 1056.0 | 0.990 | 0.950 | 0.990 | 800 |"
