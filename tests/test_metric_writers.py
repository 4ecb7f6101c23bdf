"""metrics.jsonl and TensorBoard event files written without TensorFlow."""

import glob
import json
import os
import struct

from apnet_jax import metric_writers


def test_crc32c_known_vectors():
  # RFC 3720 (iSCSI) test vectors for CRC-32C.
  assert metric_writers.crc32c(b"123456789") == 0xE3069283
  assert metric_writers.crc32c(bytes(32)) == 0x8A9136AA
  assert metric_writers.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43


def _read_records(path):
  records = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert header_crc == metric_writers._masked_crc(data[pos:pos + 8])
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert payload_crc == metric_writers._masked_crc(payload)
    records.append(payload)
    pos += 16 + length
  return records


def _parse(message):
  """A minimal protobuf wire-format reader: field number -> list of values."""
  fields, pos = {}, 0
  while pos < len(message):
    key, pos = _varint(message, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(message, pos)
    elif wire == 1:
      value, pos = struct.unpack("<d", message[pos:pos + 8])[0], pos + 8
    elif wire == 5:
      value, pos = struct.unpack("<f", message[pos:pos + 4])[0], pos + 4
    else:
      length, pos = _varint(message, pos)
      value, pos = message[pos:pos + length], pos + length
    fields.setdefault(number, []).append(value)
  return fields


def _varint(data, pos):
  result = shift = 0
  while True:
    byte = data[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return result, pos


def test_writer_writes_jsonl_and_readable_events(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path))
  writer.write(10, {"loss": 1.5, "acc": 0.25})
  writer.write(20, {"mAP": 80.0, "bad": float("nan")}, kind="eval")
  writer.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[0] == {"kind": "train", "step": 10, "loss": 1.5, "acc": 0.25}
  assert lines[1]["kind"] == "eval" and lines[1]["mAP"] == 80.0 and lines[1]["bad"] == "nan"
  (events,) = glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))
  records = [_parse(r) for r in _read_records(events)]
  assert records[0][3] == [b"brain.Event:2"]
  assert records[1][2] == [10]
  values = [_parse(v) for v in _parse(records[1][5][0])[1]]
  assert {v[1][0]: v[2][0] for v in values} == {b"train/loss": 1.5, b"train/acc": 0.25}


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path / "run"), enabled=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not os.path.exists(tmp_path / "run")


def _event_steps(folder):
  steps = []
  for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
    steps += [_parse(r)[2][0] for r in _read_records(path) if 2 in _parse(r)]
  return steps


def test_a_resumed_writer_moves_the_records_past_its_step_aside(tmp_path):
  writer = metric_writers.MetricWriter(str(tmp_path))
  for step in range(1, 6):
    writer.write(step, {"loss": float(step)})
  writer.write(4, {"mAP": 50.0}, kind="eval")
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"kind": "train", "st')  # a line cut short by a kill

  metric_writers.MetricWriter(str(tmp_path), resume_step=3).close()
  kept = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [(r["kind"], r["step"]) for r in kept] == [("train", 1), ("train", 2), ("train", 3)]
  assert _event_steps(tmp_path / "tensorboard") == [1, 2, 3]
  aside = tmp_path / "discarded_after_step_3"
  lines = (aside / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines[:3]] == [4, 5, 4]
  assert lines[3] == '{"kind": "train", "st'
  assert sorted(_event_steps(aside / "tensorboard")) == [4, 4, 5]

  metric_writers.MetricWriter(str(tmp_path), resume_step=3).close()  # nothing past 3 now
  assert (aside / "metrics.jsonl").read_text().count("\n") == 4
  assert len(glob.glob(str(tmp_path / "discarded_after_step_*"))) == 1
