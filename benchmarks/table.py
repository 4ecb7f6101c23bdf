"""The throughput table of docs/benchmarks.md, measured with one command.

  python benchmarks/table.py --machine cpu --rounds 2 --torch_python /tmp/tv/bin/python \
      --out /tmp/table
  python benchmarks/table.py --machine gpu --peak_tflops 989 --out /tmp/table

Runs every case of the machine's table (``CASES``: the train step at level 2
and level 0, extraction, and on CPU the demo network and the PyTorch
reference) in a process of its own, so that each one compiles, allocates and
is timed alone. With ``--rounds R`` the whole set runs R times, in reverse
order every other round, so that a machine whose speed drifts within the hour
(2-core cloud CPUs do, by 20% and more) does not favour one case. Each run's
raw JSON line is printed as it comes and kept in ``--out``; at the end a
markdown table gives each case's median step time over the rounds, images
per second, XLA's FLOPs per image and MFU (with ``--peak_tflops``, one
device's peak in the compute dtype), and the ratios issue 7 asks about:
level 2 against level 0 at the same size, and JAX against PyTorch on CPU.

The evaluator and the input pipeline have their own benchmarks
(``benchmarks/evaluate.py``, ``benchmarks/input_pipeline.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parents[1]

__all__ = ["CASES", "RATIOS", "Case", "main", "markdown_table"]


@dataclasses.dataclass(frozen=True)
class Case:
  """One row: a benchmark script and its arguments (without ``--json``)."""

  name: str
  script: str  # under benchmarks/
  args: tuple[str, ...]
  description: str

  @property
  def is_torch(self) -> bool:
    """Whether this is the PyTorch reference, run by ``--torch_python``."""
    return self.script == "torch_train_step.py"


# The random-init model: the timings do not depend on the weights, and the
# default init_from (torchvision's checkpoint) may not be on the machine.
_MARKET = ("--config", "configs/market1501.py", "--config.model.init_from=")


def _cpu_cases() -> list[Case]:
  resnet = (
    *_MARKET,
    "--batch_size",
    "16",
    "--height",
    "256",
    "--width",
    "128",
    "--steps",
    "4",
    "--warmup",
    "1",
  )
  return [
    Case(
      "train_level2",
      "train_step.py",
      (*resnet, "--level", "2"),
      "train step, APNet-C level 2, ResNet-50, 256x128, batch 16, float32",
    ),
    Case(
      "train_level0",
      "train_step.py",
      (*resnet, "--level", "0"),
      "train step, level 0 (ResNet-50 + BNNeck), same setting",
    ),
    Case(
      "torch_level0",
      "torch_train_step.py",
      (
        "--batch_size",
        "16",
        "--height",
        "256",
        "--width",
        "128",
        "--steps",
        "4",
        "--warmup",
        "1",
        "--threads",
        str(os.cpu_count() or 1),
      ),
      "PyTorch train step, ResNet-50 + BNNeck, same setting (reference)",
    ),
    Case(
      "extract_level2",
      "extract.py",
      (*_MARKET, "--batch_size", "32", "--height", "256", "--width", "128", "--steps", "3"),
      "extraction (image + flip), level 2, ResNet-50, 256x128, batch 32, float32",
    ),
    Case(
      "demo_float32",
      "train_step.py",
      ("--config", "configs/synthetic.py", "--steps", "10"),
      "train step, demo network (ResNet-18 x0.5, 128x64, batch 64), float32",
    ),
    Case(
      "demo_bfloat16",
      "train_step.py",
      ("--config", "configs/synthetic.py", "--dtype", "bfloat16", "--steps", "10"),
      "train step, demo network, bfloat16",
    ),
  ]


def _gpu_cases() -> list[Case]:
  def train(
    level: int, height: int, width: int, dtype: str = "bfloat16", steps: str = "30"
  ) -> tuple[str, ...]:
    return (
      *_MARKET,
      "--level",
      str(level),
      "--dtype",
      dtype,
      "--batch_size",
      "80",
      "--height",
      str(height),
      "--width",
      str(width),
      "--steps",
      steps,
      "--warmup",
      "3",
    )

  return [
    Case(
      "train_level2_384",
      "train_step.py",
      train(2, 384, 192),
      "train step, APNet-C level 2, 384x192, batch 80, bfloat16 (target >= 3,000 img/s)",
    ),
    Case(
      "train_level0_384",
      "train_step.py",
      train(0, 384, 192),
      "train step, level 0, 384x192, batch 80, bfloat16",
    ),
    Case(
      "train_level2_256",
      "train_step.py",
      train(2, 256, 128),
      "train step, level 2, 256x128, batch 80, bfloat16 (target >= 6,500 img/s)",
    ),
    Case(
      "train_level0_256",
      "train_step.py",
      train(0, 256, 128),
      "train step, level 0, 256x128, batch 80, bfloat16",
    ),
    Case(
      "train_level2_384_float32",
      "train_step.py",
      train(2, 384, 192, "float32", "20"),
      "train step, level 2, 384x192, batch 80, float32",
    ),
    Case(
      "extract_level2_384",
      "extract.py",
      (
        *_MARKET,
        "--dtype",
        "bfloat16",
        "--batch_size",
        "512",
        "--height",
        "384",
        "--width",
        "192",
        "--steps",
        "20",
        "--warmup",
        "2",
      ),
      "extraction (image + flip), level 2, 384x192, batch 512, bfloat16 (target >= 15,000 img/s)",
    ),
  ]


CASES = {"cpu": _cpu_cases(), "gpu": _gpu_cases()}

# (numerator, denominator) cases whose step-time ratio the table reports.
RATIOS: tuple[tuple[str, str], ...] = (
  ("train_level2", "train_level0"),
  ("train_level0", "torch_level0"),
  ("train_level2_384", "train_level0_384"),
  ("train_level2_256", "train_level0_256"),
)


def _machine_header() -> list[str]:
  """Lines that say what ran: host CPU, GPUs, load, the commit."""
  lines = [
    f"date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}",
    f"python {platform.python_version()}, {len(os.sched_getaffinity(0))} usable CPUs, "
    f"{platform.machine()}",
  ]
  try:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines()[:30] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    lines.append(
      "cpu: {} (family {}, model {})".format(
        fields.get("model name", "?"), fields.get("cpu family", "?"), fields.get("model", "?")
      )
    )
    lines.append(f"load average: {Path('/proc/loadavg').read_text().split()[0]}")
  except OSError:
    pass
  for command in (
    [
      "nvidia-smi",
      "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
      "--format=csv,noheader",
    ],
    ["git", "-C", str(_REPO_ROOT), "describe", "--always", "--dirty"],
  ):
    try:
      out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
      lines.append(f"{command[0]}: {out.stdout.strip()}")
    except (OSError, subprocess.SubprocessError):
      pass
  return lines


def _run(
  case: Case, json_path: Path, torch_python: str | None, timeout_s: float | None
) -> dict[str, Any] | None:
  """Runs one case in its own process; its JSON result, or None if it failed."""
  python = torch_python if case.is_torch else sys.executable
  command = [python, f"benchmarks/{case.script}", *case.args, "--json", str(json_path)]
  # A result left by an earlier run must not pass for this one's.
  json_path.unlink(missing_ok=True)
  print(
    f"$ {shlex.join(command)}    # {case.name}, load {os.getloadavg()[0]:.2f}, "
    f"{time.strftime('%H:%M:%S', time.gmtime())} UTC",
    flush=True,
  )
  try:
    returncode = subprocess.run(command, cwd=_REPO_ROOT, check=False, timeout=timeout_s).returncode
  except subprocess.TimeoutExpired:
    print(f"error: {case.name} ran past --timeout_s {timeout_s:g} and was stopped", file=sys.stderr)
    return None
  except OSError as e:
    print(f"error: cannot start {case.name}: {e}", file=sys.stderr)
    return None
  if returncode != 0:
    return None
  try:
    result = json.loads(json_path.read_text())
  except (OSError, ValueError) as e:
    print(f"error: {case.name} wrote no readable result to {json_path}: {e}", file=sys.stderr)
    return None
  if not (
    isinstance(result, dict)
    and "batch_size" in result
    and ("step_seconds" in result or "batch_seconds" in result)
  ):
    print(
      f"error: {json_path} of {case.name} is not a benchmark result (it needs batch_size "
      "and step_seconds or batch_seconds)",
      file=sys.stderr,
    )
    return None
  return result


def _step_seconds(result: dict[str, Any]) -> float:
  return result["step_seconds"] if "step_seconds" in result else result["batch_seconds"]


def markdown_table(
  results: dict[str, dict[int, dict[str, Any]]],
  cases: Sequence[Case],
  rounds: int,
  peak_tflops: float | None = None,
  peak_dtype: str = "bfloat16",
) -> str:
  """A markdown table of each case's median step time over its rounds.

  Args:
    results: case name -> round (1-based) -> the JSON result of that run.
    cases: the rows, in order; a case without results reads "failed".
    rounds: how many rounds ran; a round a case has no result for reads
      "failed" in its row.
    peak_tflops: one device's peak TFLOP/s in ``peak_dtype``, for the MFU of
      the rows computed in that dtype; None leaves MFU out.
    peak_dtype: the compute dtype ``peak_tflops`` is the peak of.

  Returns:
    The table, then one line per ratio of ``RATIOS`` whose two cases have
    results: the ratio of their medians over the rounds both ran in, and
    that of each such round.
  """
  rows = [
    "| case | img/s | ms per step or batch: median (round 1, 2, ...) | GFLOP/img | MFU "
    "| compile (s) |",
    "|---|---|---|---|---|---|",
  ]
  for case in cases:
    runs = results.get(case.name, {})
    if not runs:
      rows.append(f"| {case.description} | failed | | | | |")
      continue
    first = runs[min(runs)]
    seconds = statistics.median(_step_seconds(r) for r in runs.values())
    img_per_s = first["batch_size"] / seconds
    flops = first.get("flops_per_image")
    gflops = f"{flops / 1e9:.2f}" if flops else "n/a"
    mfu = "n/a"
    if flops and peak_tflops and first.get("dtype") == peak_dtype:
      devices = first.get("device_count", 1)
      mfu = f"{flops * img_per_s / (peak_tflops * 1e12 * devices):.1%}"
    compile_s = "n/a"
    if "compile_seconds" in first:
      compile_s = f"{statistics.median(r['compile_seconds'] for r in runs.values()):.1f}"
    each = ", ".join(
      f"{_step_seconds(runs[r]) * 1e3:.1f}" if r in runs else "failed" for r in range(1, rounds + 1)
    )
    rows.append(
      f"| {case.description} | {img_per_s:,.1f} | {seconds * 1e3:.1f} ({each}) | "
      f"{gflops} | {mfu} | {compile_s} |"
    )
  lines = ["\n".join(rows)]
  for top, bottom in RATIOS:
    both = sorted(set(results.get(top, {})) & set(results.get(bottom, {})))
    if not both:
      continue
    per_round = [_step_seconds(results[top][r]) / _step_seconds(results[bottom][r]) for r in both]
    ratio = statistics.median(_step_seconds(results[top][r]) for r in both) / statistics.median(
      _step_seconds(results[bottom][r]) for r in both
    )
    lines.append(
      f"step time {top} / {bottom}: {ratio:.2f} (rounds "
      f"{', '.join(f'{r}: {x:.2f}' for r, x in zip(both, per_round))})"
    )
  return "\n\n".join(lines)


def _python(path: str) -> str:
  """An interpreter path made absolute (the runs start in the repository root).

  Not resolved: a venv's ``python`` is a link, and following it would leave
  the venv.
  """
  path = os.path.expanduser(path)
  return os.path.abspath(path) if os.sep in path else (shutil.which(path) or path)


def main(argv: Sequence[str]) -> int:
  """Runs the machine's table and prints its summary.

  Args:
    argv: command-line arguments without the program name (see ``--help``).

  Returns:
    0, or 1 if any run failed (the others are still summarised).
  """
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--machine", choices=sorted(CASES), required=True, help="which table: its cases and settings"
  )
  parser.add_argument(
    "--out", required=True, help="folder for each run's JSON file and the summary, table.md"
  )
  parser.add_argument("--rounds", type=int, default=1, help="runs of each case, alternated")
  parser.add_argument(
    "--only",
    nargs="+",
    default=None,
    metavar="CASE",
    help="run only these cases of the machine's table",
  )
  parser.add_argument(
    "--peak_tflops",
    type=float,
    default=None,
    help="one device's peak TFLOP/s in --peak_dtype, for the MFU of the rows in that dtype",
  )
  parser.add_argument("--peak_dtype", choices=("bfloat16", "float32"), default="bfloat16")
  parser.add_argument(
    "--torch_python",
    default=None,
    help="a Python with torch installed, for the PyTorch reference row (left out without it)",
  )
  parser.add_argument(
    "--timeout_s",
    type=float,
    default=None,
    help="stop a run after this many seconds and count it as failed",
  )
  args = parser.parse_args(argv)
  if args.rounds < 1:
    parser.error(f"--rounds must be at least 1, got {args.rounds}")
  for flag in ("peak_tflops", "timeout_s"):
    if getattr(args, flag) is not None and getattr(args, flag) <= 0:
      parser.error(f"--{flag} must be positive, got {getattr(args, flag)}")
  cases = CASES[args.machine]
  names = [c.name for c in cases]
  if args.only:
    unknown = sorted(set(args.only) - set(names))
    if unknown:
      parser.error(
        f"--only: no case {', '.join(unknown)} in the {args.machine} table "
        f"(its cases: {', '.join(names)})"
      )
    cases = [c for c in cases if c.name in args.only]
  torch_python = None
  if args.torch_python:
    torch_python = _python(args.torch_python)
    if not os.access(torch_python, os.X_OK):
      parser.error(f"--torch_python {args.torch_python}: no executable file there")
  elif any(c.is_torch for c in cases):
    print(
      f"note: {', '.join(c.name for c in cases if c.is_torch)} left out: no --torch_python",
      file=sys.stderr,
    )
    cases = [c for c in cases if not c.is_torch]
  if not cases:
    parser.error("nothing to run: the only cases asked for need --torch_python")
  out = Path(os.path.abspath(os.path.expanduser(args.out)))
  out.mkdir(parents=True, exist_ok=True)

  header = _machine_header()
  print("\n".join(header), flush=True)
  results: dict[str, dict[int, dict[str, Any]]] = {}
  failed = []
  for round_number in range(1, args.rounds + 1):
    for case in cases if round_number % 2 else cases[::-1]:
      result = _run(
        case, out / f"{case.name}_round{round_number}.json", torch_python, args.timeout_s
      )
      if result is None:
        failed.append(f"{case.name} (round {round_number})")
      else:
        results.setdefault(case.name, {})[round_number] = result
  summary = markdown_table(results, cases, args.rounds, args.peak_tflops, args.peak_dtype)
  (out / "table.md").write_text("\n".join([*header, "", summary, ""]))
  print(f"\n{summary}\n\n(also in {out / 'table.md'})")
  if failed:
    print(f"\nfailed runs (see their output above): {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
