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


class MetricWriter:
  """Appends metric records to ``metrics.jsonl`` and a TensorBoard event file.

  Only JAX process 0 writes; the others get a writer that does nothing.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
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
