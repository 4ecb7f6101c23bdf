"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), without N x N matrices.

"Re-ranking Person Re-identification with k-reciprocal Encoding" replaces
the query x gallery distance by a mix of the original distance and a Jaccard
distance between *k-reciprocal encodings*. This module computes exactly what
the reference implementation used by APNet (reid-strong-baseline's
``re_ranking(probFea, galFea, k1, k2, lambda_value)``) computes, over all
``N = Q + G`` items:

1. ``d`` = squared euclidean distances between all items; row ``i`` is divided
   by its maximum over all ``N`` items (the original divides the columns of
   ``d`` by their maxima and transposes); call the result ``od``.
2. For every item ``i``: its ``k1 + 1`` nearest items (itself included) that
   also have ``i`` among *their* ``k1 + 1`` nearest are its k-reciprocal set
   ``R(i)``. Every candidate ``c`` in ``R(i)`` whose own
   ``round(k1 / 2)``-reciprocal set ``R'(c)`` has more than 2/3 of its items in
   ``R(i)`` adds ``R'(c)`` to the expanded set ``R*(i)``.
3. The encoding ``V[i]`` holds ``exp(-od[i, j])`` for ``j`` in ``R*(i)``,
   normalised to sum to 1; with ``k2 > 1`` it is replaced by the mean of the
   encodings of the ``k2`` nearest items (query expansion).
4. ``jaccard[i, j] = 1 - m / (2 - m)`` with ``m = sum_k min(V[i, k], V[j, k])``;
   the result is ``(1 - lambda) * jaccard + lambda * od`` for query rows and
   gallery columns.

Memory: no N x N array is ever built (MSMT17 has N = 93,820). Distances are
computed block by block on the JAX device (each block of the symmetric
matrix once, serving its rows and, transposed, its columns) and reduced at
once to running row maxima and nearest-neighbour lists (``jax.lax.top_k``);
the encodings are sparse rows (fixed-width, padded index/value arrays); the
Jaccard term comes from an inverted index over the gallery encodings (numpy,
on the host: its lists have irregular lengths), query chunk by query chunk,
and the re-ranked distance is handed out chunk by chunk as well.

Deliberate differences from the reference code: encodings and Jaccard sums
are kept in float32/float64 where the reference stores them in float16 (a
memory saving this layout does not need; it only loses precision), and ties
between neighbour distances are broken by index (``top_k``) where the
reference's unstable ``np.argsort`` breaks them arbitrarily; with continuous
features ties do not occur.

The module also owns the feature checks and the L2 normalisation that the
evaluator and the query expansion share.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from apnet_jax import progress

_HIGHEST = jax.lax.Precision.HIGHEST
# Rows per step when weighting the encodings: each row gathers the features of
# all its members, so this bounds that buffer (and keeps it in cache).
_ENCODING_ROWS = 32
# Rows (and columns) per block of the neighbour search, and rows per step of
# the other passes over all items. A multiple of _ENCODING_ROWS.
_NEIGHBOUR_BLOCK = 1024
# torch.nn.functional.normalize's epsilon: a zero feature stays zero.
NORM_EPS = 1e-12


def as_feature_matrix(name: str, features: Any) -> np.ndarray:
  """Checks a (num_items, dim) feature array and returns it as float32.

  Args:
    name: what the array is, for error messages (e.g. ``'query_features'``).
    features: array-like of shape (num_items, dim).

  Returns:
    The features as a float32 numpy array.

  Raises:
    ValueError: if the array is not 2-D, is empty, or holds NaN/inf.
  """
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f"{name} must be 2-D (num_items, dim), got shape {features.shape}.")
  if features.shape[0] == 0:
    raise ValueError(f"{name} is empty: nothing to evaluate.")
  if features.shape[1] == 0:
    raise ValueError(f"{name} has feature dimension 0.")
  if not np.issubdtype(features.dtype, np.number) or np.issubdtype(
    features.dtype, np.complexfloating
  ):
    raise ValueError(f"{name} must hold real numbers, got {features.dtype}.")
  features = features.astype(np.float32, copy=False)
  finite = np.isfinite(features).all(axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise ValueError(
      f"{name} has non-finite values (NaN or inf) in {len(bad)} rows, "
      f"first rows: {bad[:5].tolist()}."
    )
  return features


def l2_normalize(features: jax.Array) -> jax.Array:
  """Rows divided by their L2 norms (a zero row stays zero, as in torch)."""
  norms = jnp.linalg.norm(features, axis=1, keepdims=True)
  return features / jnp.maximum(norms, NORM_EPS)


def check_same_dim(query_features: np.ndarray, gallery_features: np.ndarray) -> None:
  """Raises ValueError if query and gallery features differ in dimension."""
  if query_features.shape[1] != gallery_features.shape[1]:
    raise ValueError(
      f"query_features have dimension {query_features.shape[1]} but "
      f"gallery_features have dimension {gallery_features.shape[1]}."
    )


def check_int(name: str, value: Any, minimum: int) -> int:
  """Returns ``value`` as an int; ValueError naming ``name`` if not an int >= minimum."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be at least {minimum}, got {value}.")
  return int(value)


def _merge_nearest(state, squared, column_start, num_items, num_neighbours):
  """Folds a block of squared distances into each row's running nearest list.

  Args:
    state: ``(best, index, row_max)``: per row, the negated squared distances
      of the nearest items so far (descending), their indices, and the largest
      squared distance so far.
    squared: (rows, columns) squared distances to items ``column_start...``.
    column_start: index of the block's first column.
    num_items: real items; later columns are padding.
    num_neighbours: length of the nearest lists.

  Returns:
    The updated state.
  """
  best, index, row_max = state
  column = column_start + jnp.arange(squared.shape[1], dtype=jnp.int32)
  real = (column < num_items)[None, :]
  row_max = jnp.maximum(row_max, jnp.max(jnp.where(real, squared, -jnp.inf), axis=1))
  values, positions = jax.lax.top_k(
    jnp.where(real, -squared, -jnp.inf), min(num_neighbours, squared.shape[1])
  )
  # Blocks arrive in increasing column order and top_k keeps the earlier of
  # equal values: ties go to the lower index, as in one top_k over the row.
  best, order = jax.lax.top_k(jnp.concatenate([best, values], axis=1), num_neighbours)
  index = jnp.take_along_axis(jnp.concatenate([index, column[positions]], axis=1), order, axis=1)
  return best, index, row_max


@functools.partial(jax.jit, static_argnames=("block", "num_neighbours", "diagonal"))
def _nearest_pair(
  features,
  squared_norms,
  num_items,
  row_start,
  column_start,
  row_state,
  column_state,
  block,
  num_neighbours,
  diagonal,
):
  """Updates the nearest lists of two row blocks from their distance block.

  The distance matrix is symmetric: the block of rows ``row_start`` x columns
  ``column_start`` serves both blocks (transposed for the second), which
  halves the matmul work of the neighbour search.
  """
  rows = jax.lax.dynamic_slice_in_dim(features, row_start, block)
  row_norms = jax.lax.dynamic_slice_in_dim(squared_norms, row_start, block)
  columns = jax.lax.dynamic_slice_in_dim(features, column_start, block)
  column_norms = jax.lax.dynamic_slice_in_dim(squared_norms, column_start, block)
  squared = (
    row_norms[:, None]
    + column_norms[None, :]
    - 2.0 * jnp.matmul(rows, columns.T, precision=_HIGHEST)
  )
  row_state = _merge_nearest(row_state, squared, column_start, num_items, num_neighbours)
  if not diagonal:
    column_state = _merge_nearest(column_state, squared.T, row_start, num_items, num_neighbours)
  return row_state, column_state


def _nearest(
  features: jax.Array, squared_norms: jax.Array, num_items: int, block: int, num_neighbours: int
) -> tuple[jax.Array, jax.Array]:
  """Every row's nearest items (itself included) and largest distance.

  Returns:
    ``(neighbours, row_max)``: (P, num_neighbours) int32 indices by increasing
    squared distance, and (P,) maximum squared distances, P = len(features).
  """
  num_blocks = features.shape[0] // block
  states = [
    (
      jnp.full((block, num_neighbours), -jnp.inf),
      jnp.zeros((block, num_neighbours), jnp.int32),
      jnp.full((block,), -jnp.inf),
    )
    for _ in range(num_blocks)
  ]
  # Row block i sees column blocks 0..i-1 (as transposes, from earlier outer
  # iterations), then i, i+1, ...: always in increasing column order.
  with progress.bar(num_blocks * (num_blocks + 1) // 2, "re-rank neighbours", "block") as bar:
    for i in range(num_blocks):
      for j in range(i, num_blocks):
        states[i], column_state = _nearest_pair(
          features,
          squared_norms,
          jnp.int32(num_items),
          jnp.int32(i * block),
          jnp.int32(j * block),
          states[i],
          states[j],
          block=block,
          num_neighbours=num_neighbours,
          diagonal=i == j,
        )
        if i != j:
          states[j] = column_state
      # Row block i is final: waiting for it makes the bar follow the device,
      # not the dispatch, and idles the device only between two row blocks.
      jax.block_until_ready(states[i])
      bar.update(num_blocks - i)
  return (
    jnp.concatenate([state[1] for state in states]),
    jnp.concatenate([state[2] for state in states]),
  )


@functools.partial(jax.jit, static_argnames=("rows", "k"))
def _reciprocal_mask(neighbours, start, rows, k):
  """Which of each row's k + 1 nearest items have the row among theirs."""
  index = start + jnp.arange(rows, dtype=jnp.int32)
  forward = neighbours[index, : k + 1]
  backward = neighbours[forward, : k + 1]
  return jnp.any(backward == index[:, None, None], axis=-1)


def _unique_sorted(indices: jax.Array, sentinel: int) -> jax.Array:
  """Sorts each row and replaces repeated indices by ``sentinel`` (last)."""
  indices = jnp.sort(indices, axis=1)
  repeated = jnp.concatenate(
    [jnp.zeros_like(indices[:, :1], dtype=bool), indices[:, 1:] == indices[:, :-1]], axis=1
  )
  return jnp.sort(jnp.where(repeated, sentinel, indices), axis=1)


@functools.partial(jax.jit, static_argnames=("rows", "k1", "half"))
def _expanded_members(neighbours, half_reciprocal, start, rows, k1, half):
  """Each row's expanded k-reciprocal set R*.

  Returns:
    (rows, (k1 + 1) * (half + 2)) member indices per row, sorted, unique, and
    padded with ``len(neighbours)``.
  """
  sentinel = neighbours.shape[0]
  index = start + jnp.arange(rows, dtype=jnp.int32)
  forward = neighbours[index, : k1 + 1]  # (r, k1+1)
  backward = neighbours[forward, : k1 + 1]  # (r, k1+1, k1+1)
  reciprocal = jnp.any(backward == index[:, None, None], axis=-1)

  # Each candidate's own half-size reciprocal set, and how much of it lies in
  # the row's reciprocal set.
  candidate_set = neighbours[forward, : half + 1]  # (r, k1+1, half+1)
  candidate_mask = half_reciprocal[forward]  # (r, k1+1, half+1)
  in_reciprocal = jnp.any(
    (candidate_set[..., None] == forward[:, None, None, :]) & reciprocal[:, None, None, :], axis=-1
  )
  overlap = jnp.sum(candidate_mask & in_reciprocal, axis=-1)
  size = jnp.sum(candidate_mask, axis=-1)
  # "more than 2/3 of the candidate's set", in exact integer arithmetic.
  accepted = reciprocal & (3 * overlap > 2 * size)

  members = jnp.concatenate(
    [
      jnp.where(reciprocal, forward, sentinel),
      jnp.where(accepted[..., None] & candidate_mask, candidate_set, sentinel).reshape(rows, -1),
    ],
    axis=1,
  )
  return _unique_sorted(members, sentinel)


@functools.partial(jax.jit, static_argnames=("rows",))
def _member_weights(features, squared_norms, row_max, members, start, rows):
  """Gaussian weights ``exp(-od[i, j])`` of the members, normalised per row."""
  sentinel = features.shape[0]
  index = start + jnp.arange(rows, dtype=jnp.int32)
  members = jax.lax.dynamic_slice_in_dim(members, start, rows)
  real = members < sentinel
  safe = jnp.minimum(members, sentinel - 1)
  dots = jnp.einsum("rd,rwd->rw", features[index], features[safe], precision=_HIGHEST)
  squared = squared_norms[index][:, None] + squared_norms[safe] - 2.0 * dots
  weights = jnp.where(real, jnp.exp(-squared / row_max[index][:, None]), 0.0)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("rows", "k2"))
def _expand_queries(members, weights, neighbours, start, rows, k2):
  """Mean of the encodings of each row's k2 nearest items (sparse rows)."""
  sentinel = neighbours.shape[0]
  index = start + jnp.arange(rows, dtype=jnp.int32)
  nearest = neighbours[index, :k2]  # (r, k2)
  columns = members[nearest].reshape(rows, -1)
  values = weights[nearest].reshape(rows, -1)
  columns, values = jax.lax.sort((columns, values), dimension=1, num_keys=1)
  # Equal columns are now adjacent: sum each run into its run number.
  new_run = jnp.concatenate(
    [jnp.ones_like(columns[:, :1], dtype=bool), columns[:, 1:] != columns[:, :-1]], axis=1
  )
  run = jnp.cumsum(new_run, axis=1) - 1
  row = jnp.arange(rows)[:, None]
  merged_values = jnp.zeros_like(values).at[row, run].add(values) / k2
  merged_columns = jnp.full_like(columns, sentinel).at[row, run].min(columns)
  return merged_columns, merged_values


@jax.jit
def _original_distance(query_features, query_norms, query_row_max, gallery_features, gallery_norms):
  """``od`` of a query chunk against the gallery."""
  # The squared norms come in precomputed: XLA:CPU would fuse their reduction
  # into the matmul epilogue and redo it for every output element.
  squared = (
    query_norms[:, None]
    + gallery_norms[None, :]
    - 2.0 * jnp.matmul(query_features, gallery_features.T, precision=_HIGHEST)
  )
  return squared / query_row_max[:, None]


def _row_chunks(function, num_rows: int, rows: int, **kwargs) -> Any:
  """Runs ``function(start=..., rows=rows, **kwargs)`` over all row chunks."""
  outputs = [
    function(start=jnp.int32(start), rows=rows, **kwargs) for start in range(0, num_rows, rows)
  ]
  return jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)


def _used_width(columns: jax.Array, sentinel: int) -> int:
  """Columns needed by sorted sparse rows padded with ``sentinel`` at the end."""
  return max(1, int(jnp.max(jnp.sum(columns < sentinel, axis=1))))


def k_reciprocal_rerank_chunks(
  query_features: Any,
  gallery_features: Any,
  *,
  k1: int = 20,
  k2: int = 6,
  lambda_value: float = 0.3,
  chunk_size: int = 256,
) -> Iterator[tuple[int, np.ndarray]]:
  """Yields the re-ranked query x gallery distance, one query chunk at a time.

  Args:
    query_features: (Q, D) query features (normalise them first if the
      protocol does).
    gallery_features: (G, D) gallery features.
    k1: size of the k-reciprocal neighbourhoods.
    k2: neighbours averaged in the query expansion (1 disables it).
    lambda_value: weight of the original distance in the result.
    chunk_size: queries per yielded block.

  Returns:
    An iterator of ``(start, distances)``: the float32 re-ranked distances of
    queries ``start : start + len(distances)`` to the whole gallery. The work
    starts at the first ``next``; the arguments are checked at once.

  Raises:
    ValueError: on invalid features or parameters.
  """
  query_features = as_feature_matrix("query_features", query_features)
  gallery_features = as_feature_matrix("gallery_features", gallery_features)
  check_same_dim(query_features, gallery_features)
  num_items = len(query_features) + len(gallery_features)
  k1 = check_int("k1", k1, 1)
  k2 = check_int("k2", k2, 1)
  chunk_size = check_int("chunk_size", chunk_size, 1)
  if k1 + 1 > num_items or k2 > num_items:
    raise ValueError(
      f"k1 + 1 = {k1 + 1} and k2 = {k2} must not exceed the {num_items} query and gallery items."
    )
  if (
    isinstance(lambda_value, bool)
    or not isinstance(lambda_value, (int, float, np.integer, np.floating))
    or not 0.0 <= lambda_value <= 1.0
  ):
    raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}.")
  return _rerank_chunks(query_features, gallery_features, k1, k2, lambda_value, chunk_size)


def _rerank_chunks(
  query_features: np.ndarray,
  gallery_features: np.ndarray,
  k1: int,
  k2: int,
  lambda_value: float,
  chunk_size: int,
) -> Iterator[tuple[int, np.ndarray]]:
  """The generator behind :func:`k_reciprocal_rerank_chunks` (checked args)."""
  num_query, num_gallery = len(query_features), len(gallery_features)
  num_items = num_query + num_gallery
  half = int(np.around(k1 / 2))  # the reference rounds half to even, too

  # All items in one array, padded to whole blocks with zero rows that are
  # never chosen as neighbours.
  block = min(_NEIGHBOUR_BLOCK, -(-num_items // _ENCODING_ROWS) * _ENCODING_ROWS)
  padded = -(-num_items // block) * block
  features = jnp.zeros((padded, query_features.shape[1]), jnp.float32)
  features = features.at[:num_query].set(query_features)
  features = features.at[num_query:num_items].set(gallery_features)
  squared_norms = jnp.sum(features * features, axis=1)

  neighbours, row_max = _nearest(
    features, squared_norms, num_items, block, num_neighbours=max(k1 + 1, k2)
  )
  if not bool(jnp.all(row_max[:num_items] > 0)):
    raise ValueError(
      "Re-ranking needs distinct features: some item is at "
      "distance 0 from every other, and the distances are "
      "normalised by their row maximum."
    )
  # Padding rows point at themselves, so the gathers below stay in bounds.
  own = jnp.arange(padded, dtype=jnp.int32)[:, None]
  neighbours = jnp.where(own < num_items, neighbours, own)

  half_reciprocal = _row_chunks(_reciprocal_mask, padded, block, neighbours=neighbours, k=half)
  members = _row_chunks(
    _expanded_members,
    padded,
    block,
    neighbours=neighbours,
    half_reciprocal=half_reciprocal,
    k1=k1,
    half=half,
  )
  members = members[:, : _used_width(members, padded)]
  # Weighting gathers the features of every member: only after trimming the
  # padding (sets are far smaller than their bound) is that cheap.
  weights = _row_chunks(
    _member_weights,
    padded,
    _ENCODING_ROWS,
    features=features,
    squared_norms=squared_norms,
    row_max=row_max,
    members=members,
  )
  if k2 > 1:
    members, weights = _row_chunks(
      _expand_queries, padded, block, members=members, weights=weights, neighbours=neighbours, k2=k2
    )
    width = _used_width(members, padded)
    members, weights = members[:, :width], weights[:, :width]
  members = np.asarray(members[:num_items])
  weights = np.asarray(weights[:num_items])
  row_max = np.asarray(row_max[:num_items])
  query_norms = np.asarray(squared_norms[:num_query])
  gallery_features = features[num_query:num_items]
  gallery_norms = squared_norms[num_query:num_items]
  del features, squared_norms, neighbours, half_reciprocal

  # Inverted index of the gallery encodings: for every column k, the gallery
  # items whose encoding uses k, and their weights there.
  item, slot = np.nonzero(members[num_query:] < padded)
  columns = members[num_query:][item, slot]
  order = np.argsort(columns, kind="stable")
  inverted_item = item[order].astype(np.int32)
  inverted_weight = weights[num_query:][item, slot][order]
  column_start = np.concatenate([[0], np.cumsum(np.bincount(columns, minlength=padded))])
  del item, slot, columns, order

  # Closed when the consumer has taken the last chunk (or drops the iterator).
  with progress.bar(num_query, "re-rank", "query") as bar:
    for start in range(0, num_query, chunk_size):
      stop = min(start + chunk_size, num_query)
      # m[i, j] = sum_k min(V[i, k], V[j, k]) over the columns both use.
      row, slot = np.nonzero(members[start:stop] < padded)
      column = members[start:stop][row, slot]
      weight = weights[start:stop][row, slot]
      length = column_start[column + 1] - column_start[column]
      pair = np.repeat(np.arange(len(column)), length)
      position = (
        np.arange(len(pair)) - (np.cumsum(length) - length)[pair] + column_start[column][pair]
      )
      overlap = np.bincount(
        row[pair] * num_gallery + inverted_item[position],
        weights=np.minimum(weight[pair], inverted_weight[position]),
        minlength=(stop - start) * num_gallery,
      ).reshape(stop - start, num_gallery)
      jaccard = 1.0 - overlap / (2.0 - overlap)
      # Fixed chunk shapes (padding rows of 1.0 keep the division finite).
      pad = chunk_size - (stop - start)
      original = _original_distance(
        jnp.asarray(np.pad(query_features[start:stop], ((0, pad), (0, 0)))),
        jnp.asarray(np.pad(query_norms[start:stop], (0, pad))),
        jnp.asarray(np.pad(row_max[start:stop], (0, pad), constant_values=1.0)),
        gallery_features,
        gallery_norms,
      )
      original = np.asarray(original, np.float64)[: stop - start]
      bar.update(stop - start)
      yield start, (jaccard * (1.0 - lambda_value) + original * lambda_value).astype(np.float32)


def k_reciprocal_rerank(
  query_features: Any,
  gallery_features: Any,
  *,
  k1: int = 20,
  k2: int = 6,
  lambda_value: float = 0.3,
  chunk_size: int = 256,
) -> np.ndarray:
  """The whole re-ranked query x gallery distance matrix, float32 (Q, G).

  For large sets prefer :func:`k_reciprocal_rerank_chunks` (what
  :func:`apnet_jax.evaluation.evaluate` uses), which never holds Q x G.
  Arguments are those of :func:`k_reciprocal_rerank_chunks`.
  """
  return np.concatenate(
    [
      block
      for _, block in k_reciprocal_rerank_chunks(
        query_features,
        gallery_features,
        k1=k1,
        k2=k2,
        lambda_value=lambda_value,
        chunk_size=chunk_size,
      )
    ]
  )
