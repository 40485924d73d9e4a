"""train.metrics: metrics.jsonl and TensorBoard event files written through tensorboardX.

The event file is checked against references that share no code with the writer: a
TFRecord parser and a CRC-32C written here from the formats' definitions (the CRC checked
against the algorithm's published check value), and a protobuf decoder built from a
hand-written descriptor of tensorflow's Event / Summary messages.
"""

import os
import struct

import pytest

from train import metrics as metrics_lib


# --- independent references ------------------------------------------------------------------
def _crc32c(data: bytes) -> int:
  """Bitwise CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
  crc = 0xFFFFFFFF
  for b in data:
    crc ^= b
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecords(blob: bytes) -> list[bytes]:
  """uint64 length, masked CRC of the length, data, masked CRC of the data; repeated."""
  out, pos = [], 0
  while pos < len(blob):
    (n,) = struct.unpack_from("<Q", blob, pos)
    (hcrc,) = struct.unpack_from("<I", blob, pos + 8)
    data = blob[pos + 12:pos + 12 + n]
    (dcrc,) = struct.unpack_from("<I", blob, pos + 12 + n)
    assert hcrc == _masked(blob[pos:pos + 8]) and dcrc == _masked(data)
    out.append(data)
    pos += 16 + n
  assert pos == len(blob)
  return out


def _event_class():
  from google.protobuf import descriptor_pb2, descriptor_pool  # pylint: disable=g-import-not-at-top
  from google.protobuf import message_factory  # pylint: disable=g-import-not-at-top
  f = descriptor_pb2.FileDescriptorProto(name="kvjax_test_event.proto", package="tfev")
  fdp = descriptor_pb2.FieldDescriptorProto
  opt = fdp.LABEL_OPTIONAL
  val = f.message_type.add(name="Value")
  val.field.add(name="tag", number=1, type=fdp.TYPE_STRING, label=opt)
  val.field.add(name="simple_value", number=2, type=fdp.TYPE_FLOAT, label=opt)
  summ = f.message_type.add(name="Summary")
  summ.field.add(name="value", number=1, type=fdp.TYPE_MESSAGE, type_name=".tfev.Value",
                 label=fdp.LABEL_REPEATED)
  ev = f.message_type.add(name="Event")
  ev.field.add(name="wall_time", number=1, type=fdp.TYPE_DOUBLE, label=opt)
  ev.field.add(name="step", number=2, type=fdp.TYPE_INT64, label=opt)
  ev.field.add(name="file_version", number=3, type=fdp.TYPE_STRING, label=opt)
  ev.field.add(name="summary", number=5, type=fdp.TYPE_MESSAGE, type_name=".tfev.Summary",
               label=opt)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tfev.Event"))


def _write(tmp_path, rows):
  w = metrics_lib.MetricWriter(str(tmp_path), tensorboard=True)
  for step, scalars in rows:
    w.write(step, scalars, log=False)
  w.close()
  (name,) = os.listdir(tmp_path / "tensorboard")
  return str(tmp_path / "tensorboard" / name)


ROWS = [(7, {"loss": 1.5, "lr": 0.25}), (8, {"loss": 1.25, "lr": 0.125}),
        (20, {"eval/loss": 3.0})]


def test_crc_reference_matches_the_published_check_value():
  assert _crc32c(b"123456789") == 0xE3069283


def test_event_file_round_trips_through_independent_readers(tmp_path):
  path = _write(tmp_path, ROWS)
  assert os.path.basename(path).startswith("events.out.tfevents.")
  with open(path, "rb") as f:
    recs = _tfrecords(f.read())
  event = _event_class()
  events = [event.FromString(r) for r in recs]
  assert events[0].file_version == "brain.Event:2"
  got = {}
  for ev in events[1:]:
    assert ev.wall_time > 1e9
    for v in ev.summary.value:
      got[(ev.step, v.tag)] = v.simple_value
  want = {(s, k): v for s, d in ROWS for k, v in d.items()}
  assert got == want                      # the values are exact in float32
  # train.metrics' own reader agrees with the references
  assert metrics_lib.read_records(path) == recs
  merged = {}
  for step, vals in metrics_lib.read_scalars(path):
    for k, v in vals.items():
      merged[(step, k)] = v
  assert merged == want


def test_jsonl_is_kept(tmp_path):
  _write(tmp_path, ROWS)
  assert metrics_lib.read_jsonl(str(tmp_path / "metrics.jsonl")) == [
      {"step": s, **d} for s, d in ROWS]


def test_tensorboard_off_writes_only_jsonl(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False)
  w.write(1, {"loss": 2.0}, log=False)
  w.close()
  assert os.listdir(tmp_path) == ["metrics.jsonl"]


def test_reader_rejects_corrupt_and_truncated_files(tmp_path):
  path = _write(tmp_path, ROWS[:1])
  with open(path, "rb") as f:
    good = f.read()
  bad = tmp_path / "flipped"
  bad.write_bytes(good[:-6] + bytes([good[-6] ^ 0x01]) + good[-5:])   # last record's data
  with pytest.raises(ValueError, match="data CRC mismatch"):
    metrics_lib.read_records(str(bad))
  cut = tmp_path / "cut"
  cut.write_bytes(good[:-3])
  with pytest.raises(ValueError, match="only .* remain|truncated"):
    metrics_lib.read_records(str(cut))
  # A header whose length field claims far more than the file holds is refused before
  # anything that size is read (the header CRC is valid, so only the bound stops it).
  header = struct.pack("<Q", 1 << 40)
  huge = tmp_path / "huge"
  huge.write_bytes(header + struct.pack("<I", _masked(header)) + b"\0" * 8)
  with pytest.raises(ValueError, match="states 1099511627776 bytes"):
    metrics_lib.read_records(str(huge))
