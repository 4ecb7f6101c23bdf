"""Test setup shared by the whole suite.

Every run gets 8 simulated CPU devices, so the sharding code paths (mesh,
NamedSharding, global-batch reductions) are exercised on any machine. This
must happen before JAX initialises its backends, hence at import time here.

The suite shares one persistent XLA compilation cache, in
``.pytest_cache/d/jax-compilation-cache`` (``pytest --cache-clear`` empties
it). Compiling dominates the suite on 2 cores: one compilation of the tiny
train step takes 26 s on a 2-core AMD EPYC; its first step with the cache
warm takes 6 s, most of it tracing. Most tests build the same tiny model
and step, in this process or in the `run.py` processes they start, which
inherit the variables set here. Every test still runs its programs; only
identical XLA programs are reused (the cache key is the whole compiled
module, its options and the devices).

The tiny synthetic dataset and the tiny model are made once per process
(per xdist worker) by the session fixtures below, for the tests that only
read them; a test that damages data or weights makes its own.
"""

import importlib.metadata
import os
import pathlib

# Under .pytest_cache/d, the folder pytest gives plugins: --cache-clear removes it.
_CACHE = (
  pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "d" / "jax-compilation-cache"
)

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
# Cache every program: the eager ops of model initialisation are small but many.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
  "jax_persistent_cache_min_compile_time_secs",
  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update(
  "jax_persistent_cache_min_entry_size_bytes",
  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]),
)


import data_fixtures as fx  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from apnet_jax import build_model  # noqa: E402
from configs.synthetic import get_config as synthetic_config  # noqa: E402

TINY_NUM_CLASSES = 8  # the train ids of synthetic_reid/tiny


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """A data_dir with synthetic_reid/tiny prepared, shared: a test that damages it copies it."""
  data_dir = tmp_path_factory.mktemp("tiny_tfds")
  fx.build("synthetic_reid", None, data_dir, "tiny")
  return str(data_dir)


@pytest.fixture(scope="session")
def _tiny_model_built_once():
  return build_model(synthetic_config("tiny").model, TINY_NUM_CLASSES, rngs=nnx.Rngs(0))


@pytest.fixture
def tiny_model(_tiny_model_built_once):
  """The model of configs/synthetic.py:tiny, 8 classes, seed 0, in train mode.

  A clone each time: a test may switch its mode or assign its variables
  without reaching the next test (merged splits would share the variables).
  """
  return nnx.clone(_tiny_model_built_once)


def pytest_report_header(config):
  """The versions under test, at the top of every run (CI runs two sets)."""
  del config
  names = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tensorflow-datasets",
    "numpy",
  )
  return "apnet-jax under " + ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)


# A worker's peak: about 2 GB for the full-size ResNet-50 parity tests, more
# while a test's run.py processes are alive.
_MEMORY_PER_WORKER = 4 * 2**30


def pytest_xdist_auto_num_workers(config):
  """``-n auto`` (in pyproject's addopts): a worker per usable core, as memory allows.

  The cores this process may run on (its affinity, which a container's
  cpuset narrows), not all the host's, and at most one worker per 4 GiB of
  memory.
  """
  del config
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return max(1, min(cores or 1, memory // _MEMORY_PER_WORKER))


def pytest_collection_modifyitems(config, items):
  """Leaves out the tests marked `gpu` unless the -m expression names them.

  So `pytest` and `pytest -m "not slow"` never run them on a machine without
  an accelerator, and `pytest -m gpu` runs them on the device machine.
  """
  if "gpu" in (config.option.markexpr or ""):
    return
  gpu = [item for item in items if item.get_closest_marker("gpu")]
  if gpu:
    items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    config.hook.pytest_deselected(items=gpu)
