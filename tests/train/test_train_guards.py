"""Training never fails silently: bad settings, diverged runs, torn metrics, damaged checkpoints.

One uninterrupted run (`full`) is the reference: every interrupted or repaired run must end
bit-identical to it.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from train import checkpoint as ckpt_lib
from train import metrics as metrics_lib
from train import train as train_lib

from tests.train.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CKPT = {"checkpoint_every": 4, "keep_checkpoints": 3, "tensorboard": False}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  summary = train_lib.train_and_evaluate(tiny_config(**CKPT), workdir)
  return workdir, summary


def _rows(workdir):
  return metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


def _same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a["trainer"].state["params"]),
               jax.device_get(b["trainer"].state["params"]))


@pytest.mark.parametrize("overrides,match", [
    ({"opt.lr": float("nan")}, r"opt.lr=nan; must be a finite number > 0.0"),
    ({"opt.lr": float("inf")}, r"opt.lr=inf"),
    ({"opt.b2": 1.0}, r"opt.b2=1.0; must be a finite number in \[0.0, 1.0\)"),
    ({"opt.clip_norm": float("nan")}, r"opt.clip_norm=nan"),
    ({"batch_size": 0}, r"batch_size=0; must be an int >= 1"),
    ({"eval_batch_size": 0}, r"eval_batch_size=0; must be an int >= 1"),
    ({"log_every": 0}, r"log_every=0; must be an int >= 1"),
    ({"keep_checkpoints": 0}, r"keep_checkpoints=0"),
])
def test_bad_settings_fail_before_training(overrides, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    train_lib.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints" / "1")
  assert not os.path.exists(tmp_path / "metrics.jsonl") or not _rows(str(tmp_path))


def _diverge(workdir, log_every):
  # a learning rate so large that the updates overflow the parameters within a few steps
  c = tiny_config(**{"opt.lr": 1e38, "opt.warmup_steps": 0, "opt.clip_norm": 0.0,
                     "checkpoint_every": 1, "log_every": log_every, "tensorboard": False})
  with pytest.raises(train_lib.NonFiniteLossError,
                     match=r"loss is (nan|inf) at step \d+ \(the first non-finite loss\); "
                     r"training stopped without saving that state \(the last checkpoint is "
                     r"step \d+\)") as e:
    train_lib.train_and_evaluate(c, str(workdir))
  return e.value


def test_first_non_finite_loss_stops_with_its_step(tmp_path):
  # Logged every step: every row before the reported step is finite, none at or after it
  err = _diverge(tmp_path / "a", log_every=1)
  s = err.step
  assert 2 <= s <= 8 and not np.isfinite(err.value)
  rows = _rows(str(tmp_path / "a"))
  assert [r["step"] for r in rows] == list(range(1, s))
  assert all(np.isfinite(r["loss"]) for r in rows)
  # and its state was never saved: checkpoints stop at the step before
  assert sorted(map(int, os.listdir(tmp_path / "a" / "checkpoints"))) == list(range(1, s))
  assert f"the last checkpoint is step {s - 1}" in str(err)
  # Logged every 4 steps: the same first step is found among the buffered ones, and the
  # save at every step still refuses the non-finite state
  err4 = _diverge(tmp_path / "b", log_every=4)
  assert err4.step == s
  assert sorted(map(int, os.listdir(tmp_path / "b" / "checkpoints"))) == list(range(1, s))
  assert all(r["step"] < s for r in _rows(str(tmp_path / "b")))


def test_train_main_exits_nonzero_on_nan_lr(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "train.main", "--config=train/configs/default.py",
                      f"--workdir={tmp_path}", "--config.opt.lr=nan"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-2000:]
  assert "opt.lr=nan; must be a finite number > 0.0" in r.stderr
  assert "Traceback" not in r.stderr
  r = subprocess.run([sys.executable, "-m", "train.main", "--config=train/configs/default.py",
                      "--workdir=/proc/kvjax_run"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode != 0 and "--workdir='/proc/kvjax_run' is not a writable" in r.stderr


def test_resume_survives_a_torn_metrics_line(full, tmp_path):
  full_dir, ref = full
  c = tiny_config(**CKPT)
  train_lib.train_and_evaluate(c, str(tmp_path), stop_after_steps=5)   # checkpoints 4, 5
  # Given a kill while step 6's row was half written (after the step-5 checkpoint)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "loss": 2.71')
  # When the run resumes
  res = train_lib.train_and_evaluate(c, str(tmp_path))
  # Then the torn row is gone and the run equals the uninterrupted one, bit for bit
  assert _losses(str(tmp_path)) == _losses(full_dir)
  assert [r["step"] for r in _rows(str(tmp_path)) if "loss" in r] == list(range(1, 9))
  _same_params(res, ref)


def test_torn_line_in_the_middle_is_an_error(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
    metrics_lib.read_jsonl(str(p), drop_torn_tail=True)
  p.write_text('{"step": 1}\n{"step": 2, "lo')
  assert metrics_lib.read_jsonl(str(p), drop_torn_tail=True) == ([{"step": 1}], '{"step": 2, "lo')


def _flip_byte_in_largest_array_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as fh:
    fh.seek(os.path.getsize(victim) // 2)
    b = fh.read(1)
    fh.seek(-1, 1)
    fh.write(bytes([b[0] ^ 0x01]))
  return os.path.relpath(victim, step_dir)


def test_manifest_is_written_after_each_save_and_detects_a_flipped_byte(full, tmp_path):
  full_dir, _ = full
  ck = os.path.join(full_dir, "checkpoints")
  assert sorted(os.listdir(ck)) == ["4", "8"]
  for s in ("4", "8"):
    body = json.load(open(os.path.join(ck, s, ckpt_lib.MANIFEST)))
    assert body["format"] == ckpt_lib.MANIFEST_FORMAT
    assert any(k.startswith("state/") for k in body["sha256"])
    assert ckpt_lib.verify_manifest(os.path.join(ck, s)) == []
  import shutil  # pylint: disable=import-outside-toplevel
  d = tmp_path / "8"
  shutil.copytree(os.path.join(ck, "8"), d)
  rel = _flip_byte_in_largest_array_file(str(d))
  assert ckpt_lib.verify_manifest(str(d)) == [f"{rel}: sha256 differs"]


def test_damaged_newest_step_falls_back_to_the_newest_intact_one(full, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  full_dir, ref = full
  # Given a copy of the finished run whose step-8 checkpoint has one flipped byte
  work = tmp_path / "w"
  shutil.copytree(os.path.join(full_dir, "checkpoints"), work / "checkpoints")
  rows = [r for r in _rows(full_dir) if r["step"] <= 8]
  (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  _flip_byte_in_largest_array_file(str(work / "checkpoints" / "8"))
  # When training resumes: it warns, restores step 4 and redoes steps 5..8
  res = train_lib.train_and_evaluate(tiny_config(**CKPT), str(work))
  assert res["step"] == 8
  _same_params(res, ref)
  assert _losses(str(work)) == _losses(full_dir)
  # the damaged step is kept aside for inspection, and a fresh step 8 is intact
  assert sorted(os.listdir(work / "checkpoints")) == ["4", "8", "8.corrupt"]
  assert ckpt_lib.verify_manifest(str(work / "checkpoints" / "8")) == []
