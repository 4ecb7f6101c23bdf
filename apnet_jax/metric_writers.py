"""Training logs: ``metrics.jsonl`` and TensorBoard event files, no TensorFlow.

TensorBoard reads TFRecord files of ``Event`` protocol buffers. Scalars need
only three message fields, so they are encoded here by hand: a TFRecord is
``len (u64) | masked crc32c(len) | data | masked crc32c(data)``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from typing import Mapping

from absl import logging

_CRC32C_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC32C_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(*, wall_time: float, step: int | None = None,
                 scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  """An ``Event`` message: wall_time=1, step=2, file_version=3, summary=5."""
  out = _field(1, 1, struct.pack("<d", wall_time))
  if step is not None:
    out += _field(2, 0, _varint(step))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    summary = b""
    for tag, value in scalars.items():  # Summary.Value: tag=1, simple_value=2
      summary += _length_delimited(
          1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
    out += _length_delimited(5, summary)
  return out


def tfrecord(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", _masked_crc(header)) + data
          + struct.pack("<I", _masked_crc(data)))


def read_records(data: bytes) -> tuple[list[bytes], bytes]:
  """The payloads of a TFRecord file's complete records, and an unfinished tail (a killed write)."""
  records, pos = [], 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    if pos + 16 + length > len(data):
      break
    records.append(data[pos + 12:pos + 12 + length])
    pos += 16 + length
  return records, data[pos:]


def event_step(event: bytes) -> int | None:
  """The ``step`` field (2) of an encoded ``Event``; None when it has none."""
  pos = 0
  while pos < len(event):
    key, pos = _read_varint(event, pos)
    number, wire_type = key >> 3, key & 7
    if wire_type == 0:
      value, pos = _read_varint(event, pos)
      if number == 2:
        return value
    elif wire_type == 1:
      pos += 8
    elif wire_type == 5:
      pos += 4
    elif wire_type == 2:
      length, pos = _read_varint(event, pos)
      pos += length
    else:
      raise ValueError(f"not an Event message: wire type {wire_type} of field {number}")
  return None


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[pos]
    value |= (byte & 0x7F) << shift
    pos += 1
    shift += 7
    if not byte & 0x80:
      return value, pos


def set_aside_after(workdir: str, step: int) -> str | None:
  """Moves the log records past ``step`` to ``workdir/discarded_after_step_<step>/``.

  A run resumed from the checkpoint at ``step`` trains the later steps again; their
  records from the killed run would make each step appear twice, in
  ``metrics.jsonl`` and in TensorBoard. They are moved, not deleted: the folder
  holds them as a ``metrics.jsonl`` and TensorBoard event files of their own.
  Each file is replaced only once its remainder is written. Returns the folder,
  or None when nothing lay past ``step``.
  """
  aside = os.path.join(workdir, f"discarded_after_step_{step}")
  moved = False
  jsonl = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(jsonl):
    with open(jsonl) as f:
      lines = [line.rstrip("\n") + "\n" for line in f]
    keep, later = [], []
    for line in lines:
      logged = _jsonl_step(line)
      (keep if logged is not None and logged <= step else later).append(line)
    if later:
      os.makedirs(aside, exist_ok=True)
      with open(os.path.join(aside, "metrics.jsonl"), "a") as f:
        f.writelines(later)
      _replace(jsonl, "".join(keep).encode())
      moved = True
  tb_dir = os.path.join(workdir, "tensorboard")
  names = sorted(os.listdir(tb_dir)) if os.path.isdir(tb_dir) else []
  for name in names:
    path = os.path.join(tb_dir, name)
    if "tfevents" not in name or not os.path.isfile(path):
      continue
    with open(path, "rb") as f:
      records, tail = read_records(f.read())
    later = [r for r in records if (event_step(r) or 0) > step]
    if not later and not tail:
      continue
    os.makedirs(os.path.join(aside, "tensorboard"), exist_ok=True)
    with open(os.path.join(aside, "tensorboard", name), "ab") as f:
      f.write(b"".join(tfrecord(r) for r in [_FILE_VERSION] + later))
    if tail:  # a record cut short by a kill: no reader takes it, but it is kept
      with open(os.path.join(aside, "tensorboard", name + ".unfinished"), "ab") as f:
        f.write(tail)
    _replace(path, b"".join(tfrecord(r) for r in records if (event_step(r) or 0) <= step))
    moved = True
  return aside if moved else None


def _jsonl_step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):  # a line cut short by a kill
    return None


def _replace(path: str, data: bytes) -> None:
  with open(path + ".tmp", "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


_FILE_VERSION = encode_event(wall_time=0.0, file_version="brain.Event:2")


class MetricWriter:
  """Appends metric records to ``metrics.jsonl`` and a TensorBoard event file.

  Only JAX process 0 writes; the others get a writer that does nothing. A
  writer of a run resumed at ``resume_step`` first sets the records past that
  step aside (`set_aside_after`), so that each step is logged once.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    aside = set_aside_after(workdir, resume_step)
    if aside:
      logging.warning("Resuming at step %d: the log records of later steps are moved to %s.",
                      resume_step, aside)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    tb_dir = os.path.join(workdir, "tensorboard")
    os.makedirs(tb_dir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._events = open(os.path.join(tb_dir, name), "ab")
    self._events.write(tfrecord(encode_event(wall_time=time.time(),
                                             file_version="brain.Event:2")))

  def write(self, step: int, metrics: Mapping[str, float], *, kind: str = "train") -> None:
    """One JSON line (``kind``, ``step`` and the metrics) and one TB event."""
    if not self.enabled:
      return
    record = {"kind": kind, "step": int(step)}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    scalars = {f"{kind}/{k}": float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    self._events.write(tfrecord(encode_event(wall_time=time.time(), step=int(step),
                                             scalars=scalars)))
    self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()


def _jsonable(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them visible.
  return value
