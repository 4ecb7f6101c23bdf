"""Identity-balanced P x K batch sampling (RandomIdentitySampler semantics).

Re-ID training with a triplet loss needs every batch to hold P distinct
identities with K images each. This module reproduces the sampling procedure
of the official APNet / reid-strong-baseline ``RandomIdentitySampler`` as a
*pure function of (seed, step)*: the batch at global step ``s`` is
``sampler.batch(s)`` no matter what was drawn before, which makes an input
pipeline built on it resumable exactly from nothing but its position.

One pass of the procedure (the official ``__iter__``):

1. For every identity, shuffle its record indices; an identity with fewer
   than K images instead draws K indices with replacement.
2. Cut each identity's indices into groups of K; a trailing incomplete group
   is dropped.
3. While at least P identities still have groups, choose P of them uniformly
   without replacement and emit the next group of each (one batch).

Epoch length. The official sampler's constructor computes
``len(sampler) = sum over ids of m - m % K`` with ``m = max(n_id, K)``, i.e.
K times the number of groups G, and its DataLoader reports
``ceil(len / (P*K))`` iterations. A pass of step 3 however stops as soon as
fewer than P identities have groups left, so it emits a *random* number of
batches, at most ``floor(G / P)`` and usually a few fewer because ids with
many images are left over (140-141 instead of 143 batches in a simulation
with a Market-like id distribution). Here every epoch has exactly
``steps_per_epoch = floor(G / P)`` batches, the constructor's length in whole
batches: the epoch starts with one official pass and, when that pass runs
dry early, is topped up with batches from a fresh, independently shuffled
pass. A fixed epoch length keeps step -> epoch arithmetic (LR schedules,
checkpoints, resumption) trivial; the price is that an epoch sees a few more
batches than an official epoch does, each drawn by the same rules.

Random numbers come from numpy ``Generator(PCG64)`` seeded with
``(seed, epoch, pass)``. numpy does not promise identical ``Generator``
streams across its versions, so exact replay of a run assumes the same numpy.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["RandomIdentitySampler", "steps_per_epoch"]


def _index_by_label(
  labels: npt.ArrayLike,
) -> tuple[np.ndarray, list[np.ndarray]]:
  """Groups record indices by train label.

  Args:
    labels: One train label per record.

  Returns:
    The sorted distinct labels and, for each, the ascending record indices.

  Raises:
    ValueError: If labels are not a 1-D integer array or contain negatives.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      "labels must be a 1-D integer array with one train label per record; "
      f"got shape {labels.shape} and dtype {labels.dtype}."
    )
  if labels.size and labels.min() < 0:
    bad = int(np.flatnonzero(labels < 0)[0])
    raise ValueError(
      f"labels must be >= 0 (train labels); record {bad} has label "
      f"{int(labels[bad])}. Only the train split can be P x K sampled."
    )
  order = np.argsort(labels, kind="stable")
  ids, starts = np.unique(labels[order], return_index=True)
  return ids, np.split(order, starts[1:]) if ids.size else []


def check_int(name: str, value: object, minimum: int) -> None:
  """Raises ValueError unless ``value`` is an int >= ``minimum``.

  Shared by the input pipeline's argument checks (hence not private).
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def _num_groups(image_counts: np.ndarray, k: int) -> int:
  """Number of K-groups one pass forms (the official constructor's len / K)."""
  return int(np.sum(np.maximum(image_counts, k) // k))


def steps_per_epoch(labels: npt.ArrayLike, *, p: int, k: int) -> int:
  """Returns the number of P x K batches in one epoch.

  This is the official sampler's constructor length in whole batches,
  ``floor(sum_id (max(n_id, K) // K) / P)``; see the module docstring for how
  it relates to what an official epoch actually emits.

  Args:
    labels: The train label of every record.
    p: Identities per batch.
    k: Images per identity.

  Raises:
    ValueError: For invalid P/K or labels, or fewer than P identities.
  """
  return RandomIdentitySampler(labels, p=p, k=k, seed=0).steps_per_epoch


class RandomIdentitySampler:
  """P x K batch plans as a pure function of (seed, step).

  Attributes:
    p: Identities per batch.
    k: Images per identity.
    batch_size: ``p * k``.
    num_ids: Identities with at least one image.
    steps_per_epoch: Batches per epoch (see the module docstring).
  """

  def __init__(self, labels: npt.ArrayLike, *, p: int, k: int, seed: int):
    """Builds the sampler.

    Args:
      labels: The train label of every record (record ``i`` has
        ``labels[i]``); contiguous or not, but non-negative.
      p: Identities per batch.
      k: Images per identity.
      seed: Seed of the whole run; batches depend only on (seed, step).

    Raises:
      ValueError: For invalid P/K or labels, or fewer than P identities.
    """
    check_int("p", p, 1)
    check_int("k", k, 1)
    check_int("seed", seed, 0)
    self.p = int(p)
    self.k = int(k)
    self.batch_size = self.p * self.k
    self._seed = int(seed)
    ids, self._indices_by_id = _index_by_label(labels)
    self.num_ids = int(ids.size)
    if self.num_ids < self.p:
      raise ValueError(
        f"P x K sampling needs at least p={self.p} identities with >= 1 "
        f"image, but the labels have {self.num_ids}."
      )
    counts = np.array([idx.size for idx in self._indices_by_id])
    self.steps_per_epoch = _num_groups(counts, self.k) // self.p
    # Workers ask for consecutive steps, so caching the latest epoch makes
    # planning cost once per epoch rather than once per batch. One (epoch,
    # plan) tuple, replaced in a single store: loader threads share it.
    self._cache: tuple[int, np.ndarray] | None = None

  def _one_pass(self, epoch: int, pass_index: int) -> np.ndarray:
    """Runs the official procedure once with its own random stream.

    Returns:
      (num_batches, p * k) record indices, num_batches >= 1.
    """
    rng = np.random.default_rng([self._seed, epoch, pass_index])
    k, p = self.k, self.p
    groups = []
    for idx in self._indices_by_id:
      if idx.size < k:
        chosen = rng.choice(idx, size=k, replace=True)
      else:
        chosen = rng.permutation(idx)
      num = chosen.size // k
      groups.append(chosen[: num * k].reshape(num, k))
    next_group = [0] * len(groups)
    available = list(range(len(groups)))
    batches = []
    while len(available) >= p:
      picks = rng.choice(len(available), size=p, replace=False)
      batch = []
      exhausted = []
      for pos in picks:
        i = available[pos]
        batch.append(groups[i][next_group[i]])
        next_group[i] += 1
        if next_group[i] == groups[i].shape[0]:
          exhausted.append(pos)
      for pos in sorted(exhausted, reverse=True):
        del available[pos]
      batches.append(np.concatenate(batch))
    return np.stack(batches)

  def epoch_plan(self, epoch: int) -> np.ndarray:
    """Returns the record indices of every batch of ``epoch``.

    Args:
      epoch: 0-based epoch number.

    Returns:
      int64 array (steps_per_epoch, p * k); row ``j`` is the batch at global
      step ``epoch * steps_per_epoch + j``. Within a row, the K images of
      each of the P identities are consecutive.
    """
    if epoch < 0:
      raise ValueError(f"epoch must be >= 0, got {epoch}.")
    cache = self._cache
    if cache is not None and cache[0] == epoch:
      return cache[1]
    parts, total, pass_index = [], 0, 0
    while total < self.steps_per_epoch:
      part = self._one_pass(epoch, pass_index)
      parts.append(part)
      total += part.shape[0]
      pass_index += 1
    plan = np.concatenate(parts)[: self.steps_per_epoch].astype(np.int64)
    plan.flags.writeable = False  # Shared by the cache: keep it intact.
    self._cache = (epoch, plan)
    return plan

  def batch(self, step: int) -> np.ndarray:
    """Returns the (p * k,) record indices of the batch at global ``step``."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    epoch, offset = divmod(int(step), self.steps_per_epoch)
    return self.epoch_plan(epoch)[offset]

  def __repr__(self) -> str:
    return (
      f"RandomIdentitySampler(p={self.p}, k={self.k}, num_ids="
      f"{self.num_ids}, steps_per_epoch={self.steps_per_epoch})"
    )
