"""SIGTERM (a preemption notice) makes training checkpoint and stop; the resume is exact."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from train import metrics as metrics_lib
from train import train as train_lib

from tests.train.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# decay_steps fixed: the schedule does not depend on `steps`, so a run stopped at step k and
# resumed with steps=k+2 must equal a run of k+2 steps
OVERRIDES = {"opt.decay_steps": 50, "eval_examples": 0, "tensorboard": False,
             "checkpoint_every": 0, "log_every": 1}

_RUN = r"""
import json, sys
from tests.train.helpers import tiny_config
from train import train as train_lib
c = tiny_config(steps=100000, **json.loads(sys.argv[2]))
s = train_lib.train_and_evaluate(c, sys.argv[1])
print("STOPPED", s["step"], flush=True)
"""


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return metrics_lib.read_jsonl(path) if os.path.exists(path) else []


def _start_run(work, overrides, logged_step):
  """A training process on `work`, returned once it has logged step `logged_step`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  p = subprocess.Popen([sys.executable, "-c", _RUN, work, json.dumps(overrides)], cwd=ROOT,
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  t0 = time.time()
  while not any(r.get("step", 0) >= logged_step for r in _rows(work)):
    assert p.poll() is None, p.communicate()[1][-3000:]
    assert time.time() - t0 < 300, "the run logged no step in 300 s"
    time.sleep(0.01)
  return p


def _assert_resume_equals_uninterrupted(work, ref_dir, steps, overrides):
  """Resuming `work` up to `steps` equals a fresh run of `steps` in `ref_dir`, bit for bit:
  the logged losses and the parameters."""
  res = train_lib.train_and_evaluate(tiny_config(steps=steps, **overrides), work)
  ref = train_lib.train_and_evaluate(tiny_config(steps=steps, **overrides), ref_dir)
  assert res["step"] == ref["step"] == steps
  assert _rows(work) and [(r["step"], r["loss"]) for r in _rows(work)] == \
      [(r["step"], r["loss"]) for r in _rows(ref_dir)]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(res["trainer"].state["params"]),
               jax.device_get(ref["trainer"].state["params"]))


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path):
  work = str(tmp_path / "run")
  # Given a run that has logged a few steps
  p = _start_run(work, OVERRIDES, logged_step=3)
  # When it receives SIGTERM
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=300)
  # Then it finishes its step, checkpoints it, and exits cleanly
  assert p.returncode == 0, err[-3000:]
  k = int(out.split("STOPPED")[1].split()[0])
  assert "stopping at step %d (SIGTERM)" % k in err
  assert os.listdir(os.path.join(work, "checkpoints")) == [str(k)]
  assert [r["step"] for r in _rows(work)] == list(range(1, k + 1))
  # and resuming for two more steps equals an uninterrupted run of k + 2 steps, bit for bit
  _assert_resume_equals_uninterrupted(work, str(tmp_path / "ref"), k + 2, OVERRIDES)


def test_kill_9_mid_run_resumes_bit_identical(tmp_path):
  """SIGKILL (no handler runs) after a few checkpoints: the resumed run's metrics and
  parameters equal an uninterrupted run's (torn metrics line and unsealed step included)."""
  over = dict(OVERRIDES, checkpoint_every=2, keep_checkpoints=2)
  work = str(tmp_path / "run")
  p = _start_run(work, over, logged_step=5)
  p.kill()
  p.communicate(timeout=60)
  k = max(r["step"] for r in _rows(work)) + 2   # resume past the kill point
  _assert_resume_equals_uninterrupted(work, str(tmp_path / "ref"), k, over)
