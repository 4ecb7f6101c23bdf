"""A run directory: who owns it, which run its records belong to, outputs replaced whole.

- `WorkdirLock`: one training per workdir at a time. An OS lock (``flock``)
  on ``WORKDIR/.lock``, so a crashed or killed run never leaves it stuck: the
  kernel releases it with the process. The file itself stays; it only names
  the last holder.
- `check_recipe`: a workdir's records (``config.json``, metrics, TensorBoard,
  checkpoints) are continued only by the run that wrote them. A key that
  changes the training trajectory is refused, naming it, unless
  ``train.allow_changes`` lists it; an accepted change is appended to
  ``WORKDIR/config_changes.jsonl``.
- `replace_folder` / `replace_file`: an output is written beside its place and
  swapped in when complete, so a folder holds the outputs of one invocation
  and a kill mid-write leaves the previous one.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import ml_collections

from apnet_jax import config_check
from apnet_jax.data import sources

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"


class WorkdirBusyError(RuntimeError):
  """Another process holds the workdir; the message names the workdir and the holder."""

  def __init__(self, workdir: str, holder: str):
    super().__init__(
      f"{workdir} is in use by another process ({holder}); one run writes a "
      "workdir at a time. Wait for it to finish, stop it, or use another "
      "--workdir."
    )
    self.workdir, self.holder = workdir, holder


def ensure_workdir(workdir: str) -> str:
  """``workdir`` made absolute and created; refuses a path that is not a folder, by name."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(
      f"--workdir {workdir} is a file, not a folder; give the run a "
      "folder (new or existing) instead."
    )
  try:
    os.makedirs(workdir, exist_ok=True)
  except FileExistsError as e:  # a file further up the path
    raise NotADirectoryError(
      f"--workdir {workdir}: {e.filename} is a file, not a folder; give the run a path of folders."
    ) from e
  return workdir


class WorkdirLock:
  """The exclusive lock of one workdir, held by this process until `release`."""

  def __init__(self, workdir: str, fd: int):
    self.workdir = workdir
    self._fd = fd

  @classmethod
  def acquire(cls, workdir: str, purpose: str) -> WorkdirLock:
    """Takes the lock of ``workdir`` for ``purpose`` (e.g. 'training'), without waiting.

    Raises:
      WorkdirBusyError: another process holds it; names the workdir and the
        holder's pid, host and purpose.
    """
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd)
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirBusyError(workdir, holder) from None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return cls(workdir, fd)

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor releases the flock
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    record = json.loads(os.pread(fd, 4096, 0).decode())
    return f"{record['purpose']}, pid {record['pid']} on {record['host']}"
  except (OSError, ValueError, KeyError, TypeError):  # written by an older or foreign process
    return "holder unknown"


# Config keys that decide the training trajectory: a change between a run and
# its continuation makes the result a splice of two recipes. Sections mapped to
# None count with all their keys. Not here: where the run stops (train.epochs,
# max_steps), how often it logs, saves or evaluates, paths, worker counts and
# evaluation settings, none of which changes a step's update.
RECIPE_KEYS: dict[str, tuple[str, ...] | None] = {
  "model": ("depth", "width", "last_stride", "stem_relu", "level", "kind", "input_size", "dtype"),
  "data": ("name", "config", "p", "k"),
  "augment": None,
  "loss": None,
  "optim": None,
  "train": ("seed",),
}


def _recipe(config: dict[str, Any], *, effective: bool = True) -> dict[str, Any]:
  """The `RECIPE_KEYS` of ``config``, flat; ``effective``: unset keys as they take effect."""
  flat = {}
  for section, keys in RECIPE_KEYS.items():
    values = config.get(section) or {}
    for key in keys if keys is not None else sorted(values):
      if key in values:
        dotted = f"{section}.{key}"
        flat[dotted] = config_check.effective_value(config, dotted) if effective else values[key]
  return json.loads(json.dumps(flat))  # tuples -> lists, as config.json holds them


def allowed_changes(config: ml_collections.ConfigDict) -> list[str]:
  """The dotted keys of ``train.allow_changes``; refuses one that is not a config key."""
  keys = [k.strip() for k in str(config.train.allow_changes).split(",") if k.strip()]
  for key in keys:
    section, _, name = key.partition(".")
    if (
      section not in config
      or not isinstance(config[section], ml_collections.ConfigDict)
      or name not in config[section]
    ):
      raise ValueError(
        f"config.train.allow_changes names {key!r}, which is not a config key; "
        "list dotted keys such as optim.base_lr,train.seed."
      )
  return keys


def check_recipe(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
  """Refuses to continue ``workdir``'s records with another recipe; returns accepted changes.

  Compares the `RECIPE_KEYS` of ``config`` with ``workdir/config.json`` (a
  workdir without one has nothing to continue). Keys listed in
  ``train.allow_changes`` are accepted and returned as ``{key: {"from", "to"}}``.
  Values are compared as they take effect: an unset key that follows another
  (`config_check.FOLLOWS`) counts with that key's value, and when it followed
  it in the workdir's run too, its change is accepted or refused with that key.

  Raises:
    ValueError: naming each changed key with both values, and
      ``train.allow_changes`` as the way to accept them; or an unreadable
      ``config.json``, by path.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      saved_config = json.load(f)
    saved = _recipe(saved_config)
  except (OSError, ValueError, AttributeError) as e:
    raise ValueError(
      f"{path} cannot be read ({e}); it should hold the config of the run in "
      f"{workdir}. Move it away to start a new run there, or use another "
      "--workdir."
    ) from e
  current = _recipe(config.to_dict())
  unset = {
    key for key, value in _recipe(config.to_dict(), effective=False).items() if value is None
  }
  changed = {
    key: {"from": saved[key], "to": current.get(key)}
    for key in saved
    if saved[key] != current.get(key)
  }
  # One list of datasets spelled another way (msmt17, msmt17:train) is no change.
  if {"data.name", "data.config"} & changed.keys() and sources.same_training_data(
    saved_config.get("data", {}), config.data
  ):
    changed.pop("data.name", None)
    changed.pop("data.config", None)
  allowed = set(allowed_changes(config))
  following = {
    key
    for key, source in config_check.FOLLOWS.items()
    if key in changed and key in unset and source in changed and saved[key] == saved[source]
  }
  refused = [key for key in changed if key not in allowed | following]
  if refused:
    diffs = "; ".join(
      f"{key}: workdir {changed[key]['from']!r}, config {changed[key]['to']!r}" for key in refused
    )
    raise ValueError(
      f"{workdir} holds the records of a run with another recipe ({CONFIG_FILE}, and the "
      f"metrics and checkpoints it wrote, if any): {diffs}. Nothing was changed. To "
      "continue it with these values, add "
      f"--config.train.allow_changes={','.join(refused)} (the change is recorded in "
      f"{CHANGES_FILE}); otherwise set them back or use another --workdir."
    )
  return changed


def record_changes(workdir: str, changes: dict[str, dict[str, Any]], *, step: int) -> None:
  """Appends the accepted recipe changes, and the step they take effect at, to the log."""
  if not changes:
    return
  record = {
    "step": int(step),
    "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "changes": changes,
  }
  with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
    f.write(json.dumps(record) + "\n")


# --- Outputs replaced whole ---------------------------------------------------------


def _staging_prefix(name: str, kind: str) -> str:
  return f".{name}.{kind}-{socket.gethostname()}-"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _clean_abandoned(parent: str, name: str) -> None:
  """Removes the staging folders of this host's dead writers of ``parent/name``.

  A writer killed between its two renames left the old output aside: it is
  put back when nothing took its place.
  """
  for kind in ("old", "new"):
    prefix = _staging_prefix(name, kind)
    for entry in sorted(os.listdir(parent)):
      pid = entry[len(prefix) :].split("-", 1)[0]
      if not entry.startswith(prefix) or not pid.isdigit() or _pid_alive(int(pid)):
        continue
      abandoned = os.path.join(parent, entry)
      if kind == "old" and not os.path.lexists(os.path.join(parent, name)):
        os.rename(abandoned, os.path.join(parent, name))
      elif os.path.isdir(abandoned) and not os.path.islink(abandoned):
        shutil.rmtree(abandoned, ignore_errors=True)
      else:
        os.remove(abandoned)


@contextlib.contextmanager
def replace_folder(path: str) -> Iterator[str]:
  """Yields an empty folder beside ``path``; it becomes ``path`` when the block succeeds.

  The previous ``path`` is removed only after the new one is in place, so the
  folder always holds one invocation's outputs; a failed or killed writer
  leaves the previous folder as it was.
  """
  path = os.path.abspath(path)
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  if os.path.lexists(path) and not os.path.isdir(path):
    raise NotADirectoryError(
      f"{path} is a file; the outputs go to a folder of that name. Move the file away."
    )
  _clean_abandoned(parent, name)
  staging = tempfile.mkdtemp(prefix=_staging_prefix(name, "new") + f"{os.getpid()}-", dir=parent)
  try:
    yield staging
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  _swap_in(staging, path)


@contextlib.contextmanager
def replace_file(path: str) -> Iterator[str]:
  """Yields a path beside ``path`` to write; it becomes ``path`` when the block succeeds."""
  path = os.path.abspath(path)
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  _clean_abandoned(parent, name)
  fd, staging = tempfile.mkstemp(
    prefix=_staging_prefix(name, "new") + f"{os.getpid()}-",
    suffix=os.path.splitext(name)[1],
    dir=parent,
  )
  os.close(fd)
  try:
    yield staging
  except BaseException:
    if os.path.lexists(staging):
      os.remove(staging)
    raise
  os.replace(staging, path)


def _swap_in(staging: str, path: str) -> None:
  parent, name = os.path.split(path)
  old = None
  if os.path.lexists(path):
    old = tempfile.mkdtemp(prefix=_staging_prefix(name, "old") + f"{os.getpid()}-", dir=parent)
    os.rmdir(old)  # the name only: rename() puts the previous folder there
    os.rename(path, old)
  os.rename(staging, path)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
