"""Multi-host runs on JAX's own distributed runtime.

Every process of a multi-host run calls :func:`initialize` once, before any
JAX computation; afterwards ``jax.devices()`` lists the devices of all
processes, the training mesh spans them, and each process feeds only its
share of every global batch (see ``sharding.shard_batch``). A plain
single-process run calls it too and nothing happens.

Where the coordinator address, the process count and the process id come from:

* arguments (``run.py --coordinator_address --num_processes --process_id``),
  and the environment variable ``JAX_COORDINATOR_ADDRESS``, which JAX itself
  reads in place of a missing address;
* otherwise JAX detects them on Cloud TPU pod slices, SLURM (``srun``),
  Open MPI (``mpirun``) and Kubernetes (with ``jax[k8s]`` installed); on SLURM
  and Open MPI with GPUs, JAX then gives each process one GPU, the one of its
  local rank, unless ``JAX_LOCAL_DEVICE_IDS`` lists others.

`on_process_0_first` runs what must have one writer (preparing a dataset,
taking a workdir's lock) on process 0 while the others wait.

On the CPU, cross-process collectives use gloo, JAX's default
(``jax_cpu_collectives_implementation``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Joins this process to a multi-process JAX run, if it is part of one.

  Must run before any JAX computation (JAX raises ``RuntimeError`` otherwise).
  With no argument and no ``JAX_COORDINATOR_ADDRESS``, JAX looks for a cluster
  it knows (module docstring); where it finds none this is a single-process
  run and nothing is done. Calling it again once initialized does nothing.

  Args:
    coordinator_address: ``host:port`` of the coordinator that process 0
      starts; the same on every process.
    num_processes: the number of processes of the run.
    process_id: this process, in ``0 .. num_processes - 1``.

  Returns:
    Whether JAX's distributed runtime is running.

  Raises:
    ValueError: settings were given but are incomplete or inconsistent; the
      message names the flags.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = any(v is not None for v in (coordinator_address, num_processes, process_id)) or bool(
    os.environ.get("JAX_COORDINATOR_ADDRESS")
  )
  if not explicit and _single_task_launch():
    # JAX would still initialize here and then show this one process only the
    # GPU of its local rank: `srun --ntasks=1 --gpus=8` would train on one GPU.
    return False
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except ValueError as e:
    # JAX found no cluster and nothing was given: a plain single-process run.
    # (JAX says so only in its message, which names the missing setting.)
    if not explicit and "coordinator_address" in str(e):
      return False
    raise ValueError(
      f"multi-host setup: {e} Outside Cloud TPU, SLURM and Open MPI pass all of "
      "--coordinator_address=HOST:PORT (of process 0, the same everywhere), "
      "--num_processes=N and --process_id=0..N-1 (got coordinator_address="
      f"{coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')!r}, "
      f"num_processes={num_processes!r}, process_id={process_id!r})."
    ) from e
  logging.info(
    "JAX distributed runtime: process %d of %d, %d local of %d devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def _single_task_launch() -> bool:
  """Whether SLURM or Open MPI launched this as the only task of its job step."""
  for variable in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if os.environ.get(variable) == "1":
      return True
  return False


def on_process_0_first(fn: Callable[[], Any], failed: str) -> Any:
  """``fn()`` on process 0 alone (its result there, None elsewhere); every process waits.

  The barrier carries process 0's error, so that no process waits for what
  will not come: the others raise ``failed`` with its text.
  """
  if jax.process_count() == 1:
    return fn()
  failure, result = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except  (re-raised below)
      failure = e
  text = f"{type(failure).__name__}: {failure}" if failure is not None else ""
  sent = np.frombuffer(text.encode()[:_ERROR_BYTES].ljust(_ERROR_BYTES, b"\0"), np.uint8)
  received = bytes(np.asarray(multihost_utils.broadcast_one_to_all(sent))).rstrip(b"\0")
  if failure is not None:
    raise failure
  if received:
    raise RuntimeError(f"{failed}: {received.decode(errors='replace')}")
  return result


_ERROR_BYTES = 4096  # of process 0's error message, sent to the other processes
