"""The throughput benchmarks run end to end on a tiny model and report sane figures.

These run the scripts' ``main`` in-process (8 simulated CPU devices from
conftest) on ResNet-18 at quarter width and 96x48 input; they check the
report, not the speed (speed is measured by running the scripts, see
docs/benchmarks.md).
"""

import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from apnet_jax import build_model  # noqa: E402
from apnet_jax.models.summary import forward_flops  # noqa: E402
from benchmarks import extract as bench_extract  # noqa: E402
from benchmarks import train_step as bench_train_step  # noqa: E402

CONFIG = str(REPO_ROOT / "configs" / "synthetic.py")
TINY = [
  "--config",
  CONFIG,
  "--config.model.width=0.25",
  "--batch_size",
  "16",
  "--height",
  "96",
  "--width",
  "48",
  "--steps",
  "2",
]


def _check_positive_finite(result, keys):
  for key in keys:
    assert key in result, key
    assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, (
      key,
      result[key],
    )


@pytest.fixture(scope="module")
def tiny_forward_flops_per_image():
  """FLOPs of one eval forward pass per image, compiled unsharded (a separate path)."""
  config = bench_train_step.parse_flags(TINY)[0]
  model = build_model(config.model, 751, rngs=nnx.Rngs(0))
  model.eval()
  return forward_flops(model, np.zeros((16, 96, 48, 3), np.float32)) / 16


@pytest.mark.slow
def test_train_step_benchmark_report(tmp_path, tiny_forward_flops_per_image):
  out = tmp_path / "train.json"
  # --level 1 differs from the config's 2: the flag must reach the model.
  start = time.perf_counter()
  result = bench_train_step.main(
    TINY + ["--level", "1", "--peak_tflops", "1.0", "--json", str(out)]
  )
  wall = time.perf_counter() - start
  assert json.loads(out.read_text()) == result
  _check_positive_finite(
    result, ["img_per_s", "step_seconds", "compile_seconds", "flops_per_image", "mfu", "final_loss"]
  )
  assert result["compilations"] == 1
  assert result["compiles_in_timed_steps"] == 0
  assert (result["batch_size"], result["p"], result["k"]) == (16, 4, 4)
  assert (result["depth"], result["height"], result["width"]) == (18, 96, 48)
  assert result["level"] == 1
  assert result["device_count"] == jax.device_count() == 8
  # Bounds from outside the script: its timed steps lie inside the call, so
  # they took less than the call's wall time, and the MFU is at least what the
  # call's wall time and FLOPs counted on another path give (forward and
  # backward cost at least two forward passes), on 8 devices of 1 TFLOP/s.
  timed_images = result["steps"] * 16
  assert timed_images / result["img_per_s"] < wall
  assert timed_images * 2 * tiny_forward_flops_per_image / wall / (1e12 * 8) < result["mfu"] < 1
  # Forward + backward cost about three forward passes; a count missing the
  # per-device factor (8 devices) would be far below one.
  ratio = result["flops_per_image"] / tiny_forward_flops_per_image
  assert 2.0 < ratio < 5.0, ratio


def test_extract_benchmark_report(tmp_path, tiny_forward_flops_per_image):
  out = tmp_path / "extract.json"
  start = time.perf_counter()
  result = bench_extract.main(TINY + ["--json", str(out)])
  wall = time.perf_counter() - start
  assert json.loads(out.read_text()) == result
  _check_positive_finite(
    result, ["img_per_s", "batch_seconds", "compile_seconds", "flops_per_image"]
  )
  assert result["compilations"] == 1
  assert result["compiles_in_timed_steps"] == 0
  assert result["feature_dim"] == 128  # 512 * 0.25 channels of ResNet-18's layer4
  assert result["steps"] * 16 / result["img_per_s"] < wall  # the timed batches lie inside the call
  # Image and flip: two forward passes per image, plus a little normalisation.
  assert result["flops_per_image"] == pytest.approx(2 * tiny_forward_flops_per_image, rel=0.05)


@pytest.mark.parametrize(
  "argv, message",
  [
    ([], "--config"),
    (["--config", "configs/no_such_config.py"], "no_such_config.py"),
    (["--config", CONFIG, "--config.model.no_such_key=1"], "no_such_key"),
    (["--config", CONFIG, "--dtype", "float16"], "float16"),
    (["--config", CONFIG, "--batch_size", "18"], r"--batch_size 18.*config\.data\.k"),
    (["--config", CONFIG, "--batch_size", "12"], r"--batch_size 12.*\b8\b"),
  ],
)
def test_train_step_benchmark_bad_flags(argv, message):
  with pytest.raises(SystemExit, match=message):
    bench_train_step.main(argv)


def test_extract_benchmark_bad_batch():
  with pytest.raises(SystemExit, match=r"--batch_size 12.*\b8\b"):
    bench_extract.main(["--config", CONFIG, "--batch_size", "12"])


# benchmarks/table.py: the table's commands, its summary and its failures.

import re  # noqa: E402

from benchmarks import table  # noqa: E402


@pytest.mark.parametrize("machine", sorted(table.CASES))
def test_table_cases_are_valid_benchmark_commands(machine, monkeypatch):
  # The config paths are relative to the repository root, where table.py runs them.
  monkeypatch.chdir(REPO_ROOT)
  names = [case.name for case in table.CASES[machine]]
  assert len(set(names)) == len(names)  # names key the results and the JSON files
  for case in table.CASES[machine]:
    script = REPO_ROOT / "benchmarks" / case.script
    assert script.is_file(), case
    if case.is_torch:
      # torch is not a dependency of the project: check the flags against the parser.
      defined = set(re.findall(r'add_argument\("(--\w+)"', script.read_text()))
      used = {arg for arg in case.args if arg.startswith("--")}
      assert used and used <= defined, (used - defined, case)
      continue
    extra = bench_train_step._define_train_flags if case.script == "train_step.py" else None
    config, fv = bench_train_step.parse_flags(list(case.args), extra)
    assert config.model.init_from == ""  # random init: no checkpoint needed
    batch_size = fv.batch_size or config.data.p * config.data.k
    assert fv.steps >= 3 and batch_size % config.data.k == 0, case


def test_table_ratios_name_cases():
  names = {case.name for cases in table.CASES.values() for case in cases}
  for top, bottom in table.RATIOS:
    assert {top, bottom} <= names, (top, bottom)


def _fake(step_seconds, batch_size=16, flops=2e10, compile_seconds=10.0, dtype="float32", **extra):
  return {
    "step_seconds": step_seconds,
    "batch_size": batch_size,
    "flops_per_image": flops,
    "compile_seconds": compile_seconds,
    "device_count": 1,
    "dtype": dtype,
    **extra,
  }


def _rows(text):
  return {
    line.split(" | ")[0].lstrip("| "): line
    for line in text.splitlines()
    if line.startswith("| ") and not line.startswith("| case |")
  }


def test_table_markdown_medians_ratios_and_failures():
  cases = [
    c
    for c in table.CASES["cpu"]
    if c.name in ("train_level2", "train_level0", "torch_level0", "demo_float32")
  ]
  results = {
    "train_level2": {1: _fake(4.0), 2: _fake(5.0), 3: _fake(6.0)},
    "train_level0": {1: _fake(4.0), 3: _fake(3.0)},  # round 2 failed
    "torch_level0": {
      1: {"step_seconds": 2.0, "batch_size": 16},
      2: {"step_seconds": 4.0, "batch_size": 16},
    },
  }
  text = table.markdown_table(results, cases, rounds=3, peak_tflops=0.4, peak_dtype="float32")
  rows = _rows(text)
  # Median 5.0 s over three rounds: 3.2 img/s; MFU 2e10 * 3.2 / 0.4e12 = 16%.
  assert (
    "| 3.2 | 5000.0 (4000.0, 5000.0, 6000.0) | 20.00 | 16.0% | 10.0 |" in rows[cases[0].description]
  )
  assert "| 4.6 | 3500.0 (4000.0, failed, 3000.0) |" in rows[cases[1].description]
  # The PyTorch reference has no FLOP count, dtype or compile time.
  assert rows[cases[2].description].endswith(
    "| 5.3 | 3000.0 (2000.0, 4000.0, failed) | n/a | n/a | n/a |"
  )
  assert "| failed |" in rows[cases[3].description]
  # Ratios over the rounds both cases ran in: level 2 / level 0 in rounds 1
  # and 3 (medians 5.0 / 3.5), level 0 / torch in round 1 only.
  assert "step time train_level2 / train_level0: 1.43 (rounds 1: 1.00, 3: 2.00)" in text
  assert "step time train_level0 / torch_level0: 2.00 (rounds 1: 2.00)" in text


def test_table_mfu_only_in_the_peak_dtype_and_per_device():
  cases = [
    c for c in table.CASES["gpu"] if c.name in ("train_level2_384", "train_level2_384_float32")
  ]
  results = {
    "train_level2_384": {
      1: _fake(0.02, batch_size=80, flops=5e10, dtype="bfloat16", device_count=2)
    },
    "train_level2_384_float32": {1: _fake(0.05, batch_size=80, flops=5e10)},
  }
  rows = _rows(table.markdown_table(results, cases, rounds=1, peak_tflops=1000.0))
  # 4,000 img/s * 50 GFLOP over 2 devices of 1,000 TFLOP/s.
  assert "| 4,000.0 | 20.0 (20.0) | 50.00 | 10.0% |" in rows[cases[0].description]
  assert "| 1,600.0 | 50.0 (50.0) | 50.00 | n/a |" in rows[cases[1].description]


def test_table_alternates_the_order_of_the_rounds(tmp_path, monkeypatch, capsys):
  calls = []

  def fake_run(case, json_path, torch_python, timeout_s):
    del torch_python, timeout_s
    calls.append((case.name, json_path.name))
    return _fake(1.0)

  monkeypatch.setattr(table, "_run", fake_run)
  assert (
    table.main(
      [
        "--machine",
        "gpu",
        "--only",
        "train_level2_256",
        "train_level0_256",
        "--rounds",
        "3",
        "--out",
        str(tmp_path),
      ]
    )
    == 0
  )
  assert calls == [
    ("train_level2_256", "train_level2_256_round1.json"),
    ("train_level0_256", "train_level0_256_round1.json"),
    ("train_level0_256", "train_level0_256_round2.json"),
    ("train_level2_256", "train_level2_256_round2.json"),
    ("train_level2_256", "train_level2_256_round3.json"),
    ("train_level0_256", "train_level0_256_round3.json"),
  ]
  summary = (tmp_path / "table.md").read_text()
  assert (
    "step time train_level2_256 / train_level0_256: 1.00 (rounds 1: 1.00, 2: 1.00, 3: 1.00)"
    in summary
  )
  assert summary.split("\n\n", 1)[1].strip() in capsys.readouterr().out


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--machine", "cpu", "--only", "no_such_case"], "no case no_such_case in the cpu table"),
    (["--machine", "cpu", "--rounds", "0"], "--rounds must be at least 1"),
    (["--machine", "gpu", "--peak_tflops", "0"], "--peak_tflops must be positive"),
    (["--machine", "cpu", "--only", "torch_level0"], "need --torch_python"),
    (["--machine", "cpu", "--torch_python", "/no/such/python"], "no executable file there"),
    (["--machine", "tpu"], "invalid choice"),
  ],
)
def test_table_bad_flags(argv, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as excinfo:
    table.main([*argv, "--out", str(tmp_path)])
  assert excinfo.value.code == 2
  assert message in capsys.readouterr().err
  assert not list(tmp_path.iterdir())  # nothing ran, nothing written


@pytest.mark.slow
def test_table_runs_a_case_and_reports_a_failed_one(tmp_path, capsys, monkeypatch):
  # The real rows take minutes; the tiny network of the tests above runs the same way.
  # --level 1 as in test_train_step_benchmark_report: the compilation cache has its program.
  tiny = table.Case("tiny", "train_step.py", (*TINY, "--level", "1"), "train step, tiny network")
  broken = table.Case(
    "broken",
    "train_step.py",
    ("--config", "configs/no_such_config.py"),
    "a case whose config does not exist",
  )
  monkeypatch.setitem(table.CASES, "cpu", [tiny, broken])
  # A relative --out, from another folder than the repository (where the runs start).
  monkeypatch.chdir(tmp_path)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "broken_round1.json").write_text(json.dumps(_fake(1.0)))  # stale
  rc = table.main(["--machine", "cpu", "--out", "out"])
  out, err = capsys.readouterr()
  assert rc == 1
  assert "failed runs (see their output above): broken (round 1)" in err
  assert "| a case whose config does not exist | failed |" in out
  assert not (tmp_path / "out" / "broken_round1.json").exists()  # the stale result went
  result = json.loads((tmp_path / "out" / "tiny_round1.json").read_text())
  assert result["compilations"] == 1 and result["batch_size"] == 16
  row = _rows(out)["train step, tiny network"]
  img_per_s = float(row.split(" | ")[1].replace(",", ""))
  assert img_per_s == pytest.approx(round(result["img_per_s"], 1), abs=0.051)
  assert row in (tmp_path / "out" / "table.md").read_text()
