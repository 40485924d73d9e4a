"""Flag validators shared by the absl launchers: bad flags fail at parse time, before any work.

Each function registers an absl validator on one flag (`flags.register_validator`), so a
value out of range stops the program while its flags are parsed, with the flag, its value
and what is allowed:

    flagcheck.ints(">= 1", "batch", "decode_steps")
    flagcheck.floats("ratio", lo=0.0, hi=1.0, hi_open=True)
    flagcheck.int_lists("lengths", lo=1)
    flagcheck.writable_dir("out_dir")

Output directories are probed without side effects: the directory (or, when it does not
exist yet, its nearest existing ancestor) must accept a file, tested by creating and
removing one, so an unwritable `--out_dir` fails at once rather than after the whole run.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

from absl import flags

FLAGS = flags.FLAGS


def _fail(name, value, allowed):
  raise flags.ValidationError(f"--{name}={value!r}; must be {allowed}")


def _int_ok(v, lo, hi) -> bool:
  return (isinstance(v, int) and not isinstance(v, bool) and v >= lo and
          (hi is None or v <= hi))


def _range_words(lo, hi, lo_open=False, hi_open=False) -> str:
  if hi is None or hi == math.inf:
    return f"> {lo}" if lo_open else f">= {lo}"
  return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _float_ok(v, lo, hi, lo_open, hi_open) -> bool:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    return False
  if v < lo or (lo_open and v == lo):
    return False
  return hi is None or v < hi or (not hi_open and v == hi)


def _register(names, check, flag_values, *, empty_passes=False) -> None:
  """Registers `check(value, name)` on each flag of `names`; it raises through _fail. With
  empty_passes, an empty or None value passes unchecked."""
  def validate(v, name):
    if v or not empty_passes:
      check(v, name)
    return True
  for name in names:
    flags.register_validator(name, functools.partial(validate, name=name),
                             flag_values=flag_values)


def ints(*names: str, lo: int = 1, hi: Optional[int] = None, allow_none: bool = True,
         flag_values=FLAGS) -> None:
  """Each integer flag in `names` must be in [lo, hi] (None passes when allow_none)."""
  def check(v, name):
    if not (v is None and allow_none) and not _int_ok(v, lo, hi):
      _fail(name, v, f"an int {_range_words(lo, hi)}")
  _register(names, check, flag_values)


def floats(*names: str, lo: float = -math.inf, hi: Optional[float] = None,
           lo_open: bool = False, hi_open: bool = False, allow_none: bool = True,
           flag_values=FLAGS) -> None:
  """Each float flag in `names` must be finite and in the range (NaN and inf fail)."""
  def check(v, name):
    if not (v is None and allow_none) and not _float_ok(v, lo, hi, lo_open, hi_open):
      _fail(name, v, f"a finite number {_range_words(lo, hi, lo_open, hi_open)}")
  _register(names, check, flag_values)


def int_lists(*names: str, lo: int = 1, hi: Optional[int] = None, nonempty: bool = True,
              flag_values=FLAGS) -> None:
  """Each list flag in `names` must hold ints in [lo, hi] (and at least one, if nonempty)."""
  def check(v, name):
    items = list(v or [])
    if nonempty and not items:
      _fail(name, v, "a non-empty comma-separated list of ints")
    for s in items:
      try:
        x = int(str(s).strip())
      except ValueError:
        _fail(name, ",".join(map(str, items)), f"comma-separated ints {_range_words(lo, hi)}"
              f" ({s!r} is not an int)")
      if not _int_ok(x, lo, hi):
        _fail(name, ",".join(map(str, items)),
              f"comma-separated ints {_range_words(lo, hi)} ({x} is not)")
  _register(names, check, flag_values)


def float_lists(*names: str, lo: float = -math.inf, hi: Optional[float] = None,
                lo_open: bool = False, hi_open: bool = False, nonempty: bool = True,
                flag_values=FLAGS) -> None:
  """Each list flag in `names` must hold finite floats in the range."""
  words = _range_words(lo, hi, lo_open, hi_open)
  def check(v, name):
    items = list(v or [])
    if nonempty and not items:
      _fail(name, v, "a non-empty comma-separated list of numbers")
    for s in items:
      try:
        x = float(str(s).strip())
      except ValueError:
        _fail(name, ",".join(map(str, items)), f"comma-separated numbers {words} ({s!r} "
              "is not a number)")
      if not _float_ok(x, lo, hi, lo_open, hi_open):
        _fail(name, ",".join(map(str, items)), f"comma-separated finite numbers {words} "
              f"({s} is not)")
  _register(names, check, flag_values)


def check_writable_dir(path: str) -> Optional[str]:
  """None if files can be written in `path` (see kvjax.checks.writable_dir_problem)."""
  from kvjax import checks  # pylint: disable=import-outside-toplevel  (launchers import jax late)
  return checks.writable_dir_problem(path)


def writable_dir(*names: str, allow_empty: bool = True, flag_values=FLAGS) -> None:
  """Each directory flag in `names` must name a writable (or creatable) directory.

  An empty or None value passes when allow_empty (the launcher's own default applies).
  """
  def check(v, name):
    if not v:
      _fail(name, v, "a directory path")
    why = check_writable_dir(v)
    if why:
      _fail(name, v, f"a writable directory ({why})")
  _register(names, check, flag_values, empty_passes=allow_empty)


def writable_file(*names: str, flag_values=FLAGS) -> None:
  """Each output-file flag in `names` (empty/None passes) must be creatable."""
  def check(v, name):
    if os.path.isdir(os.path.expanduser(v)):
      _fail(name, v, "a file path (it is a directory)")
    why = check_writable_dir(os.path.dirname(os.path.abspath(os.path.expanduser(v))))
    if why:
      _fail(name, v, f"a path in a writable directory ({why})")
  _register(names, check, flag_values, empty_passes=True)


def existing_file(*names: str, flag_values=FLAGS) -> None:
  """Each input-file flag in `names` (empty/None passes) must name a readable file."""
  def check(v, name):
    p = os.path.expanduser(v)
    if not os.path.isfile(p):
      _fail(name, v, "an existing file")
    if not os.access(p, os.R_OK):
      _fail(name, v, "a readable file")
  _register(names, check, flag_values, empty_passes=True)
