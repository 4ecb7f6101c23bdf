"""Re-ID retrieval metrics: CMC, mAP and mINP under the standard protocol.

The protocol is the one of the official APNet / reid-strong-baseline
evaluation:

* features are L2-normalised (``normalize=True``) and compared with the
  euclidean distance ``sqrt(max(||q - g||^2, 1e-12))``, or with the cosine
  distance ``1 - cos(q, g)``;
* for every query, the gallery items with the same pid *and* the same camera
  are removed (they are the same tracklet seen again, not a retrieval);
* a query with no remaining true match is skipped;
* the gallery is ranked by distance, ties broken by gallery index (a stable
  sort);
* ``cmc[k]`` is the fraction of valid queries with a true match within the top
  ``k + 1``; AP is the mean of the precision at each true match; INP is
  ``num_matches / (rank of the last true match)``.

Two optional steps change what is ranked, in fast-reid's order: alpha query
expansion replaces the (normalised) features (``query_expansion``), then
k-reciprocal re-ranking replaces the distance (``rerank``).

How it runs: the gallery is uploaded once, the queries are processed chunk by
chunk by jitted functions with fixed (padded) shapes, so an evaluation
compiles once. A full sort of each distance row (82k gallery items on MSMT17)
is slow on every backend and not needed: only the ranks of the true matches
matter, and the rank of a match is the number of kept gallery items that come
before it. The true matches of every query are listed on the host from the
pids and cameras (a few dozen per query), laid out flat for the chunk ("match
slots"), and each slot's rank is counted against the distance row, block by
block over the gallery. The cost is proportional to the total number of true
matches in a chunk, not to the largest number for one query.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from apnet_jax.evaluation import query_expansion as query_expansion_lib
from apnet_jax.evaluation import rerank as rerank_lib

_METRICS = ("euclidean", "cosine")
# Gallery items are counted in blocks of this many; the gallery is padded to a
# multiple of it (the fastest of 64-512 on a 2-core CPU).
_GALLERY_BLOCK = 256
# The number of match slots per chunk is rounded up to a multiple of this, so
# evaluations of similar size share a compiled function.
_SLOT_ROUNDING = 256
# Squared euclidean distances are clamped here before the square root, as the
# official code does.
_MIN_SQUARED_DISTANCE = 1e-12
# The normalisation epsilon, under the name plots.py reads.
NORM_EPS = rerank_lib.NORM_EPS


class _GalleryFeatures(NamedTuple):
  """Gallery features on the device, padded to ``_GALLERY_BLOCK`` rows."""

  features: jax.Array  # (G_pad, D) float32, normalised when asked
  squared_norms: jax.Array  # (G_pad,) float32


class _GalleryLabels(NamedTuple):
  """Gallery ids on the device, padded to a multiple of ``_GALLERY_BLOCK``."""

  pids: jax.Array  # (G_pad,) int32 pid codes; padding is -1
  camids: jax.Array  # (G_pad,) int32 camera codes; padding is -1
  size: jax.Array  # () int32, the real number of gallery items


class _QueryChunk(NamedTuple):
  """One chunk of queries and the flat list of their true matches."""

  pids: jax.Array  # (C,) int32; padding rows are -2 (match nothing)
  camids: jax.Array  # (C,) int32
  slot_query: jax.Array  # (T,) int32 row in the chunk; unused slots hold C
  slot_gallery: jax.Array  # (T,) int32 gallery index of the true match
  num_matches: jax.Array  # (C,) int32 true matches of each query


@functools.partial(jax.jit, static_argnames=("normalize", "padded_size"))
def _prepare_features(
  features: jax.Array, normalize: bool, padded_size: int
) -> tuple[jax.Array, jax.Array]:
  """Normalises (optionally) and zero-pads rows; returns squared norms too.

  A separate step from the distances on purpose: inside one jitted function
  XLA:CPU fuses the norm reduction into the matmul epilogue and recomputes it
  for every output element, which doubles the cost of a chunk.
  """
  if normalize:
    features = rerank_lib.l2_normalize(features)
  features = jnp.pad(features, ((0, padded_size - features.shape[0]), (0, 0)))
  return features, jnp.sum(features * features, axis=1)


def _distances(
  query_features: jax.Array, query_squared_norms: jax.Array, gallery: _GalleryFeatures, metric: str
) -> jax.Array:
  """Query x gallery distances at full float32 matmul precision."""
  similarity = jnp.matmul(query_features, gallery.features.T, precision=jax.lax.Precision.HIGHEST)
  if metric == "cosine":
    return 1.0 - similarity
  squared = query_squared_norms[:, None] + gallery.squared_norms[None, :] - 2.0 * similarity
  return jnp.sqrt(jnp.maximum(squared, _MIN_SQUARED_DISTANCE))


def _match_ranks(
  distances: jax.Array, gallery: _GalleryLabels, chunk: _QueryChunk
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-query AP, INP and rank of the first true match for one chunk.

  Args:
    distances: (C, G_pad) query x gallery distances.
    gallery: the padded gallery ids.
    chunk: the queries and their match slots.

  Returns:
    ``(ap, inp, first_rank)``, each of shape (C,); meaningless where the query
    has no true match.
  """
  num_queries, padded_gallery = distances.shape
  gallery_index = jnp.arange(padded_gallery, dtype=jnp.int32)
  same_tracklet = (chunk.pids[:, None] == gallery.pids[None, :]) & (
    chunk.camids[:, None] == gallery.camids[None, :]
  )
  removed = same_tracklet | (gallery_index >= gallery.size)[None, :]
  # A removed item sorts after every real one and never counts as "before".
  distances = jnp.where(removed, jnp.inf, distances)

  slot_row = jnp.minimum(chunk.slot_query, num_queries - 1)
  threshold = distances[slot_row, chunk.slot_gallery]

  # rank of a match = number of kept items whose (distance, index) is smaller,
  # counted block by block into per-lane counters (int16 while they cannot
  # overflow: half the memory traffic of int32).
  num_blocks = padded_gallery // _GALLERY_BLOCK
  counter = jnp.int16 if num_blocks <= np.iinfo(np.int16).max else jnp.int32
  lane = jnp.arange(_GALLERY_BLOCK, dtype=jnp.int32)

  def count_block(block_index, counts):
    start = block_index * _GALLERY_BLOCK
    block = jax.lax.dynamic_slice_in_dim(distances, start, _GALLERY_BLOCK, axis=1)
    rows = block[slot_row]  # (T, B): each slot's query row
    before = jnp.where(
      (start + lane)[None, :] < chunk.slot_gallery[:, None],
      rows <= threshold[:, None],
      rows < threshold[:, None],
    )
    return counts + before.astype(counter)

  counts = jnp.zeros((chunk.slot_query.shape[0], _GALLERY_BLOCK), counter)
  counts = jax.lax.fori_loop(0, num_blocks, count_block, counts)
  rank = jnp.sum(counts, axis=1, dtype=jnp.int32)  # 0-based rank of each slot

  # Sorted by (query, rank), the slots of a query form a contiguous run that
  # starts where it started on the host; unused slots (query C) go last.
  slot_query, rank = jax.lax.sort((chunk.slot_query, rank), num_keys=2)
  start = jnp.cumsum(chunk.num_matches) - chunk.num_matches
  used = slot_query < num_queries
  safe_query = jnp.minimum(slot_query, num_queries - 1)
  position = jnp.arange(rank.shape[0], dtype=jnp.int32) - start[safe_query]
  precision = jnp.where(used, (position + 1) / (rank + 1), 0.0)
  ap_sum = jax.ops.segment_sum(precision, safe_query, num_segments=num_queries)
  matches = jnp.maximum(chunk.num_matches, 1)
  ap = ap_sum / matches
  last = jnp.clip(start + chunk.num_matches - 1, 0, rank.shape[0] - 1)
  first_rank = rank[jnp.clip(start, 0, rank.shape[0] - 1)]
  inp = chunk.num_matches / (rank[last] + 1)
  return ap, inp, first_rank


@functools.partial(jax.jit, static_argnames=("metric",))
def _evaluate_feature_chunk(
  query_features, query_squared_norms, gallery_features, gallery_labels, chunk, metric
):
  distances = _distances(query_features, query_squared_norms, gallery_features, metric)
  return _match_ranks(distances, gallery_labels, chunk)


_evaluate_distance_chunk = jax.jit(_match_ranks)


def _as_labels(name: str, labels: Any, expected: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {labels.shape}.")
  if labels.shape[0] != expected:
    raise ValueError(
      f"{name} has {labels.shape[0]} entries but there are {expected} "
      "features: features and ids must have the same length."
    )
  return labels


def _codes(
  query_labels: np.ndarray, gallery_labels: np.ndarray, name: str
) -> tuple[np.ndarray, np.ndarray]:
  """Maps labels of any type to shared int32 codes (only equality matters)."""
  # np.concatenate would turn 1 and '1' into equal strings: refuse the mix.
  kinds = {"query": _label_kind(query_labels), "gallery": _label_kind(gallery_labels)}
  if kinds["query"] != kinds["gallery"]:
    raise ValueError(
      f"query_{name} are {kinds['query']} but gallery_{name} are "
      f"{kinds['gallery']}: use one type for both."
    )
  try:
    _, codes = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
  except TypeError as error:
    raise ValueError(f"query_{name} and gallery_{name} cannot be compared: {error}") from error
  codes = codes.astype(np.int32).reshape(-1)
  return codes[: len(query_labels)], codes[len(query_labels) :]


def _label_kind(labels: np.ndarray) -> str:
  """'numbers', 'strings' or 'bytes', for the query/gallery consistency check."""
  if labels.dtype.kind in "biuf":
    return "numbers"
  if labels.dtype.kind in "US":
    return "strings" if labels.dtype.kind == "U" else "bytes"
  return f"{labels.dtype} objects"


def _true_matches(
  query_pids: np.ndarray,
  query_camids: np.ndarray,
  gallery_pids: np.ndarray,
  gallery_camids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
  """Lists every query's true matches: same pid, other camera.

  Returns:
    ``(num_matches, match_gallery)``: the count per query, and the gallery
    indices of all matches, query after query.
  """
  order = np.argsort(gallery_pids, kind="stable")
  sorted_pids = gallery_pids[order]
  low = np.searchsorted(sorted_pids, query_pids, side="left")
  same_pid = np.searchsorted(sorted_pids, query_pids, side="right") - low
  query = np.repeat(np.arange(len(query_pids)), same_pid)
  first = np.cumsum(same_pid) - same_pid
  position = np.arange(len(query)) - first[query] + low[query]
  gallery = order[position]
  other_camera = gallery_camids[gallery] != query_camids[query]
  num_matches = np.bincount(query[other_camera], minlength=len(query_pids))
  return num_matches.astype(np.int32), gallery[other_camera].astype(np.int32)


def _check_rerank(rerank: Mapping[str, Any] | None, metric: str) -> dict[str, Any] | None:
  if rerank is None:
    return None
  if not isinstance(rerank, Mapping):
    raise ValueError(
      f"rerank must be None or a dict with keys k1, k2, lambda_value; got {type(rerank).__name__}."
    )
  unknown = set(rerank) - {"k1", "k2", "lambda_value"}
  if unknown:
    raise ValueError(f"Unknown rerank keys {sorted(unknown)}; expected k1, k2, lambda_value.")
  if metric != "euclidean":
    raise ValueError(
      "rerank uses the squared euclidean distance of the "
      "original algorithm: it requires metric='euclidean'."
    )
  return dict(rerank)


def _check_query_expansion(query_expansion: Mapping[str, Any] | None) -> dict[str, Any] | None:
  if query_expansion is None:
    return None
  if not isinstance(query_expansion, Mapping):
    raise ValueError(
      "query_expansion must be None or a dict with keys k, alpha, "
      f"times; got {type(query_expansion).__name__}."
    )
  unknown = set(query_expansion) - {"k", "alpha", "times"}
  if unknown:
    raise ValueError(f"Unknown query_expansion keys {sorted(unknown)}; expected k, alpha, times.")
  return dict(query_expansion)


def evaluate(
  query_features: Any,
  gallery_features: Any,
  query_pids: Any,
  gallery_pids: Any,
  query_camids: Any,
  gallery_camids: Any,
  *,
  metric: str = "euclidean",
  normalize: bool = True,
  max_rank: int = 50,
  query_expansion: Mapping[str, Any] | None = None,
  rerank: Mapping[str, Any] | None = None,
  chunk_size: int = 256,
) -> dict[str, Any]:
  """Scores a query set against a gallery with CMC, mAP and mINP.

  Args:
    query_features: (Q, D) query features.
    gallery_features: (G, D) gallery features.
    query_pids: (Q,) person ids of the queries (any comparable labels).
    gallery_pids: (G,) person ids of the gallery.
    query_camids: (Q,) camera ids of the queries.
    gallery_camids: (G,) camera ids of the gallery.
    metric: ``'euclidean'`` (``sqrt(max(squared distance, 1e-12))``) or
      ``'cosine'`` (``1 - cosine similarity``; always on unit vectors, so
      ``normalize`` does not change it).
    normalize: L2-normalise the features first (the official protocol).
    max_rank: length of the returned CMC curve. Ranks beyond the number of
      kept gallery items repeat the last value (the official code shortens
      the curve to the gallery size instead).
    query_expansion: ``None``, or ``dict(k=5, alpha=3.0, times=1)`` (any
      subset; these are the defaults) to replace the (normalised) features by
      their alpha query expansion over the query and gallery pool first; see
      :func:`apnet_jax.evaluation.query_expansion.alpha_query_expansion`.
      It comes before re-ranking when both are given, as in fast-reid.
    rerank: ``None``, or ``dict(k1=20, k2=6, lambda_value=0.3)`` (any subset;
      these are the defaults) to score the k-reciprocal re-ranked distance
      (Zhong et al., CVPR 2017) of the (normalised) features instead; see
      :func:`apnet_jax.evaluation.rerank.k_reciprocal_rerank`.
    chunk_size: queries per jitted step; the last chunk is padded. Memory
      per step is about ``chunk_size x G`` floats (a few of them with
      re-ranking, which never holds more than one chunk of the re-ranked
      distance either).

  Returns:
    ``{'cmc': float64 array (max_rank,), 'mAP': float, 'mINP': float,
    'num_valid_queries': int}``.

  Raises:
    ValueError: on inconsistent or non-finite inputs, an empty query set or
      gallery, or when no query has a true match in another camera.
  """
  if metric not in _METRICS:
    raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}.")
  if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)):
    raise ValueError(f"max_rank must be an int, got {max_rank!r}.")
  if max_rank < 1:
    raise ValueError(f"max_rank must be at least 1, got {max_rank}.")
  if (
    isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1
  ):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
  query_expansion = _check_query_expansion(query_expansion)
  rerank = _check_rerank(rerank, metric)
  query_features = rerank_lib.as_feature_matrix("query_features", query_features)
  gallery_features = rerank_lib.as_feature_matrix("gallery_features", gallery_features)
  rerank_lib.check_same_dim(query_features, gallery_features)
  num_query, num_gallery = len(query_features), len(gallery_features)
  query_pid_codes, gallery_pid_codes = _codes(
    _as_labels("query_pids", query_pids, num_query),
    _as_labels("gallery_pids", gallery_pids, num_gallery),
    "pids",
  )
  query_cam_codes, gallery_cam_codes = _codes(
    _as_labels("query_camids", query_camids, num_query),
    _as_labels("gallery_camids", gallery_camids, num_gallery),
    "camids",
  )

  num_matches, match_gallery = _true_matches(
    query_pid_codes, query_cam_codes, gallery_pid_codes, gallery_cam_codes
  )
  valid = num_matches > 0
  if not valid.any():
    raise ValueError(
      "No valid query: no query has a gallery item with the same pid seen "
      "by another camera. Check that query and gallery pids/camids come "
      "from the same dataset split."
    )

  padded_gallery = -(-num_gallery // _GALLERY_BLOCK) * _GALLERY_BLOCK
  normalize_features = normalize or metric == "cosine"
  if query_expansion is not None:
    # The expansion averages the features this protocol scores: unit vectors
    # when it normalises (its output is normalised again below).
    if normalize_features:
      query_features = np.asarray(rerank_lib.l2_normalize(jnp.asarray(query_features)))
      gallery_features = np.asarray(rerank_lib.l2_normalize(jnp.asarray(gallery_features)))
    query_features, gallery_features = query_expansion_lib.alpha_query_expansion(
      query_features, gallery_features, chunk_size=chunk_size, **query_expansion
    )
  label_padding = ((0, padded_gallery - num_gallery),)
  gallery_labels = _GalleryLabels(
    pids=jnp.asarray(np.pad(gallery_pid_codes, label_padding, constant_values=-1)),
    camids=jnp.asarray(np.pad(gallery_cam_codes, label_padding, constant_values=-1)),
    size=jnp.asarray(num_gallery, jnp.int32),
  )

  match_start = np.concatenate([[0], np.cumsum(num_matches)])
  chunk_starts = range(0, num_query, chunk_size)
  slots_per_chunk = max(
    match_start[min(start + chunk_size, num_query)] - match_start[start] for start in chunk_starts
  )
  num_slots = max(1, -(-slots_per_chunk // _SLOT_ROUNDING)) * _SLOT_ROUNDING

  def query_chunk(start: int) -> _QueryChunk:
    stop = min(start + chunk_size, num_query)
    pad = chunk_size - (stop - start)
    first, last = match_start[start], match_start[stop]
    slot_query = np.full(num_slots, chunk_size, np.int32)
    slot_query[: last - first] = np.repeat(
      np.arange(stop - start, dtype=np.int32), num_matches[start:stop]
    )
    slot_gallery = np.zeros(num_slots, np.int32)
    slot_gallery[: last - first] = match_gallery[first:last]
    return _QueryChunk(
      pids=jnp.asarray(np.pad(query_pid_codes[start:stop], (0, pad), constant_values=-2)),
      camids=jnp.asarray(np.pad(query_cam_codes[start:stop], (0, pad), constant_values=-2)),
      slot_query=jnp.asarray(slot_query),
      slot_gallery=jnp.asarray(slot_gallery),
      num_matches=jnp.asarray(np.pad(num_matches[start:stop], (0, pad))),
    )

  # Dispatch every chunk before reading any result back: JAX runs them
  # asynchronously while the host prepares the next one.
  results = []
  if rerank is None:
    gallery_features = _GalleryFeatures(
      *_prepare_features(
        jnp.asarray(gallery_features), normalize=normalize_features, padded_size=padded_gallery
      )
    )
    for start in chunk_starts:
      query = query_features[start : start + chunk_size]
      query, query_squared_norms = _prepare_features(
        jnp.asarray(np.pad(query, ((0, chunk_size - len(query)), (0, 0)))),
        normalize=normalize_features,
        padded_size=chunk_size,
      )
      results.append(
        _evaluate_feature_chunk(
          query,
          query_squared_norms,
          gallery_features,
          gallery_labels,
          query_chunk(start),
          metric=metric,
        )
      )
  else:
    if normalize:
      query_features = np.asarray(rerank_lib.l2_normalize(jnp.asarray(query_features)))
      gallery_features = np.asarray(rerank_lib.l2_normalize(jnp.asarray(gallery_features)))
    blocks = rerank_lib.k_reciprocal_rerank_chunks(
      query_features, gallery_features, chunk_size=chunk_size, **rerank
    )
    for start, block in blocks:
      block = np.pad(block, ((0, chunk_size - len(block)), (0, padded_gallery - num_gallery)))
      results.append(
        _evaluate_distance_chunk(jnp.asarray(block), gallery_labels, query_chunk(start))
      )

  ap, inp, first_rank = (
    np.concatenate([np.asarray(r[i]) for r in results])[:num_query] for i in range(3)
  )
  num_valid = int(valid.sum())
  first_hits = np.bincount(np.minimum(first_rank[valid], max_rank), minlength=max_rank + 1)[
    :max_rank
  ]
  return {
    "cmc": np.cumsum(first_hits) / num_valid,
    "mAP": float(np.mean(ap[valid], dtype=np.float64)),
    "mINP": float(np.mean(inp[valid], dtype=np.float64)),
    "num_valid_queries": num_valid,
  }
