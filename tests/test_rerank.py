"""Tests of the memory-bounded k-reciprocal re-ranking against a dense version."""

import re

import numpy as np
import pytest

from apnet_jax.evaluation import k_reciprocal_rerank, k_reciprocal_rerank_chunks
from apnet_jax.evaluation import rerank as rerank_lib

# -- Reference: Zhong et al.'s algorithm with dense N x N arrays, in float64 ----


def _reference_rerank(query, gallery, k1, k2, lambda_value):
  """Dense re-ranking, step by step as in reid-strong-baseline's re_ranking.

  Returns the query x gallery distance and how many items had their
  k-reciprocal set expanded (so a test can check that the rule was exercised).
  """
  features = np.concatenate([query, gallery]).astype(np.float64)
  num_query, num_items = len(query), len(features)
  norms = (features**2).sum(1)
  squared = norms[:, None] + norms[None, :] - 2.0 * features @ features.T
  # Columns divided by their maximum over all items, then transposed.
  original = (squared / squared.max(axis=0)).T
  ranking = np.argsort(original, axis=1, kind="stable")

  def reciprocal(i, k):
    forward = ranking[i, : k + 1]
    return [j for j in forward if i in ranking[j, : k + 1]]

  half = int(np.around(k1 / 2))
  half_sets = [reciprocal(i, half) for i in range(num_items)]
  encoding = np.zeros((num_items, num_items))
  expanded_items = 0
  for i in range(num_items):
    recip = reciprocal(i, k1)
    expansion = set(recip)
    for candidate in recip:
      candidate_set = half_sets[candidate]
      if len(set(candidate_set) & set(recip)) > 2 / 3 * len(candidate_set):
        expansion |= set(candidate_set)
    expanded_items += len(expansion) > len(recip)
    members = sorted(expansion)
    weights = np.exp(-original[i, members])
    encoding[i, members] = weights / weights.sum()
  if k2 != 1:
    encoding = np.stack([encoding[ranking[i, :k2]].mean(axis=0) for i in range(num_items)])
  jaccard = np.zeros((num_query, num_items))
  for i in range(num_query):
    shared = np.minimum(encoding[i][None, :], encoding).sum(axis=1)
    jaccard[i] = 1.0 - shared / (2.0 - shared)
  final = jaccard * (1.0 - lambda_value) + original[:num_query] * lambda_value
  return final[:, num_query:], expanded_items


def _clustered(seed, num_query, num_gallery, dim=12, num_ids=25):
  """Continuous features around identity centres (no distance ties)."""
  rng = np.random.default_rng(seed)
  centres = 2.0 * rng.standard_normal((num_ids, dim))
  pids = rng.integers(0, num_ids, num_query + num_gallery)
  features = centres[pids] + rng.standard_normal((len(pids), dim))
  return features[:num_query].astype(np.float32), features[num_query:].astype(np.float32)


@pytest.mark.parametrize(
  "k1, k2, lambda_value, chunk_size, neighbour_block",
  [
    (20, 6, 0.3, 64, 64),  # the paper's setting; 5 x 5 distance blocks
    (7, 1, 0.0, 24, 1024),  # odd k1 (round(3.5) = 4), no query expansion, pure Jaccard
    (9, 3, 0.5, 256, 96),  # round(4.5) = 4: numpy rounds half to even
  ],
)
def test_matches_dense_reference(k1, k2, lambda_value, chunk_size, neighbour_block, monkeypatch):
  # Small blocks so that the symmetric block-pair neighbour search runs.
  monkeypatch.setattr(rerank_lib, "_NEIGHBOUR_BLOCK", neighbour_block)
  query, gallery = _clustered(seed=k1, num_query=50, num_gallery=230)
  expected, expanded_items = _reference_rerank(query, gallery, k1, k2, lambda_value)
  assert expanded_items > 0  # the 2/3 expansion rule was exercised
  result = k_reciprocal_rerank(
    query, gallery, k1=k1, k2=k2, lambda_value=lambda_value, chunk_size=chunk_size
  )
  assert result.shape == (50, 230)
  assert result.dtype == np.float32
  np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


def test_neighbour_search_breaks_ties_by_index_across_blocks():
  # Integer features: exact squared distances with many ties.
  rng = np.random.default_rng(4)
  features = rng.integers(-1, 2, (150, 3)).astype(np.float32)
  padded = np.concatenate([features, np.zeros((10, 3), np.float32)])
  squared = ((features[:, None] - features[None]) ** 2).sum(-1)
  neighbours, row_max = rerank_lib._nearest(
    padded, (padded**2).sum(1), num_items=150, block=32, num_neighbours=9
  )
  expected = np.argsort(squared, axis=1, kind="stable")[:, :9]
  np.testing.assert_array_equal(np.asarray(neighbours)[:150], expected)
  np.testing.assert_array_equal(np.asarray(row_max)[:150], squared.max(axis=1))


def test_chunks_cover_the_queries_in_order():
  query, gallery = _clustered(seed=1, num_query=23, num_gallery=90)
  expected, _ = _reference_rerank(query, gallery, 6, 3, 0.3)
  blocks = list(k_reciprocal_rerank_chunks(query, gallery, k1=6, k2=3, chunk_size=10))
  assert [start for start, _ in blocks] == [0, 10, 20]
  assert [len(block) for _, block in blocks] == [10, 10, 3]
  np.testing.assert_allclose(np.concatenate([b for _, b in blocks]), expected, atol=1e-5)


def test_progress_counts_block_pairs_then_queries(capsys, monkeypatch):
  monkeypatch.setattr(rerank_lib, "_NEIGHBOUR_BLOCK", 32)
  query, gallery = _clustered(seed=1, num_query=23, num_gallery=90)
  blocks = k_reciprocal_rerank_chunks(query, gallery, k1=6, k2=3, chunk_size=10)
  next(blocks)
  err = capsys.readouterr().err
  # 113 items in 4 blocks of 32: 4 + 3 + 2 + 1 block pairs of the symmetric search.
  assert re.search(r"re-rank neighbours: 100%\|[^|]*\| 10/10 \[[^]]*block", err), err
  assert "re-rank:" in err and "23/23" not in err  # 10 of the 23 queries so far
  list(blocks)
  err = capsys.readouterr().err
  assert re.search(r"re-rank: 100%\|[^|]*\| 23/23 \[[^]]*query", err), err


@pytest.mark.parametrize(
  "kwargs, names",
  [
    (dict(k1=0), ("k1",)),
    (dict(k2=0), ("k2",)),
    (dict(k1=2.0), ("k1", "2.0")),
    (dict(k1=30), ("k1", "30")),
    (dict(k2=31), ("k2", "31")),
    (dict(lambda_value=-0.1), ("lambda_value", "-0.1")),
    (dict(lambda_value="0.3"), ("lambda_value", "'0.3'")),
    (dict(chunk_size=0), ("chunk_size",)),
  ],
)
def test_rejects_bad_parameters(kwargs, names):
  query, gallery = _clustered(seed=2, num_query=5, num_gallery=25)
  # Checked when called, before any block is asked for.
  with pytest.raises(ValueError) as error:
    k_reciprocal_rerank_chunks(query, gallery, **kwargs)
  for name in names:
    assert name in str(error.value)


def test_rejects_bad_features():
  query, gallery = _clustered(seed=3, num_query=5, num_gallery=25)
  bad = query.copy()
  bad[2, 0] = np.nan
  with pytest.raises(ValueError, match=r"query_features.*\[2\]"):
    k_reciprocal_rerank(bad, gallery)
  with pytest.raises(ValueError, match="gallery_features"):
    k_reciprocal_rerank(query, gallery[:0])
  with pytest.raises(ValueError, match=r"gallery_features.*\b11\b"):
    k_reciprocal_rerank(query, gallery[:, :11], k1=3)
  with pytest.raises(ValueError, match="distinct features"):
    k_reciprocal_rerank(np.ones((3, 4)), np.ones((8, 4)), k1=3, k2=2)
