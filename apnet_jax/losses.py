"""APNet training losses: label-smoothed cross-entropy + batch-hard triplet.

The official recipe (``DATALOADER.SAMPLER: 'softmax_triplet'`` in
``configs/default.yml``; ``layers/__init__.py::make_loss``) sums, with weight
one each:

* the label-smoothed cross-entropy on the classifier ``logits``
  (``CrossEntropyLoss``, epsilon ``SOLVER.SMOOTH`` = 0.1), and
* the batch-hard triplet loss on the *unnormalised* ``global_feat``, the
  pooled feature before the BNNeck (``TripletLoss``, margin
  ``SOLVER.MARGIN`` = 0.3).

Everything is computed in float32 whatever the compute dtype of the model,
with fixed shapes (masks instead of boolean indexing), so the losses run
inside a jitted, sharded train step. With the batch sharded over a mesh the
distance matrix and the hard-example mining span the whole global batch.

One deliberate difference: the official smoothing term uses
``SOLVER.CLASSNUM`` (hard-coded 751, Market-1501's number of train ids)
for every dataset; here it is the real number of classes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
  "cross_entropy_label_smooth",
  "pairwise_euclidean",
  "total_loss",
  "triplet_loss_batch_hard",
]


def cross_entropy_label_smooth(
  logits: jax.Array,
  labels: jax.Array,
  num_classes: int,
  epsilon: float = 0.1,
) -> jax.Array:
  """Cross-entropy against label-smoothed targets (Szegedy et al., 2016).

  Targets are ``(1 - epsilon) * one_hot(label) + epsilon / num_classes``; the
  loss is the batch mean of the per-sample sum over classes of
  ``-target * log_softmax(logits)``. ``epsilon = 0`` gives the standard
  cross-entropy.

  Args:
    logits: (B, num_classes) classifier outputs, any float dtype.
    labels: (B,) integer train labels in ``[0, num_classes)``. Out-of-range
      labels cannot be detected under ``jit``; the data pipeline guarantees
      the range.
    num_classes: number of train identities; must equal ``logits.shape[-1]``.
    epsilon: smoothing weight in ``[0, 1]``.

  Returns:
    The float32 scalar loss.
  """
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(
      f"cross_entropy_label_smooth: need logits (B, C) and labels (B,); got "
      f"logits {logits.shape} and labels {labels.shape}."
    )
  if logits.shape[-1] != num_classes:
    raise ValueError(
      f"cross_entropy_label_smooth: num_classes={num_classes} but the logits "
      f"have {logits.shape[-1]} classes."
    )
  if not 0.0 <= epsilon <= 1.0:
    raise ValueError(f"cross_entropy_label_smooth: epsilon must be in [0, 1], got {epsilon}.")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  targets = (1.0 - epsilon) * targets + epsilon / num_classes
  return jnp.mean(jnp.sum(-targets * log_probs, axis=-1))


def _replicated(x: jax.Array) -> jax.Array:
  """Gathers an array whose type says it is sharded (explicit-sharding meshes).

  The all-pairs distance matrix needs every sample on every device. With
  ``AxisType.Auto`` meshes (or no mesh) the type carries no sharding and the
  compiler inserts the gather itself; with ``AxisType.Explicit`` (the default
  of ``jax.make_mesh``) a batch-sharded ``x @ x.T`` is a type error.
  """
  sharding = jax.typeof(x).sharding
  if any(axis is not None for axis in sharding.spec):
    x = jax.sharding.reshard(x, NamedSharding(sharding.mesh, P()))
  return x


def pairwise_euclidean(features: jax.Array) -> jax.Array:
  """(N, D) -> (N, N) euclidean distances, as the official ``euclidean_dist``.

  ``|x|^2 + |y|^2 - 2 x.y``, clamped at 1e-12 before the square root: the
  clamp keeps the gradient finite for identical features, and the diagonal
  comes out at about 1e-6 rather than exactly 0, as in the official code.
  The matmul runs at full float32 precision (GPUs/TPUs would otherwise use
  TF32/bf16 passes).
  """
  x = _replicated(features.astype(jnp.float32))
  sq = jnp.sum(jnp.square(x), axis=-1)
  gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
  d2 = sq[:, None] + sq[None, :] - 2.0 * gram
  return jnp.sqrt(jnp.maximum(d2, 1e-12))


def triplet_loss_batch_hard(
  features: jax.Array,
  labels: jax.Array,
  margin: float = 0.3,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Batch-hard triplet loss (Hermans et al., 2017) as the official TripletLoss.

  For every anchor: the hardest positive is the farthest sample with the same
  label, the anchor itself included (as the official ``hard_example_mining``
  does; it only wins, at distance ~1e-6, when the anchor's identity has a
  single image in the batch); the hardest negative is the nearest sample with
  another label. The loss is ``mean(relu(dist_ap - dist_an + margin))``
  (``nn.MarginRankingLoss`` with target 1).

  The official code needs the same number of images per identity (P x K);
  masks here accept any label layout. An anchor without any negative (a
  batch of a single identity) gets ``dist_an = inf`` and contributes zero.

  Args:
    features: (N, D) unnormalised features (``global_feat``), any float dtype.
    labels: (N,) integer identity labels.
    margin: the ranking margin.

  Returns:
    ``(loss, dist_ap, dist_an)``: the float32 scalar loss and the (N,)
    float32 hardest-positive and hardest-negative distances.
  """
  if features.ndim != 2 or labels.shape != features.shape[:1]:
    raise ValueError(
      f"triplet_loss_batch_hard: need features (N, D) and labels (N,); got "
      f"features {features.shape} and labels {labels.shape}."
    )
  dist = pairwise_euclidean(features)
  labels = _replicated(labels)
  same = labels[:, None] == labels[None, :]
  dist_ap = jnp.max(jnp.where(same, dist, -jnp.inf), axis=1)
  dist_an = jnp.min(jnp.where(same, jnp.inf, dist), axis=1)
  loss = jnp.mean(jax.nn.relu(dist_ap - dist_an + margin))
  return loss, dist_ap, dist_an


def total_loss(
  outputs: dict[str, jax.Array],
  labels: jax.Array,
  *,
  num_classes: int,
  margin: float,
  epsilon: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The official ``softmax_triplet`` objective: smoothed CE + triplet, weight 1 each.

  Args:
    outputs: the model's outputs; uses ``logits`` and ``global_feat``.
    labels: (B,) integer train labels.
    num_classes: number of train identities.
    margin: triplet margin (``config.loss.margin``).
    epsilon: label smoothing (``config.loss.label_smoothing``).

  Returns:
    ``(loss, aux)`` with the float32 scalar loss and ``aux`` holding float32
    ``ce``, ``triplet``, ``acc`` (top-1 train accuracy of the classifier) and
    the batch means of ``dist_ap`` and ``dist_an``.
  """
  for key in ("logits", "global_feat"):
    if key not in outputs:
      raise KeyError(f"total_loss: the model outputs have no {key!r} (got {sorted(outputs)}).")
  logits = outputs["logits"]
  ce = cross_entropy_label_smooth(logits, labels, num_classes, epsilon)
  triplet, dist_ap, dist_an = triplet_loss_batch_hard(outputs["global_feat"], labels, margin)
  acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  aux: dict[str, Any] = {
    "ce": ce,
    "triplet": triplet,
    "acc": acc,
    "dist_ap": jnp.mean(dist_ap),
    "dist_an": jnp.mean(dist_an),
  }
  return ce + triplet, aux
