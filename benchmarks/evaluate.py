"""Time and peak memory of ``apnet_jax.evaluation.evaluate`` at benchmark sizes.

Random 2048-d features with planted identities (a centre per pid plus noise,
so CMC/mAP are meaningful, not ~0) at the sizes of the real test sets:

  market   3,368 queries x 15,913 gallery,   751 query pids, 6 cameras
  msmt17  11,659 queries x 82,161 gallery, 3,060 query pids, 15 cameras

Each case runs in its own subprocess so that its peak resident memory
(``ru_maxrss``, which includes the features themselves) is its own. Reported:
the first call (including compilation), the steady-state call, and the peak.

  python benchmarks/evaluate.py                      # both cases
  python benchmarks/evaluate.py --cases market --rerank
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

CASES = {
  # name: (queries, gallery, query pids, gallery distractor pids, cameras)
  "market": (3368, 15913, 751, 1, 6),
  "msmt17": (11659, 82161, 3060, 0, 15),
}
DIM = 2048


def make_features(case: str, seed: int = 0):
  """Query/gallery features and ids of the size of ``case``."""
  num_query, num_gallery, num_ids, num_distractor_ids, num_cams = CASES[case]
  rng = np.random.default_rng(seed)
  # Every query pid appears in the gallery; distractor pids only there.
  query_pids = rng.integers(0, num_ids, num_query)
  gallery_pids = np.concatenate(
    [np.arange(num_ids), rng.integers(0, num_ids + num_distractor_ids, num_gallery - num_ids)]
  )
  query_camids = rng.integers(0, num_cams, num_query)
  gallery_camids = rng.integers(0, num_cams, num_gallery)
  # Centres of norm ~0.3 * sqrt(DIM) under unit noise: on Market-sized data
  # this gives rank-1 ~0.99 and mAP ~0.7, a ranking with real work to do.
  centres = 0.3 * rng.standard_normal((num_ids + num_distractor_ids, DIM), dtype=np.float32)

  def features(pids):
    out = rng.standard_normal((len(pids), DIM), dtype=np.float32)
    out += centres[pids]
    return out

  return (
    features(query_pids),
    features(gallery_pids),
    query_pids,
    gallery_pids,
    query_camids,
    gallery_camids,
  )


def run_case(case: str, rerank: bool, repeats: int) -> dict:
  """Runs one case in this process and returns its figures."""
  import jax  # imported here so the parent process stays light

  from apnet_jax.evaluation import evaluate

  data = make_features(case)
  kwargs = {"rerank": dict(k1=20, k2=6, lambda_value=0.3)} if rerank else {}
  seconds, cpu_seconds = [], []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    result = evaluate(*data, **kwargs)
    seconds.append(time.perf_counter() - start)
    cpu_seconds.append(time.process_time() - cpu_start)
  return {
    "case": case,
    "rerank": rerank,
    "backend": jax.default_backend(),
    "queries": len(data[0]),
    "gallery": len(data[1]),
    "first_call_s": round(seconds[0], 2),
    "steady_state_s": round(min(seconds[1:]), 2) if repeats > 1 else None,
    # CPU time of all threads: less sensitive to other processes than the
    # wall time; on an idle machine, wall ~ cpu / cores for matmul-bound work.
    "first_call_cpu_s": round(cpu_seconds[0], 2),
    "steady_state_cpu_s": round(min(cpu_seconds[1:]), 2) if repeats > 1 else None,
    "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    "rank1": round(float(result["cmc"][0]), 4),
    "mAP": round(result["mAP"], 4),
    "mINP": round(result["mINP"], 4),
    "num_valid_queries": result["num_valid_queries"],
    # Other processes on the machine slow every figure down: say how busy.
    "load_avg_1m": round(os.getloadavg()[0], 2),
    "cpus": os.cpu_count(),
  }


def main() -> None:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["market", "msmt17"])
  parser.add_argument(
    "--rerank",
    action="store_true",
    help="evaluate with k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)",
  )
  parser.add_argument(
    "--repeats", type=int, default=None, help="calls per case (default: 3, or 1 with --rerank)"
  )
  parser.add_argument(
    "--in-process",
    action="store_true",
    help="run the (single) case in this process; used for the subprocesses",
  )
  args = parser.parse_args()
  repeats = args.repeats or (1 if args.rerank else 3)

  if args.in_process:
    print(json.dumps(run_case(args.cases[0], args.rerank, repeats)), flush=True)
    return
  for case in args.cases:
    command = [
      sys.executable,
      __file__,
      "--in-process",
      "--cases",
      case,
      "--repeats",
      str(repeats),
    ] + (["--rerank"] if args.rerank else [])
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
      print(f"{case}: failed\n{completed.stderr}", file=sys.stderr)
      continue
    print(completed.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()
