"""Tests of the on-device train augmentation and normalization."""

import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from apnet_jax.data import augment

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
FILL = np.array([0.485, 0.456, 0.406], np.float32)  # Official PIXEL_MEAN.


def _images(batch=8, height=24, width=12, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


def _np_normalize(images):
  return (images.astype(np.float32) / np.float32(255.0) - MEAN) / STD


def _erased_masks(out):
  """Pixels whose three channels all equal the fill values."""
  return np.all(np.asarray(out) == FILL, axis=-1)


def test_normalize_matches_numpy_reference():
  images = _images()
  out = augment.normalize(images)
  assert out.dtype == jnp.float32 and out.shape == images.shape
  np.testing.assert_allclose(out, _np_normalize(images), rtol=0, atol=1e-6)


def test_shapes_dtypes_and_determinism():
  images = _images()
  key = jax.random.key(0)
  a = augment.train_augment(key, images)
  b = augment.train_augment(key, images)
  c = augment.train_augment(jax.random.key(1), images)
  assert a.shape == images.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_no_randomness_enabled_is_plain_normalization():
  images = _images()
  out = augment.train_augment(jax.random.key(3), images, pad=0, flip_p=0.0, erase_p=0.0)
  np.testing.assert_allclose(out, _np_normalize(images), atol=1e-6)


def test_forced_flip_mirrors_the_width_axis():
  images = _images()
  out = augment.train_augment(jax.random.key(3), images, pad=0, flip_p=1.0, erase_p=0.0)
  np.testing.assert_allclose(out, _np_normalize(images[:, :, ::-1]), atol=1e-6)


def test_half_flip_probability_flips_about_half():
  images = _images(batch=200, height=4, width=6)
  out = np.asarray(augment.train_augment(jax.random.key(5), images, pad=0, flip_p=0.5, erase_p=0.0))
  flipped = np.all(
    np.isclose(out, _np_normalize(images[:, :, ::-1]), atol=1e-6),
    axis=(1, 2, 3),
  )
  kept = np.all(np.isclose(out, _np_normalize(images), atol=1e-6), axis=(1, 2, 3))
  assert np.all(flipped | kept)
  assert 60 <= flipped.sum() <= 140  # Binomial(200, 0.5): ~7 sigma margin.


def test_pad_and_crop_is_a_window_of_the_zero_padded_image():
  pad = 2
  images = _images(batch=32, height=10, width=6, seed=1)
  out = np.asarray(
    augment.train_augment(jax.random.key(7), images, pad=pad, flip_p=0.0, erase_p=0.0)
  )
  # Zero padding happens on uint8 before normalization (torchvision Pad).
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = set()
  for i in range(len(images)):
    matches = [
      (dy, dx)
      for dy in range(2 * pad + 1)
      for dx in range(2 * pad + 1)
      if np.allclose(
        out[i],
        _np_normalize(padded[i, dy : dy + 10, dx : dx + 6]),
        atol=1e-6,
      )
    ]
    assert len(matches) == 1, (i, matches)
    offsets.add(matches[0])
  assert len(offsets) > 5  # 25 equally likely offsets, 32 draws.


def _rectangle(mask):
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
  # The erased pixels fill their bounding box exactly.
  assert mask.sum() == h * w, mask.astype(int)
  return h, w


def test_forced_erasing_fills_one_valid_rectangle_with_the_mean():
  height, width = 64, 32
  images = np.zeros((64, height, width, 3), np.uint8)  # Never equals FILL.
  out = augment.train_augment(jax.random.key(11), images, pad=0, flip_p=0.0, erase_p=1.0)
  masks = _erased_masks(out)
  for mask in masks:
    assert mask.any()
    h, w = _rectangle(mask)
    assert h < height and w < width
    # h, w are rounded from sqrt(area * r), sqrt(area / r).
    area = height * width
    assert (math.sqrt(0.02 * area) - 1) ** 2 <= h * w
    assert h * w <= (math.sqrt(0.4 * area) + 1) ** 2
    assert 0.3 * (w - 1) - 1 <= h <= (w + 1) / 0.3 + 1
  # Off-mask pixels are untouched (the zero image, normalized).
  np.testing.assert_allclose(
    np.asarray(out)[~masks],
    np.broadcast_to(-MEAN / STD, (np.sum(~masks), 3)),
    atol=1e-6,
  )


def test_erasing_probability_and_disabled_erasing():
  images = np.zeros((200, 32, 16, 3), np.uint8)
  key = jax.random.key(12)
  half = _erased_masks(augment.train_augment(key, images, pad=0, flip_p=0.0, erase_p=0.5))
  erased = half.any(axis=(1, 2)).sum()
  assert 60 <= erased <= 140
  none = _erased_masks(augment.train_augment(key, images, pad=0, flip_p=0.0, erase_p=0.0))
  assert not none.any()


def _official_erase_shapes(height, width, count, seed):
  """(h, w) of the official RandomErasing loop, rewritten plainly."""
  rng = random.Random(seed)
  shapes = []
  for _ in range(count):
    for _ in range(100):
      area = height * width * rng.uniform(0.02, 0.4)
      aspect = rng.uniform(0.3, 1 / 0.3)
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      if w < width and h < height:
        shapes.append((h, w))
        break
    else:
      shapes.append(None)
  return shapes


def test_erased_rectangle_distribution_matches_the_official_loop():
  # A wide image makes many attempts invalid (h >= H), so the first-valid
  # selection matters for the distribution.
  height, width, count = 16, 48, 600
  reference = [s for s in _official_erase_shapes(height, width, 4000, 0) if s]
  ref_h = np.array([s[0] for s in reference], float)
  ref_w = np.array([s[1] for s in reference], float)
  images = np.zeros((count, height, width, 3), np.uint8)
  masks = _erased_masks(
    augment.train_augment(jax.random.key(13), images, pad=0, flip_p=0.0, erase_p=1.0)
  )
  ours = np.array([_rectangle(m) for m in masks], float)
  for got, ref in ((ours[:, 0], ref_h), (ours[:, 1], ref_w)):
    stderr = math.sqrt(got.var() / len(got) + ref.var() / len(ref))
    assert abs(got.mean() - ref.mean()) < 4 * stderr, (got.mean(), ref.mean())


def test_failed_attempts_leave_the_image_unerased():
  # 64 x 4: an attempt is valid only when w rounds below 4, which is rare;
  # with one attempt most images stay intact, with 100 almost none do.
  images = np.zeros((300, 64, 4, 3), np.uint8)
  key = jax.random.key(14)

  def erased_fraction(attempts):
    masks = _erased_masks(
      augment.train_augment(
        key,
        images,
        pad=0,
        flip_p=0.0,
        erase_p=1.0,
        erase_attempts=attempts,
      )
    )
    for mask in masks[masks.any(axis=(1, 2))]:
      assert _rectangle(mask)[1] < 4
    return masks.any(axis=(1, 2)).mean()

  assert erased_fraction(1) < 0.5
  assert erased_fraction(100) > 0.9


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_works_inside_jit_on_a_sharded_batch(axis_type):
  images = _images(batch=16, height=16, width=8)
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(axis_type,))
  sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))

  @jax.jit
  def step(seed, step_index, batch):
    key = jax.random.fold_in(jax.random.key(seed), step_index)
    return augment.train_augment(key, batch).mean(axis=(1, 2, 3))

  got = step(0, 3, sharded)
  want = augment.train_augment(jax.random.fold_in(jax.random.key(0), 3), images).mean(
    axis=(1, 2, 3)
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "images, kwargs, match",
  [
    (np.zeros((2, 8, 4, 3), np.float32), {}, "uint8"),
    (np.zeros((8, 4, 3), np.uint8), {}, r"\(B, H, W, 3\)"),
    (np.zeros((2, 8, 4, 3), np.uint8), {"pad": -1}, r"\bpad\b.*-1"),
    (np.zeros((2, 8, 4, 3), np.uint8), {"erase_min_aspect": 2.0}, r"erase_min_aspect.*2\.0"),
  ],
)
def test_invalid_inputs_raise(images, kwargs, match):
  with pytest.raises(ValueError, match=match):
    augment.train_augment(jax.random.key(0), images, **kwargs)
