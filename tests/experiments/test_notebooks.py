"""Every notebook runs top to bottom on CPU (tiny settings), its .ipynb is in sync, and the
Colab header (badge, install cell, accelerator cell) does the right thing per runtime."""

import glob
import importlib.util
import os
import re
import runpy
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata

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
  cells = make_ipynb.notebook(open(path).read(), name)["cells"]
  assert cells[0]["cell_type"] == "markdown" and "pip" in "".join(cells[1]["source"])


def _repository():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]["urls"]["Repository"]


@pytest.mark.parametrize("name", NAMES)
def test_colab_header_uses_the_one_repository_url(name):
  repo = _repository()
  assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo)
  with open(os.path.join(NB, name + ".ipynb")) as f:
    text = f.read()
  owner_repo = repo.split("github.com/")[1]
  badge = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
           f"(https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/"
           f"{name}.ipynb)")
  cells = make_ipynb.notebook(open(os.path.join(NB, name + ".py")).read(), name)["cells"]
  title = cells[0]["source"]
  assert title[0].startswith("# ") and title[2] == badge + "\n"
  assert f'REPOSITORY = "{repo}"' in "".join(cells[1]["source"])
  assert "jax[" in "".join(cells[2]["source"]) and badge.replace("\n", "") in text
  # the sources name no repository and install nothing themselves
  src = open(os.path.join(NB, name + ".py")).read()
  assert "github.com" not in src and "pip install" not in src


def _setup_cells(name="quickstart"):
  cells = make_ipynb.notebook(open(os.path.join(NB, name + ".py")).read(), name)["cells"]
  return ["".join(c["source"]) for c in cells[1:3]]


def _fake_pci(tmp_path, devices):
  for i, (vendor, device) in enumerate(devices):
    d = tmp_path / "pci" / f"0000:00:{i:02x}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
  return str(tmp_path / "pci")


@pytest.mark.parametrize("case", [
    # (kvjax importable, nvidia-smi works, PCI devices, installed plugins) -> runtime, pip
    dict(importable=True, nvidia=False, pci=[], plugins=(), runtime="cpu", pip=[]),
    dict(importable=False, nvidia=False, pci=[("0x1ae0", "0x0042")], plugins=(),   # gVNIC
         runtime="cpu", pip=["kvjax"]),
    dict(importable=False, nvidia=True, pci=[], plugins=(), runtime="gpu",
         pip=["kvjax", "jax[cuda12]"]),
    dict(importable=True, nvidia=True, pci=[], plugins=("jax-cuda12-plugin",),
         runtime="gpu", pip=[]),
    dict(importable=True, nvidia=False, pci=[("0x1ae0", "0x0063")] * 4, plugins=(),
         runtime="tpu", pip=["jax[tpu]"]),
    dict(importable=True, nvidia=False, pci=[("0x1ae0", "0x006f")], plugins=("libtpu",),
         runtime="tpu", pip=[]),
])
def test_setup_cells_install_what_the_runtime_needs(case, tmp_path, monkeypatch):
  repo, jax_version = _repository(), metadata.version("jax")
  pci = _fake_pci(tmp_path, case["pci"])
  pip_calls = []

  def fake_run(cmd, *args, **kwargs):
    if cmd[0] == "nvidia-smi":
      return subprocess.CompletedProcess(cmd, 0 if case["nvidia"] else 9, b"", b"")
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"], cmd
    pip_calls.append(cmd[-1])
    return subprocess.CompletedProcess(cmd, 0)

  real_glob, real_find, real_version = glob.glob, importlib.util.find_spec, metadata.version

  def fake_version(dist):
    if dist in ("jax-cuda12-plugin", "libtpu"):
      if dist not in case["plugins"]:
        raise metadata.PackageNotFoundError(dist)
      return real_version("jax")
    return real_version(dist)

  monkeypatch.setattr(subprocess, "run", fake_run)
  monkeypatch.setattr(shutil, "which",
                      lambda n: "/usr/bin/nvidia-smi" if case["nvidia"] else None)
  monkeypatch.setattr(glob, "glob",
                      lambda pat: real_glob(pat.replace("/sys/bus/pci/devices", pci)))
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda n, *a: (real_find(n, *a) if case["importable"] or n != "kvjax"
                                     else None))
  monkeypatch.setattr(metadata, "version", fake_version)
  ns = {"__name__": "__main__"}
  for src in _setup_cells():
    exec(compile(src, "<setup cell>", "exec"), ns)  # pylint: disable=exec-used
  assert ns["RUNTIME"] == case["runtime"]
  want = {"kvjax": f"kvjax @ git+{repo}", "jax[cuda12]": f"jax[cuda12]=={jax_version}",
          "jax[tpu]": f"jax[tpu]=={jax_version}"}
  assert pip_calls == [want[k] for k in case["pip"]]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
  monkeypatch.setenv("KVJAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.chdir(tmp_path)
  ns = runpy.run_path(os.path.join(NB, name + ".py"), run_name="__main__")
  if name == "quickstart":
    assert os.path.exists(tmp_path / "quickstart_out" / "frontier.png")
    assert {r["technique"] for r in ns["rows"]} >= {"full", "snapkv@0.5", "int4"}
    # the full cache is the reference (decode room counted on both sides): exactly 1x
    assert ns["factors"]["full cache"] == pytest.approx(1.0, abs=1e-12)
    assert ns["factors"]["SnapKVPress"] > 1.5 and ns["factors"]["StreamingLLMPress"] > 1.5
  elif name == "custom_press":
    assert any(r["technique"] == "value_norm@0.75" for r in ns["rows"])
  else:
    assert set(ns["trained"]) == {"llama", "sliding"}
