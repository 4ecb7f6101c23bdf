"""The PyTorch reference for ``benchmarks/train_step.py`` on CPU.

Issue 7's CPU target is a JAX train step no slower than 1.25x PyTorch's for
the same model and batch. This script times that PyTorch step: ResNet-50 v1.5
(stride on the 3x3 convolution, stem without ReLU, ``last_stride`` 1), global
average pooling, a BNNeck whose bias is frozen, a bias-free classifier,
label-smoothed cross-entropy (0.1) plus batch-hard triplet (margin 0.3) on the
pooled feature, and ``torch.optim.Adam(lr=4e-4, weight_decay=1e-3)``: APNet
level 0 as the official code builds it. Built from ``torch.nn`` layers so it
needs only ``torch`` (not torchvision), which is not a dependency of this
project: install it beside, e.g. ``pip install torch==2.13.0``.

  python benchmarks/torch_train_step.py --batch_size 16 --height 256 --width 128 \
      --steps 4 --threads 2 --json /tmp/torch_step.json

It times ``forward + backward + optimizer.step`` on one fixed float32 batch
(P x K labels, K = 4), after ``--warmup`` untimed steps, and prints one JSON
line with ``img_per_s`` and ``step_seconds`` as ``train_step.py`` does.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torch import nn
from torch.nn import functional as F


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5)."""

  def __init__(self, in_ch: int, planes: int, stride: int):
    super().__init__()
    out_ch = planes * 4
    self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out_ch)
    self.downsample = None
    if stride != 1 or in_ch != out_ch:
      self.downsample = nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
      )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(out + shortcut)


class Baseline(nn.Module):
  """ResNet-50 (no stem ReLU, last stride 1) + BNNeck + classifier."""

  def __init__(self, num_classes: int):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    stages, in_ch = [], 64
    for i, (blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 1))):
      planes = 64 * 2**i
      for j in range(blocks):
        stages.append(Bottleneck(in_ch, planes, stride if j == 0 else 1))
        in_ch = planes * 4
    self.layers = nn.Sequential(*stages)
    self.bottleneck = nn.BatchNorm1d(in_ch)
    self.bottleneck.bias.requires_grad_(False)
    self.classifier = nn.Linear(in_ch, num_classes, bias=False)
    nn.init.normal_(self.classifier.weight, std=0.001)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = self.layers(self.maxpool(self.bn1(self.conv1(x))))
    global_feat = x.mean(dim=(2, 3))
    return self.classifier(self.bottleneck(global_feat)), global_feat


def batch_hard_triplet(feat: torch.Tensor, pids: torch.Tensor, margin: float) -> torch.Tensor:
  dist = torch.cdist(feat, feat).clamp_min(1e-12)
  same = pids[:, None] == pids[None, :]
  hardest_pos = (dist * same).max(dim=1).values
  hardest_neg = (dist + 1e9 * same).min(dim=1).values
  return F.relu(hardest_pos - hardest_neg + margin).mean()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--height", type=int, default=256)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--num_classes", type=int, default=751)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--threads", type=int, default=torch.get_num_threads())
  parser.add_argument("--json", default=None, help="also write the result here")
  args = parser.parse_args()
  if args.batch_size % 4:
    parser.error(f"--batch_size must be a multiple of K = 4, got {args.batch_size}")

  torch.manual_seed(0)
  torch.set_num_threads(args.threads)
  model = Baseline(args.num_classes).train()
  images = torch.randn(args.batch_size, 3, args.height, args.width)
  pids = torch.arange(args.batch_size // 4).repeat_interleave(4)
  optimizer = torch.optim.Adam(model.parameters(), lr=4e-4, weight_decay=1e-3)

  def step() -> float:
    optimizer.zero_grad(set_to_none=True)
    logits, global_feat = model(images)
    loss = F.cross_entropy(logits, pids, label_smoothing=0.1) + batch_hard_triplet(
      global_feat, pids, 0.3
    )
    loss.backward()
    optimizer.step()
    return loss.item()

  start = time.perf_counter()
  for _ in range(args.warmup):
    step()
  warmup_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  step_seconds = (time.perf_counter() - start) / args.steps
  result = {
    "benchmark": "torch_train_step",
    "torch_version": torch.__version__,
    "threads": args.threads,
    "batch_size": args.batch_size,
    "height": args.height,
    "width": args.width,
    "steps": args.steps,
    "warmup": args.warmup,
    "warmup_seconds": warmup_s,
    "step_seconds": step_seconds,
    "img_per_s": args.batch_size / step_seconds,
    "final_loss": loss,
    "python_version": platform.python_version(),
    "processor": platform.processor() or platform.machine(),
    "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
  }
  line = json.dumps(result)
  print(line)
  if args.json:
    with open(args.json, "w") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
