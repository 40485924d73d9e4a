"""Writes each notebooks/*.py (jupytext percent format) as a Colab-ready .ipynb beside it.

    python notebooks/make_ipynb.py            # regenerate every .ipynb
    jupytext --sync notebooks/*.py            # the same, if you have jupytext

The .py files are the sources (reviewed, diffed, and executed by tests/experiments/
test_notebooks.py); the .ipynb files are generated from them, without outputs. The
conversion is the percent format's: "# %%" starts a code cell, "# %% [markdown]" a
markdown cell whose lines lose their leading "# ", and the jupytext header is dropped.
"""

from __future__ import annotations

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def cells(text: str) -> list[dict]:
  lines = text.splitlines()
  if lines and lines[0] == "# ---":            # jupytext YAML header
    end = lines.index("# ---", 1)
    lines = lines[end + 1:]
  out, kind, buf = [], None, []

  def flush():
    while buf and not buf[-1].strip():
      buf.pop()
    while buf and not buf[0].strip():
      buf.pop(0)
    if kind is not None and buf:
      src = [l[2:] if l.startswith("# ") else ("" if l == "#" else l) for l in buf] \
          if kind == "markdown" else list(buf)
      cell = {"cell_type": kind, "metadata": {},
              "source": [l + "\n" for l in src[:-1]] + [src[-1]]}
      if kind == "code":
        cell.update(execution_count=None, outputs=[])
      out.append(cell)
    buf.clear()

  for line in lines:
    if line.startswith("# %%"):
      flush()
      kind = "markdown" if "[markdown]" in line else "code"
    else:
      buf.append(line)
  flush()
  return out


def notebook(text: str) -> dict:
  return {"cells": cells(text), "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                      "name": "python3"},
                       "language_info": {"name": "python"},
                       "accelerator": "GPU", "colab": {"provenance": []}}}


def render(py_path: str) -> str:
  with open(py_path) as f:
    return json.dumps(notebook(f.read()), indent=1) + "\n"


def sources() -> list[str]:
  return sorted(p for p in glob.glob(os.path.join(HERE, "*.py"))
                if os.path.basename(p) != os.path.basename(__file__))


def main() -> int:
  for p in sources():
    with open(p[:-3] + ".ipynb", "w") as f:
      f.write(render(p))
    print("wrote", p[:-3] + ".ipynb")
  return 0


if __name__ == "__main__":
  sys.exit(main())
