"""Cross-domain evaluation (eval.datasets), joint training (data.name with '+') and query expansion.

The second dataset is a `reid_folder` one written here, Market-style names in
train/, query/ and gallery/; the first is `synthetic_reid:tiny`.
"""

import json
import os
import pathlib
import shutil

import data_fixtures as fx
import numpy as np
import pytest
from test_train import saved_state

from apnet_jax import checkpointing, evaluate, restore, train
from apnet_jax.evaluation import evaluator as evaluator_lib
from configs.synthetic import get_config

FOLDER = "reid_folder:mine"
FOLDER_TRAIN_IDS = 4
METRICS = ("R1", "R5", "R10", "mAP", "mINP", "cmc", "num_valid_queries", "protocol")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A data_dir holding synthetic_reid:tiny and reid_folder:mine, both prepared."""
  root = tmp_path_factory.mktemp("cross")
  mine = root / "mine"
  names = [
    f"train/{pid:04d}_c{cam}_{n}.jpg"
    for pid in range(1, FOLDER_TRAIN_IDS + 1)
    for cam in (1, 2)
    for n in "ab"
  ]
  names += [f"query/{pid:04d}_c1_q.jpg" for pid in (11, 12, 13)]
  names += [f"gallery/{pid:04d}_c2_{n}.jpg" for pid in (11, 12, 13, 14) for n in "ab"]
  for seed, name in enumerate(names):
    (mine / name).parent.mkdir(parents=True, exist_ok=True)
    (mine / name).write_bytes(fx.jpeg_bytes(seed, size=(64, 32)))
  fx.build("synthetic_reid", None, root / "data", config="tiny")
  fx.build("reid_folder", mine, root / "data", config="mine")
  return str(root / "data")


def tiny_config(data_dir, **overrides):
  config = get_config("tiny")
  config.data.data_dir = data_dir
  config.train.max_steps = 2
  config.train.log_every_steps = 1
  for dotted, value in overrides.items():
    section, key = dotted.split(".")
    setattr(config[section], key, value)
  return config


@pytest.fixture(scope="module")
def cross_run(data_dir, tmp_path_factory):
  """2 steps on synthetic_reid:tiny, evaluated on the folder and on itself: (workdir, results)."""
  workdir = str(tmp_path_factory.mktemp("cross_run"))
  # Evaluated in the loop at epoch 1 (step 2, the last), so its checkpoint carries an mAP.
  config = tiny_config(
    data_dir, **{"eval.datasets": f"{FOLDER},synthetic_reid:tiny", "train.eval_epochs": (1,)}
  )
  return workdir, config, train.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_each_entry_scores_as_it_would_as_the_main_dataset(data_dir, cross_run):
  workdir, config, results = cross_run
  assert list(results["datasets"]) == [FOLDER, "synthetic_reid:tiny"]  # as listed
  assert results["datasets"][FOLDER]["protocol"]["dataset"] == "reid_folder/mine"
  assert (
    results["datasets"][FOLDER]["protocol"]["num_query"],
    results["datasets"][FOLDER]["protocol"]["num_gallery"],
  ) == (3, 8)
  model, _ = restore.restore_model(config, workdir)
  for entry, name, builder_config in [
    ("synthetic_reid:tiny", "synthetic_reid", "tiny"),
    (FOLDER, "reid_folder", "mine"),
  ]:
    alone = tiny_config(data_dir, **{"data.name": name, "data.config": builder_config})
    evaluator = evaluator_lib.ReidEvaluator(alone, evaluator_lib.open_eval_datasets(alone))
    separate = evaluator.run(model).results
    assert list(separate["datasets"]) == [entry]
    for key in METRICS:
      assert results["datasets"][entry][key] == separate[key], (entry, key)
  # The top level is the first entry's, for tools that read one dataset.
  assert results["mAP"] == results["datasets"][FOLDER]["mAP"]


@pytest.mark.slow
def test_the_report_has_a_row_and_pictures_per_dataset(cross_run):
  workdir, _, results = cross_run
  table = evaluator_lib.format_results(results).splitlines()
  assert [line.split()[0] for line in table] == ["dataset", FOLDER, "synthetic_reid:tiny"]
  assert float(table[1].split()[4]) == pytest.approx(results["datasets"][FOLDER]["mAP"], abs=0.006)
  with open(os.path.join(workdir, "results.json")) as f:
    assert set(json.load(f)["datasets"]) == {"synthetic_reid:tiny", FOLDER}
  for picture in ("cmc", "ranked_list"):
    for entry in ("synthetic_reid-tiny", "reid_folder-mine"):
      assert os.path.isfile(os.path.join(workdir, f"{picture}_{entry}.png"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    evals = [json.loads(line) for line in f if '"eval"' in line]
  # Tagged '<entry>/mAP', the entry's ':' written '-' as TensorBoard's tags allow.
  assert evals[-1]["reid_folder-mine/mAP"] == pytest.approx(results["datasets"][FOLDER]["mAP"])
  # The best checkpoint is chosen on the training dataset, not on another domain's test set,
  # though that one is listed first.
  manager = checkpointing.make_manager(workdir, keep_best=1, read_only=True)
  step = max(manager.all_steps())
  assert manager.metrics(step)["mAP"] == pytest.approx(
    results["datasets"]["synthetic_reid:tiny"]["mAP"]
  )
  manager.close()


@pytest.mark.slow
def test_eval_mode_takes_eval_datasets_and_agrees_with_training(data_dir, cross_run, tmp_path):
  workdir, _, results = cross_run
  before = (pathlib.Path(workdir) / "results.json").read_bytes()
  # --mode eval on the folder alone, from the same checkpoint.
  config = tiny_config(data_dir, **{"eval.datasets": FOLDER})
  again = evaluate.evaluate_workdir(config, workdir)
  assert list(again["datasets"]) == [FOLDER]
  for key in METRICS:
    assert again["datasets"][FOLDER][key] == results["datasets"][FOLDER][key], key
  # Another list of datasets than training's: its report goes aside, the run's own stays.
  assert (pathlib.Path(workdir) / "results.json").read_bytes() == before
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    assert list(json.load(f)["datasets"]) == [FOLDER]


def test_one_dataset_listed_twice_is_refused_naming_both(data_dir):
  # The builder's default config written out and left out: one prepared dataset, two entries.
  fx.build("reid_folder", pathlib.Path(data_dir).parent / "mine", data_dir)
  config = tiny_config(data_dir, **{"eval.datasets": "reid_folder,reid_folder:default"})
  with pytest.raises(ValueError) as refusal:
    evaluator_lib.open_eval_datasets(config)
  message = str(refusal.value)
  assert "eval.datasets" in message and "'reid_folder'" in message
  assert "'reid_folder:default'" in message


def test_a_dataset_that_needs_a_download_is_refused_before_training(data_dir, tmp_path):
  config = tiny_config(data_dir, **{"eval.datasets": "synthetic_reid:tiny,dukemtmc_reid"})
  workdir = tmp_path / "run"
  with pytest.raises(FileNotFoundError) as refusal:
    train.train_and_evaluate(config, str(workdir))
  message = str(refusal.value)
  assert "eval.datasets" in message and "dukemtmc_reid" in message
  assert "--mode prepare" in message and "--config.data.name=dukemtmc_reid" in message
  assert data_dir in message
  assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()


def test_an_unknown_eval_dataset_is_a_config_error(data_dir, tmp_path):
  from apnet_jax import config_check

  config = tiny_config(data_dir, **{"eval.datasets": "synthetic_reid:tiny,market"})
  with pytest.raises(config_check.ConfigError) as refusal:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert [key for key, _, _ in refusal.value.problems] == ["eval.datasets"]
  assert "'market'" in str(refusal.value)


@pytest.mark.slow
def test_query_expansion_is_its_own_row_and_k_1_changes_nothing(data_dir, cross_run, tmp_path):
  workdir = str(tmp_path / "copy")  # --mode eval on the training's datasets rewrites its report
  shutil.copytree(cross_run[0], workdir)
  config = tiny_config(data_dir, **{"eval.query_expansion": True, "eval.query_expansion_k": 1})
  results = evaluate.evaluate_workdir(config, workdir)
  entry = results["datasets"]["synthetic_reid:tiny"]
  # With k=1 every feature's only neighbour is itself: the ranking is the plain one, up to
  # the order of near-ties (a 2-step model's features are close) that rounding can flip.
  for key in ("R1", "R5", "R10", "mAP", "mINP"):
    assert entry["query_expansion"][key] == pytest.approx(entry[key], abs=0.1), key
  table = evaluator_lib.format_results(results).splitlines()
  assert [line.split()[0] for line in table] == ["dataset", "synthetic_reid:tiny", "query"]

  config.eval.query_expansion_k = 5
  expanded = evaluate.evaluate_workdir(config, workdir)["datasets"]["synthetic_reid:tiny"]
  assert expanded["query_expansion"]["mAP"] != pytest.approx(expanded["mAP"], abs=1e-6)


# --- Joint training -------------------------------------------------------------------

JOINT = f"synthetic_reid:tiny+{FOLDER}"


@pytest.fixture(scope="module")
def joint_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("joint_run"))
  # data.config keeps configs/synthetic.py's 'tiny': the entries carry their own configs.
  config = tiny_config(data_dir, **{"data.name": JOINT})
  return workdir, config, train.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_joint_training_covers_both_datasets_and_evaluates_each(joint_run):
  workdir, _, results = joint_run
  manager = checkpointing.make_manager(workdir, keep_best=1, read_only=True)
  meta = checkpointing.restore_meta(manager, 2)
  manager.close()
  assert meta["num_classes"] == 8 + FOLDER_TRAIN_IDS  # synthetic_reid:tiny has 8 train ids
  state = saved_state(workdir, 2)
  classifier = [v for path, v in _flat(state["params"]) if "classifier" in path]
  assert classifier and classifier[0].shape[-1] == 8 + FOLDER_TRAIN_IDS
  assert list(results["datasets"]) == ["synthetic_reid:tiny", FOLDER]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["data"]["name"] == JOINT  # the workdir records the constituents


@pytest.mark.slow
def test_joint_training_resumes_bitwise(data_dir, joint_run, tmp_path):
  workdir, config, _ = joint_run
  half = str(tmp_path / "half")
  config.train.max_steps = 1
  train.train_and_evaluate(config, half)
  config.train.max_steps = 2
  train.train_and_evaluate(config, half)
  straight, resumed = saved_state(workdir, 2), saved_state(half, 2)
  for (path, a), (_, b) in zip(_flat(straight), _flat(resumed)):
    np.testing.assert_array_equal(a, b, err_msg=path)


@pytest.mark.slow
def test_resuming_with_another_set_of_datasets_is_refused_by_name(data_dir, joint_run, tmp_path):
  workdir, _, _ = joint_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  config = tiny_config(
    data_dir, **{"data.name": "synthetic_reid", "data.config": "tiny", "train.max_steps": 4}
  )
  with pytest.raises(ValueError) as refusal:
    train.train_and_evaluate(config, copy)
  assert "data.name" in str(refusal.value) and JOINT in str(refusal.value)


@pytest.mark.slow
def test_joint_training_resumes_with_its_datasets_spelled_another_way(
  data_dir, joint_run, tmp_path
):
  workdir, _, _ = joint_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  respelled = " + ".join(JOINT.split("+"))  # spaces around '+', and data.config unused
  config = tiny_config(
    data_dir, **{"data.name": respelled, "data.config": "small", "train.max_steps": 3}
  )
  results = train.train_and_evaluate(config, copy)
  assert list(results["datasets"]) == ["synthetic_reid:tiny", FOLDER]
  with open(os.path.join(copy, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]  # continued, not anew
  assert not os.path.exists(os.path.join(copy, "config_changes.jsonl"))  # nothing changed


def test_an_evaluated_dataset_is_a_training_one_however_spelled():
  config = get_config("tiny")
  config.data.name, config.data.config = "msmt17", ""
  assert evaluator_lib.is_trained_on(config, ["msmt17:train"])  # TFDS's default for msmt17
  assert not evaluator_lib.is_trained_on(config, ["msmt17:trainval"])
  config.data.name = "market1501 + msmt17"
  assert evaluator_lib.is_trained_on(config, ["msmt17:train", "market1501"])
  assert not evaluator_lib.is_trained_on(config, ["dukemtmc_reid"])


def _flat(tree):
  import jax

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf in leaves]


def test_prepare_mode_refuses_a_joined_name_naming_each_dataset(tmp_path):
  from apnet_jax.data import opening

  config = tiny_config(str(tmp_path), **{"data.name": JOINT, "data.config": ""})
  with pytest.raises(ValueError) as refusal:
    opening.prepare_data(config.data)
  message = str(refusal.value)
  assert "data.name" in message and JOINT in message
  assert "--config.data.name=reid_folder --config.data.config=mine" in message
  assert not any(tmp_path.iterdir())  # nothing prepared


def test_the_logged_scalars_leave_out_ranks_past_eval_max_rank():
  # eval.max_rank=5: the CMC has no rank 10, so neither has the summary nor the log.
  entry = {"R1": 40.0, "R5": 60.0, "mAP": 30.0, "mINP": 10.0}
  report = evaluator_lib.Report(dict(entry, datasets={"market1501": entry}), features={})
  assert report.scalars() == entry
  two = evaluator_lib.Report(dict(entry, datasets={"a:x": entry, "b": entry}), features={})
  assert set(two.scalars()) == {f"{e}/{k}" for e in ("a-x", "b") for k in entry}


def test_a_dataset_with_nothing_to_score_is_refused_before_training(data_dir, tmp_path):
  # Each query's identity is in the gallery, but only under the query's own camera.
  folder = tmp_path / "samecam"
  names = [f"train/{pid:04d}_c{cam}_a.jpg" for pid in (1, 2) for cam in (1, 2)]
  names += ["query/0011_c1_q.jpg", "gallery/0011_c1_g.jpg", "gallery/0012_c2_g.jpg"]
  for seed, name in enumerate(names):
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(fx.jpeg_bytes(seed, size=(64, 32)))
  fx.build("reid_folder", folder, data_dir, config="samecam")
  config = tiny_config(data_dir, **{"eval.datasets": "synthetic_reid:tiny,reid_folder:samecam"})
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as refusal:
    train.train_and_evaluate(config, str(workdir))
  assert "eval.datasets" in str(refusal.value) and "reid_folder:samecam" in str(refusal.value)
  assert not (workdir / "checkpoints").exists()


def _report(*entries):
  """Results and pictures of a report on ``entries``, named as `ReidEvaluator.pictures` does."""
  scores = {"R1": 50.0, "R5": 60.0, "R10": 70.0, "mAP": 40.0, "mINP": 30.0}
  results = dict(scores, datasets={entry: dict(scores) for entry in entries})
  suffixes = [""] if len(entries) == 1 else ["_" + e.replace(":", "-") for e in entries]
  picture = np.zeros((4, 4, 3), np.uint8)
  return results, {name + s: picture for name in ("cmc", "ranked_list") for s in suffixes}


def test_a_report_leaves_no_picture_of_the_report_it_replaces(tmp_path, capsys):
  (tmp_path / "notes.png").write_bytes(b"the user's own")
  evaluator_lib.write_report(str(tmp_path), *_report(FOLDER, "synthetic_reid:tiny"))
  pngs = sorted(p.name for p in tmp_path.glob("*.png"))
  assert pngs == [
    "cmc_reid_folder-mine.png",
    "cmc_synthetic_reid-tiny.png",
    "notes.png",
    "ranked_list_reid_folder-mine.png",
    "ranked_list_synthetic_reid-tiny.png",
  ]
  # One dataset now (--mode eval without eval.datasets, say): the per-dataset pictures go.
  evaluator_lib.write_report(str(tmp_path), *_report("synthetic_reid:tiny"))
  assert sorted(p.name for p in tmp_path.glob("*.png")) == [
    "cmc.png",
    "notes.png",
    "ranked_list.png",
  ]
  # And back to two: the single-dataset pictures go; another file of the user's stays.
  evaluator_lib.write_report(str(tmp_path), *_report("synthetic_reid:tiny", FOLDER))
  assert "cmc.png" not in {p.name for p in tmp_path.glob("*.png")}
  assert (tmp_path / "notes.png").read_bytes() == b"the user's own"
  with open(tmp_path / "results.json") as f:
    assert list(json.load(f)["datasets"]) == ["synthetic_reid:tiny", FOLDER]
