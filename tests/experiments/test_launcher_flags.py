"""Launchers share one process: flags defined on a given FlagValues, and compare's technique
listing names every registered technique."""

import importlib

from absl import flags

from experiments import compare
from kvjax import quant
from kvjax.presses import registry


def test_serve_and_bench_serving_import_and_define_in_one_process():
  serve = importlib.import_module("experiments.serve")
  bench = importlib.import_module("experiments.bench_serving")
  a = serve.define_flags(flags.FlagValues())
  b = bench.define_flags(flags.FlagValues())
  a(["serve", "--max_new_tokens=5", "--policy=none"])
  b(["bench_serving", "--max_new_tokens=7", "--configs=full"])
  # each launcher reads its own flag values; the same names do not collide
  assert serve.FLAGS is a and bench.FLAGS is b
  assert (a.max_new_tokens, b.max_new_tokens, b.configs) == (5, 7, ["full"])
  assert "model" in a and "model" in b and "rounds" not in a


def test_technique_help_lists_every_registered_technique():
  text = compare.technique_help()
  listed = text.splitlines()[0].removeprefix("techniques: ").split(", ")
  assert set(registry.names()) <= set(listed)          # duo_attention included
  assert set(quant.NAMES) <= set(listed) and "full" in listed
  # a press whose needs a prefill does not give says what to pass
  assert "  duo_attention needs head_scores (learned gates: --duo_gates)" in text.splitlines()
