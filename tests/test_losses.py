"""Losses against plain numpy references written out with loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from apnet_jax import losses


def np_log_softmax(row):
  m = max(row)
  lse = m + np.log(sum(np.exp(v - m) for v in row))
  return [v - lse for v in row]


def np_smoothed_ce(logits, labels, num_classes, epsilon):
  """(1/B) sum_i sum_c -t_ic log p_ic with t = (1-eps) one_hot + eps/K."""
  total = 0.0
  for row, label in zip(np.asarray(logits, np.float64), labels):
    logp = np_log_softmax(row)
    for c in range(num_classes):
      target = (1 - epsilon) * (c == label) + epsilon / num_classes
      total += -target * logp[c]
  return total / len(labels)


def np_batch_hard(features, labels, margin):
  """Per anchor: farthest same-label sample (itself included), nearest other-label one."""
  x = np.asarray(features, np.float64)
  n = len(labels)
  dist_ap, dist_an, terms = [], [], []
  for i in range(n):
    ap, an = -np.inf, np.inf
    for j in range(n):
      d = np.sqrt(max(np.sum((x[i] - x[j]) ** 2), 1e-12))
      if labels[j] == labels[i]:
        ap = max(ap, d)
      else:
        an = min(an, d)
    dist_ap.append(ap)
    dist_an.append(an)
    terms.append(max(ap - an + margin, 0.0))
  return float(np.mean(terms)), np.array(dist_ap), np.array(dist_an)


def test_smoothed_ce_matches_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (6, 5)).astype(np.float32)
  labels = np.array([0, 4, 2, 2, 1, 3])
  for eps in (0.1, 0.3):
    got = losses.cross_entropy_label_smooth(jnp.asarray(logits), jnp.asarray(labels), 5, eps)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_smoothed_ce(logits, labels, 5, eps), rtol=1e-6)


def test_smoothed_ce_with_zero_epsilon_is_standard_ce():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2, (4, 7)).astype(np.float32)
  labels = np.array([6, 0, 3, 3])
  expected = np.mean(
    [-np_log_softmax(row)[lab] for row, lab in zip(logits.astype(np.float64), labels)]
  )
  got = losses.cross_entropy_label_smooth(jnp.asarray(logits), jnp.asarray(labels), 7, 0.0)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_smoothed_ce_uses_the_real_number_of_classes():
  # Uniform logits: log p = -log K for every class, so the loss is log K
  # whatever epsilon, only if the smoothing spreads eps over the K real classes.
  logits = jnp.zeros((3, 10))
  got = losses.cross_entropy_label_smooth(logits, jnp.array([1, 2, 3]), 10, 0.1)
  np.testing.assert_allclose(got, np.log(10), rtol=1e-6)


def test_smoothed_ce_runs_in_float32_for_bfloat16_logits():
  logits = jnp.asarray(np.random.default_rng(2).normal(0, 2, (4, 3)), jnp.bfloat16)
  labels = np.array([0, 1, 2, 1])
  got = losses.cross_entropy_label_smooth(logits, jnp.asarray(labels), 3, 0.1)
  assert got.dtype == jnp.float32
  expected = np_smoothed_ce(np.asarray(logits.astype(jnp.float32)), labels, 3, 0.1)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_smoothed_ce_rejects_bad_input():
  with pytest.raises(ValueError, match=r"num_classes=5.*\b4\b"):
    losses.cross_entropy_label_smooth(jnp.zeros((2, 4)), jnp.array([0, 1]), 5)
  with pytest.raises(ValueError, match="labels"):
    losses.cross_entropy_label_smooth(jnp.zeros((2, 4)), jnp.array([0, 1, 2]), 4)
  with pytest.raises(ValueError, match="epsilon"):
    losses.cross_entropy_label_smooth(jnp.zeros((2, 4)), jnp.array([0, 1]), 4, 1.5)


def test_triplet_planted_structure():
  # 1-D features: id 0 at 0 and 1, id 1 at 3 and 5. By hand:
  # anchor 0: ap 1, an 3; anchor 1: ap 1, an 2; anchor 3: ap 2, an 2 (0.3);
  # anchor 5: ap 2, an 4.  loss = 0.3 / 4.
  features = jnp.array([[0.0], [1.0], [3.0], [5.0]])
  labels = jnp.array([0, 0, 1, 1])
  loss, dist_ap, dist_an = losses.triplet_loss_batch_hard(features, labels, margin=0.3)
  np.testing.assert_allclose(dist_ap, [1, 1, 2, 2], rtol=1e-6)
  np.testing.assert_allclose(dist_an, [3, 2, 2, 4], rtol=1e-6)
  np.testing.assert_allclose(loss, 0.075, rtol=1e-6)


def test_triplet_matches_reference_on_random_pk_batch():
  rng = np.random.default_rng(3)
  labels = np.repeat(np.array([5, 2, 9, 0]), 3)
  rng.shuffle(labels)
  features = rng.normal(0, 1, (12, 16)).astype(np.float32)
  for margin in (0.3, 2.0):
    loss, dist_ap, dist_an = losses.triplet_loss_batch_hard(
      jnp.asarray(features), jnp.asarray(labels), margin
    )
    ref_loss, ref_ap, ref_an = np_batch_hard(features, labels, margin)
    np.testing.assert_allclose(dist_ap, ref_ap, rtol=1e-5)
    np.testing.assert_allclose(dist_an, ref_an, rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert ref_loss > 0  # The test exercises active triplets.


def test_triplet_anchor_alone_in_its_identity_is_its_own_positive():
  # The official mining keeps the anchor among its positives at the clamped
  # distance sqrt(1e-12) = 1e-6 (integer features make |x|^2 - 2x.x + |x|^2 exact).
  features = jnp.array([[1.0, 2.0], [3.0, 2.0], [3.0, 0.0]])
  labels = jnp.array([0, 1, 1])
  loss, dist_ap, dist_an = losses.triplet_loss_batch_hard(features, labels, margin=0.3)
  np.testing.assert_allclose(dist_ap, [1e-6, 2.0, 2.0], rtol=1e-5)
  np.testing.assert_allclose(dist_an, [2.0, 2.0, np.sqrt(8.0)], rtol=1e-6)
  # Terms: relu(1e-6 - 2 + .3) = 0, relu(2 - 2 + .3) = .3, relu(2 - 2.83 + .3) = 0.
  np.testing.assert_allclose(loss, 0.3 / 3, rtol=1e-6)


def test_triplet_single_identity_batch_has_no_negative():
  features = jnp.array([[0.0, 1.0], [2.0, 1.0]])
  labels = jnp.array([4, 4])
  loss, dist_ap, dist_an = losses.triplet_loss_batch_hard(features, labels)
  assert float(loss) == 0.0
  assert np.all(np.isinf(dist_an))
  grad = jax.grad(lambda f: losses.triplet_loss_batch_hard(f, labels)[0])(features)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("labels", [[0, 0, 1, 1], [0, 1, 1, 0]])
def test_triplet_gradient_finite_for_identical_features(labels):
  # Rows 0 and 1 coincide: a distance at the sqrt clamp, as a positive
  # ([0, 0, 1, 1]) or as the hardest negative ([0, 1, 1, 0]).
  features = jnp.array([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5], [0.0, 1.0, 1.0], [2.0, 0.0, 1.0]])
  labels = jnp.asarray(labels)

  def loss_fn(f):
    return losses.triplet_loss_batch_hard(f, labels, margin=0.3)[0]

  loss, grad = jax.value_and_grad(loss_fn)(features)
  assert np.isfinite(loss) and float(loss) > 0
  assert np.all(np.isfinite(grad))
  assert np.any(grad != 0)


def test_triplet_runs_in_float32_for_bfloat16_features():
  rng = np.random.default_rng(4)
  features = jnp.asarray(rng.normal(0, 1, (8, 4)), jnp.bfloat16)
  labels = np.repeat(np.arange(4), 2)
  loss, dist_ap, dist_an = losses.triplet_loss_batch_hard(features, jnp.asarray(labels), 1.0)
  assert loss.dtype == dist_ap.dtype == dist_an.dtype == jnp.float32
  ref_loss, ref_ap, _ = np_batch_hard(np.asarray(features.astype(jnp.float32)), labels, 1.0)
  np.testing.assert_allclose(dist_ap, ref_ap, rtol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_triplet_on_a_batch_sharded_over_8_devices(axis_type):
  # The distance matrix and the mining must see the whole global batch.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  rng = np.random.default_rng(5)
  labels = np.repeat(np.arange(4), 4)
  features = rng.normal(0, 1, (16, 8)).astype(np.float32)
  out = jax.jit(lambda f, label: losses.triplet_loss_batch_hard(f, label, 0.5))(
    jax.device_put(features, sharding), jax.device_put(labels, sharding)
  )
  ref_loss, ref_ap, ref_an = np_batch_hard(features, labels, 0.5)
  np.testing.assert_allclose(out[0], ref_loss, rtol=1e-5)
  np.testing.assert_allclose(out[1], ref_ap, rtol=1e-5)
  np.testing.assert_allclose(out[2], ref_an, rtol=1e-5)


def test_triplet_rejects_bad_shapes():
  with pytest.raises(ValueError, match="features"):
    losses.triplet_loss_batch_hard(jnp.zeros((4,)), jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="labels"):
    losses.triplet_loss_batch_hard(jnp.zeros((4, 2)), jnp.zeros((3,), jnp.int32))


def test_total_loss_is_ce_plus_triplet_with_unit_weights():
  rng = np.random.default_rng(6)
  labels = np.array([0, 0, 1, 1, 2, 2])
  logits = rng.normal(0, 1, (6, 3)).astype(np.float32)
  logits[0, 0] = logits[2, 1] = logits[5, 2] = 10.0  # Rows 0, 2, 5 classified right.
  logits[1, 0] = logits[3, 1] = logits[4, 2] = -10.0
  logits[1, 2] = logits[3, 0] = logits[4, 0] = 10.0  # Rows 1, 3, 4 wrong.
  global_feat = rng.normal(0, 1, (6, 5)).astype(np.float32)
  outputs = {
    "logits": jnp.asarray(logits),
    "global_feat": jnp.asarray(global_feat),
    "feat": jnp.zeros((6, 5)),
  }
  loss, aux = losses.total_loss(
    outputs, jnp.asarray(labels), num_classes=3, margin=0.3, epsilon=0.1
  )
  ce = np_smoothed_ce(logits, labels, 3, 0.1)
  triplet, ap, an = np_batch_hard(global_feat, labels, 0.3)
  np.testing.assert_allclose(aux["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(aux["triplet"], triplet, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + triplet, rtol=1e-5)
  np.testing.assert_allclose(aux["acc"], 0.5)
  np.testing.assert_allclose(aux["dist_ap"], ap.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["dist_an"], an.mean(), rtol=1e-5)


def test_total_loss_names_a_missing_output():
  with pytest.raises(KeyError, match="global_feat"):
    losses.total_loss(
      {"logits": jnp.zeros((2, 2))}, jnp.array([0, 1]), num_classes=2, margin=0.3, epsilon=0.1
    )
