"""Families plugged in by path, bf16 compute, metric files, registry errors."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from train import metrics as metrics_lib
from train import registry
from train import train as train_lib

from tests.train.helpers import tiny_config


def _toy_config(**kw):
  c = tiny_config(**{"model.family": "tests.train.toy_family:build", "eval_examples": 0,
                     "steps": 6, **kw})
  c.data.sources = ml_collections.ConfigDict(dict(mqar=dict(kind="mqar", num_pairs=4)))
  c.model.config = ml_collections.ConfigDict(dict(vocab_size=260, hidden_size=16))
  return c


def _losses(workdir):
  return [r["loss"] for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r]


@pytest.fixture(scope="module")
def toy_full(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("toy"))
  return workdir, train_lib.train_and_evaluate(_toy_config(), workdir)


def test_plugged_family_trains_and_resumes_bit_exactly(toy_full, tmp_path):
  full_dir, full = toy_full
  train_lib.train_and_evaluate(_toy_config(), str(tmp_path), stop_after_steps=3)
  resumed = train_lib.train_and_evaluate(_toy_config(), str(tmp_path))
  la, lb = _losses(full_dir), _losses(str(tmp_path))
  assert la == lb and len(la) == 6 and la[-1] < la[0]
  params = jax.device_get(resumed["trainer"].state["params"])
  assert set(params["layers"]) == {0, 1}   # nested list modules survive the checkpoint
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full["trainer"].state["params"]),
               params)


def test_bf16_compute_keeps_f32_params(toy_full, tmp_path):
  c = _toy_config(**{"model.compute_dtype": "bfloat16", "checkpoint_every": -1,
                     "eval_examples": 0})
  s = train_lib.train_and_evaluate(c, str(tmp_path))
  losses = _losses(str(tmp_path))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  leaves = jax.tree.leaves(s["trainer"].state)
  assert {x.dtype for x in leaves if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)} == {
      np.dtype("float32")}
  ref = _losses(toy_full[0])
  np.testing.assert_allclose(losses[0], ref[0], rtol=2e-2)   # bf16 rounding only
  assert losses[0] != ref[0]                                 # it did compute in bf16


def test_registry_errors_and_registration():
  with pytest.raises(ValueError, match="unknown model.family='nope'"):
    registry.get("nope")
  with pytest.raises(ValueError, match="cannot import"):
    registry.get("tests.train.toy_family:missing")
  fam = registry.register("toy_test", lambda kw, *, rngs: None)
  assert registry.get("toy_test") is fam and "llama" in registry.names()


@pytest.mark.parametrize("family,cls", [("llama", "ModelConfig"), ("gla", "GLAConfig")])
def test_unknown_model_config_key_is_named_before_any_build(family, cls):
  # The Llama family and a Decoder family refuse a key their config class lacks, naming it
  # and the class (nothing is built: the error comes first).
  with pytest.raises(ValueError, match=rf"key\(s\) \['hiden_size'\] that {cls} does not know; "
                     r"known: \[.*'hidden_size'"):
    registry.get(family).build({"hiden_size": 32}, rngs=None)
