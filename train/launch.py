"""What the train launchers (train.main, train.curriculum, train.convert) share at the edges.

`writable_dirs` registers absl validators so an output directory that cannot take files
fails while flags are parsed, before any model is built; `exit_on_error` turns the errors
a user can fix (a bad setting, a diverged run) into one message and exit status 1.
"""

from __future__ import annotations

import contextlib

from absl import flags
from absl import logging


def writable_dirs(*names: str, flag_values=flags.FLAGS) -> None:
  """Each named directory flag (empty passes) must be writable or creatable."""
  for name in names:
    def check(path, name=name):
      if path:
        from kvjax import checks  # pylint: disable=import-outside-toplevel  (jax loads late)
        why = checks.writable_dir_problem(path)
        if why:
          raise flags.ValidationError(f"--{name}={path!r} is not a writable directory ({why})")
      return True
    flags.register_validator(name, check, flag_values=flag_values)


@contextlib.contextmanager
def exit_on_error(program: str):
  """ValueError / FloatingPointError (NonFiniteLossError) -> logged, SystemExit(1)."""
  try:
    yield
  except (ValueError, FloatingPointError) as e:
    logging.error("%s", e)
    raise SystemExit(f"{program}: {type(e).__name__}: {e}") from e
