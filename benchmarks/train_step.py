"""Throughput of the real APNet train step: images/s, compile time, FLOPs, MFU.

Builds the model and optimiser from a config file exactly as training does
and times ``apnet_jax.train_step.make_train_step`` (augmentation, forward,
loss, backward, Adam update) over a mesh of all devices, on random uint8
images with P x K labels (P = batch / config.data.k identities). The input
pipeline is not part of the timing (see ``benchmarks/input_pipeline.py``):
one device batch is reused for every step.

  python benchmarks/train_step.py --config configs/market1501.py --config.model.init_from= \
      --batch_size 80 --height 384 --width 192 --steps 20 --peak_tflops 989 --json /tmp/step.json
  python benchmarks/train_step.py --config configs/synthetic.py --level 0 --steps 5 --json out.json

Timing follows the training loop: the first call (tracing, compilation, one
step) is reported as ``compile_seconds``; then ``--warmup`` steps, then
``--steps`` steps dispatched back to back with a single
``block_until_ready`` at the end. FLOPs come from XLA's cost analysis of the
same step lowered for one CPU device (the global computation, so the count
is the same whatever the backend; see ``per_image_flops``). ``mfu`` is
``flops_per_image * img_per_s / (peak_tflops * 1e12 * devices)`` with
``--peak_tflops`` the peak of *one* device in the compute dtype, or null
without it. ``compilations`` is the number of executables the jitted step
holds after the timed steps: anything but 1 means a recompilation.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Config files import `configs.common`, which is not an installed package:
# resolve it from the repository, as run.py does by living at its root.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(_REPO_ROOT))

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

__all__ = [
  "compile_counter",
  "main",
  "parse_flags",
  "per_image_flops",
  "run_environment",
  "write_json",
]

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class _CompileCounter:
  """Counts XLA backend compilations of any function (a jax.monitoring listener)."""

  def __init__(self) -> None:
    self.count = 0
    self._registered = False

  def register(self) -> None:
    if not self._registered:
      import jax.monitoring  # pylint: disable=g-import-not-at-top

      jax.monitoring.register_event_duration_secs_listener(self._on_event)
      self._registered = True

  def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
    del duration, kwargs
    if event == _BACKEND_COMPILE_EVENT:
      self.count += 1


compile_counter = _CompileCounter()


def parse_flags(
  argv: Sequence[str], define_extra: Callable[[flags.FlagValues], None] | None = None
) -> tuple[Any, flags.FlagValues]:
  """Parses the flags the benchmarks share and applies them to the config.

  Args:
    argv: command-line arguments without the program name.
    define_extra: defines a benchmark's own flags on the given FlagValues.

  Returns:
    ``(config, flag_values)``; the config has ``model.input_size`` and
    ``model.dtype`` set from ``--height/--width/--dtype`` when given.
  """
  # A fresh FlagValues per call, so main() can run several times in a process.
  fv = flags.FlagValues()
  full_argv = ["benchmark", *argv]
  # sys_argv: the override flags (--config.a.b) are read from these arguments,
  # not from sys.argv, so main(argv) works when called from Python.
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (configs/*.py[:arg]); --config.a.b=v overrides.",
    flag_values=fv,
    lock_config=True,
    sys_argv=full_argv,
  )
  flags.DEFINE_integer(
    "batch_size", None, "Global batch; default: the config's.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer(
    "height", None, "Input height; default: config.model.input_size.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer(
    "width", None, "Input width; default: config.model.input_size.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "Compute dtype; default: config.model.dtype.",
    flag_values=fv,
  )
  flags.DEFINE_integer("steps", 10, "Timed steps (batches).", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer(
    "warmup", 1, "Untimed steps after the first (compiling) call.", lower_bound=0, flag_values=fv
  )
  flags.DEFINE_string("json", None, "Write the results to this JSON file.", flag_values=fv)
  if define_extra is not None:
    define_extra(fv)
  flags.mark_flag_as_required("config", flag_values=fv)
  try:
    fv(full_argv)
    config = fv.config
    # A config file that failed to load surfaces only when the config is read.
    height, width = config.model.input_size
  except flags.Error as e:
    raise SystemExit(f"error: {e}") from e
  except (AttributeError, KeyError) as e:
    raise SystemExit(
      f"error: a --config.* override names a key the config does not have: {e}"
    ) from e
  except OSError as e:  # the config file is missing or fails to import
    raise SystemExit(
      f"error: cannot load the config file "
      f"{config_flags.get_config_filename(fv['config'])!r}: "
      f"{e.__cause__ or e}"
    ) from e
  config.model.input_size = (fv.height or int(height), fv.width or int(width))
  if fv.dtype:
    config.model.dtype = fv.dtype
  return config, fv


def run_environment() -> dict[str, Any]:
  """Device kind and count, backend and library versions, for the JSON record."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  return {
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "device_count": len(devices),
    "jax_version": jax.__version__,
    "jaxlib_version": jaxlib.__version__,
    "flax_version": flax.__version__,
    "python_version": platform.python_version(),
    "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
  }


def per_image_flops(
  build: Callable[[Any], Any], args: Sequence[Any], batch_size: int
) -> float | None:
  """FLOPs per image of a jitted function, counted by XLA on a CPU lowering.

  ``build(mesh)`` returns the jitted function for a mesh; it is rebuilt on a
  one-device CPU mesh and lowered (not compiled) for abstract ``args``, and
  XLA's cost analysis of that module, the global computation, gives the
  count. The accelerator's own analysis is no use: on GPU the compiled
  executable's count skips the cuDNN convolutions (1.0 GFLOP per image for
  a ResNet-50 step of about 50) and the lowered module's is None.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top

  from apnet_jax import sharding  # pylint: disable=g-import-not-at-top

  mesh = Mesh(np.array(jax.devices("cpu")[:1]), (sharding.DATA_AXIS,))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tuple(args))
  cost = build(mesh).lower(*abstract).cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per device
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  if flops is None or not math.isfinite(flops) or flops <= 0:
    return None
  return float(flops) / batch_size


def write_json(result: dict[str, Any], path: str | None) -> None:
  """Prints the result as one JSON line and writes it to ``path`` when given."""
  line = json.dumps(result)
  print(line)
  if path:
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    Path(path).expanduser().write_text(line + "\n")


def _define_train_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer(
    "level",
    None,
    "Attention pyramid level; default: config.model.level.",
    lower_bound=0,
    upper_bound=3,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "num_classes",
    751,
    "Classifier outputs (train identities; 751 = Market-1501).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_float(
    "peak_tflops", None, "Peak TFLOP/s of one device, for MFU.", lower_bound=0.0, flag_values=fv
  )


def model_settings(config) -> dict[str, Any]:
  """The model fields every benchmark report carries."""
  return {
    "depth": int(config.model.depth),
    "width_multiplier": float(config.model.width),
    "level": int(config.model.level),
    "kind": str(config.model.kind),
    "dtype": str(config.model.dtype),
  }


def main(argv: Sequence[str]) -> dict[str, Any]:
  """Runs the benchmark; returns (and prints, and optionally writes) its figures.

  Args:
    argv: command-line arguments without the program name.
  """
  config, fv = parse_flags(argv, _define_train_flags)
  if fv.level is not None:
    config.model.level = fv.level
  import jax  # pylint: disable=g-import-not-at-top  (after flags: importing JAX is slow)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from apnet_jax import build_model, optim, sharding  # pylint: disable=g-import-not-at-top
  from apnet_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top

  compile_counter.register()
  k = int(config.data.k)
  batch_size = fv.batch_size or int(config.data.p) * k
  height, width = config.model.input_size
  mesh = jax.make_mesh((jax.device_count(),), (sharding.DATA_AXIS,))
  num_pids = batch_size // k
  if batch_size % k or num_pids > fv.num_classes:
    raise SystemExit(
      f"error: --batch_size {batch_size} must be P x K with K = config.data.k = {k} and "
      f"P <= --num_classes {fv.num_classes}."
    )
  if batch_size % mesh.size:
    raise SystemExit(
      f"error: --batch_size {batch_size} is not divisible by the {mesh.size} devices."
    )

  # Model, optimiser and state exactly as apnet_jax.train builds them.
  model = build_model(config.model, fv.num_classes, rngs=nnx.Rngs(config.train.seed))
  tx, _ = optim.make_optimizer(config, steps_per_epoch=1)
  graphdef, state = train_step_lib.create_train_state(model, tx)
  del model
  state = jax.device_put(state, sharding.replicated_sharding(mesh))
  step_fn = train_step_lib.make_train_step(
    graphdef, tx, num_classes=fv.num_classes, config=config, mesh=mesh, seed=config.train.seed
  )

  rng = np.random.default_rng(0)
  pids = rng.choice(fv.num_classes, size=num_pids, replace=False)
  batch = sharding.shard_batch(
    {
      "image": rng.integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8),
      "label": np.repeat(pids, k).astype(np.int32),
    },
    mesh,
  )

  start = time.perf_counter()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready((state, metrics))
  compile_seconds = time.perf_counter() - start
  for _ in range(fv.warmup):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready((state, metrics))

  compiles_before = compile_counter.count
  start = time.perf_counter()
  for _ in range(fv.steps):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  compiles_in_timed_steps = compile_counter.count - compiles_before

  flops_per_image = per_image_flops(
    lambda cpu_mesh: (
      train_step_lib.make_train_step(
        graphdef,
        tx,
        num_classes=fv.num_classes,
        config=config,
        mesh=cpu_mesh,
        seed=config.train.seed,
      ).jitted
    ),
    (state, batch),
    batch_size,
  )
  img_per_s = fv.steps * batch_size / seconds
  mfu = None
  if fv.peak_tflops and flops_per_image is not None:
    mfu = flops_per_image * img_per_s / (fv.peak_tflops * 1e12 * mesh.size)
  loss = float(metrics["loss"])
  result = {
    "benchmark": "train_step",
    "argv": list(argv),
    "config": config_flags.get_config_filename(fv["config"]),
    **model_settings(config),
    "batch_size": batch_size,
    "p": num_pids,
    "k": k,
    "height": int(height),
    "width": int(width),
    "num_classes": fv.num_classes,
    "steps": fv.steps,
    "warmup": fv.warmup,
    "peak_tflops": fv.peak_tflops,
    "img_per_s": img_per_s,
    "step_seconds": seconds / fv.steps,
    "compile_seconds": compile_seconds,
    "flops_per_image": flops_per_image,
    "mfu": mfu,
    "compilations": int(step_fn.jitted._cache_size()),  # pylint: disable=protected-access
    "compiles_in_timed_steps": compiles_in_timed_steps,
    "final_loss": loss,
    **run_environment(),
  }
  if not math.isfinite(loss):
    raise SystemExit(f"error: the train step produced a non-finite loss ({loss}).")
  write_json(result, fv.json)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
