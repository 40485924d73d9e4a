"""The pod path on one machine: two CPU processes joined by jax.distributed on localhost.

Each process owns one CPU device and builds only its rows of every batch (per-host data);
compare.run splits its batches over the processes and gathers the scores with
process_allgather. The gathered results must equal one process driving both devices.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKER = r"""
import json, os, sys
import jax
pid, nproc, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if nproc > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc,
                             process_id=pid, initialization_timeout=120)
import numpy as np
from jax.experimental import multihost_utils
from flax import nnx
import models
from experiments import compare
from experiments import tasks as T
from models.config import ModelConfig
from models.tokenizer import ByteTokenizer
from tests.train.helpers import tiny_config
from train import train as train_lib

assert jax.device_count() == 2, jax.devices()
# --- a short training run: the batch is sharded over both devices (data axis = 2)
c = tiny_config(**{"steps": 2, "eval_examples": 0, "checkpoint_every": -1,
                   "tensorboard": False, "log_every": 1})
s = train_lib.train_and_evaluate(c, os.path.join(workdir, "train"))
params = s["trainer"].state["params"]
if nproc > 1:
  params = multihost_utils.process_allgather(params, tiled=True)
flat = {k: np.asarray(v).ravel()[:64].tolist() for k, v in jax.device_get(params).items()}
# --- a compare shard: batches are split over the processes, the scores gathered
cfg = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=1,
                  num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=256,
                  bos_token_id=256, eos_token_id=257, pad_token_id=258)
model = models.Transformer(cfg, rngs=nnx.Rngs(3))
samples = T.make("passkey").samples(128, 4)
techs = compare.parse_techniques(["full", "streaming_llm"], [0.5])
rows, _ = compare.run(model, ByteTokenizer(), techs, samples, batch_size=1,
                      cache_dtype="float32", decode_steps=1, progress=False)
scores = sorted((r["technique"], r["task"], r["score"], r["n"]) for r in rows)
if jax.process_index() == 0:
  print("RESULT" + json.dumps({"params": flat, "loss": s["last"]["loss"], "scores": scores}))
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _result(out):
  line = next(l for l in out.splitlines() if l.startswith("RESULT"))
  return json.loads(line[len("RESULT"):])


def test_two_processes_equal_one_process(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  port = str(_free_port())
  # Given two processes, one CPU device each, joined on localhost
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), "2", port,
                             str(tmp_path / "multi")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  multi = _result(outs[0][0])
  # and one process driving two CPU devices
  one_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  r = subprocess.run([sys.executable, "-c", _WORKER, "0", "1", "0", str(tmp_path / "one")],
                     cwd=ROOT, env=one_env, capture_output=True, text=True, timeout=400)
  assert r.returncode == 0, r.stderr[-3000:]
  one = _result(r.stdout)
  # Then training (per-host rows, cross-process gradient reduction) and the gathered
  # compare scores agree
  assert multi["scores"] == one["scores"]
  assert len(multi["scores"]) == 2 and all(n == 4 for *_, n in multi["scores"])
  np.testing.assert_allclose(multi["loss"], one["loss"], rtol=1e-6)
  assert multi["params"].keys() == one["params"].keys()
  for k in one["params"]:
    np.testing.assert_allclose(multi["params"][k], one["params"][k], rtol=1e-5, atol=1e-7,
                               err_msg=k)


_TRAIN = r"""
import json, sys
import jax
pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid, initialization_timeout=120)
from tests.train.helpers import tiny_config
from train import train as train_lib
c = tiny_config(**{"steps": 100000, "eval_examples": 0, "checkpoint_every": 0,
                   "tensorboard": False, "log_every": 2, "opt.decay_steps": 50})
s = train_lib.train_and_evaluate(c, workdir)
print("STOPPED", s["step"], flush=True)
"""


def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
  """A preemption notice reaching one host only: all hosts agree on the step, save it."""
  import signal  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  port, work = str(_free_port()), str(tmp_path / "run")
  procs = [subprocess.Popen([sys.executable, "-c", _TRAIN, str(i), port, work], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  metrics = os.path.join(work, "metrics.jsonl")
  t0 = time.time()
  while not (os.path.exists(metrics) and '"step": 4' in open(metrics).read()):
    assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
    assert time.time() - t0 < 400, "no step logged in 400 s"
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)      # process 0 never gets the notice
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  steps = {int(o.split("STOPPED")[1].split()[0]) for o, _ in outs}
  assert len(steps) == 1, steps                # both stopped at the same step
  k = steps.pop()
  assert k % 2 == 0                            # a step where they agreed (log_every=2)
  assert os.listdir(os.path.join(work, "checkpoints")) == [str(k)]
  rows = [json.loads(l) for l in open(metrics) if l.strip()]
  assert [r["step"] for r in rows] == list(range(2, k + 1, 2))
