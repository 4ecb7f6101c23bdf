"""CPU tuning: convolutions leave YNNPACK, 1x1 convolutions become matmuls, results stay
the same, and Orbax saves replicated arrays whole.

``apnet_jax.platform.cpu.compiler_options`` takes convolutions out of XLA:CPU's
YNNPACK set for the jitted train step and extraction (docs/benchmarks.md,
"CPU tuning"). These tests read the compiled HLO to check that the option
reaches XLA (and that without it, this jaxlib does put convolutions in
YNNPACK, so the check can fail), that values and gradients agree with a
float64 reference, and that the option steps aside off the CPU, under a
user's own ``XLA_FLAGS`` and on a jaxlib that refuses it. Older jaxlibs
(0.7, Colab's) have no YNNPACK at all; there the option must step aside.
``save_replicas_whole`` is checked through the checkpoints it serves.
"""

import collections
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint._src.serialization import replica_slices

from apnet_jax import build_model, checkpointing, compat, sharding
from apnet_jax.models import layers
from apnet_jax.platform import cpu
from configs.common import get_config

_DN = ("NHWC", "HWIO", "NHWC")


def ynn_fused_opcodes(hlo: str) -> collections.Counter:
  """Opcodes of the instructions inside YNNPACK fusions of a compiled module."""
  called = re.findall(r"kind=kCustom, calls=%([\w.\-]+),[^\n]*\"kind\":\"__ynn_fusion\"", hlo)
  ops = collections.Counter()
  for name in called:
    body = re.search(r"^%" + re.escape(name) + r" .*?\{\n(.*?)\n\}", hlo, re.S | re.M)
    assert body is not None, name
    ops.update(re.findall(r"= \S+ ([a-z][\w\-]*)\(", body.group(1)))
  return ops


def top_level_opcodes(hlo: str) -> collections.Counter:
  entry = hlo[hlo.index("\nENTRY") :]
  entry = entry[: entry.index("\n}")]
  return collections.Counter(re.findall(r"= \S+ ([a-z][\w\-]*)\(", entry))


def conv_and_grads(x, w, v):
  """A 3x3 convolution, a matmul, and the gradients of both (what training runs)."""

  def loss(x, w, v):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)
    return jnp.sum(jnp.dot(y.reshape(-1, y.shape[-1]), v) ** 2)

  return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, v)


def _inputs(dtype=np.float32):
  rng = np.random.default_rng(0)
  # Channels as in ResNet's layer1: small ones do not go to YNNPACK at all.
  return (
    rng.normal(size=(2, 16, 8, 64)).astype(dtype),
    rng.normal(size=(3, 3, 64, 64)).astype(dtype) * 0.05,
    rng.normal(size=(64, 24)).astype(dtype) * 0.1,
  )


def _cpu_mesh():
  return jax.make_mesh((1,), ("data",), devices=jax.devices("cpu")[:1])


def _default_hlo() -> str:
  return jax.jit(conv_and_grads).lower(*_inputs()).compile().as_text()


def _expected_options():
  """The options when this jaxlib's default runs convolutions in YNNPACK, else None."""
  return cpu.CPU_COMPILER_OPTIONS if ynn_fused_opcodes(_default_hlo()) else None


def test_cpu_devices_get_the_options():
  expected = _expected_options()
  assert cpu.compiler_options(_cpu_mesh()) == expected
  assert cpu.compiler_options(jax.devices("cpu")) == expected


def test_the_options_keep_convolutions_out_of_ynnpack():
  default = _default_hlo()
  tuned = (
    jax.jit(conv_and_grads, compiler_options=cpu.compiler_options(_cpu_mesh()))
    .lower(*_inputs())
    .compile()
    .as_text()
  )
  if not ynn_fused_opcodes(default):
    # A jaxlib without YNNPACK (0.7): nothing to take out, and no options given.
    assert cpu.compiler_options(_cpu_mesh()) is None
    assert top_level_opcodes(tuned)["convolution"] == 3
    return
  # This jaxlib's default runs the convolutions (forward, both gradients) in
  # YNNPACK: the premise of the option.
  assert ynn_fused_opcodes(default)["convolution"] == 3
  assert ynn_fused_opcodes(tuned)["convolution"] == 0
  assert top_level_opcodes(tuned)["convolution"] == 3
  # Matmuls stay with YNNPACK.
  assert ynn_fused_opcodes(tuned)["dot"] >= 1


def test_the_options_do_not_change_values_or_gradients():
  tuned = jax.jit(conv_and_grads, compiler_options=cpu.compiler_options(_cpu_mesh()))
  loss, grads = tuned(*_inputs())
  with compat.enable_x64(True):
    ref_loss, ref_grads = jax.jit(conv_and_grads)(*_inputs(np.float64))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def _fake_devices(*platforms):
  return [types.SimpleNamespace(platform=p) for p in platforms]


@pytest.mark.parametrize("platforms", [("gpu",), ("tpu", "tpu"), ("cpu", "gpu"), ()])
def test_no_options_off_the_cpu(platforms):
  assert cpu.compiler_options(_fake_devices(*platforms)) is None


def test_a_users_xla_flags_win(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  assert cpu.compiler_options(_cpu_mesh()) is None
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  assert cpu.compiler_options(_cpu_mesh()) == _expected_options()


def test_an_option_this_jaxlib_refuses_gives_no_options(monkeypatch):
  monkeypatch.setattr(
    cpu, "CPU_COMPILER_OPTIONS", {cpu.YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_NO_SUCH_TYPE"}
  )
  cpu._accepted.cache_clear()  # pylint: disable=protected-access
  try:
    assert cpu.compiler_options(_cpu_mesh()) is None
  finally:
    cpu._accepted.cache_clear()  # pylint: disable=protected-access


@pytest.mark.parametrize(
  "kernel, stride, padding, features",
  [
    (1, 1, 0, (6, 5)),
    (1, 2, 0, (6, 5)),
    (1, 1, 1, (6, 5)),
    (3, 2, 1, (6, 5)),
    # Fewer input than output channels: the other form of the kernel's gradient.
    (1, 1, 0, (5, 9)),
    (1, 2, 0, (5, 9)),
  ],
)
def test_cpu_convolution_rewrite_equals_lax(kernel, stride, padding, features):
  """The 1x1-as-matmul convolution gives lax's values and gradients."""
  rng = np.random.default_rng(5)
  with compat.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(2, 9, 7, features[0])))
    w = jnp.asarray(rng.normal(size=(kernel, kernel, *features)))
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    args = ((stride, stride), ((padding, padding), (padding, padding)))

    def ours(x, w):
      return cpu.conv_general_dilated(x, w, *args, dimension_numbers=dims)

    def reference(x, w):
      return jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=dims)

    y, ours_vjp = jax.vjp(jax.jit(ours), x, w)
    y_ref, ref_vjp = jax.vjp(reference, x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    cotangent = jnp.asarray(rng.normal(size=y.shape))
    for got, want in zip(ours_vjp(cotangent), ref_vjp(cotangent)):
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  hlo = jax.jit(ours).lower(x.astype(np.float32), w.astype(np.float32)).as_text()
  if kernel == 1:
    assert "dot_general" in hlo and "convolution" not in hlo
  else:
    assert "convolution" in hlo


def _tiny_model():
  config = get_config()
  config.model.depth, config.model.width, config.model.level = 18, 0.25, 2
  config.model.input_size = (32, 16)
  model = build_model(config.model, 5, rngs=nnx.Rngs(0))
  model.eval()
  return model


@pytest.mark.slow
def test_the_model_is_plain_lax_outside_the_cpu_context():
  # What other platforms get: forward-mode differentiation works through the
  # whole model. Checked by the adjoint identity u.(J v) = (J^T u).v against
  # reverse mode (a finite difference would cross ReLU kinks).
  with compat.enable_x64(True):
    model = _tiny_model()
    params = jax.tree.map(lambda v: v.astype(np.float64), nnx.state(model))
    graphdef = nnx.graphdef(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 32, 16, 3)))
    v = jnp.asarray(rng.normal(size=x.shape))

    def feat(x):
      return nnx.merge(graphdef, params)(x)["feat"]

    y, tangent = jax.jvp(feat, (x,), (v,))
    u = jnp.asarray(rng.normal(size=y.shape))
    (cotangent,) = jax.vjp(feat, x)[1](u)
    np.testing.assert_allclose(jnp.vdot(u, tangent), jnp.vdot(cotangent, v), rtol=1e-6)
    assert jnp.abs(jnp.vdot(u, tangent)) > 0
    assert "custom_vjp" not in str(jax.make_jaxpr(feat)(x))


def test_the_cpu_context_swaps_in_the_matmul_kernel():
  model = _tiny_model()
  x = jnp.zeros((2, 32, 16, 3))
  with layers.convolution(cpu.convolution_for(jax.devices("cpu"))):
    tuned = str(jax.make_jaxpr(lambda x: model(x)["feat"])(x))
  plain = str(jax.make_jaxpr(lambda x: model(x)["feat"])(x))
  assert "custom_vjp" in tuned and "custom_vjp" not in plain
  # Off the CPU, the plain lax convolution is chosen.
  assert cpu.convolution_for(_fake_devices("gpu")) is jax.lax.conv_general_dilated


def test_replicated_state_is_saved_whole_from_one_cpu_device(tmp_path, monkeypatch):
  """On CPU, no replica-parallel slicing (an eager slice per device and array)."""
  seen = []
  real = replica_slices.get_replica_slices

  def spy(arr, replica_id, use_replica_parallel, *args, **kwargs):
    seen.append(use_replica_parallel)
    return real(arr, replica_id, use_replica_parallel, *args, **kwargs)

  monkeypatch.setattr(replica_slices, "get_replica_slices", spy)
  replicated = NamedSharding(sharding.make_mesh(), PartitionSpec())
  assert len(replicated.device_set) == 8
  state = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8), replicated)}
  manager = checkpointing.make_manager(str(tmp_path), keep_best=1)
  checkpointing.save(manager, 2, state, {"epoch": 1})
  checkpointing.wait_until_finished(manager)
  assert seen and not any(seen)
  restored, _ = checkpointing.restore(manager, 2, state)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert restored["w"].sharding == replicated


def test_a_users_array_handler_is_left_alone_by_checkpointing(tmp_path):
  original = ocp.type_handlers.get_type_handler(jax.Array)

  class Mine(ocp.type_handlers.ArrayHandler):
    pass

  mine = Mine()
  ocp.type_handlers.register_type_handler(jax.Array, mine, override=True)
  try:
    checkpointing.make_manager(str(tmp_path), keep_best=1)
    assert ocp.type_handlers.get_type_handler(jax.Array) is mine
  finally:
    ocp.type_handlers.register_type_handler(jax.Array, original, override=True)


@pytest.fixture
def default_array_handler():
  """Orbax's own jax.Array handler registered for the test; the previous one put back after."""
  previous = ocp.type_handlers.get_type_handler(jax.Array)
  default = ocp.type_handlers.ArrayHandler()
  ocp.type_handlers.register_type_handler(jax.Array, default, override=True)
  yield default
  ocp.type_handlers.register_type_handler(jax.Array, previous, override=True)


def test_replicas_are_saved_whole_on_the_cpu_only(default_array_handler):
  assert default_array_handler._use_replica_parallel  # Orbax's default: one piece per device
  for platforms in (("gpu",), ("tpu", "tpu"), ("cpu", "gpu"), ()):
    cpu.save_replicas_whole(_fake_devices(*platforms))
    assert ocp.type_handlers.get_type_handler(jax.Array) is default_array_handler, platforms
  cpu.save_replicas_whole(jax.devices())
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  assert type(handler) is ocp.type_handlers.ArrayHandler and not handler._use_replica_parallel
