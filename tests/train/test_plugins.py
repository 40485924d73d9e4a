"""Families plugged in by path, bf16 compute, metric files, registry errors."""

import os
import struct

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


def test_crc32c_and_event_records(tmp_path):
  assert metrics_lib.crc32c(b"123456789") == 0xE3069283   # the CRC-32C check value
  w = metrics_lib.MetricWriter(str(tmp_path), tensorboard=True)
  w.write(7, {"loss": 1.5, "lr": 0.25}, log=False)
  w.close()
  (name,) = os.listdir(tmp_path / "tensorboard")
  assert name.startswith("events.out.tfevents.")
  recs = metrics_lib.read_records(str(tmp_path / "tensorboard" / name))
  assert b"brain.Event:2" in recs[0]
  ev = _parse_event(recs[1])
  assert ev.step == 7
  assert {v.tag: v.simple_value for v in ev.summary.value} == {"loss": 1.5, "lr": 0.25}
  assert metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl")) == [
      {"step": 7, "loss": 1.5, "lr": 0.25}]


def _parse_event(blob):
  """Decodes with protobuf from a hand-built descriptor of tensorflow's Event/Summary."""
  from google.protobuf import descriptor_pb2, descriptor_pool  # pylint: disable=g-import-not-at-top
  from google.protobuf import message_factory  # pylint: disable=g-import-not-at-top
  f = descriptor_pb2.FileDescriptorProto(name="ev_test.proto", package="tfev")
  fdp = descriptor_pb2.FieldDescriptorProto
  val = f.message_type.add(name="Value")
  val.field.add(name="tag", number=1, type=fdp.TYPE_STRING, label=fdp.LABEL_OPTIONAL)
  val.field.add(name="simple_value", number=2, type=fdp.TYPE_FLOAT, label=fdp.LABEL_OPTIONAL)
  summ = f.message_type.add(name="Summary")
  summ.field.add(name="value", number=1, type=fdp.TYPE_MESSAGE, type_name=".tfev.Value",
                 label=fdp.LABEL_REPEATED)
  ev = f.message_type.add(name="Event")
  ev.field.add(name="wall_time", number=1, type=fdp.TYPE_DOUBLE, label=fdp.LABEL_OPTIONAL)
  ev.field.add(name="step", number=2, type=fdp.TYPE_INT64, label=fdp.LABEL_OPTIONAL)
  ev.field.add(name="file_version", number=3, type=fdp.TYPE_STRING, label=fdp.LABEL_OPTIONAL)
  ev.field.add(name="summary", number=5, type=fdp.TYPE_MESSAGE, type_name=".tfev.Summary",
               label=fdp.LABEL_OPTIONAL)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("tfev.Event"))
  msg = cls()
  msg.ParseFromString(blob)
  assert msg.wall_time > 1e9 and struct.pack("<d", msg.wall_time)
  return msg
