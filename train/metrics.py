"""Metric writers (stdout, metrics.jsonl, TensorBoard event files) and MFU accounting.

TensorBoard event files are written by `tensorboardX` when it is installed, and otherwise
by `EventFileWriter` below: a few lines that emit the same bytes for scalar summaries (a
TFRecord stream of `Event` protos, each record framed by its length and masked CRC-32C), so
TensorBoard reads our logs without TensorFlow or tensorboardX installed. `metrics.jsonl`
(one JSON object per logged step) is always written; tests and scripts read that.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
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


# --- CRC-32C (Castagnoli), table driven -----------------------------------------------
def _crc_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf wire format, just what Event/Summary need -------------------------------
def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field_bytes(num: int, payload: bytes) -> bytes:
  return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, scalars: Optional[Mapping] = None,
                 file_version: Optional[str] = None) -> bytes:
  """tensorflow.Event{wall_time=1 (double), step=2, file_version=3, summary=5}."""
  msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
  if file_version is not None:
    msg += _field_bytes(3, file_version.encode())
  if scalars:
    summary = b""
    for tag, val in scalars.items():  # Summary.Value{tag=1, simple_value=2 (float)}
      value = _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", val)
      summary += _field_bytes(1, value)
    msg += _field_bytes(5, summary)
  return msg


def frame_record(data: bytes) -> bytes:
  """TFRecord framing: length, masked CRC of length, data, masked CRC of data."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


def read_records(path: str) -> list[bytes]:
  """Reads a TFRecord file back, checking both CRCs (used by tests)."""
  out = []
  with open(path, "rb") as f:
    while True:
      header = f.read(8)
      if not header:
        return out
      (n,) = struct.unpack("<Q", header)
      (hcrc,) = struct.unpack("<I", f.read(4))
      data = f.read(n)
      (dcrc,) = struct.unpack("<I", f.read(4))
      if hcrc != masked_crc32c(header) or dcrc != masked_crc32c(data):
        raise ValueError(f"{path}: CRC mismatch in record {len(out)}")
      out.append(data)


class EventFileWriter:
  """Scalar summaries to `logdir/events.out.tfevents.<time>.<host>` (TensorBoard format)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self.path = os.path.join(logdir, name)
    self._f = open(self.path, "ab")
    self._f.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
    self._f.flush()

  def add_scalars(self, step: int, scalars: Mapping[str, float]):
    self._f.write(frame_record(encode_event(time.time(), int(step),
                                            scalars={k: float(v) for k, v in scalars.items()})))

  def flush(self):
    self._f.flush()

  def close(self):
    self._f.close()


class _TensorBoardX:

  def __init__(self, logdir):
    import tensorboardX  # pylint: disable=import-outside-toplevel
    self._w = tensorboardX.SummaryWriter(logdir)

  def add_scalars(self, step, scalars):
    for k, v in scalars.items():
      self._w.add_scalar(k, float(v), int(step))

  def flush(self):
    self._w.flush()

  def close(self):
    self._w.close()


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
      try:
        self._tb = _TensorBoardX(logdir)
      except ImportError:
        self._tb = EventFileWriter(logdir)

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


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
