"""The sharded train step: 8 devices vs 1, one compilation, donation, overfitting.

A small APNet (ResNet-18 at width 0.25, level 2, 64x32 inputs) on a fixed
P x K = 4 x 4 batch. Each step function is compiled once per module
(a compilation costs ~10 s on 2 CPU cores).
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

from apnet_jax import build_model, checkpointing, optim, sharding
from apnet_jax import train_step as ts
from apnet_jax.platform import cpu
from configs.common import get_config

NUM_IDS, PER_ID = 4, 4
SEED = 0


def small_config(dtype="float32"):
  config = get_config()
  config.model.depth = 18
  config.model.width = 0.25
  config.model.level = 2
  config.model.input_size = (64, 32)
  config.model.dtype = dtype
  # A constant, large rate so that 20 steps visibly fit the batch.
  config.optim.base_lr = 1e-3
  config.optim.warmup_epochs = 0
  return config


def make_batch():
  """4 identities x 4 images: one colour per identity plus pixel noise."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(NUM_IDS), PER_ID).astype(np.int32)
  colours = rng.integers(0, 256, (NUM_IDS, 1, 1, 3))
  noise = rng.normal(0, 30, (NUM_IDS * PER_ID, 64, 32, 3))
  images = np.clip(colours[labels] + noise, 0, 255).astype(np.uint8)
  return {
    "image": images,
    "label": labels,
    "pid": labels + 100,
    "filename": np.array([f"{i}.jpg" for i in range(len(labels))]),
  }


def make_mesh(kind):
  if kind == "1":
    return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  axis_type = {"8-explicit": AxisType.Explicit, "8-auto": AxisType.Auto}[kind]
  return jax.make_mesh((8,), ("data",), axis_types=(axis_type,))


class Harness:
  """Builds (once) a step function per mesh kind and fresh replicated states."""

  def __init__(self, dtype="float32"):
    self.config = small_config(dtype)
    self.tx, self.schedule = optim.make_optimizer(self.config, steps_per_epoch=10)
    self.graphdef, _ = self._new_state()
    self.steps, self.meshes = {}, {}

  def _new_state(self):
    model = build_model(self.config.model, NUM_IDS, rngs=nnx.Rngs(0))
    return ts.create_train_state(model, self.tx)

  def mesh(self, kind):
    if kind not in self.meshes:
      self.meshes[kind] = make_mesh(kind)
    return self.meshes[kind]

  def step_fn(self, kind):
    if kind not in self.steps:
      self.steps[kind] = ts.make_train_step(
        self.graphdef,
        self.tx,
        num_classes=NUM_IDS,
        config=self.config,
        mesh=self.mesh(kind),
        seed=SEED,
      )
    return self.steps[kind]

  def state(self, kind):
    _, state = self._new_state()
    return jax.device_put(state, sharding.replicated_sharding(self.mesh(kind)))

  def batch(self, kind, batch=None):
    return sharding.shard_batch(make_batch() if batch is None else batch, self.mesh(kind))


@pytest.fixture(scope="module")
def harness():
  return Harness()


@pytest.fixture(scope="module")
def one_device_result(harness):
  state, metrics = harness.step_fn("1")(harness.state("1"), harness.batch("1"))
  return jax.device_get((state, metrics))


def _adam_state(opt_state):
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
    if isinstance(s, optax.ScaleByAdamState)
  ]
  assert len(found) == 1
  return found[0]


def adam_first_moment(opt_state):
  return _adam_state(opt_state).mu


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["8-explicit", "8-auto"])
def test_one_step_on_8_devices_equals_1_device(harness, one_device_result, kind):
  """Same loss, gradients and BatchNorm statistics on 8 devices as on 1.

  The 8-device batch is one global array, so BatchNorm and the triplet mining
  see all 16 images either way; only the order of float32 summations differs
  (per-device partial sums + all-reduce). Hence: metrics to rtol 1e-5
  (observed ~5e-7); running statistics to rtol 1e-5 / atol 1e-6 (observed abs
  1e-7; the running means are ~1e-3, so a relative bound alone would be
  meaningless for them); gradients, read from Adam's first moment after one
  step (mu = (1 - b1) (g + wd w)), to 3e-5 of the largest gradient entry
  (observed 5e-6: weight gradients sum thousands of terms with cancellation,
  and some are pure rounding noise, e.g. the SAMS fc1 biases that the next
  BatchNorm cancels). The updated parameters are not compared: Adam's first
  step moves every entry by ~lr * sign(g), so noise-level gradients flip it.
  """
  ref_state, ref_metrics = one_device_result
  mesh = harness.mesh(kind)
  state, metrics = harness.step_fn(kind)(harness.state(kind), harness.batch(kind))
  replicated = sharding.replicated_sharding(mesh)
  assert all(x.sharding.is_equivalent_to(replicated, x.ndim) for x in jax.tree.leaves(state))
  state, metrics = jax.device_get((state, metrics))

  assert set(metrics) == {
    "loss",
    "ce",
    "triplet",
    "acc",
    "lr",
    "grad_norm",
    "param_norm",
    "dist_ap",
    "dist_an",
  }
  for name, value in metrics.items():
    assert value.dtype == np.float32 and value.shape == ()
    np.testing.assert_allclose(value, ref_metrics[name], rtol=1e-5, err_msg=name)
  assert int(state.step) == int(ref_state.step) == 1
  np.testing.assert_allclose(metrics["lr"], 1e-3, rtol=1e-7)
  assert metrics["triplet"] > 0 and metrics["ce"] > 0

  bn_leaves = jax.tree_util.tree_leaves_with_path(state.model_state)
  ref_bn = jax.tree.leaves(ref_state.model_state)
  assert len(bn_leaves) == len(ref_bn) > 0
  for (path, value), ref in zip(bn_leaves, ref_bn):
    np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # The running statistics did move away from their (0, 1) initialisation.
  means = [v for p, v in bn_leaves if "mean" in jax.tree_util.keystr(p)]
  assert all(np.any(m != 0) for m in means)

  mu = jax.tree.leaves(adam_first_moment(state.opt_state))
  ref_mu = jax.tree.leaves(adam_first_moment(ref_state.opt_state))
  scale = max(np.abs(m).max() for m in ref_mu)
  for got, ref in zip(mu, ref_mu):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=3e-5 * scale)


def test_the_step_is_jitted_with_the_cpu_options(harness, monkeypatch):
  """make_train_step hands the CPU options to jax.jit (see test_platform_cpu.py)."""
  # Probes the jaxlib before the spy; which options this jaxlib gets is test_platform_cpu.py's.
  expected = cpu.compiler_options(harness.mesh("1"))
  seen = []
  real_jit = jax.jit

  def spy(*args, **kwargs):
    seen.append(kwargs.get("compiler_options"))
    return real_jit(*args, **kwargs)

  monkeypatch.setattr(jax, "jit", spy)
  ts.make_train_step(
    harness.graphdef,
    harness.tx,
    num_classes=NUM_IDS,
    config=harness.config,
    mesh=harness.mesh("1"),
    seed=SEED,
  )
  assert seen == [expected]


def test_three_steps_compile_once(harness, caplog):
  step_fn = harness.step_fn("8-explicit")
  state, batch = harness.state("8-explicit"), harness.batch("8-explicit")
  cached_before = step_fn.jitted._cache_size()
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    for _ in range(3):
      state, metrics = step_fn(state, batch)
      # A fresh host batch each time, as the training loop feeds it.
      batch = harness.batch("8-explicit")
    jax.block_until_ready(metrics)
  compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(step)")]
  assert len(compiles) == (0 if cached_before else 1)
  assert step_fn.jitted._cache_size() == 1
  assert int(state.step) == 3


def test_state_is_donated(harness):
  # CPU honours donation in jax 0.10: the donated input buffers are released.
  # Checked on the arrays that matter for memory: parameters, running
  # statistics and Adam's moments. (jit drops inputs the step never reads, such
  # as the previous learning rate in the optimiser state; those stay alive.)
  step_fn = harness.step_fn("8-explicit")
  state = harness.state("8-explicit")
  new_state, _ = step_fn(state, harness.batch("8-explicit"))
  adam = adam_first_moment(state.opt_state), _adam_state(state.opt_state).nu
  big = jax.tree.leaves((state.params, state.model_state, adam))
  assert len(big) > 100
  assert all(x.is_deleted() for x in big)
  assert state.step.is_deleted()
  assert not any(x.is_deleted() for x in jax.tree.leaves(new_state))


def test_augmentation_rng_comes_from_seed_and_step(harness):
  step_fn = harness.step_fn("1")
  batch = harness.batch("1")
  _, first = step_fn(harness.state("1"), batch)
  _, again = step_fn(harness.state("1"), batch)
  later_state = harness.state("1")
  later_state = later_state.replace(
    step=jax.device_put(jnp.asarray(5, jnp.int32), later_state.step.sharding)
  )
  _, later = step_fn(later_state, batch)
  # Same parameters and batch: the loss changes only through the augmentation.
  assert float(first["loss"]) == float(again["loss"])
  assert float(first["loss"]) != float(later["loss"])


@pytest.mark.slow
def test_loss_decreases_on_a_tiny_batch(harness):
  step_fn = harness.step_fn("1")
  state, batch = harness.state("1"), harness.batch("1")
  history = []
  for _ in range(20):
    state, metrics = step_fn(state, batch)
    history.append(jax.device_get(metrics))
  loss = np.array([m["loss"] for m in history])
  assert np.all(np.isfinite(loss))
  assert loss[-5:].mean() < 0.75 * loss[:5].mean(), loss
  assert np.mean([m["acc"] for m in history[-5:]]) > np.mean([m["acc"] for m in history[:5]])


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_state_and_loss():
  harness = Harness("bfloat16")
  step_fn = harness.step_fn("1")
  state, batch = harness.state("1"), harness.batch("1")
  new_state, metrics = jax.eval_shape(step_fn.jitted, state, batch)
  float_dtypes = {
    x.dtype for x in jax.tree.leaves(new_state) if jnp.issubdtype(x.dtype, jnp.floating)
  }
  assert float_dtypes == {jnp.dtype(jnp.float32)}
  assert {m.dtype for m in metrics.values()} == {jnp.dtype(jnp.float32)}
  # ... while the convolutions run in bfloat16.
  jaxpr = str(jax.make_jaxpr(step_fn.step)(state, batch))
  conv_outputs = re.findall(r"(\w+)\[[^\]]*\] = conv_general_dilated", jaxpr)
  assert len(conv_outputs) > 40  # Forward and backward convolutions.
  assert set(conv_outputs) == {"bf16"}
  # The stem conv's output: 64x32 / 2, 64 * 0.25 channels, batch-sharded (newer
  # jax prints the sharding in the type).
  assert re.search(r"bf16\[16(@data)?,32,16,16\] = conv_general_dilated", jaxpr)


def test_train_state_roundtrips_through_the_checkpoints(harness, tmp_path):
  # Through apnet_jax.checkpointing, as training saves and resumes it.
  state = jax.device_get(harness.state("1"))
  manager = checkpointing.make_manager(str(tmp_path), keep_best=1)
  try:
    checkpointing.save(manager, 1, state, {"seed": SEED})
    checkpointing.wait_until_finished(manager)
    restored, meta = checkpointing.restore(manager, 1, state)
  finally:
    manager.close()
  assert meta == {"seed": SEED}
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(got, want)


def test_shard_batch_places_numeric_entries_along_data(harness):
  mesh = harness.mesh("8-explicit")
  sharded = sharding.shard_batch(make_batch(), mesh)
  assert sorted(sharded) == ["image", "label", "pid"]  # 'filename' (strings) is dropped.
  for value in sharded.values():
    assert value.sharding.is_equivalent_to(sharding.data_sharding(mesh), value.ndim)
  np.testing.assert_array_equal(sharded["image"], make_batch()["image"])


def test_shard_batch_rejects_a_batch_not_divisible_by_devices(harness):
  batch = make_batch()
  batch["label"] = batch["label"][:12]
  with pytest.raises(ValueError, match=r"shard_batch: batch\['label'\].*\(12,\).*\b8\b"):
    sharding.shard_batch(batch, harness.mesh("8-explicit"))


def test_train_step_rejects_bad_batches(harness):
  step_fn = harness.step_fn("1")
  state = harness.state("1")
  batch = make_batch()
  with pytest.raises(KeyError, match="label"):
    step_fn(state, {"image": batch["image"]})
  with pytest.raises(ValueError, match=r"batch\['image'\].*uint8.*float32"):
    step_fn(state, {"image": batch["image"].astype(np.float32), "label": batch["label"]})
  with pytest.raises(ValueError, match=r"batch\['label'\]"):
    step_fn(state, {"image": batch["image"], "label": batch["label"][:8]})
  with pytest.raises(ValueError, match=r"train_step: .*\b12\b.*\b8\b.*'data'"):
    harness.step_fn("8-explicit")(
      state, {"image": batch["image"][:12], "label": batch["label"][:12]}
    )
  # Nothing was donated by the rejected calls.
  assert not any(x.is_deleted() for x in jax.tree.leaves(state))


def test_make_train_step_needs_a_data_axis(harness):
  mesh = jax.make_mesh((8,), ("batch",))
  with pytest.raises(ValueError, match="'data' axis"):
    ts.make_train_step(
      harness.graphdef, harness.tx, num_classes=NUM_IDS, config=harness.config, mesh=mesh, seed=SEED
    )
  with pytest.raises(ValueError, match="'data' axis"):
    sharding.shard_batch(make_batch(), mesh)
