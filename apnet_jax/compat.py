"""Every difference between the JAX and Flax releases the package supports.

pyproject.toml admits jax 0.7.2 (Colab's) up to the newest release, and flax
0.11.2 (Colab's) up to the newest. Their APIs differ in a few places; each
difference is bridged here, once, by feature detection (never by comparing
version strings), so the rest of the code calls one name whatever is
installed. A leaf module: it imports nothing of this package.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flax import nnx

try:
  from jax import enable_x64 as _enable_x64
except ImportError:
  from jax.experimental import enable_x64 as _enable_x64

try:
  from jax.monitoring import unregister_event_duration_listener as _unregister_duration_listener
except ImportError:
  from jax._src.monitoring import (  # pylint: disable=g-import-not-at-top
    _unregister_event_duration_listener_by_callback as _unregister_duration_listener,
  )

__all__ = [
  "enable_x64",
  "iter_modules",
  "module_list",
  "set_value",
  "unregister_event_duration_listener",
]


def module_list(modules: Iterable[nnx.Module]) -> Any:
  """A list of submodules that NNX tracks as part of the graph.

  flax >= 0.12 only tracks a list attribute wrapped in ``nnx.List``; flax
  0.11 has no ``nnx.List`` and tracks plain lists. Either way the paths are
  ``(attribute, index, ...)``, so state and checkpoints look the same.
  """
  wrap = getattr(nnx, "List", list)
  return wrap(list(modules))


def set_value(variable: nnx.Variable, value: Any) -> None:
  """Replaces a variable's value.

  flax >= 0.12 has ``Variable.set_value`` (and deprecates ``.value =``);
  flax 0.11 only has the ``.value`` setter. Indexed assignment
  (``variable[...] = x``) would work in both, but under a trace it asks each
  tracer for its sharding, which is slow to fail in large models
  (`apnet_jax.models.layers.BatchNorm` says more).
  """
  if hasattr(variable, "set_value"):
    variable.set_value(value)
  else:
    variable.value = value


def iter_modules(module: nnx.Module) -> Iterator[tuple[tuple[Any, ...], nnx.Module]]:
  """``(path, submodule)`` for ``module`` and everything below it.

  flax >= 0.12 has the function ``nnx.iter_modules`` (its method
  ``Module.iter_modules`` is deprecated); flax 0.11 has only the method.
  """
  if hasattr(nnx, "iter_modules"):
    return nnx.iter_modules(module)
  return module.iter_modules()


def enable_x64(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
  """A context in which JAX computes in 64 bits (the float64 parity tests).

  ``jax.enable_x64`` in newer releases (0.10 has it, without the old name);
  ``jax.experimental.enable_x64`` in jax 0.7.
  """
  return _enable_x64(enabled)


def unregister_event_duration_listener(callback: Callable[..., Any]) -> None:
  """Removes a ``jax.monitoring`` duration listener (tests count compilations with one).

  Public in newer releases; jax 0.7 has it only as a private testing helper.
  """
  _unregister_duration_listener(callback)
