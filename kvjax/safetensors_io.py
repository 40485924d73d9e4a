"""A bounded safetensors reader/writer (no torch needed).

Format: an 8-byte little-endian header length n, a JSON header of n bytes
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}),
then the raw little-endian bytes of every tensor. Files written here are readable by the
`safetensors` package and vice versa; bfloat16 and float8 go through `ml_dtypes` (which the
`safetensors` package's numpy backend cannot return, hence this reader), and reads are
memory-mapped. Used by `models.hf` (checkpoints) and `kvjax.persist` (saved caches).

A file is data, and every read is bounded by its real size. The header is checked the way
the `safetensors` package checks it (its Rust `Metadata::validate`) before any tensor is
touched:
  * the header length is at most `MAX_HEADER_BYTES` (100 MB) and at most the file size - 8;
  * the header is a JSON object; `__metadata__`, if present, maps strings to strings;
  * every tensor has a known dtype, a shape of non-negative ints and
    `data_offsets = [begin, end]` with prod(shape) * itemsize == end - begin;
  * sorted by begin, the tensors tile the data section exactly: the first begins at 0,
    each begins where the previous ended (no overlaps, no gaps) and the last ends at the
    end of the file.
Any violation is a ValueError naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Optional

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
# The `safetensors` package's limit (its MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
_MAX_RANK = 64


def _fail(path: str, msg: str):
  raise ValueError(f"{path}: {msg}")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(path: str, name: str, info) -> tuple[int, int]:
  """Validates one tensor entry of the header; returns its (begin, end)."""
  where = f"tensor {name!r}"
  if not isinstance(info, dict):
    _fail(path, f"{where}: header entry must be an object, got {type(info).__name__}")
  unknown = sorted(set(info) - {"dtype", "shape", "data_offsets"})
  if unknown:
    _fail(path, f"{where}: unknown header fields {unknown} (allowed: dtype, shape, "
          "data_offsets)")
  dt, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
  if dt not in DTYPES:
    _fail(path, f"{where}: dtype={dt!r} is not supported (allowed: {sorted(DTYPES)})")
  if (not isinstance(shape, list) or len(shape) > _MAX_RANK
      or not all(_is_int(s) and s >= 0 for s in shape)):
    _fail(path, f"{where}: shape={shape!r} must be a list of at most {_MAX_RANK} "
          "non-negative ints")
  if (not isinstance(offsets, list) or len(offsets) != 2
      or not all(_is_int(o) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
    _fail(path, f"{where}: data_offsets={offsets!r} must be [begin, end] with "
          "0 <= begin <= end")
  nbytes = math.prod(shape) * np.dtype(DTYPES[dt]).itemsize
  if offsets[1] - offsets[0] != nbytes:
    _fail(path, f"{where}: dtype {dt} x shape {shape} is {nbytes} bytes but data_offsets "
          f"{offsets} span {offsets[1] - offsets[0]}")
  return offsets[0], offsets[1]


def read_header(path: str) -> tuple[dict, int]:
  """Reads and validates a safetensors header (see the module docstring).

  Args:
    path: the .safetensors file.

  Returns:
    (header dict, byte offset of the data section).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a well-formed safetensors file; names the file and tensor.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such safetensors file")
  size = os.path.getsize(path)
  if size < 8:
    _fail(path, f"not a safetensors file (only {size} bytes; the header length alone "
          "takes 8)")
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > min(MAX_HEADER_BYTES, size - 8):
      _fail(path, f"header length {n} is impossible: it must be at most "
            f"min({MAX_HEADER_BYTES}, file size - 8 = {size - 8}) bytes (truncated or "
            "not a safetensors file)")
    raw = f.read(n)
  if len(raw) != n:
    _fail(path, f"file shrank while reading its {n}-byte header")
  try:
    header = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    _fail(path, f"corrupt safetensors header: not UTF-8 JSON ({type(e).__name__}: "
          f"{str(e)[:200]})")
  if not isinstance(header, dict):
    _fail(path, f"corrupt safetensors header: a JSON object is required, got "
          f"{type(header).__name__}")
  meta = header.get("__metadata__")
  if meta is not None and not (isinstance(meta, dict) and
                               all(isinstance(v, str) for v in meta.values())):
    _fail(path, "__metadata__ must map strings to strings")
  spans = sorted((_check_entry(path, name, info), name)
                 for name, info in header.items() if name != "__metadata__")
  end = 0
  for (a, b), name in spans:
    if a != end:
      what = "overlaps the previous tensor" if a < end else f"leaves a gap after byte {end}"
      _fail(path, f"tensor {name!r}: data_offsets [{a}, {b}] {what} (tensors must tile "
            "the data section)")
    end = b
  data_bytes = size - 8 - n
  if end != data_bytes:
    _fail(path, f"tensors end at data byte {end} but the data section holds {data_bytes} "
          f"bytes ({'truncated file' if end > data_bytes else 'trailing bytes'})")
  return header, 8 + n


def read_metadata(path: str) -> dict:
  """The `__metadata__` {str: str} of a safetensors file (without reading tensors)."""
  return dict(read_header(path)[0].get("__metadata__") or {})


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a .safetensors file (read-only memory-mapped numpy arrays).

  The header is validated first (`read_header`), so every tensor lies inside the file.
  """
  header, start = read_header(path)
  size = os.path.getsize(path)
  data = (np.memmap(path, dtype=np.uint8, mode="r", offset=start) if size > start
          else np.zeros((0,), np.uint8))
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    a, b = info["data_offsets"]
    out[name] = np.frombuffer(data[a:b], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: Optional[dict] = None):
  """Writes tensors to a .safetensors file (readable by the `safetensors` package)."""
  header, offset, blobs = {}, 0, []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    if arr.dtype not in NAMES:
      raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors "
                       f"(supported: {sorted(str(np.dtype(d)) for d in DTYPES.values())})")
    raw = arr.tobytes()
    header[name] = {"dtype": NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    offset += len(raw)
    blobs.append(raw)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  hb = json.dumps(header, separators=(",", ":")).encode()
  hb += b" " * (-len(hb) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(hb)))
    f.write(hb)
    for raw in blobs:
      f.write(raw)
