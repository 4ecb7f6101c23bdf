"""PyTorch checkpoint files without PyTorch: ``.pth``/``.pt``, ``.safetensors``, ``.npz``.

A ``torch.save`` file is a pickle whose tensors point, through persistent
ids, at raw little-endian storages. Two containers exist:

- the zip format (PyTorch >= 1.6): ``<prefix>/data.pkl`` plus one file per
  storage, ``<prefix>/data/<key>``;
- the legacy format (older files, torchvision's ``resnet50-19c8e357.pth``
  among them): a magic number, a protocol version and system info, the
  pickle, the list of storage keys, then each storage as an int64 element
  count followed by its bytes.

The unpickler here only resolves the handful of globals a state dict needs
(tensor and parameter rebuilders, storage types, ``OrderedDict``) and refuses
anything else by name, so reading a checkpoint never runs foreign code.
``.safetensors`` files are read by the safetensors library.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import ml_dtypes  # bfloat16 for numpy (a JAX dependency); safetensors.numpy reads BF16 by it
import numpy as np
import safetensors
import safetensors.numpy

_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class CheckpointFormatError(ValueError):
  """A checkpoint file that cannot be read; the message names the file."""


class _StorageType:
  """Stands for ``torch.<Name>Storage`` while unpickling."""

  def __init__(self, name: str):
    if name == "BFloat16Storage":
      self.dtype = np.dtype(ml_dtypes.bfloat16)
    elif name in _STORAGE_DTYPES:
      self.dtype = np.dtype(_STORAGE_DTYPES[name])
    else:
      raise pickle.UnpicklingError(f"unsupported storage type torch.{name}")
    self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """``torch._utils._rebuild_tensor_v2``: a strided view into a storage."""
  del unused
  itemsize = storage.itemsize
  if not size:
    return storage[offset].copy()
  view = np.lib.stride_tricks.as_strided(
    storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
  )
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, *unused):
  """``torch._utils._rebuild_parameter``: a Parameter is its data here."""
  del unused
  return data


_GLOBALS = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,  # files before PyTorch 0.4
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  """Resolves state-dict globals only; ``deferred`` for legacy files."""

  def __init__(self, file: BinaryIO, load_storage, deferred: bool = False):
    super().__init__(file)
    self._load_storage = load_storage
    self._deferred = deferred
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module, name):
    if (module, name) in _GLOBALS:
      fn = _GLOBALS[(module, name)]
      if self._deferred and fn is _rebuild_tensor:
        return lambda storage, *args: _Pending(storage.key, args)
      return fn
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    raise pickle.UnpicklingError(
      f"global {module}.{name} is not part of a state dict and is not loaded"
    )

  def persistent_load(self, pid):
    kind, storage_type, key, _location, numel = pid[:5]
    if kind != "storage":
      raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
    if isinstance(storage_type, _StorageType):
      dtype = storage_type.dtype
    else:  # torch.UntypedStorage: bytes
      dtype = np.dtype(np.uint8)
    key = str(key)
    if key not in self._storages:
      self._storages[key] = self._load_storage(key, dtype, numel)
    return self._storages[key]


def _read_zip_pth(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
      raise CheckpointFormatError(f"{path}: a zip file without data.pkl is no torch checkpoint")
    prefix = pkl[0][: -len("data.pkl")]

    def load_storage(key, dtype, numel):
      raw = zf.read(f"{prefix}data/{key}")
      return np.frombuffer(raw, dtype=dtype.newbyteorder("<"), count=numel).astype(dtype)

    with zf.open(pkl[0]) as f:
      return _Unpickler(io.BytesIO(f.read()), load_storage).load()


def _read_legacy_pth(path: str) -> Any:
  with open(path, "rb") as f:
    if pickle.load(f) != _LEGACY_MAGIC:
      raise CheckpointFormatError(f"{path}: neither a zip nor a legacy torch checkpoint")
    pickle.load(f)  # protocol version
    pickle.load(f)  # system info
    wanted: dict[str, tuple[np.dtype, int]] = {}

    # Storages come after the pickle, so the unpickler gets placeholders that
    # are filled in once the bytes have been read.
    def load_storage(key, dtype, numel):
      wanted[key] = (dtype, numel)
      return _Pending(key)

    obj = _Unpickler(f, load_storage, deferred=True).load()
    keys = pickle.load(f)
    storages = {}
    for key in keys:
      (count,) = struct.unpack("<q", f.read(8))
      dtype, _ = wanted[key]
      raw = f.read(count * dtype.itemsize)
      if len(raw) != count * dtype.itemsize:
        raise CheckpointFormatError(f"{path}: truncated (storage {key})")
      storages[key] = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
  return _resolve(obj, storages)


class _Pending:
  """A tensor (or storage) of a legacy file whose bytes are not read yet."""

  def __init__(self, key, rebuild=None):
    self.key, self.rebuild = key, rebuild


def _resolve(obj, storages):
  if isinstance(obj, _Pending):
    storage = storages[obj.key]
    return storage if obj.rebuild is None else _rebuild_tensor(storage, *obj.rebuild)
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v, storages)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v, storages) for v in obj)
  return obj


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, TypeError) as e:  # TypeError: a dtype numpy lacks
    raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from e


def read_checkpoint(path: str | os.PathLike) -> Any:
  """Reads a ``.pth``/``.pt`` (zip or legacy), ``.safetensors`` or ``.npz`` file.

  Returns the stored object with every tensor as a numpy array (a state
  dict, or a dict that nests one).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  try:
    if path.endswith(".safetensors"):
      return _read_safetensors(path)
    if path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    if zipfile.is_zipfile(path):
      return _read_zip_pth(path)
    return _read_legacy_pth(path)
  except CheckpointFormatError:
    raise
  except (
    pickle.UnpicklingError,
    EOFError,
    KeyError,
    ValueError,
    struct.error,
    zipfile.BadZipFile,
  ) as e:
    raise CheckpointFormatError(f"{path}: cannot be read as a checkpoint ({e})") from e


# --- Writing the zip format -------------------------------------------------


class _Global:
  """A reference to a torch global, written without importing torch."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's reduce wants a callable
    raise TypeError("placeholder")


class _TensorRef:
  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array

  def __reduce__(self):
    a = self.array
    stride = tuple(s // a.itemsize for s in a.strides) if a.ndim else ()
    return (
      _Global("torch._utils", "_rebuild_tensor_v2"),
      (_StorageRef(self.key, a), 0, a.shape, stride, False, collections.OrderedDict()),
    )


class _StorageRef:
  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array


_STORAGE_NAMES = {np.dtype(v): k for k, v in _STORAGE_DTYPES.items()}


class _Pickler(pickle._Pickler):  # The pure-Python pickler lets us write globals by name.
  dispatch = dict(pickle._Pickler.dispatch)

  def save_torch_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[_Global] = save_torch_global

  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      name = _STORAGE_NAMES[obj.array.dtype]
      return ("storage", _Global("torch", name), obj.key, "cpu", obj.array.size)
    return None


def write_pth(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes ``state_dict`` as a zip-format ``.pth`` that ``torch.load`` reads.

  Written to a temporary name and renamed, so an existing file is only
  replaced by a complete one.
  """
  path = os.fspath(path)
  prefix = "archive"
  items = collections.OrderedDict()
  arrays = {}
  for i, (name, value) in enumerate(state_dict.items()):
    a = np.ascontiguousarray(np.asarray(value))
    if a.dtype not in _STORAGE_NAMES:
      raise ValueError(f"{name}: dtype {a.dtype} cannot be written to a .pth file")
    arrays[str(i)] = a
    items[name] = _TensorRef(str(i), a)
  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump(items)
  tmp = path + ".tmp"
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{prefix}/data.pkl", buf.getvalue())
    zf.writestr(f"{prefix}/byteorder", "little")
    for key, a in arrays.items():
      zf.writestr(f"{prefix}/data/{key}", a.astype(a.dtype.newbyteorder("<")).tobytes())
    zf.writestr(f"{prefix}/version", "3\n")
  os.replace(tmp, path)
