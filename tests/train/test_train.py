"""End-to-end training on CPU: loss goes down, resume is bit-exact, bad inputs fail clearly.

One uninterrupted run (`run_full`) is shared by several tests; compiled programs are reused
across Trainers with the same config, so the resumed runs do not compile again.
"""

import hashlib
import os

import jax
import numpy as np
import pytest
from flax import nnx

from models import hf
from train import checkpoint as ckpt_lib
from train import metrics as metrics_lib
from train import train as train_lib

from tests.train.helpers import tiny_config


@pytest.fixture(scope="module")
def run_full(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  c = tiny_config(export=True, peak_flops_per_device=1e12)
  summary = train_lib.train_and_evaluate(c, workdir)
  return workdir, summary


def _losses(workdir):
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _tree_hash(root):
  h = hashlib.sha256()
  for d, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      p = os.path.join(d, f)
      h.update(p.encode())
      with open(p, "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def test_loss_decreases_and_outputs_are_written(run_full):
  workdir, summary = run_full
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 9))
  assert losses[8] < losses[1] - 0.5, losses
  assert summary["step"] == 8 and "eval/mqar/exact_match" in summary["eval"]
  assert np.isfinite(summary["eval"]["eval/stdlib/loss"])
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  logged = [r for r in rows if "loss" in r and r["step"] > 1]
  assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 for r in logged), logged
  # TensorBoard events: valid records (CRC-checked), one per logged row + the header.
  (tb,) = os.listdir(os.path.join(workdir, "tensorboard"))
  assert len(metrics_lib.read_records(os.path.join(workdir, "tensorboard", tb))) >= 9
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["8"]


def test_export_round_trips(run_full):
  workdir, summary = run_full
  path = summary["export_dir"]
  assert os.path.exists(os.path.join(path, "kvjax_tokenizer.json"))
  loaded = nnx.state(hf.from_pretrained(path), nnx.Param).to_pure_dict()
  trained = jax.device_get(summary["trainer"].state["params"])
  jax.tree.map(np.testing.assert_array_equal, loaded, trained)


def test_resume_is_bit_exact(run_full, tmp_path):
  full_dir, full = run_full
  c = tiny_config(export=True)
  first = train_lib.train_and_evaluate(c, str(tmp_path), stop_after_steps=4)
  assert first["step"] == 4
  del first
  # a fresh loop, as after preemption: new Trainer, state + data iterator from disk
  second = train_lib.train_and_evaluate(c, str(tmp_path))
  assert second["step"] == 8
  assert _losses(str(tmp_path)) == _losses(full_dir)   # exact float equality
  p_full = jax.device_get(full["trainer"].state["params"])
  p_res = jax.device_get(second["trainer"].state["params"])
  jax.tree.map(np.testing.assert_array_equal, p_full, p_res)
  assert second["eval"] == full["eval"]


def test_checkpoint_of_another_architecture_is_refused(run_full):
  full_dir, _ = run_full
  before = _tree_hash(full_dir + "/checkpoints")
  c = tiny_config(**{"model.config.hidden_size": 48})
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"(?s)different model.*hidden_size: checkpoint 32, config 48"):
    train_lib.train_and_evaluate(c, full_dir)
  assert _tree_hash(full_dir + "/checkpoints") == before


def test_corrupt_checkpoint_is_refused(run_full, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  full_dir, _ = run_full
  work = tmp_path / "w"
  shutil.copytree(os.path.join(full_dir, "checkpoints"), work / "checkpoints")
  for d, _, files in os.walk(work / "checkpoints" / "8" / "state"):
    for f in files:   # garble every array file
      with open(os.path.join(d, f), "r+b") as fh:
        fh.write(b"\x00garbage\xff" * 4)
  before = _tree_hash(str(work))
  with pytest.raises(ckpt_lib.CheckpointError, match="could not be restored"):
    train_lib.train_and_evaluate(tiny_config(), str(work))
  assert _tree_hash(str(work)) == before   # nothing written, nothing overwritten
  meta_dir = tmp_path / "m" / "checkpoints"
  shutil.copytree(os.path.join(full_dir, "checkpoints"), meta_dir)
  shutil.rmtree(meta_dir / "8" / "meta")
  with pytest.raises(ckpt_lib.CheckpointError, match="no readable metadata"):
    train_lib.train_and_evaluate(tiny_config(), str(tmp_path / "m"))


@pytest.mark.parametrize("overrides, match", [
    ({"model.config.num_heads": 3}, "num_heads=3 must be a multiple of num_kv_heads=2"),
    ({"model.config.vocab_size": 100}, "vocabulary .100. is smaller"),
    ({"seq_len": 100}, "seq_len=100 exceeds model.config.max_position_embeddings=64"),
    ({"batch_size": 6, "grad_accum_steps": 4}, "batch_size=6 is not divisible"),
    ({"model.config.dtype": "bfloat16"}, "model.config.dtype='bfloat16' differs"),
    ({"model.family": "no_such_family"}, "unknown model.family"),
    ({"model.compute_dtype": "int8"}, "compute_dtype='int8'"),
    ({"data.sources.mqar.num_pairs": 40}, "MQAR: length=33 is too short"),
])
def test_inconsistent_config_raises(overrides, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    train_lib.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints" / "1")


_SHARDED = r"""
import json, sys
import jax
from tests.train.helpers import tiny_config
from train import train as train_lib
assert jax.device_count() == 8, jax.devices()
c = tiny_config(**{"mesh.data": 4, "mesh.model": 2, "mesh.fsdp": True,
                   "mesh.fsdp_min_size": 64, "grad_accum_steps": 2, "eval_examples": 0,
                   "checkpoint_every": -1, "tensorboard": False})
s = train_lib.train_and_evaluate(c, sys.argv[1], stop_after_steps=3)
specs = {k: list(v.sharding.spec) for k, v in s["trainer"].state["params"].items()}
mu = s["trainer"].state["opt_state"]
print("RESULT" + json.dumps({"specs": specs, "mu_specs": [list(x.sharding.spec) for x in
      jax.tree.leaves(mu) if x.ndim >= 2][:4]}))
"""


def test_sharded_fsdp_tp_and_accumulation_match_one_device(run_full, tmp_path):
  """8 simulated CPU devices, mesh (data=4, model=2), FSDP + TP, 2 micro-batches."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  full_dir, _ = run_full
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.split("RESULT", 1)[1])
  assert res["specs"]["wq"] == [None, "data", "model"], res["specs"]   # [L, H, Hq*D]
  assert res["specs"]["wo"] == [None, "model", "data"], res["specs"]   # [L, Hq*D, H]
  assert any("data" in s for s in res["mu_specs"]), res["mu_specs"]    # Adam moments too
  sharded, single = _losses(str(tmp_path)), _losses(full_dir)
  assert sorted(sharded) == [1, 2, 3]
  for k in sharded:
    np.testing.assert_allclose(sharded[k], single[k], rtol=1e-5)   # measured 9e-8


def test_warm_start_copies_matching_params(run_full):
  """Conversion by weight transfer: the trained Llama -> the same Llama, sliding window."""
  _, summary = run_full
  c = tiny_config(**{"model.config.sliding_window": 8})
  trainer = train_lib.Trainer(c)
  trainer.init_state()
  with pytest.raises(ValueError, match="is not a directory"):
    train_lib.warm_start(trainer, "/nonexistent/model")
  out = train_lib.warm_start(trainer, summary["export_dir"])
  assert out["fresh"] == [] and len(out["copied"]) == len(jax.tree.leaves(
      trainer.state["params"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.state["params"]),
               jax.device_get(summary["trainer"].state["params"]))
