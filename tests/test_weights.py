"""PyTorch weights: reading .pth without PyTorch, layouts, aliases, errors, writing."""

import collections
import io
import json
import pathlib
import pickle
import pickletools
import re
import zipfile

import jax
import numpy as np
import pytest
from flax import nnx

from apnet_jax import build_model, load_torch_weights, save_torch_weights, torch_io, weights
from configs.common import get_config

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
TORCH = FIXTURES / "torch"


def small_model(level=2, kind="channel", seed=0, num_classes=5):
  config = get_config().model
  config.depth, config.width, config.input_size = 50, 0.25, (64, 32)
  config.level, config.kind = level, kind
  return build_model(config, num_classes, rngs=nnx.Rngs(seed))


def assert_same_state(a, b):
  fa, fb = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, va), (_, vb) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]), err_msg=str(path))


# --- files written by PyTorch itself (fixtures/torch/make_fixtures.py) ---------


@pytest.mark.parametrize("name", ["tensors.pth", "tensors_legacy.pth"])
def test_reads_pytorch_files_without_pytorch(name):
  expected = np.load(TORCH / "tensors_expected.npz")
  checkpoint = torch_io.read_checkpoint(TORCH / name)
  assert checkpoint["epoch"] == 3
  state = checkpoint["state_dict"]
  assert sorted(k[len("module.") :] for k in state) == sorted(expected.files)
  for key, value in state.items():
    want = expected[key[len("module.") :]]
    assert value.dtype == want.dtype and value.shape == want.shape, key
    np.testing.assert_array_equal(value, want, err_msg=key)


def _pickle_outline(data: bytes):
  """The globals and persistent ids of a pickle, in order: its structure."""
  outline = []
  for op, arg, _ in pickletools.genops(data):
    if op.name in ("GLOBAL", "STACK_GLOBAL", "BINPERSID", "BINUNICODE", "SHORT_BINUNICODE"):
      outline.append((op.name, arg))
  return outline


def test_written_pth_has_the_structure_pytorch_writes(tmp_path):
  """Our writer against torch.save's own output for the same tensors."""
  with zipfile.ZipFile(TORCH / "tensors.pth") as zf:
    torch_pickle = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
  ours_path = tmp_path / "ours.pth"
  torch_io.write_pth(
    {"module.conv.weight": np.arange(24, dtype=np.float32).reshape(4, 6) / 7}, ours_path
  )
  with zipfile.ZipFile(ours_path) as zf:
    ours_pickle = zf.read("archive/data.pkl")
    assert zf.read("archive/version").strip() == b"3"

  def globals_(outline):
    return [a for op, a in outline if op == "GLOBAL"]

  torch_globals = set(globals_(_pickle_outline(torch_pickle)))
  assert set(globals_(_pickle_outline(ours_pickle))) <= torch_globals
  assert {"torch._utils _rebuild_tensor_v2", "torch FloatStorage"} <= torch_globals
  # Both describe a storage as ('storage', type, key, 'cpu', numel).
  ours_ops = [a for op, a in _pickle_outline(ours_pickle) if op != "GLOBAL"]
  assert ours_ops[:3] == ["module.conv.weight", "storage", "0"]


def test_pth_round_trip_keeps_values_and_dtypes(tmp_path):
  state = collections.OrderedDict(
    a=np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
    b=np.arange(5, dtype=np.int64),
    c=np.array(2.5),
    d=np.array([True, False]),
  )
  torch_io.write_pth(state, tmp_path / "x.pth")
  back = torch_io.read_checkpoint(tmp_path / "x.pth")
  assert list(back) == list(state)
  for key in state:
    assert back[key].dtype == state[key].dtype
    np.testing.assert_array_equal(back[key], state[key])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_unreadable_file_is_named(tmp_path, content):
  path = tmp_path / "weights.pth"
  path.write_bytes(content)
  with pytest.raises(torch_io.CheckpointFormatError, match="weights.pth"):
    torch_io.read_checkpoint(path)


def test_truncated_legacy_file_is_named(tmp_path):
  data = (TORCH / "tensors_legacy.pth").read_bytes()
  path = tmp_path / "cut.pth"
  path.write_bytes(data[:-40])
  with pytest.raises(torch_io.CheckpointFormatError, match="cut.pth.*truncated"):
    torch_io.read_checkpoint(path)


def test_foreign_code_in_a_pickle_is_refused(tmp_path):
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"x": io.StringIO("boom")}))
  with pytest.raises(torch_io.CheckpointFormatError, match=r"evil.pth.*_io.StringIO"):
    torch_io.read_checkpoint(path)


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    load_torch_weights(small_model(), tmp_path / "nowhere.pth")


# --- layouts ---------------------------------------------------------------


def test_official_key_set_equals_the_official_model():
  keys = json.loads((FIXTURES / "golden" / "apnet_official_keys.json").read_text())
  for level in (0, 1, 2):
    config = get_config().model
    config.level = level
    model = nnx.eval_shape(lambda config=config: build_model(config, 10, rngs=nnx.Rngs(0)))
    entries = weights._entries(model)
    shapes = {k: list(weights._torch_shape(e.variable.shape, e.kind)) for k, e in entries.items()}
    official = keys[f"level{level}"]
    canonical = {
      k: v
      for k, v in official.items()
      if keys[f"level{level}_canonical"][k] == k and "num_batches" not in k
    }
    assert shapes == canonical


@pytest.mark.slow
def test_save_then_load_is_exact(tmp_path):
  model = small_model(level=3, seed=1)
  model.train()
  model(jax.random.normal(jax.random.key(0), (4, 64, 32, 3)))  # non-trivial running stats
  save_torch_weights(model, tmp_path / "apnet.pth")
  state = torch_io.read_checkpoint(tmp_path / "apnet.pth")
  assert "att_ss1.fc1.weight" in state and "BN_1.bottleneck2.weight" in state  # level 3 names
  assert state["att_ss1.fc1.weight"].ndim == 4  # 1x1 Conv2d as in PyTorch
  np.testing.assert_array_equal(
    state["base_2.0.0.conv1.weight"], state["base.layer1.0.conv1.weight"]
  )
  other = small_model(level=3, seed=2)
  report = load_torch_weights(other, tmp_path / "apnet.pth")
  assert report.layout == "official" and not report.missing and not report.unexpected
  assert_same_state(model, other)


def test_spatial_variant_round_trips(tmp_path):
  model = small_model(level=2, kind="spatial", seed=1)
  save_torch_weights(model, tmp_path / "apnet_s.pth")
  other = small_model(level=2, kind="spatial", seed=2)
  report = load_torch_weights(other, tmp_path / "apnet_s.pth")
  assert not report.missing and not report.unexpected
  assert_same_state(model, other)


def test_nested_dataparallel_safetensors_and_npz_sources(tmp_path):
  from safetensors.numpy import save_file

  model = small_model(seed=1)
  state = weights.torch_state_dict(model)
  nested = {"epoch": 7, "state_dict": {"module." + k: v for k, v in state.items()}}
  sources = [nested]
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp_path / "w.safetensors")
  np.savez(tmp_path / "w.npz", **state)
  sources += [tmp_path / "w.safetensors", tmp_path / "w.npz"]
  for source in sources:
    other = small_model(seed=2)
    report = load_torch_weights(other, source)
    assert not report.missing and not report.unexpected, source
    assert_same_state(model, other)


def _safetensors_file(path, tensors):
  """A .safetensors file written by hand from its specification: an 8-byte
  little-endian header length, the JSON header, then the tensors' bytes."""
  header, data = {}, b""
  for name, (dtype, shape, raw) in tensors.items():
    header[name] = {
      "dtype": dtype,
      "shape": shape,
      "data_offsets": [len(data), len(data) + len(raw)],
    }
    data += raw
  text = json.dumps(header).encode()
  path.write_bytes(len(text).to_bytes(8, "little") + text + data)
  return path


def test_safetensors_files_are_read_or_named(tmp_path):
  weight = np.arange(6, dtype="<f4").reshape(2, 3)
  good = _safetensors_file(tmp_path / "good.safetensors", {"w": ("F32", [2, 3], weight.tobytes())})
  np.testing.assert_array_equal(torch_io.read_checkpoint(good)["w"], weight)
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(good.read_bytes()[:-5])
  with pytest.raises(torch_io.CheckpointFormatError, match="cut.safetensors"):
    torch_io.read_checkpoint(cut)
  # bfloat16 1.0 and -2.0: the top halves of the float32 bit patterns.
  bf16 = _safetensors_file(
    tmp_path / "half.safetensors", {"w": ("BF16", [2], bytes([0x80, 0x3F, 0x00, 0xC0]))}
  )
  np.testing.assert_array_equal(torch_io.read_checkpoint(bf16)["w"].astype(np.float32), [1, -2])
  odd = _safetensors_file(tmp_path / "odd.safetensors", {"w": ("X9", [1], b"\0")})
  with pytest.raises(torch_io.CheckpointFormatError, match="odd.safetensors"):
    torch_io.read_checkpoint(odd)


def test_torchvision_layout_fills_the_backbone():
  source_model = small_model(level=0, seed=1)
  official = weights.torch_state_dict(source_model)
  torchvision = {k[len("base.") :]: v for k, v in official.items() if k.startswith("base.")}
  torchvision["fc.weight"] = np.zeros((1000, 512), np.float32)
  torchvision["fc.bias"] = np.zeros((1000,), np.float32)
  model = small_model(level=2, seed=2)
  head_before = np.asarray(model.classifier.kernel[...]).copy()
  report = load_torch_weights(model, torchvision)
  assert report.layout == "torchvision"
  assert "layer4.2.conv3.weight" in report.loaded and "conv1.weight" in report.loaded
  assert not report.unexpected  # fc.* is ignored, not unexpected
  assert report.missing == []  # the backbone is complete; the head is not its business
  np.testing.assert_array_equal(
    model.backbone.layer4[2].conv3.kernel[...], source_model.backbone.layer4[2].conv3.kernel[...]
  )
  np.testing.assert_array_equal(model.classifier.kernel[...], head_before)


def test_wrong_shapes_are_all_named_and_nothing_is_loaded():
  model = small_model(seed=1)
  state = {k: v for k, v in weights.torch_state_dict(model).items() if not k.startswith("base_")}
  state["base.layer2.0.conv2.weight"] = np.zeros((3, 3, 3, 3), np.float32)
  state["classifier.weight"] = np.zeros((9, 512), np.float32)
  target = small_model(seed=2)
  before = np.asarray(target.backbone.conv1.kernel[...]).copy()
  with pytest.raises(ValueError) as error:
    load_torch_weights(target, state)
  message = str(error.value)
  assert "base.layer2.0.conv2.weight: expected (32, 32, 3, 3), got (3, 3, 3, 3)" in message
  assert "classifier.weight: expected (5, 512), got (9, 512)" in message
  np.testing.assert_array_equal(target.backbone.conv1.kernel[...], before)


def test_disagreeing_alias_is_named():
  state = weights.torch_state_dict(small_model(seed=1))
  state["base_3.0.1.bn2.running_mean"] = state["base_3.0.1.bn2.running_mean"] + 1
  with pytest.raises(
    ValueError,
    match=r"base_3\.0\.1\.bn2\.running_mean.*"
    r"base\.layer2\.1\.bn2\.running_mean",
  ):
    load_torch_weights(small_model(seed=2), state)


def test_layout_and_alias_errors_name_the_file(tmp_path):
  state = weights.torch_state_dict(small_model(seed=1))
  state["base_3.0.1.bn2.running_mean"] = state["base_3.0.1.bn2.running_mean"] + 1
  path = tmp_path / "official.pth"
  torch_io.write_pth(state, path)
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*base_3\.0\.1\.bn2"):
    load_torch_weights(small_model(seed=2), path)
  torch_io.write_pth({"encoder.weight": np.zeros(3, np.float32)}, path)
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*encoder\.weight"):
    load_torch_weights(small_model(), path)


def test_aliases_alone_are_enough():
  model = small_model(seed=1)
  state = {k: v for k, v in weights.torch_state_dict(model).items() if not k.startswith("base.")}
  other = small_model(seed=2)
  report = load_torch_weights(other, state)
  assert not report.missing
  assert_same_state(model, other)


def test_missing_and_unexpected_are_reported():
  state = weights.torch_state_dict(small_model(level=1, seed=1))
  report = load_torch_weights(small_model(level=2, seed=2), state)
  assert "att_s1.fc1.weight" in report.missing and "BN5.bottleneck2.weight" in report.missing
  state["extra.weight"] = np.zeros(3)
  assert load_torch_weights(small_model(level=1), state).unexpected == ["extra.weight"]


def test_unknown_layout_is_refused():
  with pytest.raises(ValueError, match=r"conv1\.weight.*encoder\.weight"):
    load_torch_weights(small_model(), {"encoder.weight": np.zeros(3)})


def test_nan_weights_are_named_as_such_not_as_disagreeing_aliases(tmp_path):
  state = weights.torch_state_dict(small_model(seed=1))
  # A diverged run: NaN in a tensor and, as the official code saves it, in its alias too.
  for key in ("base.layer2.1.bn2.running_mean", "base_3.0.1.bn2.running_mean"):
    state[key] = np.full_like(state[key], np.nan)
  path = tmp_path / "diverged.pth"
  torch_io.write_pth(state, path)
  with pytest.raises(
    ValueError,
    match=rf"^{re.escape(str(path))}: NaN.*"
    r"\(base\.layer2\.1\.bn2\.running_mean\)",
  ):
    load_torch_weights(small_model(seed=2), path)
