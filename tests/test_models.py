"""The network: shapes, variants, BatchNorm semantics, attention blocks, init."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apnet_jax import build_model, compat
from apnet_jax.models import attention, layers
from apnet_jax.models.apnet import stage_sizes
from apnet_jax.models.summary import count_parameters
from configs.common import get_config


def small_config(**overrides):
  config = get_config().model
  config.depth, config.width, config.input_size = 18, 0.25, (64, 32)
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def images(n=4, size=(64, 32), seed=0):
  return jax.random.normal(jax.random.key(seed), (n, *size, 3))


def forward_backward(model, x):
  """The model's outputs (with stages) and the gradient of a loss on them."""

  def loss(model):
    out = model(x)
    return jnp.mean(out["logits"] ** 2) + jnp.mean(out["global_feat"] ** 2)

  return model(x, return_stages=True), nnx.grad(loss)(model)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["channel", "spatial"])
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_forward_backward_shapes(kind, level):
  # Shapes only (abstract evaluation: seconds, where compiling takes ~30 s a case).
  model = nnx.eval_shape(
    lambda: build_model(small_config(kind=kind, level=level), 7, rngs=nnx.Rngs(0))
  )
  out, grads = nnx.eval_shape(forward_backward, model, images())
  assert out["global_feat"].shape == out["feat"].shape == (4, 128)
  assert out["logits"].shape == (4, 7)
  expected = [(4, h, w, c) for (h, w), c in zip(stage_sizes((64, 32), 1), (16, 16, 32, 64, 128))]
  assert [s.shape for s in out["stages"]] == expected
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert [(p, g.shape) for p, g in nnx.to_flat_state(grads)] == [(p, v.shape) for p, v in params]
  assert any(p[0] == "pyramids" for p, _ in params) == (level > 0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["channel", "spatial"])
def test_every_parameter_of_the_deepest_pyramid_gets_a_gradient(kind):
  """Level 3 holds every kind of gate of levels 1 and 2: all are wired in."""
  model = build_model(small_config(kind=kind, level=3), 7, rngs=nnx.Rngs(0))
  _, grads = nnx.jit(forward_backward)(model, images())
  flat = nnx.to_flat_state(grads)
  assert all(bool(jnp.all(jnp.isfinite(g[...]))) for _, g in flat)
  pyramid = [(p, g) for p, g in flat if p[0] == "pyramids"]
  assert pyramid
  for path, g in pyramid:
    assert float(jnp.abs(g[...]).max()) > 0, path


def test_level_structure_matches_the_pyramid():
  model = build_model(small_config(level=3), 5, rngs=nnx.Rngs(0))
  for pyramid in model.pyramids:
    assert [s.radix for s in pyramid.splits] == [4, 2]  # finest first, then SE
    assert isinstance(pyramid.whole, attention.SEGate)
  model = build_model(small_config(level=3, kind="spatial"), 5, rngs=nnx.Rngs(0))
  assert [s.stripes for s in model.pyramids[0].splits] == [4, 2]
  assert model.pyramids[0].whole.stripes == 1


def test_spatial_rejects_maps_that_do_not_split():
  with pytest.raises(ValueError, match=r"APNet-S.*10x5.*\b4\b.*model\.input_size"):
    build_model(small_config(level=3, kind="spatial", input_size=(80, 40)), 5, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("depth", 42, "model.depth"),
    ("level", 4, "model.level"),
    ("kind", "temporal", "model.kind"),
    ("dtype", "float16", "model.dtype"),
  ],
)
def test_bad_config_is_named(field, value, message):
  with pytest.raises(ValueError, match=message):
    build_model(small_config(**{field: value}), 5, rngs=nnx.Rngs(0))


# torchvision's published parameter counts minus the ImageNet fc layer.
@pytest.mark.parametrize(
  "depth,expected",
  [
    (18, 11_689_512 - 513_000),
    (34, 21_797_672 - 513_000),
    (50, 25_557_032 - 2_049_000),
    (101, 44_549_160 - 2_049_000),
  ],
)
def test_backbone_sizes_equal_torchvision(depth, expected):
  from apnet_jax.models import ResNet

  backbone = nnx.eval_shape(lambda: ResNet(depth, rngs=nnx.Rngs(0)))
  assert count_parameters(backbone)["trainable"] == expected


# Jitted as the model runs in training and evaluation (and one compilation is
# several times cheaper on CPU than the eager forward's one per operation).
call = nnx.jit(lambda model, x: model(x))


def test_train_and_eval_batchnorm_modes():
  model = build_model(small_config(), 5, rngs=nnx.Rngs(0))
  x = images()
  before = np.asarray(model.backbone.bn1.mean[...])
  model.train()
  train_out = call(model, x)
  after = np.asarray(model.backbone.bn1.mean[...])
  assert not np.allclose(before, after)  # running stats move in training
  model.eval()
  eval_out = call(model, x)
  assert np.allclose(model.backbone.bn1.mean[...], after)  # and stay put in eval
  # Eval features of one image do not depend on the rest of the batch.
  single = call(model, x[:1])
  np.testing.assert_allclose(single["feat"], eval_out["feat"][:1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(train_out["feat"], eval_out["feat"])


def test_batchnorm_matches_pytorch_formulas():
  """Normalise with the biased variance, track the unbiased one, momentum 0.1."""
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(6, 5, 4, 3)).astype(np.float32)
  bn = layers.BatchNorm(3)
  scale, bias = np.array([1.0, 2.0, 0.5]), np.array([0.1, -0.2, 0.3])
  bn.scale[...] = jnp.asarray(scale, jnp.float32)
  bn.bias[...] = jnp.asarray(bias, jnp.float32)
  y = np.asarray(bn(jnp.asarray(x)))
  flat = x.reshape(-1, 3).astype(np.float64)
  mean, var = flat.mean(0), flat.var(0)
  expected = (x - mean) / np.sqrt(var + 1e-5) * scale + bias
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  bn.use_running_average = True
  expected = (x - np.asarray(bn.mean[...])) / np.sqrt(np.asarray(bn.var[...]) + 1e-5) * scale + bias
  np.testing.assert_allclose(bn(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_batchnorm_statistics_survive_a_large_mean():
  """The batch variance must not cancel when |mean| >> std (float32)."""
  rng = np.random.default_rng(3)
  x = rng.normal(1000.0, 1.0, size=(8, 6, 5, 3)).astype(np.float32)
  x[..., 1] -= 3000.0  # channels with different offsets
  bn = layers.BatchNorm(3)
  y = np.asarray(bn(jnp.asarray(x)))
  flat = x.reshape(-1, 3).astype(np.float64)
  # E[x^2] - E[x]^2 in float32 would be off by ~0.1 here (x^2 ~ 1e6, ulp 0.06).
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-4)
  expected = (x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
  np.testing.assert_allclose(y, expected, atol=2e-3)


def test_batchnorm_gradients_equal_the_two_pass_formula():
  """Autodiff through our BatchNorm equals the textbook formula's gradients."""
  rng = np.random.default_rng(4)
  with compat.enable_x64(True):
    x = jnp.asarray(rng.normal(2.0, 3.0, size=(4, 5, 6, 7)))
    w = jnp.asarray(rng.normal(size=(4, 5, 6, 7)))
    # The layer keeps float32 parameters: use float32-representable values.
    scale = jnp.asarray(rng.uniform(0.5, 2.0, 7).astype(np.float32), jnp.float64)
    bias = jnp.asarray(rng.normal(size=7).astype(np.float32), jnp.float64)

    def ours(x, scale, bias):
      bn = layers.BatchNorm(7)
      # Cast explicitly: JAX will refuse an implicit float64 -> float32 scatter.
      bn.scale[...], bn.bias[...] = scale.astype(jnp.float32), bias.astype(jnp.float32)
      return jnp.sum(jnp.sin(bn(x)) * w)

    def textbook(x, scale, bias):
      mean = x.mean(axis=(0, 1, 2))
      var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
      return jnp.sum(jnp.sin((x - mean) / jnp.sqrt(var + 1e-5) * scale + bias) * w)

    got = jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(textbook, argnums=(0, 1, 2))(x, scale, bias)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-12)
    # The parameter gradients pass through the float32 variables.
    for g, r in zip(got[1:], want[1:]):
      np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)


def test_sams_matches_a_numpy_reference():
  rng = np.random.default_rng(1)
  sams = attention.SAMS(8, 2, rngs=nnx.Rngs(0))
  sams.bn1.use_running_average = True
  x = rng.normal(size=(3, 4, 2, 8)).astype(np.float32)
  w1, b1 = np.asarray(sams.fc1.kernel[...]), np.asarray(sams.fc1.bias[...])
  w2, b2 = np.asarray(sams.fc2.kernel[...]), np.asarray(sams.fc2.bias[...])
  # PyTorch semantics: split channels into radix groups, sum, pool, MLP,
  # view (B, radix, C/radix), softmax over radix.
  pooled = (x[..., :4] + x[..., 4:]).mean(axis=(1, 2))
  hidden = np.maximum((pooled @ w1 + b1) / np.sqrt(1 + 1e-5), 0)
  logits = (hidden @ w2 + b2).reshape(3, 2, 4)
  att = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  got = sams.weights(jnp.asarray(x.mean(axis=(1, 2))))
  np.testing.assert_allclose(got, att, rtol=1e-5, atol=1e-6)


def test_se_gate_matches_a_numpy_reference():
  rng = np.random.default_rng(2)
  se = attention.SEGate(16, rngs=nnx.Rngs(0))
  assert se.fc1.kernel.shape == (16, 8)  # hidden width 8 at every stage
  x = rng.normal(size=(2, 3, 3, 16)).astype(np.float32)
  hidden = np.maximum(x.mean(axis=(1, 2)) @ np.asarray(se.fc1.kernel[...]), 0)
  gate = 1 / (1 + np.exp(-(hidden @ np.asarray(se.fc2.kernel[...]))))
  got = se.weights(jnp.asarray(x.mean(axis=(1, 2))))
  np.testing.assert_allclose(got, gate, rtol=1e-5, atol=1e-6)


def _composed_channel_pyramid(pyramid, x):
  """APNet-C's pyramid as the official code composes it, written out in jnp.

  Each step on the whole map: split the channels, weigh the groups, BatchNorm
  over (B, H, W) (biased variance; running statistics updated with the
  unbiased one), then the SE gate. Returns the map, the weights and the new
  running statistics, to compare with `AttentionPyramid`'s affine form.
  """

  def dense(layer, v):
    out = v @ layer.kernel[...]
    return out + layer.bias[...] if layer.bias is not None else out

  def batch_norm(bn, v, axes):
    if not bn.use_running_average:
      mean, var = v.mean(axis=axes), v.var(axis=axes)
      n = v.size // v.shape[-1]
      stats = (0.9 * bn.mean[...] + 0.1 * mean, 0.9 * bn.var[...] + 0.1 * var * n / (n - 1))
    else:
      mean, var = bn.mean[...], bn.var[...]
      stats = (mean, var)
    return (v - mean) / jnp.sqrt(var + 1e-5) * bn.scale[...] + bn.bias[...], stats

  weights, stats = [], []
  for sams, bn in zip(pyramid.splits, pyramid.split_bns):
    groups = jnp.split(x, sams.radix, axis=-1)
    hidden, _ = batch_norm(sams.bn1, dense(sams.fc1, sum(groups).mean(axis=(1, 2))), 0)
    logits = dense(sams.fc2, jax.nn.relu(hidden)).reshape(len(x), sams.radix, -1)
    att = jax.nn.softmax(logits, axis=1)
    x = jnp.concatenate([g * att[:, j, None, None] for j, g in enumerate(groups)], -1)
    x, bn_stats = batch_norm(bn, x, (0, 1, 2))
    weights.append(att)
    stats.append(bn_stats)
  se = pyramid.whole
  gate = jax.nn.sigmoid(jax.nn.relu(x.mean(axis=(1, 2)) @ se.fc1.kernel[...]) @ se.fc2.kernel[...])
  return x * gate[:, None, None], weights + [gate], stats


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_channel_pyramid_equals_the_official_composition(level, training):
  """The affine form of APNet-C's pyramid: same map, weights, statistics, gradients."""
  with compat.enable_x64(True):
    pyramid = attention.AttentionPyramid(8, level, "channel", (6, 4), rngs=nnx.Rngs(3))
    rng = np.random.default_rng(level)
    for bn in pyramid.split_bns:  # away from the initial values
      compat.set_value(bn.mean, jnp.asarray(rng.normal(size=8)))
      compat.set_value(bn.var, jnp.asarray(rng.uniform(0.5, 2, size=8)))
      compat.set_value(bn.scale, jnp.asarray(rng.uniform(0.5, 2, size=8)))
    pyramid.set_attributes(use_running_average=not training, raise_if_not_found=False)
    for sams in pyramid.splits:
      sams.bn1.use_running_average = True  # a BatchNorm of B pooled vectors, not under test
    graphdef, params, rest = nnx.split(pyramid, nnx.Param, ...)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    rest = jax.tree.map(lambda p: p.astype(jnp.float64), rest)
    # Post-ReLU-like activations whose channel means are far from zero.
    x = jnp.asarray(np.abs(rng.normal(3.0, 2.0, size=(5, 6, 4, 8))))

    def ours(module, x):
      out, weights = module(x, return_weights=True)
      return out, weights, [(bn.mean[...], bn.var[...]) for bn in module.split_bns]

    def loss(fn, params, x):
      out, weights, stats = fn(nnx.merge(graphdef, params, rest, copy=True), x)
      value = jnp.sum(jnp.sin(out)) + sum(jnp.sum(jnp.cos(w)) for w in weights)
      return value, (out, weights, stats)

    # Jitted: eagerly, every small op of both forms would compile on its own.
    got_grads, (got, got_w, got_stats) = jax.jit(
      jax.grad(functools.partial(loss, ours), argnums=(0, 1), has_aux=True)
    )(params, x)
    want_grads, (want, want_w, want_stats) = jax.jit(
      jax.grad(functools.partial(loss, _composed_channel_pyramid), argnums=(0, 1), has_aux=True)
    )(params, x)

    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert len(got_w) == len(want_w) == level
    for g, w in zip(got_w, want_w):
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    assert len(got_stats) == len(want_stats) == level - 1
    for (gm, gv), (wm, wv) in zip(got_stats, want_stats):
      np.testing.assert_allclose(gm, wm, rtol=1e-10)
      np.testing.assert_allclose(gv, wv, rtol=1e-10)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-10)
    assert float(jnp.abs(got_grads[1]).max()) > 0


def test_channel_pyramid_keeps_float32_precision_under_a_large_mean():
  """The batch variance from per-image moments must not cancel when |mean| >> std."""

  def build():
    pyramid = attention.AttentionPyramid(8, 3, "channel", (6, 4), rngs=nnx.Rngs(4))
    # Attention that ignores its input (zero last layers): the weights are then
    # the same in float32 and float64, and only the statistics are compared.
    for gate in (*pyramid.splits, pyramid.whole):
      compat.set_value(gate.fc2.kernel, jnp.zeros_like(gate.fc2.kernel[...]))
    return pyramid

  rng = np.random.default_rng(4)
  x = rng.normal(1000.0, 1.0, size=(5, 6, 4, 8))
  x[..., 1::2] -= 3000.0  # channels with different offsets
  pyramid = build()
  got = nnx.jit(lambda m, x: m(x))(pyramid, jnp.asarray(x, jnp.float32))
  got_var = [np.asarray(bn.var[...]) for bn in pyramid.split_bns]
  with compat.enable_x64(True):
    graphdef, state = nnx.split(build())
    reference = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(jnp.float64), state))
    want, _, want_stats = _composed_channel_pyramid(reference, jnp.asarray(x))
  # E[x^2] - E[x]^2 in float32 would be off by ~0.06 here (x^2 ~ 1e7, ulp ~1).
  np.testing.assert_allclose(got, want, atol=2e-3)
  for g, (_, w) in zip(got_var, want_stats):
    np.testing.assert_allclose(g, w, rtol=1e-5)


def test_batchnorm_normalizer_needs_the_batch_moments_in_training():
  bn = layers.BatchNorm(3)
  with pytest.raises(ValueError, match="BatchNorm"):
    bn.normalizer()
  bn.use_running_average = True
  mean, mul = bn.normalizer()
  np.testing.assert_allclose(mean, 0.0)
  np.testing.assert_allclose(mul, 1 / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_training_on_one_image_is_refused():
  # One value per channel (the SAMS BatchNorms and the BNNeck see one pooled
  # row per image): the batch variance is 0 and every output would be the bias.
  model = build_model(small_config(level=2), 10, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"BatchNorm.*\b1\b.*model\.eval\(\)"):
    model(images(1))
  bn = layers.BatchNorm(3)
  with pytest.raises(ValueError, match=r"BatchNorm.*\b1\b"):
    bn(jnp.ones((1, 3)))
  assert bn(jnp.ones((2, 3))).shape == (2, 3)
  model.eval()  # running statistics: one image is fine
  assert model(images(1))["feat"].shape == (1, 128)


def test_stripe_attention_attends_each_stripe_on_its_own():
  rng = np.random.default_rng(3)
  stripes = attention.StripeAttention(8, 8, 4, 2, rngs=nnx.Rngs(0))
  stripes.set_attributes(use_running_average=True)
  x = rng.normal(size=(2, 8, 4, 8)).astype(np.float32)
  gate = np.asarray(stripes.weights(jnp.asarray(x)))
  top = np.asarray(stripes.rga.weights(jnp.asarray(x[:, :4])))
  bottom = np.asarray(stripes.rga.weights(jnp.asarray(x[:, 4:])))
  np.testing.assert_allclose(gate, np.concatenate([top, bottom], axis=1), rtol=1e-5, atol=1e-6)
  # Changing the bottom stripe leaves the top stripe's attention unchanged.
  x2 = x.copy()
  x2[:, 4:] = rng.normal(size=x2[:, 4:].shape)
  np.testing.assert_allclose(
    np.asarray(stripes.weights(jnp.asarray(x2)))[:, :4], gate[:, :4], rtol=1e-5, atol=1e-6
  )


def test_stem_relu_switch():
  x = images(2)
  plain = build_model(small_config(level=0), 5, rngs=nnx.Rngs(0))
  relu = build_model(small_config(level=0, stem_relu=True), 5, rngs=nnx.Rngs(0))
  plain.eval(), relu.eval()
  stem = plain.backbone.stage(0, x)
  assert float(stem.min()) < 0  # the official stem lets negatives through
  assert float(relu.backbone.stage(0, x).min()) >= 0


def test_initialisation_follows_the_official_code():
  model = build_model(get_config().model, 751, rngs=nnx.Rngs(0))
  kernel = np.asarray(model.backbone.layer3[0].conv2.kernel[...])  # 3x3, 256 -> 256
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (9 * 256)), rtol=0.05)
  np.testing.assert_allclose(np.asarray(model.classifier.kernel[...]).std(), 0.001, rtol=0.05)
  assert np.all(model.bottleneck.scale[...] == 1) and np.all(model.bottleneck.bias[...] == 0)
  fc1 = np.asarray(model.pyramids[2].splits[0].fc1.kernel[...])  # PyTorch default init
  assert np.abs(fc1).max() <= 1 / np.sqrt(fc1.shape[0])
  np.testing.assert_allclose(fc1.std(), 1 / np.sqrt(3 * fc1.shape[0]), rtol=0.05)


@pytest.mark.slow
def test_initialisers_draw_on_the_host_from_the_key():
  """Values are a function of the key alone, jitted or not, and cost no program per shape."""
  shape = (3, 3, 8, 16)
  first = layers.kaiming_fan_out(jax.random.key(1), shape)
  assert first.dtype == jnp.float32 and first.shape == shape
  np.testing.assert_array_equal(layers.kaiming_fan_out(jax.random.key(1), shape), first)
  assert not np.array_equal(layers.kaiming_fan_out(jax.random.key(2), shape), first)
  np.testing.assert_array_equal(
    jax.jit(lambda key: layers.kaiming_fan_out(key, shape))(jax.random.key(1)), first
  )
  np.testing.assert_array_equal(layers.kaiming_fan_out(jax.random.PRNGKey(1), shape), first)
  keys = jax.random.split(jax.random.key(4), 2)
  np.testing.assert_array_equal(
    jax.vmap(lambda key: layers.kaiming_fan_out(key, shape))(keys),
    np.stack([layers.kaiming_fan_out(key, shape) for key in keys]),
  )

  # A whole model, at a width no other test builds (every shape is new here).
  config = small_config(level=2, kind="channel", width=0.375)
  lowered = []

  def count(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      lowered.append(event)

  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    eager = build_model(config, 7, rngs=nnx.Rngs(3))
  finally:
    compat.unregister_event_duration_listener(count)
  # A few key derivations at most; drawing with jax.random lowered ~100 programs.
  assert len(lowered) <= 5, len(lowered)
  jitted = nnx.jit(lambda: build_model(config, 7, rngs=nnx.Rngs(3)))()
  flat_eager, flat_jitted = (
    nnx.to_flat_state(nnx.state(eager)),
    nnx.to_flat_state(nnx.state(jitted)),
  )
  assert [p for p, _ in flat_eager] == [p for p, _ in flat_jitted]
  for (path, a), (_, b) in zip(flat_eager, flat_jitted):
    np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def test_bfloat16_compute_keeps_float32_parameters():
  model = build_model(small_config(dtype="bfloat16"), 5, rngs=nnx.Rngs(0))
  model.eval()
  out = nnx.jit(lambda model, x: model(x, return_stages=True))(model, images(2))
  assert out["stages"][2].dtype == jnp.bfloat16
  assert out["feat"].dtype == out["logits"].dtype == jnp.float32
  leaves = jax.tree.leaves(nnx.state(model))
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  reference = build_model(small_config(), 5, rngs=nnx.Rngs(0))
  reference.eval()
  expected = np.asarray(call(reference, images(2))["feat"])
  assert rel_l2(out["feat"], expected) < 0.05  # bfloat16 keeps ~3 significant digits


def rel_l2(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def test_frozen_biases_are_not_parameters():
  model = build_model(small_config(level=2), 5, rngs=nnx.Rngs(0))
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  frozen = nnx.to_flat_state(nnx.state(model, layers.FrozenBias))
  assert ("bottleneck", "bias") in [p for p, _ in frozen]
  assert ("bottleneck", "bias") not in [p for p, _ in params]
  assert len(frozen) == 1 + 5  # BNNeck + the BatchNorm after each SAMS
