"""A small safetensors reader/writer (no torch, no `safetensors` package needed).

Format: an 8-byte little-endian header length n, a JSON header of n bytes
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}),
then the raw little-endian bytes of every tensor. Files written here are readable by the
`safetensors` package and vice versa; bfloat16 and float8 go through `ml_dtypes`, and reads
are memory-mapped. Used by `models.hf` (checkpoints) and `kvjax.persist` (saved caches).
"""

from __future__ import annotations

import json
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


def read_header(path: str) -> tuple[dict, int]:
  """(header dict, byte offset of the data section)."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head)
    try:
      header = json.loads(f.read(n))
    except ValueError as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
  return header, 8 + n


def read_metadata(path: str) -> dict:
  """The `__metadata__` {str: str} of a safetensors file (without reading tensors)."""
  return dict(read_header(path)[0].get("__metadata__") or {})


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads every tensor of a .safetensors file (memory-mapped numpy arrays)."""
  header, start = read_header(path)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=start)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dt = info["dtype"]
    if dt not in DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
    a, b = info["data_offsets"]
    out[name] = np.frombuffer(data[a:b], dtype=DTYPES[dt]).reshape(info["shape"])
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
