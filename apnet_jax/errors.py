"""The errors whose message alone tells the user what happened and what to do.

A command line (``run.py``) ends with one of `USER_ERRORS` as its last line,
without a traceback (`exit_with_error`); other errors keep their traceback.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from absl import logging

from apnet_jax import checkpointing
from apnet_jax import workdir as workdir_lib


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the message names the step."""


USER_ERRORS = (
  NonFiniteLossError,
  checkpointing.CheckpointReadError,
  checkpointing.CheckpointSaveError,
  workdir_lib.WorkdirBusyError,
)


def exit_with_error(error: BaseException) -> NoReturn:
  """Ends the process with status 1 and ``error`` (one of `USER_ERRORS`) as its last line.

  Orbax's and TensorStore's threads go on printing tracebacks of their own
  until the interpreter is gone, hundreds of lines that bury the error: they
  are silenced, the error is printed last, and the process ends at once (log
  files are line-buffered or flushed, so nothing written is lost).
  """
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  stderr = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  # On a line of its own: a thread may have been cut off mid-line.
  os.write(stderr, f"\n{type(error).__name__}: {error}\n".encode())
  os._exit(1)
