"""Launcher flags are validated at parse time (experiments/flagcheck.py), before any work."""

import os

import pytest
from absl import flags

from experiments import flagcheck
from tests.experiments.helpers import run_module

def _fv():
  fv = flags.FlagValues()
  flags.DEFINE_integer("batch", 1, "", flag_values=fv)
  flags.DEFINE_integer("room", 0, "", flag_values=fv)
  flags.DEFINE_float("ratio", 0.5, "", flag_values=fv)
  flags.DEFINE_list("lengths", ["8"], "", flag_values=fv)
  flags.DEFINE_list("budgets", ["0.5"], "", flag_values=fv)
  flags.DEFINE_string("out_dir", "", "", flag_values=fv)
  flags.DEFINE_string("out", "", "", flag_values=fv)
  flagcheck.ints("batch", lo=1, flag_values=fv)
  flagcheck.ints("room", lo=0, flag_values=fv)
  flagcheck.floats("ratio", lo=0.0, hi=1.0, hi_open=True, flag_values=fv)
  flagcheck.int_lists("lengths", lo=1, flag_values=fv)
  flagcheck.float_lists("budgets", lo=0.0, hi=1.0, lo_open=True, flag_values=fv)
  flagcheck.writable_dir("out_dir", flag_values=fv)
  flagcheck.writable_file("out", flag_values=fv)
  return fv


@pytest.mark.parametrize("arg,match", [
    ("--batch=0", r"--batch=0; must be an int >= 1"),
    ("--room=-1", r"--room=-1; must be an int >= 0"),
    ("--ratio=1.0", r"--ratio=1.0; must be a finite number in \[0.0, 1.0\)"),
    ("--ratio=nan", r"--ratio=nan"),
    ("--lengths=8,0", r"--lengths='8,0'; must be comma-separated ints >= 1 \(0 is not\)"),
    ("--lengths=8,x", r"'x' is not an int"),
    ("--lengths=", r"non-empty"),
    ("--budgets=0.5,0", r"--budgets='0.5,0'.*\(0.0, 1.0\]"),
    ("--budgets=inf", r"finite"),
])
def test_bad_values_fail_at_parse_time(arg, match):
  fv = _fv()
  with pytest.raises(flags.IllegalFlagValueError, match=match):
    fv(["prog", arg])


def test_good_values_parse():
  fv = _fv()
  fv(["prog", "--batch=3", "--room=0", "--ratio=0.0", "--lengths=1,4096", "--budgets=1,0.25"])
  assert (fv.batch, fv.room, fv.ratio, fv.lengths) == (3, 0, 0.0, ["1", "4096"])


def test_out_dir_probe(tmp_path):
  fv = _fv()
  new = tmp_path / "a" / "b"
  fv(["prog", f"--out_dir={new}", f"--out={tmp_path / 'x.json'}"])
  assert not new.exists() and os.listdir(tmp_path) == []  # the probe leaves nothing behind
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(flags.IllegalFlagValueError, match="is not a directory"):
    _fv()(["prog", f"--out_dir={blocker}/sub"])
  with pytest.raises(flags.IllegalFlagValueError, match="it is a directory"):
    _fv()(["prog", f"--out={tmp_path}"])


def test_unwritable_out_dir():
  # /proc refuses new files even to root, so this holds for every user
  with pytest.raises(flags.IllegalFlagValueError, match="cannot create a file in /proc"):
    _fv()(["prog", "--out_dir=/proc/kvjax_results/run1"])


@pytest.mark.parametrize("module,args,match", [
    ("experiments.generate", ["--max_new_tokens=-1"], "--max_new_tokens=-1; must be an int >= 1"),
    ("experiments.generate", ["--batch=0"], "--batch=0; must be an int >= 1"),
    ("experiments.compare", ["--out_dir=/proc/kvjax_results"], "--out_dir='/proc/kvjax_results'"),
    ("experiments.compare", ["--decode_steps=-1"], "--decode_steps=-1"),
    ("experiments.bench_compression", ["--decode_steps=-1"], "--decode_steps=-1"),
])
def test_launchers_refuse_bad_flags_before_work(module, args, match):
  r = run_module(module, args, timeout=120)
  assert r.returncode != 0
  assert match in r.stderr, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
