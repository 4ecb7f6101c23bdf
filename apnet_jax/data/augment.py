"""On-device training augmentation and normalization (pure, jittable JAX).

The Grain pipeline hands over uint8 (B, H, W, 3) images already resized to the
network input; everything random that the official recipe does after the
resize runs here, inside the jitted train step, so only uint8 crosses the
host-to-device bus. The order and parameters follow the official transform
list (torchvision on PIL images, then tensors):

1. ``RandomHorizontalFlip(p=0.5)``
2. ``Pad(10)`` with zeros, then ``RandomCrop((H, W))``: the crop offset is
   uniform in ``[0, 2 * pad]`` on each axis, so black borders of up to 20
   pixels can enter the image.
3. ``ToTensor`` + ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``.
4. ``RandomErasing(p=0.5)`` on the *normalized* image: up to 100 attempts
   draw an area fraction uniform in [0.02, 0.4] and an aspect ratio uniform
   (not log-uniform) in [0.3, 1/0.3]; ``h = round(sqrt(area * aspect))``,
   ``w = round(sqrt(area / aspect))``; the first attempt with ``h < H`` and
   ``w < W`` is placed at a uniform top-left corner and filled per channel
   with ``erase_fill``. The official APNet builds the erasing transform with
   ``mean=cfg.INPUT.PIXEL_MEAN`` = (0.485, 0.456, 0.406), so it writes those
   raw values into the normalized tensor (not zeros, and not the class
   default (0.4914, 0.4822, 0.4465), which reid-strong-baseline's class has
   but its builder also overrides). That is our default.

The 100 sequential attempts become fixed shapes: every image draws all
attempts at once and keeps the first valid one (``argmax`` of the validity
mask); the rectangle is applied as a mask. An image whose attempts all fail
is left unerased, as in the official loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize", "train_augment"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@jax.jit
def normalize(images: jax.Array) -> jax.Array:
  """Maps uint8 images to ImageNet-normalized float32.

  Same arithmetic as torchvision ``ToTensor`` then ``Normalize``:
  ``(x / 255 - mean) / std`` per channel.

  Args:
    images: uint8 (..., H, W, 3).

  Returns:
    float32 array of the same shape.
  """
  if images.shape[-1] != 3:
    raise ValueError(f"images must have 3 channels last, got {images.shape}.")
  x = images.astype(jnp.float32) / 255.0
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (x - mean) / std


def _flip_pad_crop(key: jax.Array, images: jax.Array, pad: int, flip_p: float) -> jax.Array:
  """Random horizontal flip, zero padding and random crop back to (H, W)."""
  batch, height, width, _ = images.shape
  flip_key, y_key, x_key = jax.random.split(key, 3)
  flip = jax.random.uniform(flip_key, (batch,)) < flip_p
  images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  top = jax.random.randint(y_key, (batch, 1), 0, 2 * pad + 1)
  left = jax.random.randint(x_key, (batch, 1), 0, 2 * pad + 1)
  # Per-image windows as two gathers along H then W (no vmap, which would
  # reject a batch-sharded image next to unsharded offsets).
  rows = (top + jnp.arange(height))[:, :, None, None]
  cols = (left + jnp.arange(width))[:, None, :, None]
  padded = jnp.take_along_axis(padded, rows, axis=1)
  return jnp.take_along_axis(padded, cols, axis=2)


def _erase(
  key: jax.Array,
  images: jax.Array,
  p: float,
  area: tuple[float, float],
  min_aspect: float,
  attempts: int,
  fill: tuple[float, float, float],
) -> jax.Array:
  """Random erasing with ``attempts`` candidate rectangles per image."""
  batch, height, width, _ = images.shape
  apply_key, area_key, aspect_key, y_key, x_key = jax.random.split(key, 5)
  apply = jax.random.uniform(apply_key, (batch,)) < p
  target_area = (height * width) * jax.random.uniform(
    area_key, (batch, attempts), minval=area[0], maxval=area[1]
  )
  aspect = jax.random.uniform(
    aspect_key, (batch, attempts), minval=min_aspect, maxval=1.0 / min_aspect
  )
  # jnp.round rounds half to even, like Python's round() in the official code.
  h_all = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
  w_all = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  valid = (h_all < height) & (w_all < width)
  first = jnp.argmax(valid, axis=1)  # 0 when none is valid; masked below.
  h = jnp.take_along_axis(h_all, first[:, None], axis=1)[:, 0]
  w = jnp.take_along_axis(w_all, first[:, None], axis=1)[:, 0]
  apply = apply & valid.any(axis=1)
  # Top-left corner uniform over the inclusive range [0, H - h] (resp. W - w),
  # as random.randint draws.
  top = jnp.floor(jax.random.uniform(y_key, (batch,)) * (height - h + 1))
  left = jnp.floor(jax.random.uniform(x_key, (batch,)) * (width - w + 1))
  top = jnp.minimum(top.astype(jnp.int32), height - h)
  left = jnp.minimum(left.astype(jnp.int32), width - w)
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
  in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
  mask = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]
  fill = jnp.asarray(fill, images.dtype)
  return jnp.where(mask[..., None], fill, images)


@functools.partial(
  jax.jit,
  static_argnames=(
    "pad",
    "flip_p",
    "erase_p",
    "erase_area",
    "erase_min_aspect",
    "erase_attempts",
    "erase_fill",
  ),
)
def train_augment(
  rng: jax.Array,
  images: jax.Array,
  *,
  pad: int = 10,
  flip_p: float = 0.5,
  erase_p: float = 0.5,
  erase_area: tuple[float, float] = (0.02, 0.4),
  erase_min_aspect: float = 0.3,
  erase_attempts: int = 100,
  erase_fill: tuple[float, float, float] = IMAGENET_MEAN,
) -> jax.Array:
  """Official APNet train augmentation of a resized uint8 batch.

  Flip, zero-pad + random crop, normalize, random erasing (see the module
  docstring for the exact semantics). Pure: the output depends only on
  ``rng`` and ``images``; derive ``rng`` from (seed, step) for reproducible,
  resumable training. Fully vectorized over the batch and jitted, so it can
  be called standalone or inside a jitted train step on sharded batches.

  Args:
    rng: A JAX PRNG key.
    images: uint8 (B, H, W, 3) images at the network input size.
    pad: Zero padding on each side before the random crop.
    flip_p: Probability of a horizontal flip.
    erase_p: Probability of random erasing.
    erase_area: (min, max) erased fraction of the image area.
    erase_min_aspect: Smallest aspect ratio h / w; the largest is its inverse.
    erase_attempts: Candidate rectangles per image.
    erase_fill: Per-channel value written into the normalized image.

  Returns:
    float32 (B, H, W, 3) normalized, augmented images.
  """
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != jnp.uint8:
    raise ValueError(f"images must be uint8 (B, H, W, 3); got {images.dtype} {images.shape}.")
  if pad < 0 or erase_attempts < 1:
    raise ValueError(f"need pad >= 0 and erase_attempts >= 1, got {pad}, {erase_attempts}.")
  if not (0.0 < erase_area[0] <= erase_area[1] and 0.0 < erase_min_aspect <= 1.0):
    raise ValueError(
      "need 0 < erase_area[0] <= erase_area[1] and 0 < erase_min_aspect <= 1;"
      f" got {erase_area}, {erase_min_aspect}."
    )
  crop_key, erase_key = jax.random.split(rng)
  images = _flip_pad_crop(crop_key, images, pad, flip_p)
  return _erase(
    erase_key,
    normalize(images),
    erase_p,
    erase_area,
    erase_min_aspect,
    erase_attempts,
    erase_fill,
  )
