"""Tests of the re-ID metrics (CMC, mAP, mINP) against a plain numpy protocol."""

import numpy as np
import pytest

from apnet_jax.evaluation import evaluate, k_reciprocal_rerank

# -- Reference: the protocol, one query at a time, in float64 -----------------


def _reference_distances(query, gallery, metric, normalize):
  query = np.asarray(query, np.float64)
  gallery = np.asarray(gallery, np.float64)
  if normalize or metric == "cosine":
    query = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    gallery = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
  if metric == "cosine":
    return 1.0 - query @ gallery.T
  squared = ((query[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
  return np.sqrt(np.maximum(squared, 1e-12))


def _reference_metrics(distances, query_pids, gallery_pids, query_camids, gallery_camids, max_rank):
  cmc_sum = np.zeros(max_rank)
  aps, inps = [], []
  for i in range(len(distances)):
    order = np.argsort(distances[i], kind="stable")  # ties: lower gallery index first
    same_pid = gallery_pids[order] == query_pids[i]
    same_cam = gallery_camids[order] == query_camids[i]
    kept = ~(same_pid & same_cam)
    is_match = same_pid[kept]
    if not is_match.any():
      continue
    match_ranks = np.flatnonzero(is_match)  # 0-based ranks of the true matches
    cmc_sum += np.arange(max_rank) >= match_ranks[0]
    aps.append(np.mean(np.arange(1, len(match_ranks) + 1) / (match_ranks + 1)))
    inps.append(len(match_ranks) / (match_ranks[-1] + 1))
  return {
    "cmc": cmc_sum / len(aps),
    "mAP": float(np.mean(aps)),
    "mINP": float(np.mean(inps)),
    "num_valid_queries": len(aps),
  }


def _assert_same(result, expected):
  assert set(result) == {"cmc", "mAP", "mINP", "num_valid_queries"}
  assert result["num_valid_queries"] == expected["num_valid_queries"]
  assert result["cmc"].shape == expected["cmc"].shape
  np.testing.assert_allclose(result["cmc"], expected["cmc"], rtol=0, atol=1e-6)
  assert result["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
  assert result["mINP"] == pytest.approx(expected["mINP"], abs=1e-6)


# -- Data ----------------------------------------------------------------------


def _planted(seed=0, num_query=37, num_gallery=300, dim=16, noise=0.9):
  """Identities with a feature centre each, seen by several cameras.

  The gallery holds true matches (same pid, other camera), same-camera copies
  of query identities (removed by the protocol), distractor pids absent from
  the query set, and queries whose pid has only same-camera gallery items or
  none at all (skipped).
  """
  rng = np.random.default_rng(seed)
  num_ids, num_cams = 12, 4
  centres = rng.standard_normal((num_ids + 6, dim))
  query_pids = rng.integers(0, num_ids, num_query)
  query_camids = rng.integers(0, num_cams, num_query)
  # pid num_ids: only in camera 0 everywhere (no valid match); pid num_ids + 1:
  # a query pid absent from the gallery.
  query_pids[:3] = num_ids
  query_camids[:3] = 0
  query_pids[3] = num_ids + 1
  gallery_pids = rng.integers(0, num_ids + 6, num_gallery)
  gallery_pids[gallery_pids == num_ids + 1] = num_ids + 2
  gallery_camids = rng.integers(0, num_cams, num_gallery)
  gallery_camids[gallery_pids == num_ids] = 0
  # Same pid and camera as some query: junk the protocol must remove.
  junk = min(20, num_query - 4)
  gallery_pids[:junk] = query_pids[4 : 4 + junk]
  gallery_camids[:junk] = query_camids[4 : 4 + junk]
  query = centres[query_pids] + noise * rng.standard_normal((num_query, dim))
  gallery = centres[gallery_pids] + noise * rng.standard_normal((num_gallery, dim))
  return (
    query.astype(np.float32),
    gallery.astype(np.float32),
    query_pids,
    gallery_pids,
    query_camids,
    gallery_camids,
  )


def _check(data, *, metric="euclidean", normalize=True, max_rank=50, chunk_size=8):
  query, gallery, qp, gp, qc, gc = data
  result = evaluate(
    query,
    gallery,
    qp,
    gp,
    qc,
    gc,
    metric=metric,
    normalize=normalize,
    max_rank=max_rank,
    chunk_size=chunk_size,
  )
  distances = _reference_distances(query, gallery, metric, normalize)
  expected = _reference_metrics(distances, qp, gp, qc, gc, max_rank)
  _assert_same(result, expected)
  return result


# -- Agreement with the reference ------------------------------------------------


def test_euclidean_normalized_matches_reference():
  data = _planted(seed=0)
  result = _check(data, chunk_size=8)  # 37 queries: the last chunk is padded
  # The planted data exercises every case of the protocol.
  assert result["num_valid_queries"] < len(data[0])
  assert 0.3 < result["mAP"] < 1.0
  assert 0.0 < result["cmc"][0] < 1.0


@pytest.mark.parametrize("normalize", [True, False])
def test_cosine_matches_reference(normalize):
  _check(_planted(seed=1), metric="cosine", normalize=normalize, chunk_size=16)


def test_unnormalized_euclidean_matches_reference():
  query, gallery, *ids = _planted(seed=2)
  # Different norms per item, so normalising would change the ranking.
  scale = np.random.default_rng(2).uniform(0.2, 5.0, (len(gallery), 1)).astype(np.float32)
  _check((query, gallery * scale, *ids), normalize=False, chunk_size=64)


def test_ties_are_broken_by_gallery_index():
  # Small integer features: every distance is exact in float32 and float64, and
  # duplicated gallery rows give exactly tied distances.
  rng = np.random.default_rng(3)
  num_query, num_gallery = 21, 140
  query = rng.integers(-2, 3, (num_query, 6)).astype(np.float32)
  base = rng.integers(-2, 3, (num_gallery // 2, 6)).astype(np.float32)
  gallery = np.concatenate([base, base])[rng.permutation(num_gallery)]
  qp = rng.integers(0, 5, num_query)
  gp = rng.integers(0, 5, num_gallery)
  qc = rng.integers(0, 3, num_query)
  gc = rng.integers(0, 3, num_gallery)
  distances = _reference_distances(query, gallery, "euclidean", False)
  assert np.mean([len(np.unique(row)) < len(row) / 2 for row in distances]) == 1.0
  _check((query, gallery, qp, gp, qc, gc), normalize=False, chunk_size=5)


def test_max_rank_longer_than_gallery_saturates():
  query, gallery, *ids = _planted(seed=4, num_query=9, num_gallery=40)
  result = _check((query, gallery, *ids), max_rank=60, chunk_size=4)
  assert result["cmc"].shape == (60,)
  assert result["cmc"][-1] == 1.0


def test_labels_of_any_integer_range_and_strings():
  query, gallery, qp, gp, qc, gc = _planted(seed=5)
  expected = evaluate(query, gallery, qp, gp, qc, gc)
  # Large/negative pids and string camera ids only matter through equality.
  shifted = evaluate(
    query,
    gallery,
    qp * 10**12 - 1,
    gp * 10**12 - 1,
    np.char.add("cam", qc.astype(str)),
    np.char.add("cam", gc.astype(str)),
  )
  _assert_same(shifted, expected)


@pytest.mark.parametrize("normalize", [True, False])
def test_rerank_scores_the_rerank_distance(normalize):
  query, gallery, qp, gp, qc, gc = _planted(seed=6, num_query=30, num_gallery=170)
  params = dict(k1=6, k2=3, lambda_value=0.3)
  result = evaluate(
    query, gallery, qp, gp, qc, gc, normalize=normalize, rerank=params, chunk_size=8
  )
  if normalize:  # first normalise, then re-rank (the official R1_mAP_reranking)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  distances = k_reciprocal_rerank(query, gallery, **params)
  _assert_same(result, _reference_metrics(distances, qp, gp, qc, gc, 50))
  plain = evaluate(query, gallery, qp, gp, qc, gc)
  assert result["mAP"] != plain["mAP"]


# -- Bad input -------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
  return _planted(seed=7, num_query=6, num_gallery=30)


def _call(data, **kwargs):
  return evaluate(*data, **kwargs)


def test_rejects_mismatched_lengths(small):
  q, g, qp, gp, qc, gc = small
  with pytest.raises(ValueError, match=r"query_pids.*\b5\b"):
    evaluate(q, g, qp[:5], gp, qc, gc)
  with pytest.raises(ValueError, match=r"gallery_camids.*\b29\b"):
    evaluate(q, g, qp, gp, qc, gc[:29])
  with pytest.raises(ValueError, match="query_camids"):
    evaluate(q, g, qp, gp, qc[:, None], gc)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_rejects_non_finite_features(small, bad):
  q, g, qp, gp, qc, gc = small
  g = g.copy()
  g[3, 1] = bad
  with pytest.raises(ValueError, match=r"gallery_features.*\[3\]"):
    evaluate(q, g, qp, gp, qc, gc)


def test_rejects_empty_sets(small):
  q, g, qp, gp, qc, gc = small
  with pytest.raises(ValueError, match="gallery_features"):
    evaluate(q, g[:0], qp, gp[:0], qc, gc[:0])
  with pytest.raises(ValueError, match="query_features"):
    evaluate(q[:0], g, qp[:0], gp, qc[:0], gc)


def test_rejects_mismatched_dims_and_shapes(small):
  q, g, qp, gp, qc, gc = small
  with pytest.raises(ValueError) as error:
    evaluate(q, g[:, :15], qp, gp, qc, gc)
  for name in ("query_features", "16", "gallery_features", "15"):
    assert name in str(error.value)
  with pytest.raises(ValueError, match="query_features"):
    evaluate(q[0], g, qp, gp, qc, gc)


def test_rejects_no_valid_query(small):
  q, g, qp, gp, qc, gc = small
  with pytest.raises(ValueError, match="No valid query"):
    evaluate(q, g, qp, gp + 1000, qc, gc)
  # Every gallery item of the query pids in the query's own camera.
  with pytest.raises(ValueError, match="No valid query"):
    evaluate(q, g, np.zeros(6), np.zeros(30), np.zeros(6), np.zeros(30))


def test_rejects_labels_of_different_types(small):
  q, g, qp, gp, qc, gc = small
  # As strings, query pid 1 and gallery pid '1' would silently count as equal.
  with pytest.raises(ValueError, match="query_pids.*numbers.*gallery_pids.*strings"):
    evaluate(q, g, qp, gp.astype(str), qc, gc)
  with pytest.raises(ValueError, match="query_camids.*strings.*gallery_camids.*numbers"):
    evaluate(q, g, qp, gp, qc.astype(str), gc)
  # One type on both sides is fine, whatever it is: the metrics do not change.
  as_numbers = evaluate(q, g, qp, gp, qc, gc)
  as_strings = evaluate(q, g, qp.astype(str), gp.astype(str), qc, gc)
  assert as_strings["mAP"] == as_numbers["mAP"]


@pytest.mark.parametrize(
  "kwargs, names",
  [
    (dict(max_rank=0), ("max_rank",)),
    (dict(max_rank=2.5), ("max_rank", "2.5")),
    (dict(metric="manhattan"), ("metric", "'manhattan'")),
    (dict(chunk_size=0), ("chunk_size",)),
    (dict(rerank=dict(k1=5, k3=2)), ("rerank", "'k3'")),
    (dict(rerank=dict(k1=5), metric="cosine"), ("rerank", "metric='euclidean'")),
    (dict(rerank=dict(k1=0)), ("k1",)),
    (dict(rerank=dict(lambda_value=1.5)), ("lambda_value", "1.5")),
    (dict(rerank=dict(k1=40)), ("k1", "36")),
  ],
)
def test_rejects_bad_arguments(small, kwargs, names):
  with pytest.raises(ValueError) as error:
    _call(small, **kwargs)
  for name in names:
    assert name in str(error.value)


def test_ranked_list_picture_frames_each_verdict(tmp_path):
  from PIL import Image

  from apnet_jax.evaluation import plots

  rng = np.random.default_rng(0)
  colours = rng.integers(0, 256, (2, 4, 3)).astype(np.uint8)  # one flat colour per image
  flat = lambda c, hw: np.broadcast_to(c, (*hw, 3))  # noqa: E731
  queries = [flat(colours[i, 0], (128, 64)) for i in range(2)]
  gallery = [[flat(colours[i, j], (40 + 10 * j, 20)) for j in range(1, 4)] for i in range(2)]
  matches = np.array([[True, False, True], [False, False, True]])
  plots.plot_ranked_lists(
    queries,
    gallery,
    matches,
    str(tmp_path / "ranked.png"),
    query_labels=["pid 1", "a very long file name.jpg"],
  )
  picture = np.asarray(Image.open(tmp_path / "ranked.png").convert("RGB"))
  plots.plot_ranked_lists(queries, gallery, None, str(tmp_path / "unknown.png"))
  unknown = np.asarray(Image.open(tmp_path / "unknown.png").convert("RGB"))

  cell_h, cell_w = plots._CELL_HW
  framed_w, framed_h = cell_w + 2 * plots._FRAME, cell_h + 2 * plots._FRAME
  hex_rgb = lambda h: [int(h[k : k + 2], 16) for k in (1, 3, 5)]  # noqa: E731
  assert picture.shape == (
    plots._GAP + 2 * (plots._TEXT + framed_h + plots._GAP),
    plots._GAP + plots._QUERY_GAP + 4 * (framed_w + plots._GAP),
    3,
  )
  for i in range(2):
    for column in range(4):
      x = plots._GAP + column * (framed_w + plots._GAP) + (plots._QUERY_GAP if column else 0)
      y = plots._GAP + i * (plots._TEXT + framed_h + plots._GAP) + plots._TEXT
      frame = (
        plots._QUERY if column == 0 else plots._MATCH if matches[i, column - 1] else plots._MISMATCH
      )
      assert picture[y + 1, x + 1].tolist() == hex_rgb(frame), (i, column)
      assert picture[y + framed_h // 2, x + framed_w // 2].tolist() == colours[i, column].tolist()
      if column:
        assert unknown[y + 1, x + 1].tolist() == hex_rgb(plots._UNKNOWN)
  # Captions are written (dark pixels in the text band above the first row).
  assert (picture[plots._GAP : plots._GAP + plots._TEXT] < 100).any()


def test_rank_orders_by_normalized_distance_and_survives_zero_features():
  from apnet_jax.evaluation import plots

  query = np.array([[1.0, 0.0], [0.0, 0.0]])
  gallery = np.array([[0.0, 5.0], [3.0, 0.1], [0.0, 0.0], [-2.0, 0.0]])
  order, dist = plots.rank(query, gallery, top=4, exclude=np.array([[0, 0, 0, 1], [0] * 4]) > 0)
  # Query 0 against unit directions: (3, 0.1) nearest, then the zero feature
  # and (0, 5) both at sqrt(2) (ties by index), (-2, 0) left out.
  assert order[0].tolist() == [1, 0, 2, 3]
  np.testing.assert_allclose(
    dist[0, :3], [np.sqrt(2 - 2 * 3 / np.hypot(3, 0.1)), np.sqrt(2), np.sqrt(2)], rtol=1e-6
  )
  assert dist[0, 3] == np.inf
  # A zero query is at sqrt(2) from everything, not NaN.
  np.testing.assert_allclose(dist[1], np.sqrt(2))
