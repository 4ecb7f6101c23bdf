"""Every pixel format an image can come in: 8-bit RGB as the builders, pipeline and extract read it.

The expected pixels are computed here with numpy from the arrays written, not
by the decoder under test.
"""

import io

import numpy as np
import PIL.Image
import pytest

from apnet_jax import images
from apnet_jax.data import pipeline
from apnet_jax.datasets import reid_common
from apnet_jax.evaluation import plots

H, W = 16, 8


def _encode(image, fmt="PNG"):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def _ramp16():
  """A 16-bit grey ramp over the whole range, 0 to 65535."""
  return np.linspace(0, 65535, H * W).round().astype(np.uint16).reshape(H, W)


def _grey(array):
  return np.repeat(array[..., None], 3, axis=-1)


def test_a_16_bit_png_is_scaled_to_8_bits_not_saturated():
  ramp = _ramp16()
  data = _encode(PIL.Image.fromarray(ramp))
  assert PIL.Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit on disk
  expected = _grey(np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8))
  # The same pixels through every reader: pictures, the pipeline, the builders' check.
  np.testing.assert_array_equal(plots.decode(data), expected)
  np.testing.assert_array_equal(pipeline.decode_and_resize(data, height=H, width=W), expected)
  reid_common.check_image(data, "bounding_box_train/0001_c1s1_000001_00.png")
  assert expected.min() == 0 and expected.max() == 255  # not white


def test_32_bit_integer_samples_in_the_16_bit_range_are_scaled_the_same():
  ramp = _ramp16()
  image = PIL.Image.fromarray(ramp.astype(np.int32), "I")
  expected = _grey(np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8))
  np.testing.assert_array_equal(np.asarray(images.to_rgb(image, "ramp")), expected)


def test_palette_grey_alpha_and_cmyk_images_read_their_colours():
  rng = np.random.default_rng(0)
  # Palette: each pixel is its palette entry.
  palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
  index = rng.integers(0, 256, (H, W), dtype=np.uint8)
  indexed = PIL.Image.fromarray(index, "P")
  indexed.putpalette(palette.tobytes())
  np.testing.assert_array_equal(plots.decode(_encode(indexed)), palette[index])
  # Grey + alpha and RGBA: the stored colour, alpha dropped (the official convert("RGB")).
  grey, alpha = rng.integers(0, 256, (2, H, W), dtype=np.uint8)
  la = PIL.Image.fromarray(np.stack([grey, alpha], -1), "LA")
  np.testing.assert_array_equal(plots.decode(_encode(la)), _grey(grey))
  rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
  np.testing.assert_array_equal(
    plots.decode(_encode(PIL.Image.fromarray(rgba, "RGBA"))), rgba[..., :3]
  )
  # CMYK (a JPEG can hold it): R = 255 - C without black, as in PIL's own conversion.
  cmy = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
  cmyk = PIL.Image.fromarray(np.concatenate([cmy, np.zeros((H, W, 1), np.uint8)], -1), "CMYK")
  np.testing.assert_array_equal(np.asarray(images.to_rgb(cmyk, "cmyk")), 255 - cmy)
  # Two-level images.
  bits = rng.integers(0, 2, (H, W)).astype(bool)
  np.testing.assert_array_equal(
    plots.decode(_encode(PIL.Image.fromarray(bits))), _grey(bits.astype(np.uint8) * 255)
  )


@pytest.mark.parametrize(
  "image, match",
  [
    (
      PIL.Image.fromarray(np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W), "F"),
      r"ramp\.tif: .*'F'",
    ),
    (PIL.Image.fromarray(np.full((H, W), -5, np.int32), "I"), r"ramp\.tif: .*'I'.*-5"),
  ],
  ids=["float", "negative"],
)
def test_formats_without_an_8_bit_reading_are_refused_by_name(image, match):
  data = _encode(image, "TIFF")
  with pytest.raises(images.ImageModeError, match=match):
    images.decode_rgb(data, "ramp.tif")
  with pytest.raises(ValueError, match=r"'ramp\.tif'.*mode"):
    pipeline.decode_and_resize(data, height=H, width=W, filename="ramp.tif")
