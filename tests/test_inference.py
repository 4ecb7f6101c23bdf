"""Your own images (--mode extract) and the exported feature extractor (--mode export)."""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from apnet_jax import build_model, export, inference, save_torch_weights
from apnet_jax.evaluation.features import make_embed_fn
from configs.synthetic import get_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A config pointing at an official-layout checkpoint of a tiny model, and the model."""
  root = tmp_path_factory.mktemp("inference")
  config = get_config("tiny")
  config.eval.batch_size = 8
  model = build_model(config.model, 8, rngs=nnx.Rngs(5))
  model.train()
  model(jnp.asarray(np.random.default_rng(0).normal(size=(8, 64, 32, 3)), jnp.float32))
  model.eval()
  save_torch_weights(model, root / "apnet.pth")
  config.eval.torch_checkpoint = str(root / "apnet.pth")
  return root, config, model


def write_images(folder, count, seed):
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    sub = folder / f"cam{i % 2}"
    sub.mkdir(parents=True, exist_ok=True)
    path = sub / f"img_{i:02d}.png"
    Image.fromarray(rng.integers(0, 255, (40 + i, 20, 3), dtype=np.uint8)).save(path)
    paths.append(str(path))
  (folder / "notes.txt").write_text("not an image")
  return sorted(paths)


@pytest.mark.slow
def test_extract_writes_features_and_rankings(setup, tmp_path, capsys):
  root, config, model = setup
  queries = write_images(tmp_path / "mine", 5, seed=1)
  write_images(tmp_path / "gallery", 7, seed=2)
  # One query is also in the gallery: it must be its own nearest neighbour.
  Image.open(queries[3]).save(tmp_path / "gallery" / "copy_of_query3.png")
  config = config.copy_and_resolve_references()
  config.extract.input_dir = str(tmp_path / "mine")
  config.extract.gallery_dir = str(tmp_path / "gallery")
  result = inference.extract_folder(config, str(tmp_path / "run"))
  # A bar per folder on stderr, counting images (each folder fits one batch of 8).
  err = capsys.readouterr().err
  for desc, n in (("extract", 5), ("gallery", 8)):
    assert re.search(rf"{desc}: 100%\|[^|]*\| {n}/{n} \[[^]]*img", err), (desc, err)
  out = tmp_path / "run" / "extract"
  features = np.load(out / "features.npy")
  assert features.shape == (5, model.feature_dim) and result["num_gallery"] == 8
  assert (out / "files.txt").read_text().split() == queries
  # The features are the model's (image + flip) on the resized images.
  from apnet_jax.data import pipeline

  image = pipeline.decode_and_resize(
    open(queries[0], "rb").read(), height=64, width=32, filename=queries[0]
  )
  graphdef, state = nnx.split(model)
  expected = make_embed_fn(graphdef, "bn")(state, jnp.asarray(image[None]))
  np.testing.assert_allclose(features[0], expected[0], rtol=1e-4, atol=1e-4)
  ranking = json.loads((out / "ranking.json").read_text())
  assert list(ranking) == queries
  top = ranking[queries[3]]
  assert top[0]["file"].endswith("copy_of_query3.png") and top[0]["distance"] < 1e-3
  assert all(a["distance"] <= b["distance"] for a, b in zip(top, top[1:]))
  assert len(top) == min(config.extract.top, 8)  # the gallery has 8 images
  assert (out / "ranked_list.png").read_bytes()[:4] == b"\x89PNG"


def test_extract_bad_input_is_named(setup, tmp_path):
  _, config, _ = setup
  config = config.copy_and_resolve_references()
  with pytest.raises(ValueError, match=r"--mode extract.*extract\.input_dir"):
    inference.extract_folder(config, str(tmp_path / "run"))
  (tmp_path / "empty").mkdir()
  config.extract.input_dir = str(tmp_path / "empty")
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty"))):
    inference.extract_folder(config, str(tmp_path / "run"))
  config.extract.input_dir = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing"))):
    inference.extract_folder(config, str(tmp_path / "run"))
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "crop.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  config.extract.input_dir = str(tmp_path / "broken")
  with pytest.raises(ValueError, match="crop.jpg"):
    inference.extract_folder(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_exported_extractor_equals_the_model(setup, tmp_path):
  _, config, model = setup
  path = inference.export_workdir(config, str(tmp_path / "run"))
  extract = export.load(path)
  graphdef, state = nnx.split(model)
  embed = make_embed_fn(graphdef, "bn")
  rng = np.random.default_rng(3)
  for batch in (1, 5):  # any batch size
    images = rng.integers(0, 255, (batch, 64, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(
      extract(images), embed(state, jnp.asarray(images)), rtol=1e-5, atol=1e-5
    )
  with pytest.raises(ValueError) as error:
    extract(np.zeros((2, 32, 32, 3), np.uint8))
  for name in (str(path), "uint8", "(B, 64, 32, 3)", "(2, 32, 32, 3)"):
    assert name in str(error.value)
  bogus = tmp_path / "bogus.jaxexport"
  bogus.write_bytes(b"something else")
  with pytest.raises(ValueError, match=re.escape(str(bogus))):
    export.load(bogus)


def test_a_16_bit_png_is_described_by_its_content_not_as_white(setup, tmp_path):
  _, config, model = setup
  ramp = np.linspace(0, 65535, 64 * 32).round().astype(np.uint16).reshape(64, 32)
  Image.fromarray(ramp).save(tmp_path / "ramp16.png")
  Image.fromarray(np.full((64, 32, 3), 255, np.uint8)).save(tmp_path / "white.png")
  # Its feature is the model's on the 8-bit ramp (scaled with numpy here), not on white.
  eight_bit = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
  features = inference.folder_features(
    model, [str(tmp_path / "ramp16.png"), str(tmp_path / "white.png")], config, desc="extract"
  )
  graphdef, state = nnx.split(model)
  expected = make_embed_fn(graphdef, "bn")(
    state, jnp.asarray(np.repeat(eight_bit[None, ..., None], 3, axis=-1))
  )
  np.testing.assert_allclose(features[0], expected[0], rtol=1e-4, atol=1e-4)
  # White's feature lies well outside that tolerance (on main, the ramp decoded to white).
  assert np.abs(features[0] - features[1]).max() > 10 * 1e-4


def test_extract_replaces_the_previous_outputs_whole(setup, tmp_path):
  _, config, _ = setup
  config = config.copy_and_resolve_references()
  config.extract.input_dir = str(tmp_path / "mine")
  config.extract.gallery_dir = str(tmp_path / "gallery")
  write_images(tmp_path / "mine", 3, seed=1)
  write_images(tmp_path / "gallery", 4, seed=2)
  inference.extract_folder(config, str(tmp_path / "run"))
  config.extract.gallery_dir = ""  # the second run ranks nothing: no ranking may remain
  inference.extract_folder(config, str(tmp_path / "run"))
  assert sorted(p.name for p in (tmp_path / "run" / "extract").iterdir()) == [
    "features.npy",
    "files.txt",
  ]
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["extract"]


@pytest.mark.parametrize("key, value", [("num_pictures", 0), ("top", 0), ("top", -3)])
def test_extract_counts_below_one_are_refused_by_name(setup, tmp_path, key, value):
  _, config, _ = setup
  config = config.copy_and_resolve_references()
  config.extract.input_dir = str(tmp_path)
  config.extract[key] = value
  with pytest.raises(ValueError, match=rf"extract\.{key}={value}"):
    inference.extract_folder(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
