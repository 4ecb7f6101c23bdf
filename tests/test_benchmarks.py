"""The throughput benchmarks run end to end on a tiny model and report sane figures.

These run the scripts' ``main`` in-process (8 simulated CPU devices from
conftest) on ResNet-18 at quarter width and 96x48 input; they check the
report, not the speed (speed is measured by running the scripts, see
docs/benchmarks.md).
"""

import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import extract as bench_extract  # noqa: E402
from benchmarks import train_step as bench_train_step  # noqa: E402

from apnet_jax import build_model  # noqa: E402
from apnet_jax.models.summary import forward_flops  # noqa: E402

CONFIG = str(REPO_ROOT / "configs" / "synthetic.py")
TINY = ["--config", CONFIG, "--config.model.width=0.25", "--batch_size", "16",
        "--height", "96", "--width", "48", "--steps", "2"]


def _check_positive_finite(result, keys):
  for key in keys:
    assert key in result, key
    assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, (
        key, result[key])


@pytest.fixture(scope="module")
def tiny_forward_flops_per_image():
  """FLOPs of one eval forward pass per image, compiled unsharded (a separate path)."""
  config = bench_train_step.parse_flags(TINY)[0]
  model = build_model(config.model, 751, rngs=nnx.Rngs(0))
  model.eval()
  return forward_flops(model, np.zeros((16, 96, 48, 3), np.float32)) / 16


def test_train_step_benchmark_report(tmp_path, tiny_forward_flops_per_image):
  out = tmp_path / "train.json"
  # --level 1 differs from the config's 2: the flag must reach the model.
  result = bench_train_step.main(TINY + ["--level", "1", "--peak_tflops", "1.0",
                                         "--json", str(out)])
  assert json.loads(out.read_text()) == result
  _check_positive_finite(result, ["img_per_s", "step_seconds", "compile_seconds",
                                  "flops_per_image", "mfu", "final_loss"])
  assert result["compilations"] == 1
  assert result["compiles_in_timed_steps"] == 0
  assert (result["batch_size"], result["p"], result["k"]) == (16, 4, 4)
  assert (result["depth"], result["height"], result["width"]) == (18, 96, 48)
  assert result["level"] == 1
  assert result["device_count"] == jax.device_count() == 8
  assert result["img_per_s"] == pytest.approx(16 / result["step_seconds"])
  assert result["mfu"] == pytest.approx(
      result["flops_per_image"] * result["img_per_s"] / (1e12 * 8))
  # Forward + backward cost about three forward passes; a count missing the
  # per-device factor (8 devices) would be far below one.
  ratio = result["flops_per_image"] / tiny_forward_flops_per_image
  assert 2.0 < ratio < 5.0, ratio


def test_extract_benchmark_report(tmp_path, tiny_forward_flops_per_image):
  out = tmp_path / "extract.json"
  result = bench_extract.main(TINY + ["--json", str(out)])
  assert json.loads(out.read_text()) == result
  _check_positive_finite(result, ["img_per_s", "batch_seconds", "compile_seconds",
                                  "flops_per_image"])
  assert result["compilations"] == 1
  assert result["compiles_in_timed_steps"] == 0
  assert result["feature_dim"] == 128  # 512 * 0.25 channels of ResNet-18's layer4
  assert result["img_per_s"] == pytest.approx(16 / result["batch_seconds"])
  # Image and flip: two forward passes per image, plus a little normalisation.
  assert result["flops_per_image"] == pytest.approx(2 * tiny_forward_flops_per_image, rel=0.05)


@pytest.mark.parametrize("argv, message", [
    ([], "--config"),
    (["--config", "configs/no_such_config.py"], "no_such_config.py"),
    (["--config", CONFIG, "--config.model.no_such_key=1"], "no_such_key"),
    (["--config", CONFIG, "--dtype", "float16"], "float16"),
    (["--config", CONFIG, "--batch_size", "18"], "P x K"),
    (["--config", CONFIG, "--batch_size", "12"], "divisible by the 8 devices"),
])
def test_train_step_benchmark_bad_flags(argv, message):
  with pytest.raises(SystemExit, match=message):
    bench_train_step.main(argv)


def test_extract_benchmark_bad_batch():
  with pytest.raises(SystemExit, match="divisible by the 8 devices"):
    bench_extract.main(["--config", CONFIG, "--batch_size", "12"])
