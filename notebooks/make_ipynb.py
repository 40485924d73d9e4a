"""Writes each notebooks/*.py (jupytext percent format) as a Colab-ready .ipynb beside it.

    python notebooks/make_ipynb.py            # regenerate every .ipynb

The .py files are the sources (reviewed, diffed, and executed by
tests/experiments/test_notebooks.py); the .ipynb files are generated from them, without
outputs. The conversion is the percent format's: "# %%" starts a code cell, "# %% [markdown]"
a markdown cell whose lines lose their leading "# ", and the jupytext header is dropped.

Every notebook also gets the same Colab header, written here once:

  * an "Open in Colab" badge under its title, pointing at the notebook in the repository;
  * a setup cell that installs kvjax from the repository (`pip install "kvjax @ git+URL"`)
    unless kvjax is importable already (a local checkout, CI);
  * an accelerator cell that, on a GPU or TPU runtime, adds jax's CUDA or TPU build for the
    jax version installed (`jax[cuda12]` / `jax[tpu]`), unless it is there already.

The repository URL is read from pyproject.toml's `[project.urls] Repository`, the one
place it is written.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
PYPROJECT = os.path.join(os.path.dirname(HERE), "pyproject.toml")
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"

INSTALL_CELL = """\
# Colab or a fresh runtime: install kvjax from its repository. Skipped where kvjax is
# importable already (a local checkout, CI).
import importlib.util
import subprocess
import sys

REPOSITORY = "@REPOSITORY@"
if importlib.util.find_spec("kvjax") is None:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"kvjax @ git+{REPOSITORY}"],
                 check=True)"""

ACCELERATOR_CELL = """\
# On a GPU or TPU runtime, add jax's CUDA / TPU build for the installed jax version (Colab's
# GPU runtime usually has it already); on a CPU runtime nothing is installed.
import glob
import os
import shutil
import subprocess
import sys
from importlib import metadata


# TPU chips are PCI devices of Google's vendor id with these device ids (v3 ... TPU7x)
TPU_PCI_IDS = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read(64).strip()
  except OSError:
    return ""


def accelerator() -> str:
  \"\"\"'gpu' on an NVIDIA runtime, 'tpu' on a Cloud TPU runtime, else 'cpu'.\"\"\"
  if shutil.which("nvidia-smi") and subprocess.run(
      ["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0:
    return "gpu"
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    device = os.path.join(os.path.dirname(vendor), "device")
    if _read(vendor) == "0x1ae0" and _read(device) in TPU_PCI_IDS:
      return "tpu"
  return "cpu"


def installed(dist: str) -> bool:
  try:
    metadata.version(dist)
    return True
  except metadata.PackageNotFoundError:
    return False


RUNTIME = accelerator()
JAX_BUILD = {"gpu": ("cuda12", "jax-cuda12-plugin"), "tpu": ("tpu", "libtpu")}.get(RUNTIME)
if JAX_BUILD and not installed(JAX_BUILD[1]):
  subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                  f"jax[{JAX_BUILD[0]}]=={metadata.version('jax')}"], check=True)
print("runtime:", RUNTIME)"""


def repository_url(pyproject: str = PYPROJECT) -> str:
  """`[project.urls] Repository` of pyproject.toml (a https://github.com/OWNER/NAME URL)."""
  with open(pyproject, "rb") as f:
    urls = tomllib.load(f).get("project", {}).get("urls", {})
  url = str(urls.get("Repository", "")).rstrip("/")
  if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
    raise ValueError(f"{pyproject}: [project.urls] Repository={url!r}; expected "
                     "https://github.com/OWNER/NAME")
  return url


def colab_url(name: str, repository: str) -> str:
  """The Colab address that opens notebooks/<name>.ipynb of the repository's main branch."""
  owner_repo = repository.split("github.com/", 1)[1]
  return f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{name}.ipynb"


def _code(source: str) -> dict:
  lines = source.split("\n")
  return {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
          "source": [l + "\n" for l in lines[:-1]] + [lines[-1]]}


def colab_header(cells_: list, name: str, repository: str) -> list:
  """The cells with the badge under the first markdown cell's title and the two setup
  cells after it."""
  first = dict(cells_[0])
  if first["cell_type"] != "markdown":
    raise ValueError(f"{name}: the first cell must be markdown (the title)")
  badge = f"[![Open In Colab]({BADGE})]({colab_url(name, repository)})"
  lines = "".join(first["source"]).split("\n")
  lines = lines[:1] + ["", badge] + lines[1:]
  first["source"] = [l + "\n" for l in lines[:-1]] + [lines[-1]]
  setup = [_code(INSTALL_CELL.replace("@REPOSITORY@", repository)), _code(ACCELERATOR_CELL)]
  return [first] + setup + cells_[1:]


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


def notebook(text: str, name: str = "notebook", repository: str = "") -> dict:
  """The .ipynb dict of a percent-format source, with the Colab header."""
  repository = repository or repository_url()
  return {"cells": colab_header(cells(text), name, repository), "nbformat": 4,
          "nbformat_minor": 5,
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                      "name": "python3"},
                       "language_info": {"name": "python"},
                       "accelerator": "GPU", "colab": {"provenance": []}}}


def render(py_path: str) -> str:
  name = os.path.splitext(os.path.basename(py_path))[0]
  with open(py_path) as f:
    return json.dumps(notebook(f.read(), name), indent=1) + "\n"


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
