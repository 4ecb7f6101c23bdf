"""Tests of the P x K RandomIdentitySampler."""

import collections

import numpy as np
import pytest

from apnet_jax.data import sampler as sampler_lib
from apnet_jax.data.sampler import RandomIdentitySampler

P, K = 3, 4

# Unbalanced ids: 1, 2 and 3 images (< K, sampled with replacement), exactly
# K, and several with more (9 leaves a partial group of 1 that is dropped).
IMAGES_PER_ID = {0: 1, 1: 2, 2: 3, 3: 4, 4: 9, 5: 12, 6: 5, 7: 17}


def _labels(images_per_id=IMAGES_PER_ID, seed=0):
  labels = np.concatenate([np.full(n, label) for label, n in images_per_id.items()])
  # Records of an id are not contiguous in real sources: shuffle them.
  return np.random.default_rng(seed).permutation(labels)


def _reference_steps_per_epoch(labels, p, k):
  """sum over ids of max(n, K) - max(n, K) % K, in batches of P * K."""
  images = 0
  for n in collections.Counter(labels.tolist()).values():
    m = max(n, k)
    images += m - m % k
  return images // (p * k)


def test_batches_hold_p_distinct_ids_times_k_images():
  labels = _labels()
  s = RandomIdentitySampler(labels, p=P, k=K, seed=1)
  for epoch in range(3):
    plan = s.epoch_plan(epoch)
    assert plan.shape == (s.steps_per_epoch, P * K)
    for batch in plan:
      groups = labels[batch].reshape(P, K)
      # K consecutive images of one id, P different ids.
      assert (groups == groups[:, :1]).all(), groups
      assert len(set(groups[:, 0].tolist())) == P


def test_ids_with_fewer_than_k_images_are_sampled_with_replacement():
  labels = _labels()
  s = RandomIdentitySampler(labels, p=P, k=K, seed=2)
  seen = collections.defaultdict(list)
  for epoch in range(20):
    for batch in s.epoch_plan(epoch):
      for group in batch.reshape(P, K):
        seen[int(labels[group[0]])].append(group)
  for label, n in IMAGES_PER_ID.items():
    own = set(np.flatnonzero(labels == label).tolist())
    groups = seen[label]
    assert groups, f"id {label} never sampled in 20 epochs"
    for group in groups:
      assert set(group.tolist()) <= own
      if n >= K:  # Without replacement inside a group.
        assert len(set(group.tolist())) == K
    if n < K:  # K indices from n < K images: repeats are unavoidable.
      assert all(len(set(g.tolist())) <= n for g in groups)
      used = set(np.concatenate(groups).tolist())
      assert used == own  # Every image of the id gets drawn eventually.


def test_steps_per_epoch_is_the_official_constructor_length():
  labels = _labels()
  expected = _reference_steps_per_epoch(labels, P, K)
  # 1 + 1 + 1 + 1 + 2 + 3 + 1 + 4 = 14 groups of K -> 4 batches of P.
  assert expected == 4
  assert sampler_lib.steps_per_epoch(labels, p=P, k=K) == expected
  assert RandomIdentitySampler(labels, p=P, k=K, seed=0).steps_per_epoch == 4
  big = _labels({i: 1 + (7 * i) % 23 for i in range(40)})
  assert sampler_lib.steps_per_epoch(big, p=5, k=4) == (_reference_steps_per_epoch(big, 5, 4))


def test_one_official_pass_follows_the_reference_rules():
  labels = _labels()
  s = RandomIdentitySampler(labels, p=P, k=K, seed=3)
  for pass_index in range(10):
    batches = s._one_pass(epoch=0, pass_index=pass_index)
    groups_used = collections.Counter()
    images_used = collections.defaultdict(list)
    for batch in batches:
      for group in batch.reshape(P, K):
        label = int(labels[group[0]])
        groups_used[label] += 1
        images_used[label].extend(group.tolist())
    groups_available = {label: max(n, K) // K for label, n in IMAGES_PER_ID.items()}
    for label, n in IMAGES_PER_ID.items():
      assert groups_used[label] <= groups_available[label]
      if n >= K:  # Disjoint groups: each image at most once per pass.
        assert len(set(images_used[label])) == len(images_used[label])
    # The pass stops exactly when fewer than P ids have groups left.
    left = [label for label in IMAGES_PER_ID if groups_used[label] < groups_available[label]]
    assert len(left) < P


def test_epoch_is_a_permutation_when_every_id_has_exactly_k_images():
  # 12 ids x K images with P | 12: one official pass uses every record once.
  labels = _labels({i: K for i in range(12)})
  s = RandomIdentitySampler(labels, p=P, k=K, seed=4)
  assert s.steps_per_epoch == 4
  for epoch in range(3):
    plan = s.epoch_plan(epoch)
    np.testing.assert_array_equal(np.sort(plan.ravel()), np.arange(48))


def test_short_official_pass_is_topped_up_to_the_epoch_length():
  # One id with many images starves the pass: it ends after 2 batches
  # (only the big id has groups left), but the epoch has 30 // 3 = 10 steps.
  labels = _labels({0: 100, 1: 4, 2: 4, 3: 4, 4: 4, 5: 4, 6: 4})
  s = RandomIdentitySampler(labels, p=P, k=K, seed=5)
  assert s.steps_per_epoch == (25 + 6) // P
  first_pass = s._one_pass(epoch=0, pass_index=0)
  assert len(first_pass) < s.steps_per_epoch
  plan = s.epoch_plan(0)
  assert plan.shape == (s.steps_per_epoch, P * K)
  # The epoch starts with the official pass; later batches come from
  # fresh passes with the same rules.
  np.testing.assert_array_equal(plan[: len(first_pass)], first_pass)
  for batch in plan:
    groups = labels[batch].reshape(P, K)
    assert len(set(groups[:, 0].tolist())) == P


def test_deterministic_per_seed_and_order_independent():
  labels = _labels()
  a = RandomIdentitySampler(labels, p=P, k=K, seed=7)
  b = RandomIdentitySampler(labels, p=P, k=K, seed=7)
  c = RandomIdentitySampler(labels, p=P, k=K, seed=8)
  spe = a.steps_per_epoch
  steps = range(3 * spe)
  in_order = np.stack([a.batch(s) for s in steps])
  # b is asked in a scrambled order: a batch depends on (seed, step) only.
  scrambled = np.random.default_rng(0).permutation(len(steps))
  from_b = {int(s): b.batch(int(s)) for s in scrambled}
  np.testing.assert_array_equal(in_order, np.stack([from_b[s] for s in steps]))
  np.testing.assert_array_equal(in_order[:spe], a.epoch_plan(0))
  other_seed = np.stack([c.batch(s) for s in steps])
  assert not np.array_equal(in_order, other_seed)
  assert not np.array_equal(a.epoch_plan(0), a.epoch_plan(1))


def test_plans_are_read_only():
  s = RandomIdentitySampler(_labels(), p=P, k=K, seed=0)
  with pytest.raises(ValueError):
    s.epoch_plan(0)[0, 0] = 5


@pytest.mark.parametrize(
  "labels, p, k, match",
  [
    (np.array([0, 0, 1, 1, 2]), 5, 2, r"p=5.*\b3\b"),
    (np.array([], np.int64), 1, 1, r"p=1.*\b0\b"),
    (np.array([0, 1, 2]), 0, 2, r"\bp\b.*\b0\b"),
    (np.array([0, 1, 2]), 2, 0, r"\bk\b.*\b0\b"),
    (np.array([0, 1, 2]), 2.0, 2, r"\bp\b.*2\.0"),
    (np.array([0, -1, 2]), 2, 2, r"record 1\b.*-1"),
    (np.array([[0, 1]]), 1, 1, r"labels.*\(1, 2\)"),
    (np.array([0.0, 1.0]), 1, 1, r"labels.*float64"),
  ],
)
def test_invalid_arguments_raise_clear_errors(labels, p, k, match):
  with pytest.raises(ValueError, match=match):
    RandomIdentitySampler(labels, p=p, k=k, seed=0)


def test_negative_step_or_epoch_is_rejected():
  s = RandomIdentitySampler(_labels(), p=P, k=K, seed=0)
  with pytest.raises(ValueError, match=r"\bstep\b.*-1"):
    s.batch(-1)
  with pytest.raises(ValueError, match=r"\bepoch\b.*-2"):
    s.epoch_plan(-2)
