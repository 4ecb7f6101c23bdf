"""The synthetic re-ID dataset: split structure, determinism, difficulty."""

import dataclasses

import data_fixtures as fx
import numpy as np
import pytest

from apnet_jax.data import sources
from apnet_jax.datasets.synthetic_reid import SyntheticReidConfig
from apnet_jax.datasets.synthetic_reid import synthetic_reid_dataset_builder as synthetic

TINY = synthetic.Builder.builder_configs["tiny"]


def test_tiny_build_has_market_split_structure(tiny_data_dir):
  builder = sources.get_builder("synthetic_reid", data_dir=tiny_data_dir, config="tiny")
  c = TINY
  per_id = c.num_cameras * c.images_per_id_per_camera
  sizes = {s: builder.info.splits[s].num_examples for s in ("train", "query", "gallery")}
  assert sizes == {
    "train": c.num_train_ids * per_id,
    "query": c.num_test_ids * c.num_cameras,
    "gallery": c.num_test_ids * (per_id - c.num_cameras) + c.num_distractors,
  }
  train, query, gallery = (fx.records(builder, s) for s in ("train", "query", "gallery"))
  train_pids = {r[1] for r in train}
  assert train_pids == set(range(1, c.num_train_ids + 1))
  assert sorted({r[3] for r in train}) == list(range(c.num_train_ids))
  assert all(r[3] == -1 for r in query + gallery)
  assert not train_pids & {r[1] for r in query + gallery}
  assert 0 in {r[1] for r in gallery}  # distractors
  for _, pid, camid, _, _ in query:
    same_id = [(g[1], g[2]) for g in gallery if g[1] == pid]
    assert any(cam != camid for _, cam in same_id)  # a cross-camera match
    assert any(cam == camid for _, cam in same_id)  # same-camera junk
  for filename, *_, image in train[:3] + gallery[-3:]:
    assert image[:2] == b"\xff\xd8", filename  # JPEG
    assert fx.decode(image).shape == (c.height, c.width, 3)


def test_deterministic_per_seed():
  def render(config):
    images = synthetic.synthetic_images(config)
    return [i.read() for i in images["train"][:4] + images["gallery"][-2:]]

  first = render(TINY)
  assert render(TINY) == first
  other = render(dataclasses.replace(TINY, name="other", seed=1))
  assert all(a != b for a, b in zip(first, other))


def test_config_checks_name_the_field():
  with pytest.raises(ValueError, match="images_per_id_per_camera=1"):
    SyntheticReidConfig(name="x", images_per_id_per_camera=1)
  with pytest.raises(ValueError, match="num_cameras=1"):
    SyntheticReidConfig(name="x", num_cameras=1)


def _mean_ap(query, gallery):
  """Plain re-ID mAP: same pid and camera removed from each query's gallery."""
  (qf, qp, qc), (gf, gp, gc) = query, gallery
  aps = []
  for f, p, c in zip(qf, qp, qc):
    keep = ~((gp == p) & (gc == c))
    order = np.argsort(((gf[keep] - f) ** 2).sum(1), kind="stable")
    match = gp[keep][order] == p
    ranks = np.flatnonzero(match)
    aps.append(np.mean(np.arange(1, len(ranks) + 1) / (ranks + 1)))
  return float(np.mean(aps))


@pytest.mark.slow
def test_identities_are_not_given_away_by_mean_colour():
  config = dataclasses.replace(
    synthetic.Builder.builder_configs["small"],
    name="check",
    num_test_ids=40,
    num_distractors=20,
  )
  splits = synthetic.synthetic_images(config)

  def describe(images, descriptor):
    pixels = [fx.decode(i.read()).astype(np.float32) for i in images]
    return (
      np.array([descriptor(p) for p in pixels]),
      np.array([i.pid for i in images]),
      np.array([i.camid for i in images]),
    )

  def mean_colour(p):
    return p.mean((0, 1))

  def person_colours(p):
    # Torso and leg colours of the image centre, after grey-world
    # normalisation (undoes a camera's gain and colour cast).
    p = p / p.mean((0, 1))
    h, w = p.shape[:2]
    centre = p[:, w // 2 - w // 8 : w // 2 + w // 8]
    return np.concatenate(
      [
        centre[int(h * 0.3) : int(h * 0.5)].mean((0, 1)),
        centre[int(h * 0.6) : int(h * 0.8)].mean((0, 1)),
      ]
    )

  by_mean = _mean_ap(
    describe(splits["query"], mean_colour), describe(splits["gallery"], mean_colour)
  )
  by_person = _mean_ap(
    describe(splits["query"], person_colours), describe(splits["gallery"], person_colours)
  )
  assert by_mean < 0.1  # the camera, not the person, dominates the mean colour
  assert by_person > 2 * by_mean  # yet the person carries identity


def test_annotations_match_records(tiny_data_dir):
  builder = sources.get_builder("synthetic_reid", data_dir=tiny_data_dir, config="tiny")
  for split in ("train", "query", "gallery"):
    rows = fx.records(builder, split)
    annotations = sources.split_annotations(
      "synthetic_reid", split, data_dir=tiny_data_dir, config="tiny"
    )
    np.testing.assert_array_equal(annotations.pid, [r[1] for r in rows])
    np.testing.assert_array_equal(annotations.camid, [r[2] for r in rows])
    np.testing.assert_array_equal(annotations.label, [r[3] for r in rows])
