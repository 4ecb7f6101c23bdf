"""Tests of alpha query expansion against a per-item numpy reference, and in evaluate."""

import numpy as np
import pytest
from test_evaluation import _assert_same, _planted

from apnet_jax.evaluation import alpha_query_expansion, evaluate

# -- Reference: fast-reid's aqe, item by item, in float64 ----------------------


def _reference_expansion(query, gallery, k, alpha, times):
  """Each item becomes the mean over its k most similar pool items of feature * sim**alpha."""
  features = np.concatenate([query, gallery]).astype(np.float64)
  for _ in range(times):
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    expanded = np.empty_like(features)
    for i in range(len(features)):
      similarity = unit @ unit[i]
      nearest = np.argsort(-similarity, kind="stable")[:k]  # ties: lower index first
      terms = [features[j] * similarity[j] ** alpha for j in nearest]
      expanded[i] = np.mean(terms, axis=0)
    features = expanded
  return features[: len(query)], features[len(query) :]


def _features(seed, num_query=23, num_gallery=61, dim=10):
  """Continuous features around a few centres: neighbours are close, no ties."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((8, dim))
  ids = rng.integers(0, 8, num_query + num_gallery)
  features = centres[ids] + 0.6 * rng.standard_normal((len(ids), dim))
  # Norms far from 1 and unequal: averaging raw or unit features would differ.
  features *= rng.uniform(0.5, 4.0, (len(ids), 1))
  features = features.astype(np.float32)
  return features[:num_query], features[num_query:]


def _assert_close(actual, expected):
  for a, e in zip(actual, expected):
    assert a.dtype == np.float32 and a.shape == e.shape
    np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-6)


# -- Agreement with the reference ----------------------------------------------


@pytest.mark.parametrize(
  "k, alpha, times",
  [(5, 3.0, 1), (2, 1.0, 1), (10, 0.0, 1), (7, 3, 2), (4, 5.5, 3), (84, 2.0, 1), (84, 3.0, 1)],
)
def test_matches_reference(k, alpha, times):
  query, gallery = _features(seed=k)
  if alpha % 1:
    # A negative similarity to a fractional power is undefined: with
    # non-negative features no similarity is negative.
    query, gallery = np.abs(query), np.abs(gallery)
  result = alpha_query_expansion(query, gallery, k=k, alpha=alpha, times=times, chunk_size=16)
  _assert_close(result, _reference_expansion(query, gallery, k, alpha, times))


def test_chunk_size_does_not_change_the_result():
  query, gallery = _features(seed=3)
  results = [
    alpha_query_expansion(query, gallery, k=6, alpha=3.0, times=2, chunk_size=size)
    for size in (1, 7, 64, 1000)
  ]
  for result in results[1:]:
    _assert_close(result, results[0])


# -- Properties that need no formula -------------------------------------------


def test_k1_leaves_distinct_features_unchanged():
  # Each item's nearest item is itself, at similarity 1.
  query, gallery = _features(seed=4)
  expanded = alpha_query_expansion(query, gallery, k=1, alpha=3.0, times=3)
  _assert_close(expanded, (query, gallery))


def test_plain_mean_over_the_whole_pool_gives_every_item_the_pool_mean():
  query, gallery = _features(seed=5)
  pool = np.concatenate([query, gallery])
  expanded = alpha_query_expansion(query, gallery, k=len(pool), alpha=0.0)
  mean = pool.astype(np.float64).mean(axis=0)
  _assert_close(expanded, (np.tile(mean, (len(query), 1)), np.tile(mean, (len(gallery), 1))))


def test_the_pool_is_query_and_gallery_together():
  # Where the split between query and gallery lies does not matter.
  query, gallery = _features(seed=6)
  whole = np.concatenate(alpha_query_expansion(query, gallery, k=5, alpha=3.0))
  moved = np.concatenate(
    alpha_query_expansion(query[:5], np.concatenate([query[5:], gallery]), k=5, alpha=3.0)
  )
  _assert_close((moved,), (whole,))


def test_ties_go_to_the_lower_pool_index():
  # Items 0 and 1 point the same way (similarity exactly 1 to each other), so
  # with k = 1 both take item 0, the query, with weight 1 ** alpha = 1.
  query = np.array([[1.0, 0.0, 0.0]], np.float32)
  gallery = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], np.float32)
  expanded_query, expanded_gallery = alpha_query_expansion(query, gallery, k=1, alpha=3.0)
  np.testing.assert_array_equal(expanded_query, query)
  np.testing.assert_array_equal(expanded_gallery, [query[0], gallery[1]])


# -- In evaluate -----------------------------------------------------------------


@pytest.mark.parametrize(
  "metric, normalize", [("euclidean", True), ("euclidean", False), ("cosine", False)]
)
def test_evaluate_scores_the_expanded_features(metric, normalize):
  query, gallery, qp, gp, qc, gc = _planted(seed=8, num_query=30, num_gallery=170)
  params = dict(k=4, alpha=3.0, times=2)
  options = dict(metric=metric, normalize=normalize, chunk_size=8)
  result = evaluate(query, gallery, qp, gp, qc, gc, query_expansion=params, **options)
  if normalize or metric == "cosine":  # first normalise, then expand, as re-ranking does
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  by_hand = _reference_expansion(query, gallery, **params)
  expected = evaluate(*by_hand, qp, gp, qc, gc, **options)
  _assert_same(result, expected)
  assert result["mAP"] != evaluate(query, gallery, qp, gp, qc, gc)["mAP"]


def test_evaluate_expands_before_reranking():
  query, gallery, qp, gp, qc, gc = _planted(seed=9, num_query=30, num_gallery=170)
  expansion, rerank = dict(k=3, alpha=3.0), dict(k1=6, k2=3, lambda_value=0.3)
  result = evaluate(
    query, gallery, qp, gp, qc, gc, query_expansion=expansion, rerank=rerank, chunk_size=8
  )
  query = query / np.linalg.norm(query, axis=1, keepdims=True)
  gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  by_hand = _reference_expansion(query, gallery, times=1, **expansion)
  expected = evaluate(*by_hand, qp, gp, qc, gc, rerank=rerank, chunk_size=8)
  _assert_same(result, expected)


# -- Bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(k=0), "k must be at least 1"),
    (dict(k=2.0), "k must be an int"),
    (dict(k=10), "k = 10 must not exceed the 9 query and gallery items"),
    (dict(alpha=-1.0), "alpha must be a finite number >= 0"),
    (dict(alpha=float("nan")), "alpha must be a finite number >= 0"),
    (dict(alpha="3"), "alpha must be a finite number >= 0"),
    (dict(times=0), "times must be at least 1"),
    (dict(chunk_size=0), "chunk_size must be at least 1"),
  ],
)
def test_rejects_bad_parameters(kwargs, message):
  query, gallery = _features(seed=10, num_query=3, num_gallery=6)
  with pytest.raises(ValueError, match=message):
    alpha_query_expansion(query, gallery, **{"k": 2, "alpha": 3.0, **kwargs})


def test_rejects_bad_features():
  query, gallery = _features(seed=11, num_query=3, num_gallery=6)
  with pytest.raises(ValueError, match="query_features must be 2-D"):
    alpha_query_expansion(query[0], gallery, k=2, alpha=3.0)
  with pytest.raises(ValueError, match="dimension 10 but gallery_features have dimension 9"):
    alpha_query_expansion(query, gallery[:, :9], k=2, alpha=3.0)
  with pytest.raises(ValueError, match="gallery_features is empty"):
    alpha_query_expansion(query, gallery[:0], k=2, alpha=3.0)
  bad = gallery.copy()
  bad[2, 0] = np.nan
  with pytest.raises(ValueError, match=r"gallery_features has non-finite values .* \[2\]"):
    alpha_query_expansion(query, bad, k=2, alpha=3.0)


def test_rejects_a_fractional_power_of_a_negative_similarity():
  query = np.array([[1.0, 0.0]], np.float32)
  gallery = np.array([[-1.0, 0.1], [0.0, 1.0]], np.float32)
  # Items 0 and 1 are anti-correlated and, with k = 3, among each other's
  # nearest: an integer power of their similarity is defined, a fractional one
  # is not.
  expanded, _ = alpha_query_expansion(query, gallery, k=3, alpha=3.0)
  assert np.isfinite(expanded).all()
  with pytest.raises(ValueError, match=r"alpha = 2\.5 is not an integer .* k = 3"):
    alpha_query_expansion(query, gallery, k=3, alpha=2.5)


@pytest.mark.parametrize(
  "query_expansion, message",
  [
    (dict(k=2, beta=1), r"Unknown query_expansion keys \['beta'\]"),
    ([("k", 2)], "query_expansion must be None or a dict"),
    (dict(k=0), "k must be at least 1"),
    (dict(alpha=-2), "alpha must be a finite number >= 0"),
  ],
)
def test_evaluate_rejects_bad_query_expansion(query_expansion, message):
  data = _planted(seed=7, num_query=6, num_gallery=30)
  with pytest.raises(ValueError, match=message):
    evaluate(*data, query_expansion=query_expansion)
