"""The names of the datasets a run trains or evaluates on: ``name[:config]`` entries.

``data.name`` joins the datasets of joint training with ``+``
(``market1501+dukemtmc_reid+msmt17:train``); ``eval.datasets`` lists the test
sets of a cross-domain table with ``,``. Each entry is a builder name of
`apnet_jax.data.sources.BUILDERS`, optionally with a builder config after a
colon. `parse_entries` reads such a list; `data_entries` reads the datasets of
a ``data`` config section.

This module imports nothing of TFDS or of the project, so that
`apnet_jax.config_check` can check these keys before anything is opened: the
known builder names are passed in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
  """One dataset of a run.

  Attributes:
    name: the builder name (a key of `apnet_jax.data.sources.BUILDERS`).
    config: the builder config; '' for the builder's default.
  """

  name: str
  config: str = ""

  def __str__(self) -> str:
    """The entry as written: ``name`` or ``name:config``."""
    return f"{self.name}:{self.config}" if self.config else self.name


def parse_entries(
  text: str, *, separator: str, known: Collection[str] | None = None, key: str = ""
) -> tuple[DatasetEntry, ...]:
  """Reads ``name[:config]`` entries joined by ``separator``.

  Spaces around an entry are ignored (``"market1501, msmt17"``).

  Args:
    text: the entries, e.g. ``"market1501+msmt17:train"``.
    separator: what joins them: '+' for data.name, ',' for eval.datasets.
    known: the builder names an entry may take; None checks the syntax only.
    key: the config key the text comes from, named in errors (e.g. 'data.name').

  Returns:
    The entries in the order written (at least one).

  Raises:
    ValueError: an empty entry, a name or config left empty around the colon,
      an unknown builder name (the known ones are listed), or an entry given
      twice; the message quotes the offending entry.
    TypeError: ``text`` is not a string.
  """
  where = f"{key}={text!r}: " if key else ""
  if not isinstance(text, str):
    raise TypeError(f"{where}expected a string of name[:config] entries joined by {separator!r}.")
  entries = []
  for position, raw in enumerate(text.split(separator), start=1):
    entry = raw.strip()
    if not entry:
      raise ValueError(
        f"{where}entry {position} is empty; join name[:config] entries with a single {separator!r}."
      )
    name, colon, config = (part.strip() for part in entry.partition(":"))
    if not name or (colon and not config):
      raise ValueError(
        f"{where}entry {entry!r} is not name[:config] (a builder name, "
        "optionally a colon and a builder config)."
      )
    if known is not None and name not in known:
      raise ValueError(
        f"{where}entry {entry!r} names no known dataset; known: {', '.join(sorted(known))}."
      )
    parsed = DatasetEntry(name, config)
    if parsed in entries:
      raise ValueError(f"{where}entry {entry!r} is given twice.")
    entries.append(parsed)
  return tuple(entries)


def data_entries(
  data_config: Any, *, known: Collection[str] | None = None
) -> tuple[DatasetEntry, ...]:
  """The datasets a ``data`` config section trains on, in order.

  ``data.name`` with ``+`` or ``:`` is read by `parse_entries` (separator
  '+'), and each entry carries its own config: ``data.config`` is not used
  then (a config file's default for it, e.g. ``configs/folder.py``'s, must not
  stand in the way; `apnet_jax.data.opening.open_train_split` warns when it is
  set). A plain ``data.name`` is one dataset with ``data.config``.

  Args:
    data_config: the ``data`` section, or its dict (``name`` and ``config`` are read).
    known: the builder names allowed; None checks the syntax only.

  Raises:
    ValueError: a bad ``data.name`` (see `parse_entries`).
    TypeError: ``data.name`` or ``data.config`` is not a string.
  """
  name, config = data_config["name"], data_config["config"]
  entries = parse_entries(name, separator="+", known=known, key="data.name")
  if "+" in name or ":" in name:
    return entries
  if not isinstance(config, str):
    raise TypeError(f"data.config={config!r}: expected a string ('' for the default).")
  return (DatasetEntry(entries[0].name, config.strip()),)
