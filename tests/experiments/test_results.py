"""The results writer, table and frontier verdict on handmade rows."""

import csv
import json
import os

from experiments import plots, results


def _row(tech, fam, task, score, length=2048, depth=None, kvb=1000.0, kvf=1.0, ratio=None):
  return dict(mode="query_agnostic", technique=tech, family=fam, press=None, ratio=ratio,
              quant=None, task=task, metric="prefix_match", length=length, depth=depth, n=4,
              score=score, kv_bytes=kvb, kv_factor=kvf, prefill_tok_s=100.0,
              decode_tok_s=float("nan") if tech == "x" else 50.0, model="m")


ROWS = [
    _row("full", "full", "passkey", 1.0), _row("full", "full", "kv_retrieval", 0.9),
    _row("full", "full", "perplexity", 3.0),
    _row("snapkv@0.5", "press", "passkey", 1.0, kvb=500, kvf=2.0, ratio=0.5),
    _row("snapkv@0.5", "press", "kv_retrieval", 0.9, kvb=500, kvf=2.0, ratio=0.5),
    _row("snapkv@0.9", "press", "passkey", 0.5, kvb=100, kvf=10.0, ratio=0.9),
    _row("snapkv@0.9", "press", "kv_retrieval", 0.2, kvb=100, kvf=10.0, ratio=0.9),
    _row("int4", "quant", "passkey", 1.0, kvb=280, kvf=3.6),
    _row("int4", "quant", "kv_retrieval", 0.85, kvb=280, kvf=3.6),
    _row("full", "full", "needle", 1.0, length=1024, depth=0.0),
    _row("full", "full", "needle", 0.5, length=1024, depth=1.0),
]


def test_write_round_trip(tmp_path):
  paths = results.write(ROWS, str(tmp_path), meta={"model": "m"})
  back = results.read_jsonl(paths["jsonl"])
  assert len(back) == len(ROWS) and back[0]["technique"] == "full"
  with open(paths["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert rows[0]["score"] == "1.0" and rows[0]["depth"] == ""
  assert list(rows[0])[:len(results.FIELDS)] == list(results.FIELDS)
  with open(paths["run"]) as f:
    run = json.load(f)
  assert run["model"] == "m" and set(run) == {"model", "environment"}
  # rewritten, not appended
  results.write(ROWS[:2], str(tmp_path))
  assert len(results.read_jsonl(paths["jsonl"])) == 2


def test_run_json_records_the_environment(tmp_path):
  import platform
  import subprocess
  import sys
  from importlib import metadata

  import jax
  paths = results.write(ROWS[:1], str(tmp_path), meta={"flags": {"n": 4}})
  with open(paths["run"]) as f:
    env = json.load(f)["environment"]
  dev = jax.devices()[0]
  assert env["backend"] == jax.default_backend() == dev.platform
  assert env["device_kind"] == dev.device_kind and env["device_count"] == jax.device_count()
  assert env["jax"] == jax.__version__ == metadata.version("jax")
  assert env["jaxlib"] == metadata.version("jaxlib") and env["flax"] == metadata.version("flax")
  assert env["python"] == platform.python_version() == "%d.%d.%d" % sys.version_info[:3]
  assert env["platform"] == platform.platform()
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                        text=True, check=False).stdout.strip()
  if head:   # a git checkout: the commit, marked when tracked files differ from it
    assert env["git_commit"].split("+")[0] == head
  else:
    assert env["git_commit"] is None
  # a caller's own environment entry is kept as given
  paths = results.write(ROWS[:1], str(tmp_path), meta={"environment": {"x": 1}})
  with open(paths["run"]) as f:
    assert json.load(f)["environment"] == {"x": 1}


def test_device_label_names_backend_kind_and_count():
  import jax
  label = results.device_label()
  assert label.startswith(jax.default_backend())
  assert label.endswith(f" x{jax.device_count()}")
  kind = jax.devices()[0].device_kind
  if kind.lower() == jax.default_backend():       # CPU: the kind adds nothing
    assert label == f"{kind} x{jax.device_count()}"
  else:
    assert f" {kind} x" in label


def test_table_says_the_mode_and_every_technique():
  t = results.table(ROWS)
  assert "mode: query_agnostic" in t
  lines = t.splitlines()
  full = next(l for l in lines if l.startswith("full"))
  assert "100.0" in full and "90.0" in full and "3.00" in full and "75.0" in full  # needle mean
  assert any(l.startswith("snapkv@0.9") and "50.0" in l for l in lines)


def test_frontier_verdict_within_one_point():
  v = results.frontier_verdict(ROWS, tasks=["passkey", "kv_retrieval"])
  assert v["snapkv"] == (2.0, "snapkv@0.5")     # 0.9 falls 60 points short
  assert v["int4"] == (None, None)              # mean 0.925 < 0.95 - 0.01


def test_plots_write_pngs(tmp_path):
  got = plots.all_plots(ROWS, str(tmp_path))
  assert set(got) == {"frontier", "needle", "throughput"}
  assert all(os.path.getsize(p) > 1000 for p in got.values())


def test_perplexity_verdict_relative_tolerance():
  rows = [_row("full", "full", "perplexity", 3.0),
          _row("knorm@0.5", "press", "perplexity", 3.02, kvf=2.0),    # +0.7%
          _row("knorm@0.9", "press", "perplexity", 3.5, kvf=10.0),    # +17%
          _row("int8", "quant", "perplexity", 3.001, kvf=1.9)]
  v = results.perplexity_verdict(rows)
  assert v == {"knorm": (2.0, "knorm@0.5"), "int8": (1.9, "int8")}
  # passkey 100, kv 90, needle mean(100, 50) = 75 -> 88.3
  assert abs(results.full_accuracy(ROWS) - (1.0 + 0.9 + 0.75) / 3) < 1e-12


def test_plots_are_shown_only_where_a_figure_can_be_shown(tmp_path, monkeypatch):
  import warnings

  import matplotlib
  import matplotlib.pyplot as plt
  shown = []
  monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(len(plt.get_fignums())))
  # Agg (scripts, CI): saved, never shown, and no "cannot be shown" warning
  assert not plots.can_show()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = plots.all_plots(ROWS, str(tmp_path / "agg"), show=True)
  assert not [w for w in caught if "cannot be shown" in str(w.message)
              or "non-interactive" in str(w.message)]
  assert set(got) == {"frontier", "needle", "throughput"} and shown == []
  # a notebook's inline backend: each plot is saved, then shown while its figure is open
  monkeypatch.setattr(matplotlib, "get_backend",
                      lambda: "module://matplotlib_inline.backend_inline")
  assert plots.can_show()
  got = plots.all_plots(ROWS, str(tmp_path / "inline"), show=True)
  assert shown == [1, 1, 1] and plt.get_fignums() == []
  assert all(os.path.getsize(p) > 1000 for p in got.values())
  shown.clear()
  plots.all_plots(ROWS, str(tmp_path / "off"))          # show defaults to False
  assert shown == []
