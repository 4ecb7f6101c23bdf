"""Progress bars for long work: one rule for every caller.

Bars are tqdm's (``tqdm.auto``: a widget under Jupyter and Colab, text on
stderr elsewhere), so they never reach stdout, ``results.json`` or
``metrics.jsonl``. Only JAX process 0 draws: the other processes do the same
work in step and would repeat every line. ``TQDM_DISABLE=1`` (any non-empty
value, as tqdm reads it) turns them off.
"""

from __future__ import annotations

import os
from typing import Any

import jax
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

