"""A procedurally drawn re-ID benchmark: no download, built in seconds.

It lets a new user run the whole system (prepare, train, evaluate) in
minutes. Pedestrians are drawn with PIL:

* an identity is a body shape (height, shoulder width, head size, leg length)
  and clothing (upper and lower garment colours, an upper pattern: plain,
  stripes or checks; trousers or shorts; shoes; hair; optionally a hat, a
  backpack or a shoulder bag);
* a camera is a background (colour and texture), an illumination gain and a
  colour cast, a blur, and a framing (scale and offset);
* an image adds a pose (front or back view, stride, arm swing), framing
  jitter, garment colour noise and sensor noise.

Splits follow Market-1501: train ids (1..N) are disjoint from test ids; every
test id has one query image per camera, and its other images of that camera
(same-camera matches, junk for the protocol) and of the other cameras are in
the gallery, with distractors (pid 0, each a one-off person) added. Files are
named like Market's: ``bounding_box_train/0001_c1_000.jpg``.

Difficulty knobs (`SyntheticReidConfig`): ``color_noise``, ``pose_jitter``,
``shared_clothing`` (identities copying a garment of another, so that no
single colour identifies a person), ``camera_cast`` and ``pixel_noise``.
Everything is drawn from ``seed``: a build is deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter
import tensorflow_datasets as tfds

from .. import reid_common

# Garment base colours (RGB): distinct hues and greys, as worn in the street.
_PALETTE = np.array(
  [
    (200, 30, 30),
    (30, 60, 160),
    (40, 130, 60),
    (220, 200, 40),
    (240, 240, 235),
    (25, 25, 30),
    (120, 120, 125),
    (150, 90, 40),
    (230, 120, 30),
    (110, 40, 130),
    (60, 170, 190),
    (230, 150, 170),
    (90, 110, 50),
    (170, 160, 130),
  ],
  dtype=np.float32,
)
_SKIN = np.array(
  [(240, 200, 170), (210, 160, 120), (160, 110, 75), (100, 65, 45)],
  dtype=np.float32,
)
_HAIR = np.array(
  [(20, 15, 10), (70, 45, 25), (150, 110, 60), (200, 180, 130), (120, 120, 120)],
  dtype=np.float32,
)
_PATTERNS = ("plain", "stripes", "checks")
_BAGS = ("none", "backpack", "shoulder")
# Purposes of the random streams, so that each one is independent.
_IDENTITY, _CAMERA, _IMAGE, _DISTRACTOR, _SHARING = range(5)


@dataclasses.dataclass(eq=False)
class SyntheticReidConfig(tfds.core.BuilderConfig):
  """Sizes and difficulty of a synthetic re-ID dataset.

  Attributes:
    num_train_ids: identities of the train split (pids 1..num_train_ids).
    num_test_ids: identities of query and gallery (the following pids).
    num_distractors: gallery images of one-off people (pid 0).
    num_cameras: cameras; every identity is seen by all of them.
    images_per_id_per_camera: images of an identity in a camera (>= 2: for a
      test id, the first is the query, the others go to the gallery).
    height: image height in pixels.
    width: image width in pixels.
    seed: seed of everything drawn.
    color_noise: std of the per-image relative garment colour jitter.
    pose_jitter: scale (0..1) of the per-image framing and pose variation.
    shared_clothing: probability that an identity copies the upper (and,
      independently, the lower) garment of another identity of its split.
    camera_cast: strength of each camera's illumination and colour cast.
    pixel_noise: std of the sensor noise, in 0..255 units.
  """

  num_train_ids: int = 100
  num_test_ids: int = 100
  num_distractors: int = 100
  num_cameras: int = 4
  images_per_id_per_camera: int = 3
  height: int = 128
  width: int = 64
  seed: int = 0
  color_noise: float = 0.08
  pose_jitter: float = 0.5
  shared_clothing: float = 0.3
  camera_cast: float = 0.15
  pixel_noise: float = 3.0

  def __post_init__(self):
    checks = {
      "num_train_ids": self.num_train_ids >= 1,
      "num_test_ids": self.num_test_ids >= 1,
      "num_distractors": self.num_distractors >= 0,
      "num_cameras": self.num_cameras >= 2,
      "images_per_id_per_camera": self.images_per_id_per_camera >= 2,
      "height": self.height >= 32,
      "width": self.width >= 16,
      "shared_clothing": 0.0 <= self.shared_clothing <= 1.0,
      "pose_jitter": 0.0 <= self.pose_jitter <= 1.0,
    }
    for field, ok in checks.items():
      if not ok:
        raise ValueError(
          f"SyntheticReidConfig.{field}={getattr(self, field)!r} is out of"
          " range (cameras and images per id per camera need >= 2, so that"
          " every query has a cross-camera match)."
        )


@dataclasses.dataclass(frozen=True)
class _Person:
  """What identifies a person: body shape and clothing."""

  body_height: float  # fraction of the frame height
  shoulder: float  # fraction of the frame width
  head: float  # fraction of the body height
  leg: float  # fraction of the body height
  skin: np.ndarray
  hair: np.ndarray
  upper: np.ndarray
  upper_pattern: str
  upper_second: np.ndarray
  pattern_period: int
  lower: np.ndarray
  shorts: bool
  shoes: np.ndarray
  hat: np.ndarray | None
  bag: str
  bag_colour: np.ndarray
  bag_side: int  # -1 left, 1 right


@dataclasses.dataclass(frozen=True)
class _Camera:
  background: np.ndarray
  texture: str
  texture_colour: np.ndarray
  gain: float
  cast: np.ndarray
  blur: float
  scale: float
  offset_y: float


def _colour(rng: np.random.Generator, palette: np.ndarray, spread: float) -> np.ndarray:
  base = palette[rng.integers(len(palette))]
  return np.clip(base + rng.normal(0, spread, 3), 0, 255)


def _draw_person(rng: np.random.Generator) -> _Person:
  return _Person(
    body_height=rng.uniform(0.76, 0.94),
    shoulder=rng.uniform(0.30, 0.50),
    head=rng.uniform(0.11, 0.16),
    leg=rng.uniform(0.40, 0.52),
    skin=_colour(rng, _SKIN, 8),
    hair=_colour(rng, _HAIR, 8),
    upper=_colour(rng, _PALETTE, 18),
    upper_pattern=_PATTERNS[rng.integers(len(_PATTERNS))],
    upper_second=_colour(rng, _PALETTE, 18),
    pattern_period=int(rng.integers(3, 7)),
    lower=_colour(rng, _PALETTE, 18),
    shorts=bool(rng.random() < 0.25),
    shoes=_colour(rng, _PALETTE, 10) * 0.5,
    hat=_colour(rng, _PALETTE, 15) if rng.random() < 0.25 else None,
    bag=_BAGS[rng.integers(len(_BAGS))],
    bag_colour=_colour(rng, _PALETTE, 15),
    bag_side=int(rng.choice((-1, 1))),
  )


def _share_clothing(
  people: list[_Person], probability: float, rng: np.random.Generator
) -> list[_Person]:
  """Lets identities copy the upper or lower garment of another one."""
  shared = list(people)
  for i in range(len(people)):
    if len(people) < 2:
      break
    for fields in (
      ("upper", "upper_pattern", "upper_second", "pattern_period"),
      ("lower", "shorts"),
    ):
      if rng.random() < probability:
        j = (i + 1 + int(rng.integers(len(people) - 1))) % len(people)
        shared[i] = dataclasses.replace(shared[i], **{f: getattr(people[j], f) for f in fields})
  return shared


def _draw_camera(rng: np.random.Generator, strength: float) -> _Camera:
  background = rng.uniform(60, 200, 3)
  return _Camera(
    background=background,
    texture=("plain", "gradient", "tiles", "noise")[rng.integers(4)],
    texture_colour=np.clip(background + rng.normal(0, 35, 3), 0, 255),
    gain=1.0 + rng.uniform(-1, 1) * 2 * strength,
    cast=1.0 + rng.normal(0, strength / 2, 3),
    blur=rng.uniform(0.0, 1.0),
    scale=rng.uniform(0.92, 1.04),
    offset_y=rng.uniform(-0.03, 0.03),
  )


def _background(camera: _Camera, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
  image = np.empty((height, width, 3), np.float32)
  image[:] = camera.background
  rows = np.linspace(0, 1, height)[:, None, None]
  if camera.texture == "gradient":
    image = image * (1 - 0.4 * rows) + camera.texture_colour * 0.4 * rows
  elif camera.texture == "tiles":
    size = max(4, height // 10)
    shift = rng.integers(size)
    y, x = np.mgrid[:height, :width]
    tiles = ((y + shift) // size + (x + shift) // size) % 2 == 0
    image[tiles] = camera.texture_colour
  elif camera.texture == "noise":
    image += rng.normal(0, 18, (height, width, 1))
  # A floor line at the feet, so that framing shows.
  floor = int(height * rng.uniform(0.85, 0.95))
  image[floor:] = image[floor:] * 0.8
  return image


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
  return tuple(int(c) for c in np.clip(colour, 0, 255))


def _render(
  person: _Person,
  camera: _Camera,
  config: SyntheticReidConfig,
  image_seed: Sequence[int],
) -> bytes:
  """Draws one JPEG of ``person`` seen by ``camera``."""
  rng = np.random.default_rng(list(image_seed))
  height, width = config.height, config.width
  jitter = config.pose_jitter

  def noisy(colour):
    return colour * (1 + rng.normal(0, config.color_noise, 3))

  canvas = PIL.Image.fromarray(
    np.clip(_background(camera, height, width, rng), 0, 255).astype(np.uint8)
  )
  draw = PIL.ImageDraw.Draw(canvas)
  scale = camera.scale * (1 + rng.normal(0, 0.05 * jitter))
  body = height * person.body_height * scale
  top = (height - body) / 2 + height * (camera.offset_y + rng.normal(0, 0.03 * jitter))
  cx = width / 2 + width * rng.normal(0, 0.06 * jitter)
  back_view = bool(rng.random() < 0.5)
  stride = rng.uniform(0, 0.12) * width * (0.5 + jitter)
  swing = rng.uniform(-1, 1) * 0.08 * width * (0.5 + jitter)

  head = body * person.head
  neck = top + head
  hip = top + body * (1 - person.leg)
  feet = top + body
  half = width * person.shoulder / 2
  upper, lower = noisy(person.upper), noisy(person.lower)
  skin = noisy(person.skin)

  # Legs (trousers, or shorts showing skin below the knee) and shoes.
  knee = hip + (feet - hip) * 0.45
  for side in (-1, 1):
    foot_x = cx + side * (half * 0.45 + stride / 2)
    hip_x = cx + side * half * 0.35
    leg_w = half * 0.32
    leg = [
      (hip_x - leg_w, hip),
      (hip_x + leg_w, hip),
      (foot_x + leg_w * 0.8, feet),
      (foot_x - leg_w * 0.8, feet),
    ]
    draw.polygon(leg, fill=_rgb(lower))
    if person.shorts:
      ky = knee
      kx = hip_x + (foot_x - hip_x) * 0.45
      draw.polygon(
        [
          (kx - leg_w * 0.9, ky),
          (kx + leg_w * 0.9, ky),
          (foot_x + leg_w * 0.7, feet),
          (foot_x - leg_w * 0.7, feet),
        ],
        fill=_rgb(skin),
      )
    draw.ellipse(
      [foot_x - leg_w * 1.2, feet - head * 0.25, foot_x + leg_w * 1.2, feet + head * 0.1],
      fill=_rgb(noisy(person.shoes)),
    )

  # Arms (sleeves in the upper colour, skin hands), swinging.
  for side in (-1, 1):
    shoulder_x = cx + side * half
    hand_x = shoulder_x + side * width * 0.03 + side * swing
    hand_y = hip + (feet - hip) * 0.12
    draw.line(
      [(shoulder_x, neck + head * 0.3), (hand_x, hand_y)],
      fill=_rgb(upper),
      width=max(2, int(width * 0.09)),
    )
    r = max(1.5, width * 0.04)
    draw.ellipse([hand_x - r, hand_y - r, hand_x + r, hand_y + r], fill=_rgb(skin))

  # Torso with its pattern, drawn through a mask.
  torso = [
    (cx - half, neck + head * 0.15),
    (cx + half, neck + head * 0.15),
    (cx + half * 0.8, hip + head * 0.2),
    (cx - half * 0.8, hip + head * 0.2),
  ]
  mask = PIL.Image.new("L", canvas.size, 0)
  PIL.ImageDraw.Draw(mask).polygon(torso, fill=255)
  cloth = np.empty((height, width, 3), np.float32)
  cloth[:] = upper
  period = person.pattern_period
  y, x = np.mgrid[:height, :width]
  if person.upper_pattern == "stripes":
    cloth[(y // period) % 2 == 0] = noisy(person.upper_second)
  elif person.upper_pattern == "checks":
    cloth[((y // period) + (x // period)) % 2 == 0] = noisy(person.upper_second)
  canvas.paste(PIL.Image.fromarray(np.clip(cloth, 0, 255).astype(np.uint8)), mask=mask)

  # Bags: a backpack covers the back (straps from the front); a shoulder bag
  # hangs at the hip on its side, with a strap across the chest.
  bag = _rgb(noisy(person.bag_colour))
  if person.bag == "backpack":
    if back_view:
      draw.rectangle(
        [cx - half * 0.7, neck + head * 0.4, cx + half * 0.7, hip - head * 0.1], fill=bag
      )
    else:
      for side in (-1, 1):
        draw.line(
          [(cx + side * half * 0.55, neck + head * 0.15), (cx + side * half * 0.5, hip)],
          fill=bag,
          width=2,
        )
  elif person.bag == "shoulder":
    side = person.bag_side if not back_view else -person.bag_side
    bx = cx + side * half * 1.05
    draw.line([(cx - side * half * 0.6, neck + head * 0.2), (bx, hip)], fill=bag, width=2)
    draw.rectangle(
      [bx - half * 0.35, hip - head * 0.5, bx + half * 0.35, hip + head * 0.5], fill=bag
    )

  # Head: face (front) or hair (back), optional hat.
  head_w = head * 0.8
  draw.ellipse(
    [cx - head_w / 2, top, cx + head_w / 2, neck], fill=_rgb(person.hair if back_view else skin)
  )
  if not back_view:
    draw.chord(
      [cx - head_w / 2, top, cx + head_w / 2, neck], 180, 360, fill=_rgb(noisy(person.hair))
    )
  if person.hat is not None:
    hat = _rgb(noisy(person.hat))
    draw.rectangle(
      [cx - head_w / 2, top - head * 0.15, cx + head_w / 2, top + head * 0.3], fill=hat
    )
    draw.rectangle(
      [cx - head_w * 0.75, top + head * 0.22, cx + head_w * 0.75, top + head * 0.32], fill=hat
    )

  # The camera: blur, illumination and colour cast, sensor noise.
  if camera.blur > 0.05:
    canvas = canvas.filter(PIL.ImageFilter.GaussianBlur(camera.blur))
  pixels = np.asarray(canvas, np.float32) * camera.gain * camera.cast
  pixels += rng.normal(0, config.pixel_noise, pixels.shape)
  buffer = io.BytesIO()
  PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
    buffer, format="JPEG", quality=90
  )
  return buffer.getvalue()


def synthetic_images(
  config: SyntheticReidConfig,
) -> dict[str, list[reid_common.ReidImage]]:
  """The images of each split (drawn lazily, when read)."""
  seed = config.seed

  def rng(*purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, *purpose])

  cameras = [_draw_camera(rng(_CAMERA, c), config.camera_cast) for c in range(config.num_cameras)]
  train_pids = list(range(1, config.num_train_ids + 1))
  test_pids = list(range(config.num_train_ids + 1, config.num_train_ids + config.num_test_ids + 1))
  people = {}
  for split_number, pids in enumerate((train_pids, test_pids)):
    drawn = [_draw_person(rng(_IDENTITY, pid)) for pid in pids]
    drawn = _share_clothing(drawn, config.shared_clothing, rng(_SHARING, split_number))
    people.update(zip(pids, drawn))

  def image(folder, pid, camid, k, person, image_seed):
    filename = f"{folder}/{pid:04d}_c{camid + 1}_{k:03d}.jpg"
    return reid_common.ReidImage(
      filename=filename,
      pid=pid,
      camid=camid,
      location=f"synthetic image {filename}",
      read=functools.partial(_render, person, cameras[camid], config, image_seed),
    )

  splits = {"train": [], "query": [], "gallery": []}
  per_camera = range(config.images_per_id_per_camera)
  for pid in train_pids + test_pids:
    for camid in range(config.num_cameras):
      for k in per_camera:
        if pid <= config.num_train_ids:
          split, folder = "train", "bounding_box_train"
        elif k == 0:
          split, folder = "query", "query"
        else:
          split, folder = "gallery", "bounding_box_test"
        splits[split].append(
          image(folder, pid, camid, k, people[pid], (seed, _IMAGE, pid, camid, k))
        )
  for k in range(config.num_distractors):
    distractor_rng = rng(_DISTRACTOR, k)
    camid = int(distractor_rng.integers(config.num_cameras))
    splits["gallery"].append(
      image(
        "bounding_box_test", 0, camid, k, _draw_person(distractor_rng), (seed, _DISTRACTOR, k, 1)
      )
    )
  return splits


class Builder(reid_common.ReidBuilder):
  """Synthetic pedestrians with Market-1501's split structure."""

  BUILDER_CONFIGS = [
    SyntheticReidConfig(
      name="small",
      description="100 train ids, 100 test ids, 4 cameras, 128x64.",
    ),
    SyntheticReidConfig(
      name="tiny",
      description="8 train ids, 8 test ids, 3 cameras, 64x32 (tests).",
      num_train_ids=8,
      num_test_ids=8,
      num_distractors=4,
      num_cameras=3,
      images_per_id_per_camera=2,
      height=64,
      width=32,
    ),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "small"

  def _collect_images(
    self, dl_manager: tfds.download.DownloadManager
  ) -> tuple[str, dict[str, list[reid_common.ReidImage]]]:
    del dl_manager  # nothing to download
    return "synthetic", synthetic_images(self.builder_config)
