"""Test setup shared by the whole suite.

Every run gets 8 simulated CPU devices, so the sharding code paths (mesh,
NamedSharding, global-batch reductions) are exercised on any machine. This
must happen before JAX initialises its backends, hence at import time here.
"""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
