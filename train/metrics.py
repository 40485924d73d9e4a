"""Metric writers (stdout, metrics.jsonl, TensorBoard event files) and MFU accounting.

`metrics.jsonl` (one JSON object per logged step) is always written; tests and scripts
read that. TensorBoard event files (`<workdir>/tensorboard/`, `config.tensorboard=True`)
are written by tensorboardX's `SummaryWriter`, a maintained writer that needs neither
TensorFlow nor PyTorch. `read_records` / `read_scalars` read an event file back (a TFRecord
stream of `Event` protos, each record's length and data checked by masked CRC-32C, every
read bounded by the file's size) with tensorboardX's own CRC and `Event` message.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping, Optional

import jax
from absl import logging

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12, "NVIDIA B200": 2250e12,
}


def peak_flops_per_device(override: float = 0.0) -> Optional[float]:
  """Peak FLOP/s of one local device (None when unknown, e.g. on CPU)."""
  if override and override > 0:
    return float(override)
  kind = jax.devices()[0].device_kind
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name):
      return flops
  return None


def _tensorboardx():
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("TensorBoard logging (config.tensorboard=True) needs tensorboardX: "
                      "pip install tensorboardX (it is in requirements.txt and "
                      "pyproject.toml); or set config.tensorboard=False") from e
  return tensorboardX


class TensorBoardWriter:
  """Scalar summaries to `logdir/events.out.tfevents.*` through tensorboardX's writer."""

  def __init__(self, logdir: str):
    self._w = _tensorboardx().SummaryWriter(logdir)

  def add_scalars(self, step: int, scalars: Mapping[str, float]):
    for k, v in scalars.items():
      self._w.add_scalar(k, float(v), int(step))

  def flush(self):
    self._w.flush()

  def close(self):
    self._w.close()


def read_records(path: str) -> list[bytes]:
  """The records of a TFRecord stream (a TensorBoard event file), both CRCs checked.

  Reads are bounded by the file's size: a record whose stated length runs past the end
  of the file raises ValueError instead of being read.
  """
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=import-outside-toplevel
  size = os.path.getsize(path)
  out = []
  with open(path, "rb") as f:
    pos = 0
    while pos < size:
      if size - pos < 12:
        raise ValueError(f"{path}: truncated record header at byte {pos}")
      header = f.read(8)
      (n,) = struct.unpack("<Q", header)
      (hcrc,) = struct.unpack("<I", f.read(4))
      if hcrc != masked_crc32c(header):
        raise ValueError(f"{path}: header CRC mismatch in record {len(out)}")
      if n + 4 > size - pos - 12:
        raise ValueError(f"{path}: record {len(out)} states {n} bytes; only "
                         f"{size - pos - 16} remain")
      data = f.read(n)
      (dcrc,) = struct.unpack("<I", f.read(4))
      if dcrc != masked_crc32c(data):
        raise ValueError(f"{path}: data CRC mismatch in record {len(out)}")
      out.append(data)
      pos += 16 + n
  return out


def read_scalars(path: str) -> list[tuple[int, dict]]:
  """(step, {tag: value}) for every event of an event file that carries scalars."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = []
  for rec in read_records(path):
    ev = event_pb2.Event.FromString(rec)
    vals = {v.tag: v.simple_value for v in ev.summary.value if v.WhichOneof("value") ==
            "simple_value"}
    if vals:
      out.append((int(ev.step), vals))
  return out


class MetricWriter:
  """Writes each logged step to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      logdir = os.path.join(workdir, "tensorboard")
      self._tb = TensorBoardWriter(logdir)

  def write(self, step: int, scalars: Mapping[str, float], log: bool = True):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.add_scalars(step, scalars)
      self._tb.flush()
    if log:
      logging.info("step %d: %s", step, format_scalars(scalars))

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def format_scalars(scalars: Mapping[str, float]) -> str:
  return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(scalars.items()))


def _fmt(v: float) -> str:
  return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def read_jsonl(path: str, *, drop_torn_tail: bool = False):
  """The rows of a metrics.jsonl file.

  With drop_torn_tail, returns (rows, torn): a last line that is not complete JSON (a run
  killed while writing it) is left out and returned as `torn` ("" when none). Any other
  unreadable line raises ValueError naming the file and line.
  """
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  while lines and not lines[-1].strip():
    lines.pop()
  rows, torn = [], ""
  for i, raw in enumerate(lines, 1):
    if not raw.strip():
      continue
    try:
      row = json.loads(raw.decode("utf-8"))
      if not isinstance(row, dict):
        raise ValueError(f"a JSON {type(row).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as e:
      if drop_torn_tail and i == len(lines):
        torn = raw.decode("utf-8", "replace")
        break
      raise ValueError(f"{path}:{i}: not a JSON object ({e})") from e
    rows.append(row)
  return (rows, torn) if drop_torn_tail else rows
