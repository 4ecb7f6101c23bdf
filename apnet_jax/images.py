"""Encoded images to 8-bit RGB: the one decoder of every image the project reads.

The builders' checks, the input pipeline, ``--mode extract`` and the pictures
all decode through `decode_rgb`, so an image is either read the same way
everywhere or refused by name before anything is built from it.

``PIL.Image.convert("RGB")`` alone is wrong for high-bit-depth images: it clips
16- and 32-bit integer samples at 255, so a 16-bit PNG becomes white. Those
are scaled here to the 8-bit range instead (``round(v * 255 / 65535)``).
Alpha is dropped and the stored colour kept, as the official code's
``convert("RGB")`` does: re-ID crops are photographs, and compositing onto a
chosen background would invent pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Modes PIL converts to RGB correctly (alpha, if any, dropped). 'La' (alpha
# premultiplied grey) has no direct conversion; it goes through 'LA'.
_PIL_CONVERTS = (
  "1",
  "L",
  "LA",
  "La",
  "P",
  "PA",
  "RGB",
  "RGBA",
  "RGBa",
  "RGBX",
  "CMYK",
  "YCbCr",
  "LAB",
  "HSV",
)
# Integer modes whose samples are 16-bit (PIL opens 16-bit greyscale PNGs as
# 'I;16' or, in older versions, as 32-bit 'I' holding 0..65535).
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_SIXTEEN_BIT_MAX = 65535


class ImageModeError(ValueError):
  """An image whose pixel format cannot be mapped to 8-bit RGB; names the file and mode."""


def to_rgb(image: Image.Image, name: str) -> Image.Image:
  """``image`` (any mode PIL reads) as 8-bit RGB; refuses the modes it cannot map, by name.

  Raises:
    ImageModeError: naming ``name`` and the mode: floating-point samples (no fixed
      range to scale from), integer samples outside 0..65535, or a mode not
      listed above.
  """
  mode = image.mode
  if mode in _PIL_CONVERTS:
    return (image.convert("LA") if mode == "La" else image).convert("RGB")
  if mode in _SIXTEEN_BIT:
    samples = np.asarray(image).astype(np.int64)
    if samples.size and (samples.min() < 0 or samples.max() > _SIXTEEN_BIT_MAX):
      raise ImageModeError(
        f"{name}: mode {mode!r} holds samples from {samples.min()} to {samples.max()}, "
        f"outside the 16-bit range 0..{_SIXTEEN_BIT_MAX} this reader scales from; save it "
        "as an 8- or 16-bit PNG or a JPEG."
      )
    grey = (samples * 255 + _SIXTEEN_BIT_MAX // 2) // _SIXTEEN_BIT_MAX  # rounded
    return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
  what = (
    "floating-point samples, which have no fixed range to scale to 8 bits"
    if mode == "F"
    else "a pixel format this reader does not map to RGB"
  )
  raise ImageModeError(
    f"{name}: image mode {mode!r} holds {what}; save it as an 8- or 16-bit PNG or a JPEG."
  )


def decode_rgb(data: bytes, name: str) -> Image.Image:
  """Decodes the encoded image ``data`` completely to 8-bit RGB (see `to_rgb`).

  Raises:
    ValueError: naming ``name``, if the bytes are not a readable image or its
      mode cannot be mapped to RGB.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # a truncated file fails only here
      return to_rgb(image, name)
  except ImageModeError:
    raise
  except Exception as e:  # PIL raises many types; all mean a broken file.
    raise ValueError(f"cannot decode image {name}: {e}") from e
