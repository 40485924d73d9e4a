"""A quiet launcher start: two known noise lines are dropped, nothing else is hidden.

absl apps log INFO, so every launcher used to open with lines that are not about the run:

  * jax probes every backend it knows and, on a machine without a TPU runtime, logs
    "Unable to initialize backend 'tpu': ... libtpu.so: cannot open shared object file"
    at INFO. A backend whose runtime library is simply not installed is dropped. Any other
    failure to start a backend (a TPU held by another process, a plugin that fails to
    load) is raised to WARNING, so it is seen even without INFO logging. A backend the user
    asked for (`JAX_PLATFORMS`) still fails with jax's own RuntimeError.
  * matplotlib builds its font cache on first use and logs "generated new fontManager"
    (INFO) and, when that takes a while, "Matplotlib is building the font cache; this may
    take a moment." (WARNING). Both are dropped; its other messages are kept.

`quiet_startup()` installs these filters on the two loggers (idempotent, no jax or
matplotlib import). The `train` and `experiments` packages call it when imported, so every
launcher (`python -m train.main`, `python -m experiments.compare`, ...) starts quietly.
Which backend jax picks is not changed.
"""

from __future__ import annotations

import logging
import re

JAX_LOGGER = "jax._src.xla_bridge"
MPL_LOGGER = "matplotlib.font_manager"

_BACKEND = re.compile(r"^Unable to initialize backend '([\w-]+)'")
# The causes that only mean "this backend's runtime is not installed here".
_NOT_INSTALLED = re.compile(
    r"cannot open shared object file|No such file or directory|not found|"
    r"no (?:visible )?devices|No module named", re.I)
_MPL_NOISE = ("generated new fontManager", "Matplotlib is building the font cache")


class BackendProbeFilter(logging.Filter):
  """Drops INFO "Unable to initialize backend" for backends that are not installed."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    if not _BACKEND.match(msg):
      return True
    if record.levelno <= logging.INFO and _NOT_INSTALLED.search(msg):
      return False
    if record.levelno < logging.WARNING:          # a real failure: make sure it is seen
      record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


class FontCacheFilter(logging.Filter):
  """Drops matplotlib's font-cache build notices."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not any(msg.startswith(n) for n in _MPL_NOISE)


def quiet_startup() -> None:
  """Installs both filters (once)."""
  for name, cls in ((JAX_LOGGER, BackendProbeFilter), (MPL_LOGGER, FontCacheFilter)):
    logger = logging.getLogger(name)
    if not any(isinstance(f, cls) for f in logger.filters):
      logger.addFilter(cls())
