"""Throughput of the training input pipeline and of the on-device augment.

Builds an in-memory, Market-1501-sized source (JPEGs of 128 x 64, Market's
native size, ~750 identities), then measures images/s of
``pipeline.train_loader`` (P x K sampling, JPEG decode, bilinear resize to
384 x 192, batching) and the time of the jitted ``augment.train_augment`` on
a batch of 80 on the default JAX backend.

  python benchmarks/input_pipeline.py --workers 0 1 2 --batches 40

Worker start-up and the first batches are excluded by a warm-up; each
setting is timed ``--repeats`` times (``--batches`` each) to show the noise.
"""

from __future__ import annotations

import argparse
import io
import os
import time

import jax
import numpy as np
from PIL import Image

from apnet_jax.data import augment, pipeline


def make_market_like_source(
  num_images: int, num_ids: int, seed: int = 0
) -> tuple[list[dict], np.ndarray]:
  """Returns synthetic train records with photo-like 128 x 64 JPEGs."""
  rng = np.random.default_rng(seed)
  # Every id gets >= 1 image; the rest are spread unevenly, like Market.
  labels = np.concatenate([np.arange(num_ids), rng.integers(0, num_ids, num_images - num_ids)])
  records = []
  for i, label in enumerate(labels):
    # Smooth content (upsampled coarse noise) compresses and decodes like a
    # photo; white noise would make JPEGs unrealistically large.
    coarse = rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((64, 128), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    records.append(
      {
        "image": buf.getvalue(),
        "pid": int(label),
        "camid": i % 6,
        "label": int(label),
        "filename": f"{label:04d}_c{i % 6 + 1}_{i:06d}.jpg",
      }
    )
  return records, labels


def time_loader(records, labels, args, num_workers: int) -> tuple[list[float], float]:
  """Times the train loader with ``num_workers`` processes.

  Returns:
    images/s of each of ``args.repeats`` runs, and images per CPU-second of
    this process (all its threads; worker processes are not counted, so it
    is only meaningful for ``num_workers=0``). The latter barely depends on
    what else runs on the machine.
  """
  it = pipeline.train_loader(
    records,
    labels,
    p=args.p,
    k=args.k,
    height=args.height,
    width=args.width,
    seed=0,
    num_workers=num_workers,
    process_index=0,
    process_count=1,
  )
  for _ in range(args.warmup):
    next(it)
  rates = []
  cpu_start = time.process_time()
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.batches):
      batch = next(it)
    elapsed = time.perf_counter() - start
    rates.append(args.batches * args.p * args.k / elapsed)
  cpu = time.process_time() - cpu_start
  assert batch["image"].shape == (args.p * args.k, args.height, args.width, 3)
  if hasattr(it, "close"):
    it.close()
  return rates, args.repeats * args.batches * args.p * args.k / cpu


def time_augment(args) -> float:
  """Returns seconds per call of the jitted train_augment (batch of p*k)."""
  rng = np.random.default_rng(0)
  images = jax.device_put(
    rng.integers(0, 256, (args.p * args.k, args.height, args.width, 3), np.uint8)
  )
  key = jax.random.key(0)
  augment.train_augment(key, images).block_until_ready()  # Compile.
  start = time.perf_counter()
  for step in range(args.augment_calls):
    out = augment.train_augment(jax.random.fold_in(key, step), images)
  out.block_until_ready()
  return (time.perf_counter() - start) / args.augment_calls


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--num-images", type=int, default=2000)
  parser.add_argument("--num-ids", type=int, default=750)
  parser.add_argument("--p", type=int, default=20)
  parser.add_argument("--k", type=int, default=4)
  parser.add_argument("--height", type=int, default=384)
  parser.add_argument("--width", type=int, default=192)
  parser.add_argument("--augment-calls", type=int, default=20)
  args = parser.parse_args()

  records, labels = make_market_like_source(args.num_images, args.num_ids)
  mean_kb = np.mean([len(r["image"]) for r in records]) / 1024
  print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
  print(
    f"source: {len(records)} JPEGs of 128x64 ({mean_kb:.1f} KiB on average),"
    f" {args.num_ids} ids; batches of p={args.p} x k={args.k} at "
    f"{args.height}x{args.width}"
  )
  # Before the loaders: their worker processes would compete with the
  # dispatch of the augmentation for the CPU.
  seconds = time_augment(args)
  print(
    f"train_augment on {jax.default_backend()} ({args.p * args.k} x "
    f"{args.height}x{args.width}): {seconds * 1e3:.1f} ms/batch, "
    f"{args.p * args.k / seconds:,.0f} images/s"
  )
  for num_workers in args.workers:
    rates, per_cpu_second = time_loader(records, labels, args, num_workers)
    line = (
      f"train_loader num_workers={num_workers}: median "
      f"{np.median(rates):,.0f} images/s (runs: " + ", ".join(f"{r:,.0f}" for r in rates) + ")"
    )
    if num_workers == 0:
      line += f"; {per_cpu_second:,.0f} images per CPU-second"
    print(line)


if __name__ == "__main__":
  main()
