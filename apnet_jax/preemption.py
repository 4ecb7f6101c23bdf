"""Stopping a training cleanly on SIGTERM or SIGINT (a preemption, a Ctrl-C).

`StopSignals` turns the signals into a flag the training loop checks after
each step, so that the step is saved before the process ends; on several
processes JAX's preemption service names the step at which all of them stop.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import jax
from absl import logging
from jax.experimental import multihost_utils


class StopSignals:
  """SIGTERM and SIGINT as a flag the loop checks after each step (a context manager).

  Installed before anything compiles: a KeyboardInterrupt raised while XLA
  compiles can crash the process, a flag cannot. The first signal sets the flag
  and gives that signal its default action back, so that a second one (Ctrl-C
  twice) ends the process at once; Orbax commits a checkpoint by renaming it
  whole, so the last committed one stays intact. After `stop_at_once`, a signal
  ends the process with a message instead of setting the flag.

  With several processes, JAX's preemption service takes SIGTERM instead (a
  Python handler would hide it from the service) and names one step at which
  every process sees the flag, so that all save that step together; SIGINT is
  left alone there, as one process alone cannot stop them all at one step. On
  exit the previous handlers are back: after training returns (in a notebook,
  say), a signal must not just set a flag that nothing reads.
  """

  EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}

  def __init__(self):
    self.signum: int | None = None
    self._multihost = jax.process_count() > 1
    self._previous: dict[int, Any] = {}
    self._message: str | None = None

  @property
  def set(self) -> bool:
    return self.signum is not None

  def __enter__(self) -> StopSignals:
    if not self._multihost:
      try:
        for signum in self.EXIT_CODES:
          self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread (e.g. some notebook kernels)
        pass
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      # None: a handler set outside Python, which cannot be put back; the default is closest.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def poll(self, step: int) -> None:
    """Every process calls this after each step, from the same first step."""
    if self._multihost and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGTERM

  def exit_if_set(self, what_was_done: str) -> None:
    """Ends the process (SystemExit 143 or 130) if a signal came; logs what was done."""
    if self.set:
      logging.warning("%s: %s; stopped.", signal.Signals(self.signum).name, what_was_done)
      raise SystemExit(self.EXIT_CODES[self.signum])

  def stop_at_once(self, message: str) -> None:
    """From now on a signal ends the process with ``message`` (one line, on stderr)."""
    self._message = message
    if self.set:  # it came between the last check and now
      self._stop(self.signum)

  def _handle(self, signum, frame):
    del frame
    if self.signum is None:
      self.signum = signum
    if signum in self._previous:
      signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    if self._message is not None:
      self._stop(signum)

  def _stop(self, signum: int) -> None:
    print(f"{signal.Signals(signum).name}: {self._message}", file=sys.stderr, flush=True)
    raise SystemExit(self.EXIT_CODES[signum])
