"""Helpers shared by the launcher tests: a launcher in its own process, a tiny saved model."""

import os
import subprocess
import sys

from flax import nnx

import models
from models.tokenizer import ByteTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_module(module, args, *, timeout):
  """`python -m module *args` from the repository root on CPU, in its own process (absl
  flags are process-global and launchers define flags of the same names); the
  CompletedProcess with text stdout/stderr, whatever its exit status."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=timeout, check=False)


def save_tiny_model(path, cfg, seed):
  """models.Transformer(cfg) with random weights from `seed` and the byte tokenizer, saved
  in HF format at `path` (returned)."""
  models.save_pretrained(models.Transformer(cfg, rngs=nnx.Rngs(seed)), path)
  ByteTokenizer().save(path)
  return path
