"""What long work shows on the terminal: progress bars, and no third-party chatter.

`bar` is the one way to draw a progress bar. Bars are tqdm's (``tqdm.auto``:
a widget under Jupyter and Colab, text on stderr elsewhere), so they never
reach stdout, ``results.json`` or ``metrics.jsonl``. Only JAX process 0 draws:
the other processes do the same work in step and would repeat every line.
``TQDM_DISABLE=1`` (any non-empty value, as tqdm reads it) turns them off.

`quiet_log_lines` hides third-party absl log lines that tell a user nothing
(and would cut through a bar) at the default verbosity; ``--verbosity=0``
(absl INFO) or above shows them again.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from absl import logging as absl_logging
from tqdm import auto as tqdm_auto


def bar(total: int, desc: str, unit: str = "it", **kwargs: Any) -> tqdm_auto.tqdm:
  """A tqdm progress bar of ``total`` units, drawn by process 0 only.

  Args:
    total: units of work in all (images, queries, blocks...).
    desc: what is in progress, shown before the bar (e.g. 'query').
    unit: the unit counted, shown in the rate (e.g. 'img' gives 'img/s').
    **kwargs: more arguments of ``tqdm`` (e.g. ``initial``).

  Returns:
    The bar; use it as a context manager and ``update(n)`` it. A disabled
    bar accepts the same calls and draws nothing.
  """
  # tqdm reads TQDM_DISABLE only at import and lets an explicit `disable`
  # override it, and its notebook bar always passes one: read it here.
  disable = jax.process_index() != 0 or bool(os.environ.get("TQDM_DISABLE"))
  return tqdm_auto.tqdm(total=total, desc=desc, unit=unit, disable=disable, **kwargs)


class _QuietBelowInfo(logging.Filter):
  """Drops records whose message starts with one of ``prefixes``, below absl INFO."""

  def __init__(self, prefixes: tuple[str, ...]):
    super().__init__()
    self.prefixes = prefixes

  def filter(self, record: logging.LogRecord) -> bool:
    return absl_logging.get_verbosity() >= absl_logging.INFO or not record.getMessage().startswith(
      self.prefixes
    )


def quiet_log_lines(*prefixes: str) -> None:
  """Hides absl log lines that start with ``prefixes`` unless the verbosity is INFO or more.

  run.py keeps absl at WARNING unless ``--verbosity`` is given, and a notebook
  starts there too, so such lines are hidden by default and shown on request.
  """
  absl_logging.get_absl_logger().addFilter(_QuietBelowInfo(prefixes))
