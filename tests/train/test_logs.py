"""train.logs: launchers start without backend-probe and font-cache noise, errors still show."""

import logging
import os
import subprocess
import sys

import pytest

from train import logs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOT_INSTALLED = ("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: "
                 "libtpu.so: cannot open shared object file: No such file or directory")
BUSY = ("Unable to initialize backend 'tpu': ABORTED: The TPU is already in use by "
        "process with pid 1234.")


@pytest.fixture(autouse=True)
def _filters():
  logs.quiet_startup()
  logs.quiet_startup()                               # idempotent
  for name in (logs.JAX_LOGGER, logs.MPL_LOGGER):
    assert len(logging.getLogger(name).filters) >= 1
  jax_filters = [f for f in logging.getLogger(logs.JAX_LOGGER).filters
                 if isinstance(f, logs.BackendProbeFilter)]
  assert len(jax_filters) == 1


def _emit(caplog, logger, level, msg):
  caplog.clear()
  with caplog.at_level(logging.DEBUG, logger=logger):
    logging.getLogger(logger).log(level, msg)
  return [(r.levelname, r.getMessage()) for r in caplog.records]


def test_a_backend_that_is_not_installed_is_dropped(caplog):
  assert _emit(caplog, logs.JAX_LOGGER, logging.INFO, NOT_INSTALLED) == []


def test_a_backend_that_fails_otherwise_is_raised_to_warning(caplog):
  assert _emit(caplog, logs.JAX_LOGGER, logging.INFO, BUSY) == [("WARNING", BUSY)]


def test_other_jax_messages_and_errors_are_kept(caplog):
  other = ("An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not "
           "installed.")
  assert _emit(caplog, logs.JAX_LOGGER, logging.WARNING, other) == [("WARNING", other)]
  assert _emit(caplog, logs.JAX_LOGGER, logging.ERROR, NOT_INSTALLED) == [("ERROR", NOT_INSTALLED)]
  assert _emit(caplog, logs.JAX_LOGGER, logging.INFO, "Backend 'cpu' ready") == [
      ("INFO", "Backend 'cpu' ready")]


def test_font_cache_notices_are_dropped_and_other_font_messages_kept(caplog):
  assert _emit(caplog, logs.MPL_LOGGER, logging.INFO, "generated new fontManager") == []
  assert _emit(caplog, logs.MPL_LOGGER, logging.WARNING,
               "Matplotlib is building the font cache; this may take a moment.") == []
  kept = "findfont: Font family 'Nope' not found."
  assert _emit(caplog, logs.MPL_LOGGER, logging.WARNING, kept) == [("WARNING", kept)]


APP = """
import sys
if sys.argv[1] == "quiet":
  import experiments  # noqa: F401  (the package installs the filters)
from absl import app

def main(_):
  import jax
  print("devices:", jax.devices())
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  plt.figure()

app.run(main, argv=sys.argv[:1])
"""


def _run_app(tmp_path, mode):
  env = dict(os.environ, MPLCONFIGDIR=str(tmp_path / mode), PYTHONPATH=ROOT)
  env.pop("JAX_PLATFORMS", None)
  proc = subprocess.run([sys.executable, "-c", APP, mode], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=True)
  return proc.stdout, proc.stderr


def test_an_absl_launcher_starts_quietly(tmp_path):
  # Given an absl app that touches jax and a fresh matplotlib cache,
  # When it runs without the filters, matplotlib's cache notice is printed (a control);
  out, err = _run_app(tmp_path, "loud")
  assert "devices:" in out and "generated new fontManager" in err
  # Then with them (importing the experiments package) neither notice is printed.
  out, err = _run_app(tmp_path, "quiet")
  assert "devices:" in out
  assert "fontManager" not in err and "font cache" not in err
  assert "Unable to initialize backend" not in err
