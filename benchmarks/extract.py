"""Throughput of evaluation feature extraction (image + horizontal flip).

Times the function evaluation runs, ``apnet_jax.evaluation.features.make_embed_fn``,
jitted over a mesh of all devices as ``extract_features`` jits it (state
replicated, batch sharded along ``data``), on random uint8 images. Each
image costs two forward passes (the image and its flip). Decoding is not
part of the timing (see ``benchmarks/input_pipeline.py``).

  python benchmarks/extract.py --config configs/market1501.py --batch_size 128 --steps 20 \
      --json /tmp/extract.json

The first call (compilation + one batch) is ``compile_seconds``; then
``--warmup`` batches, then ``--steps`` batches with one
``block_until_ready`` at the end. ``flops_per_image`` counts both passes
(XLA's cost analysis, per device, times the mesh size). Flags shared with
``benchmarks/train_step.py``: ``--config`` (with ``--config.a.b=v``
overrides), ``--batch_size``, ``--height``, ``--width``, ``--dtype``,
``--steps``, ``--warmup``, ``--json``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The repository root on the path: config files import `configs.common`, and the
# flag parsing and reporting shared with benchmarks/train_step.py are imported
# from there as `benchmarks.train_step`.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(_REPO_ROOT))

from ml_collections import config_flags  # noqa: E402

from benchmarks import train_step as bench  # noqa: E402

__all__ = ["main"]


def main(argv: Sequence[str]) -> dict[str, Any]:
  """Runs the benchmark; returns (and prints, and optionally writes) its figures.

  Args:
    argv: command-line arguments without the program name.
  """
  config, fv = bench.parse_flags(argv)
  import jax  # pylint: disable=g-import-not-at-top  (after flags: importing JAX is slow)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P

  from apnet_jax import build_model  # pylint: disable=g-import-not-at-top
  from apnet_jax.evaluation import features  # pylint: disable=g-import-not-at-top
  from apnet_jax.platform import cpu  # pylint: disable=g-import-not-at-top

  bench.compile_counter.register()
  batch_size = fv.batch_size or int(config.eval.batch_size)
  height, width = config.model.input_size
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  if batch_size % mesh.size:
    raise SystemExit(
      f"error: --batch_size {batch_size} is not divisible by the {mesh.size} devices."
    )

  # The classifier size only matters for eval_feature='logits'; Market's 751.
  model = build_model(config.model, 751, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  del model
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(state, replicated)
  embed = jax.jit(
    features.make_embed_fn(
      graphdef, str(config.model.eval_feature), conv_general_dilated=cpu.convolution_for(mesh)
    ),
    in_shardings=(replicated, NamedSharding(mesh, P("data"))),
    out_shardings=replicated,
    compiler_options=cpu.compiler_options(mesh),
  )
  images = jax.device_put(
    np.random.default_rng(0).integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8),
    NamedSharding(mesh, P("data")),
  )

  start = time.perf_counter()
  out = embed(state, images).block_until_ready()
  compile_seconds = time.perf_counter() - start
  for _ in range(fv.warmup):
    out = embed(state, images)
  out.block_until_ready()

  compiles_before = bench.compile_counter.count
  outputs = []
  start = time.perf_counter()
  for _ in range(fv.steps):
    outputs.append(embed(state, images))
  jax.block_until_ready(outputs)
  seconds = time.perf_counter() - start
  compiles_in_timed_steps = bench.compile_counter.count - compiles_before

  feature = np.asarray(outputs[-1])
  if not np.all(np.isfinite(feature)):
    raise SystemExit("error: feature extraction produced non-finite features.")
  flops_per_image = bench.per_image_flops(
    lambda cpu_mesh: jax.jit(
      features.make_embed_fn(graphdef, str(config.model.eval_feature)),
      in_shardings=NamedSharding(cpu_mesh, P()),
    ),
    (state, images),
    batch_size,
  )
  result = {
    "benchmark": "extract",
    "argv": list(argv),
    "config": config_flags.get_config_filename(fv["config"]),
    **bench.model_settings(config),
    "eval_feature": str(config.model.eval_feature),
    "feature_dim": int(feature.shape[-1]),
    "batch_size": batch_size,
    "height": int(height),
    "width": int(width),
    "steps": fv.steps,
    "warmup": fv.warmup,
    "img_per_s": fv.steps * batch_size / seconds,
    "batch_seconds": seconds / fv.steps,
    "compile_seconds": compile_seconds,
    "flops_per_image": flops_per_image,
    "compilations": int(embed._cache_size()),  # pylint: disable=protected-access
    "compiles_in_timed_steps": compiles_in_timed_steps,
    **bench.run_environment(),
  }
  bench.write_json(result, fv.json)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
