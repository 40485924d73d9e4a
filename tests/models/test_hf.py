"""HF loading: round trips, sharding, interop with the safetensors package, clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import models
from models import hf


def tiny(cfg=None, seed=0):
  cfg = cfg or models.ModelConfig(num_layers=2, attention_bias=True,
                                  architecture="Qwen2ForCausalLM")
  return models.Transformer(cfg, rngs=nnx.Rngs(seed))


def params(m):
  return jax.tree.leaves(nnx.state(m, nnx.Param))


@pytest.mark.parametrize("shard", [None, 40_000])
def test_save_load_round_trip(tmp_path, shard):
  m = tiny()
  models.save_pretrained(m, str(tmp_path), max_shard_bytes=shard)
  if shard:
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
  m2 = models.from_pretrained(str(tmp_path))
  assert m2.config == m.config
  for a, b in zip(params(m), params(m2)):
    np.testing.assert_array_equal(a, b)


def test_bf16_and_safetensors_package_interop(tmp_path):
  # Our writer is readable by the reference package, and vice versa.
  arrs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((4,), np.int8)}
  hf.write_safetensors(str(tmp_path / "x.safetensors"), arrs)
  back = safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))
  for k in arrs:
    np.testing.assert_array_equal(back[k], arrs[k])
  safetensors.numpy.save_file(arrs, str(tmp_path / "y.safetensors"))
  ours = hf.read_safetensors(str(tmp_path / "y.safetensors"))
  for k in arrs:
    np.testing.assert_array_equal(ours[k], arrs[k])
  bf = {"w": np.arange(8, dtype=np.float32).astype(ml_dtypes.bfloat16)}
  hf.write_safetensors(str(tmp_path / "z.safetensors"), bf)
  np.testing.assert_array_equal(hf.read_safetensors(str(tmp_path / "z.safetensors"))["w"], bf["w"])


def test_load_with_dtype(tmp_path):
  m = tiny()
  models.save_pretrained(m, str(tmp_path))
  m2 = models.from_pretrained(str(tmp_path), dtype="bfloat16")
  assert all(p.dtype == jnp.bfloat16 for p in params(m2))


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="not a directory"):
    models.from_pretrained(str(tmp_path / "nope"))
  m = tiny()
  models.save_pretrained(m, str(tmp_path / "ok"))
  # unknown architecture
  d = tmp_path / "arch"
  models.save_pretrained(m, str(d))
  cfg = json.loads((d / "config.json").read_text())
  cfg["architectures"] = ["GPTNeoXForCausalLM"]
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="unknown architecture 'GPTNeoXForCausalLM'"):
    models.from_pretrained(str(d))
  # directory without safetensors
  d = tmp_path / "empty"
  d.mkdir()
  (d / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
  with pytest.raises(ValueError, match="no \\*.safetensors"):
    models.from_pretrained(str(d))
  # missing and extra tensors are named
  d = tmp_path / "mismatch"
  models.save_pretrained(m, str(d))
  t = hf.read_safetensors(str(d / "model.safetensors"))
  t = {k: np.array(v) for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}
  t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
  hf.write_safetensors(str(d / "model.safetensors"), t)
  with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"
                     r".*unexpected tensors \['model.layers.0.extra.weight'\]"):
    models.from_pretrained(str(d))
  # no config
  d = tmp_path / "noconfig"
  d.mkdir()
  with pytest.raises(ValueError, match="config.json"):
    models.from_pretrained(str(d))
