"""Every notebook runs top to bottom on CPU (tiny settings), and its .ipynb is in sync."""

import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NB = os.path.join(ROOT, "notebooks")
sys.path.insert(0, NB)
import make_ipynb  # noqa: E402  pylint: disable=wrong-import-position

NAMES = ["quickstart", "train_cache_aware", "custom_press"]


@pytest.mark.parametrize("name", NAMES)
def test_ipynb_is_generated_from_the_py(name):
  path = os.path.join(NB, name + ".py")
  with open(path[:-3] + ".ipynb") as f:
    assert f.read() == make_ipynb.render(path), "run python notebooks/make_ipynb.py"
  cells = make_ipynb.notebook(open(path).read())["cells"]
  assert cells[0]["cell_type"] == "markdown" and "pip" in "".join(cells[1]["source"])


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
  monkeypatch.setenv("KVJAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.chdir(tmp_path)
  ns = runpy.run_path(os.path.join(NB, name + ".py"), run_name="__main__")
  if name == "quickstart":
    assert os.path.exists(tmp_path / "quickstart_out" / "frontier.png")
    assert {r["technique"] for r in ns["rows"]} >= {"full", "snapkv@0.5", "int4"}
  elif name == "custom_press":
    assert any(r["technique"] == "value_norm@0.75" for r in ns["rows"])
  else:
    assert set(ns["trained"]) == {"llama", "sliding"}
