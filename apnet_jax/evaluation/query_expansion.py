"""Alpha query expansion (alpha-QE), as fast-reid's ``aqe`` computes it.

Query expansion replaces every feature by a weighted mean of its nearest
neighbours, so that a query also retrieves what its best matches retrieve
(Chum et al., ICCV 2007; the alpha weighting is Radenovic et al., TPAMI 2018).
This module computes what fast-reid's ``aqe(query_feat, gallery_feat, qe_times,
qe_k, alpha)`` computes, over the pool of all ``N = Q + G`` query and gallery
items, for ``times`` rounds:

1. ``sim`` = cosine similarities between all items (dot products of the
   L2-normalised features);
2. every item's ``k`` most similar items, itself included, are its neighbours;
3. the item's new feature is ``(1 / k) * sum_j features[j] * sim[i, j] ** alpha``
   over its neighbours ``j``: the mean over ``k``, not a normalised weighted
   mean, of the features *as given* (not normalised), the previous round's
   output from the second round on.

The result is not normalised either; :func:`apnet_jax.evaluation.evaluate`
normalises it like any feature when its protocol does.

Memory: the similarities are computed one chunk of rows at a time against the
whole pool, and each chunk is reduced at once to its ``k`` neighbours
(``jax.lax.top_k``); no N x N array is built. Ties between similarities go to
the lower pool index (queries before gallery), where fast-reid's
``np.argpartition`` breaks them arbitrarily.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apnet_jax.evaluation import rerank as rerank_lib


@jax.jit
def _unit_rows(features: jax.Array) -> jax.Array:
  return rerank_lib.l2_normalize(features)


@functools.partial(jax.jit, static_argnames=("rows", "k"))
def _expand_rows(features, unit, num_items, start, alpha, rows, k):
  """The expanded features of pool rows ``start : start + rows``.

  Args:
    features: (P, D) features to average; rows from ``num_items`` on are
      padding.
    unit: (P, D) the same features L2-normalised.
    num_items: the real number of pool items.
    start: first row of the chunk.
    alpha: exponent of the similarity weights.
    rows: rows in the chunk.
    k: neighbours per row.

  Returns:
    ``(expanded, undefined)``: the (rows, D) expanded features, and whether
    some real row raised a negative similarity to a non-integer power (NaN).
  """
  chunk = jax.lax.dynamic_slice_in_dim(unit, start, rows)
  similarity = jnp.matmul(chunk, unit.T, precision=jax.lax.Precision.HIGHEST)
  column = jnp.arange(unit.shape[0], dtype=jnp.int32)
  similarity = jnp.where((column < num_items)[None, :], similarity, -jnp.inf)
  # top_k returns the lower index first among equal values: the tie rule.
  top, neighbours = jax.lax.top_k(similarity, k)
  weights = jnp.power(top, alpha)

  # One neighbour at a time: the buffer stays (rows, D) whatever k is.
  def add_neighbour(j, total):
    return total + weights[:, j, None] * features[neighbours[:, j]]

  total = jax.lax.fori_loop(
    0, k, add_neighbour, jnp.zeros((rows, features.shape[1]), features.dtype)
  )
  real = start + jnp.arange(rows, dtype=jnp.int32) < num_items
  undefined = jnp.any(jnp.isnan(weights) & real[:, None])
  return total / k, undefined


def _check_alpha(alpha: Any) -> float:
  if (
    isinstance(alpha, bool)
    or not isinstance(alpha, (int, float, np.integer, np.floating))
    or not math.isfinite(alpha)
    or alpha < 0
  ):
    raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}.")
  return float(alpha)


def alpha_query_expansion(
  query_features: Any,
  gallery_features: Any,
  *,
  k: int = 5,
  alpha: float = 3.0,
  times: int = 1,
  chunk_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
  """Expands query and gallery features with their nearest pool neighbours.

  Args:
    query_features: (Q, D) query features.
    gallery_features: (G, D) gallery features.
    k: neighbours averaged per item, the item itself included (1 leaves
      distinct features unchanged); at most ``Q + G``.
    alpha: exponent of the cosine-similarity weights (0: a plain mean).
    times: rounds of expansion, each on the previous round's output.
    chunk_size: pool rows per jitted step. Memory per step is about
      ``chunk_size x (Q + G)`` similarities plus ``chunk_size x D`` features.

  Returns:
    ``(query, gallery)``: the expanded (Q, D) and (G, D) features, float32,
    not normalised.

  Raises:
    ValueError: on invalid features or parameters, or when ``alpha`` is not
      an integer and some item has a negative similarity among its ``k``
      nearest (the power is undefined there).
  """
  query_features = rerank_lib.as_feature_matrix("query_features", query_features)
  gallery_features = rerank_lib.as_feature_matrix("gallery_features", gallery_features)
  rerank_lib.check_same_dim(query_features, gallery_features)
  num_query = len(query_features)
  num_items = num_query + len(gallery_features)
  k = rerank_lib.check_int("k", k, 1)
  if k > num_items:
    raise ValueError(
      f"k = {k} must not exceed the {num_items} query and gallery "
      "items of the query expansion pool."
    )
  alpha = _check_alpha(alpha)
  times = rerank_lib.check_int("times", times, 1)
  chunk_size = rerank_lib.check_int("chunk_size", chunk_size, 1)

  rows = min(chunk_size, num_items)
  padded = -(-num_items // rows) * rows
  padding = ((0, padded - num_items), (0, 0))
  features = jnp.asarray(np.pad(np.concatenate([query_features, gallery_features]), padding))
  for _ in range(times):
    unit = _unit_rows(features)
    outputs = [
      _expand_rows(
        features, unit, jnp.int32(num_items), jnp.int32(start), jnp.float32(alpha), rows=rows, k=k
      )
      for start in range(0, padded, rows)
    ]
    if any(bool(undefined) for _, undefined in outputs):
      raise ValueError(
        f"alpha = {alpha} is not an integer and some item has a negative "
        f"similarity among its k = {k} nearest: the weight sim ** alpha is "
        "undefined. Use an integer alpha or a smaller k."
      )
    # Padding rows get some finite mean: harmless, as columns they stay masked.
    features = jnp.concatenate([expanded for expanded, _ in outputs])
  features = np.asarray(features[:num_items], dtype=np.float32)
  return features[:num_query], features[num_query:]
