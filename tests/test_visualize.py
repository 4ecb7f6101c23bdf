"""Attention maps (--mode visualize): Grad-CAM, the pyramid's weights, the PNG grid."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from apnet_jax import build_model, compat, save_torch_weights, visualize
from apnet_jax.data import augment
from apnet_jax.models import layers
from apnet_jax.models.apnet import stage_sizes
from configs.synthetic import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 8


def small_model(kind, level, seed):
  """ResNet-18 at 1/4 width, 128x64, eval mode; the pyramids' BatchNorms get random statistics."""
  config = get_config("tiny")
  config.model.input_size = (128, 64)
  config.model.kind, config.model.level = kind, level
  model = build_model(config.model, NUM_CLASSES, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for path, module in compat.iter_modules(model):
    if path[:1] == ("pyramids",) and isinstance(module, layers.BatchNorm):
      n = module.num_features
      module.mean[...] = jnp.asarray(rng.normal(0, 0.1, n), jnp.float32)
      module.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
      module.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
  model.eval()
  return config, model


def random_images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 255, (n, 128, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def channel():
  """APNet-C level 3 (SAMS 4, SAMS 2, SE) and its maps of 3 images, one with a label."""
  # A seed whose untrained model has a live Grad-CAM in every stage of every
  # image (checked below): at random init, about a third of the maps are 0.
  config, model = small_model("channel", 3, seed=0)
  images = random_images(3)
  return config, model, images, visualize.attention_maps(model, images, labels=[5, -1, -1])


def test_grad_cam_equals_a_hand_computation(channel):
  _, model, images, maps = channel

  @jax.jit
  def backprop_by_hand(x):
    """Stage outputs, logits, and the target logits' gradients: the chain rule, stage by stage."""
    stages, vjps = [], []
    for i, pyramid in enumerate(model.pyramids):
      x, vjp = jax.vjp(lambda a, i=i, p=pyramid: p(model.backbone.stage(i, a)), x)
      stages.append(x)
      vjps.append(vjp)
    logits, head_vjp = jax.vjp(
      lambda a: model.classifier(model.bottleneck(layers.global_avg_pool(a))), x
    )
    target = jnp.where(jnp.arange(3) == 0, 5, jnp.argmax(logits, axis=1))
    grad = head_vjp(jax.nn.one_hot(target, NUM_CLASSES))[0]
    grads = [None] * 5
    for i in reversed(range(5)):
      grads[i] = grad
      grad = vjps[i](grad)[0]
    return stages, grads, target

  stages, grads, target = backprop_by_hand(augment.normalize(jnp.asarray(images)))
  np.testing.assert_array_equal(maps.target, target)  # label 5, then the top logits
  for s, (activation, grad) in enumerate(zip(stages, grads)):
    activation, grad = np.asarray(activation), np.asarray(grad)
    cam = np.maximum((activation * grad.mean(axis=(1, 2), keepdims=True)).sum(-1), 0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    expected = np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0)
    np.testing.assert_allclose(maps.grad_cam[s], expected, atol=2e-5, err_msg=f"stage {s}")


def test_maps_have_the_stage_shapes_and_are_normalized(channel):
  config, model, _, maps = channel
  sizes = stage_sizes((128, 64), config.model.last_stride)
  assert [m.shape for m in maps.grad_cam] == [(3, h, w) for h, w in sizes]
  peaks = np.stack([cam.max(axis=(1, 2)) for cam in maps.grad_cam])
  for cam in maps.grad_cam:
    assert cam.dtype == np.float32 and cam.min() >= 0
  # Each map peaks at 1, or is 0 where nothing in the stage speaks for the target.
  assert np.all((np.abs(peaks - 1) < 1e-6) | (peaks == 0))
  assert (peaks == 0).sum() <= 1, peaks  # not a vacuous check: this model's maps live
  assert maps.parts == (4, 2, 1) and maps.kind == "channel"
  for c, stage in zip(model.backbone.stage_channels, maps.attention):
    assert [w.shape for w in stage] == [(3, 4, c // 4), (3, 2, c // 2), (3, c)]


def test_attention_weights_equal_a_recomputation_of_the_gates(channel):
  _, model, images, maps = channel

  def params(module):
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(module))}

  def dense(p, x):
    return x @ p[("kernel",)] + p.get(("bias",), 0)

  def batch_norm(p, x):
    return (x - p[("mean",)]) / np.sqrt(p[("var",)] + 1e-5) * p[("scale",)] + p[("bias",)]

  @jax.jit
  def forward(x):
    """The model's outputs, and each stage's input to its pyramid."""
    out = model(x, return_stages=True, return_attention=True)
    inputs = [model.backbone.stage(i, x if i == 0 else out["stages"][i - 1]) for i in range(5)]
    return out, inputs

  before = nnx.to_flat_state(nnx.state(model))
  x = augment.normalize(jnp.asarray(images))
  with jax.default_matmul_precision("highest"):
    out, inputs = forward(x)
    # The opt-in outputs leave the default ones as they are.
    plain = jax.jit(lambda x: model(x))(x)
    assert set(plain) == {"global_feat", "feat", "logits"}
    for key in plain:
      np.testing.assert_allclose(plain[key], out[key], rtol=1e-6, atol=1e-6)
    for i, pyramid in enumerate(model.pyramids):
      x = np.asarray(inputs[i])
      for r, (sams, bn) in enumerate(zip(pyramid.splits, pyramid.split_bns)):
        p, radix = params(sams), sams.radix
        groups = x.reshape(*x.shape[:3], radix, -1)
        hidden = dense(
          {k[1:]: v for k, v in p.items() if k[0] == "fc1"}, groups.sum(3).mean(axis=(1, 2))
        )
        hidden = np.maximum(
          batch_norm({k[1:]: v for k, v in p.items() if k[0] == "bn1"}, hidden), 0
        )
        logits = dense({k[1:]: v for k, v in p.items() if k[0] == "fc2"}, hidden)
        logits = logits.reshape(len(x), radix, -1)
        softmax = np.exp(logits - logits.max(1, keepdims=True))
        softmax /= softmax.sum(1, keepdims=True)
        np.testing.assert_allclose(maps.attention[i][r], softmax, atol=1e-5)
        x = batch_norm(params(bn), (groups * softmax[:, None, None]).reshape(x.shape))
      p = params(pyramid.whole)
      hidden = np.maximum(x.mean(axis=(1, 2)) @ p[("fc1", "kernel")], 0)
      gate = 1 / (1 + np.exp(-(hidden @ p[("fc2", "kernel")])))
      np.testing.assert_allclose(maps.attention[i][-1], gate, atol=1e-5)
      # The recomputed pyramid gives the model's stage output.
      np.testing.assert_allclose(out["stages"][i], x * gate[:, None, None], atol=1e-4, rtol=1e-4)
  after = nnx.to_flat_state(nnx.state(model))
  assert [k for k, _ in before] == [k for k, _ in after]  # the calls added no variables


@pytest.mark.slow
def test_spatial_maps_are_the_stripes_gates(tmp_path):
  """APNet-S level 2: each stripe attended on its own, stacked; then the whole map."""
  _, model = small_model("spatial", 2, seed=2)
  images = random_images(2, seed=1)
  maps = visualize.attention_maps(model, images)
  assert maps.parts == (2, 1) and maps.kind == "spatial"
  pyramid = model.pyramids[0]

  @jax.jit
  def stem_gates_by_hand(x):
    stage = model.backbone.stage(0, x)
    half, rga = stage.shape[1] // 2, pyramid.splits[0].rga
    stripes = jnp.concatenate([rga.weights(stage[:, :half]), rga.weights(stage[:, half:])], 1)
    return stripes, pyramid.whole.rga.weights(pyramid.split_bns[0](stage * stripes))

  stripes, whole = stem_gates_by_hand(augment.normalize(jnp.asarray(images)))
  np.testing.assert_allclose(maps.attention[0][0], stripes[..., 0], atol=1e-5)
  np.testing.assert_allclose(maps.attention[0][1], whole[..., 0], atol=1e-4)  # f32 rounding
  for stage_maps, (h, w) in zip(maps.attention, stage_sizes((128, 64), 1)):
    for gate in stage_maps:
      assert gate.shape == (2, h, w) and 0 <= gate.min() and gate.max() <= 1
  visualize.plot_attention(maps, str(tmp_path / "spatial.png"))
  with Image.open(tmp_path / "spatial.png") as png:
    assert_grid_size(png, 2, maps.parts, spatial=True)


def assert_grid_size(png, num_images, parts, spatial):
  """plot_attention's figure: 6 columns, one block of rows per image, 80 dpi."""
  ratios = ([2.0] + [2.0 if spatial else 0.4] * len(parts)) * num_images
  expected = 0.95 * 6 * 80, 0.95 * sum(ratios) * 80
  assert np.abs(np.subtract(png.size, expected)).max() <= 1, (png.size, expected)


def test_plot_writes_the_grid(channel, tmp_path):
  _, _, _, maps = channel
  path = tmp_path / "attention.png"
  visualize.plot_attention(maps, str(path), query_labels=["a", "b", "c"])
  with Image.open(path) as png:
    assert png.format == "PNG"
    assert_grid_size(png, 3, maps.parts, spatial=False)


def test_attention_maps_refuses_bad_input(channel):
  _, model, images, _ = channel
  with pytest.raises(ValueError, match=r"attention_maps.*uint8.*float32"):
    visualize.attention_maps(model, images.astype(np.float32))
  with pytest.raises(ValueError, match=r"attention_maps.*N = 0"):
    visualize.attention_maps(model, images[:0])
  with pytest.raises(ValueError, match=r"labels.*\[-1, 8\).*\[0, 8, 1\]"):
    visualize.attention_maps(model, images, labels=[0, 8, 1])


@pytest.fixture(scope="module")
def workdir_config(channel, tiny_data_dir, tmp_path_factory):
  """A tiny synthetic config whose model is an official-layout checkpoint of `channel`."""
  root = tmp_path_factory.mktemp("visualize")
  config, model, _, _ = channel
  config = config.copy_and_resolve_references()
  config.data.data_dir = tiny_data_dir
  save_torch_weights(model, root / "apnet.pth")
  config.eval.torch_checkpoint = str(root / "apnet.pth")
  return root, config


def test_visualize_workdir_writes_attention_png(workdir_config, capsys):
  root, config = workdir_config
  config = config.copy_and_resolve_references()
  config.visualize.num_queries = 3  # as many images as `channel`'s: no new compilation
  path = visualize.visualize_workdir(config, str(root / "run"))
  assert path == str(root / "run" / "attention.png")
  out, err = capsys.readouterr()
  assert f"attention maps of 3 queries -> {path}" in out
  assert re.search(r"attention maps: 100%\|[^|]*\| 3/3 \[[^]]*img", err), err
  with Image.open(path) as png:
    assert_grid_size(png, 3, (4, 2, 1), spatial=False)


def test_visualize_workdir_errors_name_the_problem(workdir_config, tmp_path):
  _, config = workdir_config
  config = config.copy_and_resolve_references()
  config.visualize.num_queries = 0
  with pytest.raises(ValueError, match=r"visualize\.num_queries=0"):
    visualize.visualize_workdir(config, str(tmp_path / "run"))
  config.visualize.num_queries = 2
  config.eval.torch_checkpoint = ""
  empty = tmp_path / "empty_run"
  with pytest.raises(FileNotFoundError, match=re.escape(f"{empty}/checkpoints")):
    visualize.visualize_workdir(config, str(empty))
  assert not (empty / "attention.png").exists()


@pytest.mark.slow
def test_command_line_visualize_mode():
  base = [sys.executable, "run.py", "--config", "configs/synthetic.py:tiny", "--mode", "visualize"]
  result = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0 and "--mode visualize needs --workdir" in result.stderr
  result = subprocess.run(
    base + ["--workdir", "/nonexistent/run", "--config.visualize.num_queries=-1"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode != 0
  assert "visualize.num_queries=-1: a whole number >= 1" in result.stderr


def test_compare_runs_puts_the_paper_beside(tmp_path):
  runs = []
  for name, dataset, r1, mean_ap in (
    ("market", "market1501", 95.1, 88.0),
    ("demo", "synthetic_reid/small", 95.8, 86.1),
  ):
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(
      json.dumps(
        {
          "R1": r1,
          "mAP": mean_ap,
          "protocol": {"dataset": dataset, "distractors": "kept (standard)"},
        }
      )
    )
    runs.append(str(tmp_path / name))
  lines = visualize.compare_runs([runs[0], runs[1] + "/results.json"]).splitlines()
  assert lines[0].split() == [
    "run",
    "dataset",
    "distractors",
    "R1",
    "mAP",
    "paper",
    "R1",
    "paper",
    "mAP",
  ]
  assert lines[1].split() == ["market", "market1501", "kept", "95.1", "88.0", "96.2", "90.5"]
  assert lines[2].split() == ["demo", "synthetic_reid/small", "kept", "95.8", "86.1", "-", "-"]
  with pytest.raises(FileNotFoundError) as error:
    visualize.compare_runs([str(tmp_path / "nowhere")])
  assert "results.json" in str(error.value) and str(tmp_path / "nowhere") in str(error.value)
  (tmp_path / "bad.json").write_text(json.dumps({"R1": 1.0}))
  with pytest.raises(ValueError, match=r"bad\.json.*'protocol'"):
    visualize.compare_runs([str(tmp_path / "bad.json")])
